# -*- test-case-name: tests.unit.test_bigvalue -*-
"""AMP arguments whose encoded value may exceed AMP's 64 KiB value limit.

AMP limits every *value* of a box to 65535 bytes but not the box itself, so
a large value is spread over several keys of the same box: ``name`` holds
the first piece and ``name.1``, ``name.2`` … the following ones, in order.
The receiver pops them until the next key is missing and joins the bytes
before decoding, so a multi-byte UTF-8 character cut in two by a piece
boundary is reassembled intact.

Each command stays one request and one answer with the contract's argument
names; nothing has to be remembered between boxes (as a stream of
open/chunk/commit commands would), so a dropped connection leaves no
half-received value behind.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any

from twisted.protocols import amp

__all__ = ["BigUnicode", "BigAmpList", "PIECE_SIZE", "piece_keys", "split"]

PIECE_SIZE = amp.MAX_VALUE_LENGTH


def split(data: bytes, size: int = PIECE_SIZE) -> list[bytes]:
    """``data`` cut into pieces of at most ``size`` bytes; always at least
    one piece, so an empty value still travels (and is not "missing")."""
    return [data[i:i + size] for i in range(0, len(data), size)] or [b""]


def piece_keys(name: bytes) -> Iterator[bytes]:
    """The box keys holding ``name``'s pieces: ``name``, ``name.1`` …"""
    yield name
    index = 1
    while True:
        yield name + b"." + str(index).encode("ascii")
        index += 1


def _python_name(name: bytes) -> str:
    # What amp does for its own arguments (dashes are not identifiers).
    return name.decode("ascii").replace("-", "_")


class _Spread:
    """Mixin for an :class:`amp.Argument`: its ``toStringProto`` output is
    spread over as many keys as it needs, and joined back on receipt."""

    optional: bool

    def toBox(self, name: bytes, strings: MutableMapping[bytes, bytes],
              objects: dict[str, Any], proto: amp.AMP) -> None:
        obj = self.retrieve(objects, _python_name(name), proto)  # type: ignore[attr-defined]
        if self.optional and obj is None:
            return
        data = self.toStringProto(obj, proto)  # type: ignore[attr-defined]
        for key, piece in zip(piece_keys(name), split(data)):
            strings[key] = piece

    def fromBox(self, name: bytes, strings: MutableMapping[bytes, bytes],
                objects: dict[str, Any], proto: amp.AMP) -> None:
        pieces = []
        for key in piece_keys(name):
            piece = strings.pop(key, None)
            if piece is None:
                break
            pieces.append(piece)
        python_name = _python_name(name)
        if not pieces:
            if self.optional:
                objects[python_name] = None
                return
            raise KeyError(name)
        objects[python_name] = self.fromStringProto(b"".join(pieces), proto)  # type: ignore[attr-defined]


class BigUnicode(_Spread, amp.Unicode):
    """A text argument of any length (UTF-8 on the wire)."""

    def __init__(self, optional: bool = False) -> None:
        super().__init__(optional)  # type: ignore[no-untyped-call]  # amp's, untyped


class BigAmpList(_Spread, amp.AmpList):
    """An :class:`amp.AmpList` that may hold more than 64 KiB of entries
    (a host runs thousands of sockets)."""

    def __init__(self, subargs: list[tuple[bytes, amp.Argument]],
                 optional: bool = False) -> None:
        super().__init__(subargs, optional)  # type: ignore[no-untyped-call]
