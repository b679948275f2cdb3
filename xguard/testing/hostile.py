"""Hostile input for the domain sockets, for the fuzz tests and the soak
runner (``bench/fuzz.py``): what a compromised guest's helper can send.

The generators take a :class:`Pick`, a source of choices, so one definition
serves both: :class:`HypothesisPick` draws through Hypothesis (examples
shrink to a minimal failing request), :class:`RandomPick` through a seeded
``random.Random`` (fast enough for 10^5 requests). A :class:`Probe` is the
raw bytes to send and what the generator knows about them.

VM content in generated bodies carries :data:`MARKER` (or its base64,
:data:`MARKER_B64`): neither may ever appear in the daemon's log. The
marker has a space and a ``#``, so it can never be a method name or a
request target, which are logged (truncated) by design.

:func:`exchange` sends a probe on a fresh connection and reads the answer;
:func:`status_codes` finds the status of every response in it.
"""

from __future__ import annotations

import base64
import random
import re
import socket
import time
from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

import attrs

__all__ = [
    "Pick", "RandomPick", "HypothesisPick", "Probe", "MARKER", "MARKER_B64",
    "swtpm_probe", "varstored_probe", "xml_body", "valid_call", "exchange", "status_codes",
    "Answer", "apply_edits",
]

T = TypeVar("T")

MARKER = "xg fuzz#secret"
MARKER_B64 = base64.b64encode(b"xg-fuzz-secret-state").decode()  # "eGctZnV6ei1z..."
KEYS = ("/tpm2-00.permall", "/tpm2-00.savestate", "/tpm2-00.volatilestate")
METHODS = ("session.login_with_password", "session.logout", "VM.get_by_uuid",
           "VM.get_NVRAM", "VM.set_NVRAM_EFI_variables", "VM.set_NVRAM_EFI_variables_v2",
           "VM.get_secureboot_certificates_state", "message.create")
ARITY = {"session.login_with_password": 4, "session.logout": 1, "VM.get_by_uuid": 2,
         "VM.get_NVRAM": 2, "VM.set_NVRAM_EFI_variables": 3,
         "VM.set_NVRAM_EFI_variables_v2": 4, "VM.get_secureboot_certificates_state": 2,
         "message.create": 6}
MiB = 1024 * 1024


class Pick(Protocol):
    """A source of choices."""

    def integer(self, low: int, high: int) -> int: ...

    def chance(self, p: float) -> bool: ...

    def choice(self, options: Sequence[T]) -> T: ...

    def binary(self, low: int, high: int) -> bytes: ...


class RandomPick:
    """Choices from a seeded ``random.Random``."""

    def __init__(self, seed: int | None = None) -> None:
        self.rng = random.Random(seed)

    def integer(self, low: int, high: int) -> int:
        return self.rng.randint(low, high)

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def choice(self, options: Sequence[T]) -> T:
        return options[self.rng.randrange(len(options))]

    def binary(self, low: int, high: int) -> bytes:
        return self.rng.randbytes(self.rng.randint(low, high))


class HypothesisPick:
    """Choices drawn through Hypothesis's ``data`` (``st.data()``)."""

    def __init__(self, data: Any) -> None:
        from hypothesis import strategies as st

        self._st = st
        self._data = data

    def integer(self, low: int, high: int) -> int:
        return int(self._data.draw(self._st.integers(low, high)))

    def chance(self, p: float) -> bool:
        # Hypothesis shrinks towards 0: let 0 mean the usual branch, so a
        # minimal example takes the common path wherever it can.
        value = int(self._data.draw(self._st.integers(0, 999)))
        return value < p * 1000 if p > 0.5 else value >= 1000 - p * 1000

    def choice(self, options: Sequence[T]) -> T:
        return options[self.integer(0, len(options) - 1)]

    def binary(self, low: int, high: int) -> bytes:
        size = self.integer(low, high)
        if size <= 64:
            return bytes(self._data.draw(self._st.binary(min_size=size, max_size=size)))
        # Long runs from a drawn seed: Hypothesis's buffer stays small.
        return random.Random(self.integer(0, 2**32)).randbytes(size)


@attrs.frozen
class Probe:
    """Bytes to send on one connection.

    :ivar methods: the HTTP method of each request, in order, as generated
        (a HEAD's answer has no body).
    :ivar answered: the generator expects an answer for every request (the
        framing is complete; refusals are answered at once too); false when
        the server may wait for more bytes.
    :ivar kind: a short name of how the probe was made, for the report.
    """

    data: bytes
    methods: tuple[bytes, ...]
    answered: bool
    kind: str


# -- pieces ---------------------------------------------------------------------

def _token(pick: Pick, alphabet: bytes, low: int, high: int) -> bytes:
    return bytes(pick.choice(alphabet) for _ in range(pick.integer(low, high)))


_PRINTABLE = bytes(range(0x21, 0x7F))
_TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _target(pick: Pick, swtpm: bool) -> bytes:
    path = pick.choice(KEYS).encode() if swtpm else b"/"
    variant = pick.integer(0, 16)
    if variant <= 6:
        return path
    if variant == 7:
        return path.replace(b".", pick.choice([b"%2E", b"%2e", b"%252E", b"%00.", b"%ff"]))
    if variant == 8:
        return pick.choice([b"//", b"/./", b"/../", b"x", b"", b"///"]) + path.lstrip(b"/")
    if variant == 9:
        scheme = pick.choice([b"http", b"HTTPS", b"ftp", b"http:", b""])
        return scheme + b"://" + _token(pick, _PRINTABLE.replace(b"/", b""), 0, 12) + path
    if variant == 10:
        return path + b"?" + _token(pick, _PRINTABLE, 0, 40)
    if variant == 11:
        return path + pick.choice([b"/", b"//", b"#f", b";x", b"%", b"%2F"])
    if variant == 12:
        return pick.choice([b"*", b"/" * pick.integer(1, 50), b"/" + b"a" * pick.integer(1, 20000)])
    if variant == 13:
        return b"/" + pick.binary(0, 30).replace(b" ", b"").replace(b"\r", b"").replace(b"\n", b"")
    if variant == 14:
        return b"/" + _token(pick, _PRINTABLE, 1, 60)
    if variant == 15:
        return b"/%" + pick.choice([b"ff", b"c3", b"e2%82", b"f0%9f%98", b"zz", b"", b"%"])
    return path.upper()


def _method(pick: Pick, usual: Sequence[bytes]) -> bytes:
    variant = pick.integer(0, 12)
    if variant <= 7:
        return pick.choice(usual)
    if variant == 8:
        return pick.choice([b"GET", b"PUT", b"DELETE", b"HEAD", b"POST", b"OPTIONS", b"PATCH",
                            b"TRACE", b"CONNECT"])
    if variant == 9:
        return pick.choice(usual).lower()
    if variant == 10:
        return _token(pick, _TCHAR, 1, 20)
    if variant == 11:
        return pick.binary(0, 8).replace(b" ", b"")
    return b"A" * pick.integer(1, 5000)


def _version(pick: Pick) -> bytes:
    if pick.chance(0.85):
        return b"HTTP/1.1"
    return pick.choice([b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1x", b"http/1.1", b"HTTP/1", b"",
                        b"HTTP/0.9", b"HTTP/1.1 HTTP/1.1"])


def _chunked(pick: Pick, body: bytes) -> tuple[bytes, bool]:
    """A chunked encoding of ``body``; sometimes malformed (then False)."""
    out, pos, good = [], 0, True
    while pos < len(body):
        size = min(len(body) - pos, pick.choice([1, 3, 100, 4096, 65536]))
        ext = pick.choice([b"", b"", b";a=b", b" ;x", b";" + b"e" * 2000])
        out.append(b"%x%s\r\n%s\r\n" % (size, ext, body[pos:pos + size]))
        pos += size
        if len(out) > 400:
            break
    last = b"0\r\n" + pick.choice([b"", b"", b"T: v\r\n", b"bad trailer\r\n"]) + b"\r\n"
    if pick.chance(0.1):
        out.insert(pick.integer(0, len(out)), pick.choice([b"zz\r\n", b"5\r\nab\r\n", b"\r\n",
                                                            b"-1\r\n", b"1\r\nxyz"]))
        good = False
    return b"".join(out) + last, good


def http_request(pick: Pick, method: bytes, target: bytes, body: bytes, *,
                 clean: bool = False) -> tuple[bytes, bool]:
    """One request around ``body``: a ``clean`` one as swtpm or varstored
    would frame it, else with hostile headers and framing; and whether the
    server will have all it needs to answer."""
    if clean:
        headers = [b"Host: localhost"] if pick.chance(0.7) else []
        if pick.chance(0.8):
            headers.append(b"Connection: close")
        headers.append(b"Content-Length: %d" % len(body))
        version = b"HTTP/1.1" if pick.chance(0.9) else b"HTTP/1.0"
        head = method + b" " + target + b" " + version + b"\r\n"
        return head + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body, True
    version = _version(pick)
    headers = []
    answered = True
    if pick.chance(0.6):
        headers.append(b"Host: " + pick.choice([b"localhost", b"x", b"", b"\xff\xfe", b"a:b:c"]))
    if pick.chance(0.85):
        headers.append(b"Connection: " + pick.choice([b"close", b"close", b"Close, x",
                                                       b"keep-alive"]))
    framing = pick.integer(0, 12)
    if framing <= 6:
        headers.append(b"Content-Length: %d" % len(body))
    elif framing == 7:
        encoded, good = _chunked(pick, body)
        headers.append(b"Transfer-Encoding: " + pick.choice([b"chunked", b"Chunked",
                                                              b"chunked, chunked", b"gzip",
                                                              b"gzip, chunked", b"identity"]))
        body = encoded
        answered = good
    elif framing == 8:
        headers += [b"Transfer-Encoding: chunked", b"Transfer-Encoding: identity"]
        body, _ = _chunked(pick, body)
    elif framing == 9:
        headers += [b"Content-Length: %d" % len(body), b"Transfer-Encoding: identity"]
    elif framing == 10:
        delta = pick.integer(-5, 5)
        headers.append(b"Content-Length: %d" % max(0, len(body) + delta))
        answered = delta <= 0
    elif framing == 11:
        headers.append(b"Content-Length: " + pick.choice([b"-1", b"9" * 5000, b"1 2", b"0x10",
                                                          b"", b"+5", b"%d, %d" % (len(body),
                                                                                   len(body))]))
    else:
        headers += [b"Content-Length: %d" % len(body)] * 2
    for _ in range(pick.integer(0, 3) if pick.chance(0.3) else 0):
        headers.append(pick.choice([
            b"Expect: 100-continue", b"X-Junk: " + _token(pick, _PRINTABLE, 0, 100),
            b"Bad Header: x", b"X-Fold: a\r\n b", b"X-Nul: a\x00b", b": novalue", b"NoColon",
            b"X-Long: " + b"v" * 17000, b"Content-Type: text/xml; charset=utf-16",
        ]))
    if pick.chance(0.02):
        headers += [b"X-Many: %d" % n for n in range(600)]
    eol = b"\r\n"
    if pick.chance(0.05):
        eol = b"\n"  # Twisted waits for CRLF: the request never ends
        answered = False
    head = method + b" " + target + b" " + version + eol + b"".join(h + eol for h in headers)
    return head + eol + body, answered


def apply_edits(data: bytes, edits: Sequence[tuple[int, int, bytes]]) -> bytes:
    """``data`` damaged by explicit edits ``(position, kind, chunk)``, for
    Hypothesis to generate and shrink: kind 0 inserts ``chunk``, 1 deletes
    ``len(chunk) + 1`` bytes, 2 overwrites with ``chunk``, 3 duplicates the
    next 40 bytes. Positions wrap around the current length."""
    out = bytearray(data)
    for position, kind, chunk in edits:
        position %= len(out) + 1
        if kind == 0:
            out[position:position] = chunk
        elif kind == 1:
            del out[position:position + len(chunk) + 1]
        elif kind == 2:
            out[position:position + len(chunk)] = chunk
        else:
            out[position:position] = out[position:position + 40]
    return bytes(out)


def _mutate(pick: Pick, data: bytes) -> bytes:
    """Byte-level damage: insert, delete, replace, duplicate, truncate."""
    out = bytearray(data)
    for _ in range(pick.integer(1, 6)):
        pos = pick.integer(0, len(out))
        what = pick.integer(0, 4)
        if what == 0:
            out[pos:pos] = pick.choice([pick.binary(1, 8), b"\r\n", b" ", b"<", b"&", b"\x00"])
        elif what == 1:
            del out[pos:pos + pick.integer(1, 16)]
        elif what == 2:
            out[pos:pos + 1] = bytes([pick.integer(0, 255)])
        elif what == 3:
            out[pos:pos] = bytes(out[pos:pos + pick.integer(1, 64)])
        else:
            del out[pick.integer(0, len(out)):]
    return bytes(out)


# -- swtpm ----------------------------------------------------------------------

def _swtpm_body(pick: Pick) -> bytes:
    variant = pick.integer(0, 9)
    if variant <= 4:
        raw = MARKER_B64.encode() + base64.b64encode(pick.binary(0, 3000))
        return raw[:len(raw) // 4 * 4]
    if variant == 5:
        return b""
    if variant == 6:
        return MARKER_B64.encode() + pick.choice([b"=", b" ", b"\n", b"===", b"A", b"*", b"\x80"])
    if variant == 7:
        return pick.binary(0, 500)
    if variant == 8:
        size = pick.choice([MiB - 4, MiB, MiB + 4, 2 * MiB])
        return (MARKER_B64.encode() * (size // len(MARKER_B64) + 1))[:size]
    return b"QUJD" * pick.integer(0, 3000) + b"=" * pick.integer(0, 3)


def swtpm_probe(pick: Pick, *, mutate: bool = True) -> Probe:
    """A request (or a few) to an swtpm socket."""
    if mutate and pick.chance(0.08):
        return Probe(_mutate(pick, swtpm_probe(pick, mutate=False).data), (), False,
                     "swtpm-mutated")
    if pick.chance(0.03):
        return Probe(pick.binary(0, 2000), (), False, "random-bytes")
    methods, parts, answered = [], [], True
    for _ in range(pick.choice([1, 1, 1, 1, 2, 3])):
        clean = pick.chance(0.5)
        usual = [b"GET", b"GET", b"PUT", b"PUT", b"DELETE", b"HEAD"]
        method = pick.choice(usual) if clean else _method(pick, usual)
        target = pick.choice(KEYS).encode() if clean else _target(pick, swtpm=True)
        body = _swtpm_body(pick) if method == b"PUT" or pick.chance(0.05) else b""
        data, ok = http_request(pick, method, target, body, clean=clean)
        parts.append(data)
        methods.append(method)
        answered = answered and ok
    return Probe(b"".join(parts), tuple(methods), answered, "swtpm-http")


# -- varstored ------------------------------------------------------------------

def _text(pick: Pick, vm_uuids: Sequence[str]) -> str:
    return pick.choice([
        MARKER, "OpaqueRef:xguard-session", "OpaqueRef:xguard-vm", "OpaqueRef:" + MARKER,
        "yes", "no", "0", "", " ", "&amp;<x>", MARKER * pick.integer(1, 200),
        pick.choice(vm_uuids) if vm_uuids else "", "\u00e9\u4e2d\U0001f600", "a\r\nb",
    ])


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace("\r", "&#13;")


def _value(pick: Pick, depth: int, vm_uuids: Sequence[str]) -> str:
    variant = pick.integer(0, 14 if depth < 40 else 9)
    if variant <= 3:
        return f"<value>{_escape(_text(pick, vm_uuids))}</value>"
    if variant == 4:
        return f"<value><string>{_escape(_text(pick, vm_uuids))}</string></value>"
    if variant == 5:
        number = pick.choice(["0", "-1", "2147483648", "9" * 4301, "1e3", "+7", " 5 ", "",
                              "0" * 40 + "1"])
        tag = pick.choice(["int", "i4", "i8"])
        return f"<value><{tag}>{number}</{tag}></value>"
    if variant == 6:
        kind, text = pick.choice([("boolean", "1"), ("boolean", "2"), ("double", "1.5"),
                                  ("double", "nan"), ("double", "1e99999"), ("base64", "QUJD"),
                                  ("base64", "!!"), ("nil", ""), ("nil", "x"),
                                  ("dateTime.iso8601", "20260101T00:00:00"), ("struct", "x")])
        return f"<value><{kind}>{text}</{kind}></value>"
    if variant == 7:
        return "<value><nil/></value>"
    if variant == 8:
        return f"<value>{MARKER}<![CDATA[{MARKER}]]><!--c--></value>"
    if variant == 9:
        return "<value><unknown/></value>"
    if variant <= 11:
        items = "".join(_value(pick, depth + 1, vm_uuids) for _ in range(pick.integer(0, 3)))
        return f"<value><array><data>{items}</data></array></value>"
    if variant == 12:
        members = "".join(
            f"<member><name>{_escape(_text(pick, vm_uuids))}</name>"
            f"{_value(pick, depth + 1, vm_uuids)}</member>" for _ in range(pick.integer(0, 3)))
        return f"<value><struct>{members}</struct></value>"
    if variant == 13:
        n = pick.choice([30, 40, 100, 5000])
        return "<value><array><data>" * n + "<value/>" + "</data></array></value>" * n
    return "<value>" + "x" * pick.choice([10, 70_000, 500_000]) + "</value>"


def valid_call(pick: Pick, vm_uuids: Sequence[str] = ()) -> bytes:
    """A call as varstored or the XenAPI SDK would send it."""
    import xmlrpc.client

    method = pick.choice(METHODS)
    params: list[Any] = [_text(pick, vm_uuids) for _ in range(ARITY[method])]
    if method == "message.create":
        params[2] = pick.choice(["0", 5, "99"])
    if method.startswith("VM.set_NVRAM") and pick.chance(0.3):
        params[2] = MARKER * pick.integer(1, 20_000)
    if pick.chance(0.5):
        return xmlrpc.client.dumps(tuple(params), method).encode()
    values = "".join(f"<param><value>{_escape(str(p))}</value></param>" for p in params)
    return (f'<?xml version="1.0"?><methodCall><methodName>{method}</methodName>'
            f"<params>{values}</params></methodCall>").encode()


def xml_body(pick: Pick, vm_uuids: Sequence[str] = ()) -> bytes:
    """An XML-RPC methodCall, mostly well-formed, often hostile."""
    method = pick.choice(METHODS) if pick.chance(0.8) else pick.choice(
        ["system.listMethods", "VM.destroy", "", "a b", "x" * 300, "VM.get_NVRAM\x00"])
    arity = ARITY.get(method, 2)
    count = arity if pick.chance(0.8) else pick.integer(0, arity + 2)
    params = "".join(f"<param>{_value(pick, 0, vm_uuids)}</param>" for _ in range(count))
    decl = pick.choice(['<?xml version="1.0"?>', "", '<?xml version="1.0" encoding="UTF-16"?>',
                        "<?xml version='1.0' encoding='iso-8859-1'?>", "\ufeff"])
    doc = (f"{decl}<methodCall><methodName>{_escape(method)}</methodName>"
           f"<params>{params}</params></methodCall>")
    hostile = pick.integer(0, 24)
    if hostile == 0:
        doc = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY a "' + MARKER + '">'
               '<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>'
               + doc.replace(decl, "").replace(MARKER, "&b;"))
    elif hostile == 1:
        doc = ('<!DOCTYPE m [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
               + doc.replace(decl, "").replace("<params>", "<params>&x;"))
    elif hostile == 2:
        doc = doc.replace("<methodName>", '<methodName a="1" xmlns:x="u">')
    elif hostile == 3:
        doc = doc.replace("<params>", "<params><!--" + "c" * pick.choice([10, 40_000]) + "-->")
    elif hostile == 4:
        doc = doc.replace("<params>", "<?pi x?><params>")
    elif hostile == 5:
        doc = doc[:pick.integer(0, len(doc))]
    elif hostile == 6:
        doc = doc.replace("</methodName>", "</methodName>" + "<x>" * pick.choice([50, 100_000]))
    elif hostile == 7:
        doc = doc.replace("<params>", "<params>" + "<param/>" * 3000)
    elif hostile == 8:
        doc = doc.replace("<params>", '<params><x ' + 'a="" ' * pick.choice([10, 20_000]) + "/>")
    raw = doc.encode("utf-8", "surrogatepass")
    if hostile == 9:
        raw = raw.replace(b"<params>", b"<params>\xff\xfe\xc3")
    elif hostile == 10:
        raw = _mutate(pick, raw)
    elif hostile == 11:
        raw = doc.encode("utf-16")
    return raw


def varstored_probe(pick: Pick, vm_uuids: Sequence[str] = (), *,
                    mutate: bool = True) -> Probe:
    """A request (or a few) to a varstored socket."""
    if mutate and pick.chance(0.08):
        return Probe(_mutate(pick, varstored_probe(pick, vm_uuids, mutate=False).data), (),
                     False, "varstored-mutated")
    if pick.chance(0.03):
        return Probe(pick.binary(0, 2000), (), False, "random-bytes")
    methods, parts, answered = [], [], True
    for _ in range(pick.choice([1, 1, 1, 1, 2])):
        clean = pick.chance(0.5)
        method = b"POST" if clean else _method(pick, [b"POST"])
        target = b"/" if clean else _target(pick, swtpm=False)
        if method != b"POST" and not pick.chance(0.1):
            body = b""
        elif clean and pick.chance(0.6):
            body = valid_call(pick, vm_uuids)
        else:
            body = xml_body(pick, vm_uuids)
        if len(body) > MiB and pick.chance(0.5):
            body = body[:MiB]
        data, ok = http_request(pick, method, target, body, clean=clean)
        parts.append(data)
        methods.append(method)
        answered = answered and ok
    return Probe(b"".join(parts), tuple(methods), answered, "varstored-http")


# -- the wire -------------------------------------------------------------------

@attrs.frozen
class Answer:
    """What came back on one connection."""

    data: bytes
    #: how the exchange ended: eof, answered, quiet, timeout, reset,
    #: reset-while-sending, send-blocked, refused (connect)
    end: str
    seconds: float


def exchange(path: str, probe: Probe, *, answer_timeout: float = 5.0,
             quiet_timeout: float = 0.05) -> Answer:
    """Send ``probe`` on a new connection to ``path`` and read what comes
    back: until the server closes, until every request of an ``answered``
    probe has its answer (waiting up to ``answer_timeout`` for each part),
    or until the server is quiet for ``quiet_timeout`` on a probe it may
    be waiting on."""
    started = time.monotonic()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    chunks: list[bytes] = []
    end = "eof"
    try:
        s.settimeout(answer_timeout)
        try:
            s.connect(path)
        except OSError:
            return Answer(b"", "refused", time.monotonic() - started)
        try:
            s.sendall(probe.data)
        except (BrokenPipeError, ConnectionResetError):
            end = "reset-while-sending"
        except TimeoutError:
            # The server stopped reading (a request ahead is still being
            # served and its buffer is full): back-pressure, not a fault.
            end = "send-blocked"
        s.settimeout(answer_timeout if probe.answered else quiet_timeout)
        while True:
            try:
                data = s.recv(65536)
            except TimeoutError:
                end = "timeout" if not chunks else "quiet"
                break
            except ConnectionResetError:
                end = "reset"
                break
            if not data:
                break
            chunks.append(data)
            if probe.answered and probe.methods:
                finals = [c for c in status_codes(b"".join(chunks), probe.methods) if c >= 200]
                if len(finals) >= len(probe.methods):
                    end = "answered"
                    break
    finally:
        s.close()
    return Answer(b"".join(chunks), end, time.monotonic() - started)


_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3})[ \r]")


def status_codes(data: bytes, methods: Sequence[bytes] = ()) -> list[int]:
    """The status code of each response in ``data``, in order. Bodies are
    skipped by Content-Length or chunking (none after HEAD, 1xx, 204,
    304); what cannot be parsed ends the list."""
    codes: list[int] = []
    pos, index = 0, 0
    while pos < len(data):
        match = _STATUS.match(data, pos)
        head_end = data.find(b"\r\n\r\n", pos)
        if match is None or head_end < 0:
            break
        code = int(match.group(1))
        codes.append(code)
        headers = {}
        for line in data[pos:head_end].split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        pos = head_end + 4
        if 100 <= code < 200:
            continue
        method = methods[index] if index < len(methods) else b""
        index += 1
        if method == b"HEAD" or code in (204, 304):
            continue
        if b"content-length" in headers:
            try:
                pos += int(headers[b"content-length"])
            except ValueError:
                break
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            while True:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    return codes
                try:
                    size = int(data[pos:eol].split(b";")[0], 16)
                except ValueError:
                    return codes
                pos = eol + 2 + size + 2
                if size == 0:
                    break
        else:
            break
    return codes
