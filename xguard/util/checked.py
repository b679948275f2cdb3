# -*- test-case-name: tests.unit.test_checked -*-
"""Checked bytes (SPEC §6): every file xguard reads back carries what it
is, its format version, its length and a checksum, written in the same
durable step as the content, so a torn, truncated, zero-length or
foreign file is recognised as such and never delivered or served.

A sealed file is one header line, then the payload::

    xguard <kind> <version> <length> <blake2b-128 hex>\\n<payload>

The kind (``entry``, ``copy``, ``handle`` …) keeps a file of one sort from
passing for another. BLAKE2b is in the standard library, in C, and faster
than CRC-32C in Python; 128 bits make an accidental match impossible.
"""

from __future__ import annotations

import hashlib

__all__ = ["Damaged", "seal", "unseal", "is_sealed", "digest", "MAGIC"]

MAGIC = b"xguard "
_DIGEST_SIZE = 16


class Damaged(ValueError):
    """A file that fails its check (the message says how)."""


def digest(payload: bytes) -> bytes:
    """The checksum a sealed file carries for ``payload`` (hex, ASCII): a
    caller that also compares contents by it hashes once (see ``seal``)."""
    return hashlib.blake2b(payload, digest_size=_DIGEST_SIZE).hexdigest().encode("ascii")


_digest = digest


def seal(kind: str, version: int, payload: bytes, *, checksum: bytes | None = None) -> bytes:
    """``payload`` with its header: the bytes to write in one durable step.
    ``checksum``: ``digest(payload)`` when the caller has it already."""
    if not kind.isascii() or not kind.isalnum():
        raise ValueError(f"bad kind {kind!r}")
    return b"%s%s %d %d %s\n%s" % (MAGIC, kind.encode("ascii"), version, len(payload),
                                    checksum if checksum is not None else _digest(payload),
                                    payload)


def is_sealed(raw: bytes) -> bool:
    """Whether ``raw`` claims to be a sealed file (then :func:`unseal` checks it)."""
    return raw.startswith(MAGIC)


def unseal(raw: bytes, kind: str) -> tuple[int, bytes]:
    """(format version, payload) of a sealed file of ``kind``.

    :raises Damaged: it is not one, or its length or checksum does not
        match (a torn or truncated write, a flipped bit).
    """
    if not raw:
        raise Damaged("empty file")
    head, newline, payload = raw.partition(b"\n")
    if not newline:
        raise Damaged("no header line")
    fields = head.split(b" ")
    if len(fields) != 5 or fields[0] + b" " != MAGIC:
        raise Damaged("not a checked xguard file")
    _, found_kind, version, length, digest = fields
    if found_kind != kind.encode("ascii"):
        raise Damaged(f"a {found_kind.decode('ascii', 'replace')} file, not a {kind} file")
    if not (version.isdigit() and length.isdigit()):
        raise Damaged("malformed header")
    if int(length) != len(payload):
        raise Damaged(f"{len(payload)} bytes where the header says {int(length)}")
    if _digest(payload) != digest:
        raise Damaged("checksum mismatch")
    return int(version), payload
