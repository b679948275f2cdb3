# -*- test-case-name: tests.unit.test_entry -*-
"""What one version file holds: the write, and the upstream state it was
based on, checked (SPEC §6, "Checked bytes" and "Other writers").

xguard's own files are sealed (:mod:`xguard.util.checked`, kind
``entry``): a header line, then one line of JSON metadata, then the
content exactly as the item is delivered (a swtpm key's base64; for NVRAM,
:meth:`xguard.model.NvramWrite.encode`)::

    xguard entry 1 <length> <checksum>
    {"accept": {"0": ["<digest>", …], "1": […], "2": […]}}
    <content>

``accept`` is, per key of the service, the digests of the values upstream
may hold if nobody else wrote: the base (what xguard last saw there) and
values xguard sent whose outcome it did not learn. ``null`` when unknown.

Files in the previous formats are still read, with an unknown base: the
upstream daemon's (the content exactly as received) and xguard's before
this one (the same, and NVRAM's JSON record). A zero-length file is never
one of those: every write xguard or the upstream daemon made of an empty
key was an acknowledged *write*, but a lying disk leaves zero-length files
for acknowledged writes whose data it never stored, and delivering one
would wipe upstream's state — so it is refused as damaged (an empty write
pending across an upgrade from the upstream daemon is set aside with it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import attrs

from ..model import Accept
from ..util.checked import MAGIC, Damaged, is_sealed, seal, unseal

__all__ = ["Entry", "encode", "decode", "Damaged", "KIND", "VERSION"]

KIND = "entry"
VERSION = 1


@attrs.frozen
class Entry:
    """One acknowledged write of an item, as it is delivered."""

    content: bytes
    #: What upstream may hold for this write to be delivered over it
    #: (None: unknown).
    accept: Accept | None = None
    #: A file of an earlier format (the upstream daemon's, or xguard's
    #: before it recorded bases).
    legacy: bool = False


def encode(entry: Entry) -> bytes:
    """The bytes of a version file (written in one durable step)."""
    accept = None if entry.accept is None else {
        str(key): sorted(digests) for key, digests in sorted(entry.accept.items())}
    meta = json.dumps({"accept": accept}, separators=(",", ":"), sort_keys=True)
    return seal(KIND, VERSION, meta.encode("ascii") + b"\n" + entry.content)


def decode(raw: bytes) -> Entry:
    """The write a version file holds.

    :raises Damaged: the file fails its check, or is empty.
    """
    if not raw:
        raise Damaged("empty file")
    if MAGIC.startswith(raw):
        raise Damaged("torn in its header")
    if not is_sealed(raw):
        return Entry(raw, legacy=True)  # the upstream daemon's, or xguard's earlier format
    version, payload = unseal(raw, KIND)
    if version != VERSION:
        raise Damaged(f"entry format {version}, this xguard reads {VERSION}")
    meta, newline, content = payload.partition(b"\n")
    if not newline:
        raise Damaged("no metadata line")
    try:
        doc = json.loads(meta)
        accept = _accept(doc["accept"])
    except (ValueError, KeyError, TypeError) as e:
        raise Damaged(f"bad metadata: {e}") from None
    return Entry(content, accept)


def _accept(doc: object) -> Accept | None:
    if doc is None:
        return None
    if not isinstance(doc, Mapping):
        raise TypeError("accept is not a map")
    out: dict[int, frozenset[str]] = {}
    for key, digests in doc.items():
        if not (isinstance(key, str) and key.isdigit() and isinstance(digests, list)
                and all(isinstance(d, str) for d in digests)):
            raise TypeError("accept holds something else than digests per key")
        out[int(key)] = frozenset(digests)
    return out
