# -*- test-case-name: tests.unit.test_framing -*-
"""HTTP/1.1 message framing for the domain sockets (RFC 9112), stricter
than twisted.web's and with bounded work per read.

A guest's helper is hostile input, and two parsers disagreeing on where a
body ends is how requests get smuggled, so framing is decided here, once,
from the whole header section:

- **Request target** (§3.2): origin-form (``/path?query``) is served as is;
  absolute-form (``http://authority/path?query``) is served as its path and
  query, the authority ignored like ``Host`` (meaningless on a UNIX
  socket); asterisk-form is left to Twisted (``OPTIONS *``). Anything else,
  a byte that is not printable ASCII, or a path whose percent-decoding is
  not UTF-8 is refused.
- **Body length** (§6): ``Transfer-Encoding`` must be exactly ``chunked``
  (the only coding implemented, and necessarily the final one; §6.3 makes
  anything else a 400), never together with ``Content-Length``, never on
  HTTP/1.0; ``Content-Length`` is one run of digits, given once.
- **Chunked bodies** are decoded by :class:`ChunkedDecoder`, which hands a
  whole read's data over in one call and refuses a body of more than
  :data:`MAX_CHUNKS` chunks: Twisted's decoder costs ~6 µs per chunk, so a
  single 64 KiB read of one-byte chunks held the reactor for ~60 ms.

Every refusal is a :class:`FramingError` whose message never quotes the
request.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from urllib.parse import unquote_to_bytes

__all__ = ["FramingError", "origin_form", "body_length", "ChunkedDecoder", "MAX_CHUNKS"]

#: Chunks one body may have. Real clients send a few (swtpm and varstored
#: send none); every chunk is a step of Python code on the reactor.
MAX_CHUNKS = 256
#: Longest chunk-size line (extensions included) and trailer line.
MAX_LINE = 1024
#: Largest trailer section, in bytes.
MAX_TRAILER = 8192
#: Content-Length digits beyond this (after leading zeros) are over any limit.
_MAX_DIGITS = 18

_ABSOLUTE = re.compile(rb"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)(.*)", re.DOTALL)
# A chunk-size line: the size, then optional extensions (read and ignored).
_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?\r\n")
_DIGITS = re.compile(rb"[0-9]+")
_TOO_BIG = 1 << 62


class FramingError(ValueError):
    """The request cannot be framed; answer ``code`` and drop the
    connection. The message is safe to log."""

    def __init__(self, reason: str, code: int = 400) -> None:
        super().__init__(reason)
        self.code = code


def origin_form(target: bytes) -> bytes:
    """The request target to serve, in origin-form (or ``*``)."""
    if not target or any(c < 0x21 or c > 0x7E for c in target):
        raise FramingError("request target is not printable ASCII")
    if target == b"*":
        return target
    if not target.startswith(b"/"):
        match = _ABSOLUTE.fullmatch(target)
        if match is None or match.group(1).lower() not in (b"http", b"https"):
            raise FramingError("request target is neither origin-form nor absolute-form")
        target = match.group(3)
        if target.startswith(b"#"):
            raise FramingError("request target has a fragment")
        if not target.startswith(b"/"):
            target = b"/" + target  # "http://x" and "http://x?q" mean "/" (RFC 9112 §3.2.2)
    path = target.split(b"?", 1)[0]
    try:
        unquote_to_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        raise FramingError("request path is not UTF-8 once percent-decoded") from None
    return target


def body_length(version: bytes, lengths: Sequence[bytes], codings: Sequence[bytes]) -> int | None:
    """The body's length from the framing headers' raw values: an int
    (0 without either header), or None for a chunked body.

    :param lengths: every ``Content-Length`` field value, in order.
    :param codings: every ``Transfer-Encoding`` field value, in order.
    """
    if codings:
        if lengths:
            raise FramingError("both Content-Length and Transfer-Encoding")
        if version != b"HTTP/1.1":
            raise FramingError("Transfer-Encoding on HTTP/1.0")
        names = [name.strip(b" \t").lower() for value in codings for name in value.split(b",")]
        names = [name for name in names if name]
        if names != [b"chunked"]:
            raise FramingError("transfer coding other than a single final chunked")
        return None
    if not lengths:
        return 0
    if len(lengths) > 1:
        raise FramingError("more than one Content-Length")
    value = lengths[0]
    if not _DIGITS.fullmatch(value):
        raise FramingError("Content-Length is not a number")
    significant = value.lstrip(b"0")
    if len(significant) > _MAX_DIGITS:
        return _TOO_BIG  # over any limit: the caller answers 413
    return int(significant or b"0")


# Decoder states.
_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class ChunkedDecoder:
    """A chunked body decoder (RFC 9112 §7.1) with the interface of
    twisted.web's transfer decoders (``dataReceived``, ``noMoreData``).

    :param deliver: called with the body bytes decoded from each read (one
        call per read, not one per chunk).
    :param finish: called once with what follows the body (the next
        request's bytes) when the body is complete.
    :param max_body: a body longer than this is refused with 413 as soon as
        a chunk size says so.
    :param max_chunks: a body with more chunks is refused.
    """

    def __init__(self, deliver: Callable[[bytes], None], finish: Callable[[bytes], None],
                 *, max_body: int, max_chunks: int = MAX_CHUNKS) -> None:
        self._deliver = deliver
        self._finish = finish
        self._max_body = max_body
        self._max_chunks = max_chunks
        self._state = _SIZE
        self._partial = b""
        self._remaining = 0
        self._chunks = 0
        self._size = 0
        self._trailer = 0

    def dataReceived(self, data: bytes) -> None:
        if self._state == _DONE:
            raise RuntimeError("body already complete")
        if self._partial:
            data, self._partial = self._partial + data, b""
        out: list[bytes] = []
        pos, end = 0, len(data)
        while pos < end:
            state = self._state
            if state == _DATA:
                take = min(self._remaining, end - pos)
                out.append(data[pos:pos + take])
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = _DATA_END
            elif state == _DATA_END:
                if end - pos < 2:
                    if data[pos:] != b"\r":
                        raise FramingError("chunk data not followed by CRLF")
                    self._partial = data[pos:]
                    break
                if data[pos:pos + 2] != b"\r\n":
                    raise FramingError("chunk data not followed by CRLF")
                pos += 2
                self._state = _SIZE
            elif state == _SIZE and (match := _SIZE_LINE.match(data, pos, pos + MAX_LINE + 2)):
                pos = match.end()
                self._chunk_size(int(match.group(1), 16))
            else:
                eol = data.find(b"\r\n", pos, pos + MAX_LINE + 2)
                if eol < 0:
                    if end - pos > MAX_LINE:
                        raise FramingError("chunk line too long")
                    self._partial = data[pos:]
                    break
                line = data[pos:eol]
                pos = eol + 2
                if state == _SIZE:
                    raise FramingError("invalid chunk size line")
                if self._trailer_line(line):
                    if out:
                        self._deliver(b"".join(out))
                    self._finish(data[pos:])
                    return
        if out:
            self._deliver(b"".join(out))

    def _chunk_size(self, size: int) -> None:
        self._chunks += 1
        if self._chunks > self._max_chunks:
            raise FramingError(f"more than {self._max_chunks} chunks")
        self._size += size
        if self._size > self._max_body:
            raise FramingError("chunked body over the limit", code=413)
        if size:
            self._remaining = size
            self._state = _DATA
        else:
            self._state = _TRAILER

    def _trailer_line(self, line: bytes) -> bool:
        """Trailer fields are read and ignored; True at the section's end."""
        if not line:
            self._state = _DONE
            return True
        self._trailer += len(line) + 2
        if self._trailer > MAX_TRAILER:
            raise FramingError("trailer section too large")
        if b":" not in line:
            raise FramingError("malformed trailer field")
        return False

    def noMoreData(self) -> None:
        """The connection ended: fine only after the whole body."""
        if self._state != _DONE:
            raise FramingError("connection closed inside a chunked body")
