# -*- test-case-name: tests.unit.test_model -*-
"""Pure domain types shared by every layer: services, vTPM keys, the vTPM
contents string, NVRAM writes. Nothing here does I/O."""

from __future__ import annotations

import enum
import hashlib
import json
import os
import uuid as _uuid
from collections.abc import Mapping

import attrs

from .errors import InvalidGid, InvalidPath, InvalidUUID

__all__ = [
    "Service",
    "TpmKey",
    "TpmState",
    "NvramWrite",
    "NVRAM_EFI_VARIABLES",
    "is_valid_uuid",
    "normalise_update",
    "check_uuid",
    "check_socket_path",
    "check_gid",
    "MAX_SOCKET_PATH_BYTES",
    "MAX_GID",
    "digest",
    "Accept",
    "Base",
    "DIRECT",
    "Outcome",
    "Residence",
]


class Service(enum.Enum):
    """The two kinds of domain socket; values are the upstream daemon's names
    (used in the cache layout and the active-sockets file)."""

    SWTPM = "Swtpm"
    VARSTORED = "Varstored"


class TpmKey(enum.IntEnum):
    """The three pieces of swtpm state. Values are the cache-layout keys."""

    PERMALL = 0
    SAVESTATE = 1
    VOLATILESTATE = 2

    @property
    def path(self) -> str:
        """The swtpm HTTP backend's resource path for this key."""
        return "/tpm2-00." + self.name.lower()

    @classmethod
    def from_path(cls, path: str) -> "TpmKey | None":
        """The key served at ``path``, or None when the path is not one."""
        for key in cls:
            if key.path == path:
                return key
        return None


@attrs.frozen
class TpmState:
    """xapi keeps a vTPM's three keys in one string, joined by single
    spaces; a value without a space is a bare permall (older format)."""

    permall: str = ""
    savestate: str = ""
    volatilestate: str = ""

    @classmethod
    def deserialize(cls, contents: str) -> "TpmState":
        """Parse xapi's contents string. Extra fields (never written by us)
        are refused rather than silently dropped."""
        if contents == "":
            return cls()
        parts = contents.split(" ")
        if len(parts) == 1:
            return cls(permall=parts[0])
        if len(parts) != 3:
            raise ValueError(f"vTPM contents has {len(parts)} fields, expected 1 or 3")
        return cls(*parts)

    def serialize(self) -> str:
        """The contents string xapi stores."""
        if self.savestate == "" and self.volatilestate == "":
            return self.permall
        return " ".join((self.permall, self.savestate, self.volatilestate))

    def get(self, key: TpmKey) -> str:
        return (self.permall, self.savestate, self.volatilestate)[key]

    def update(self, changes: Mapping[TpmKey, str]) -> "TpmState":
        """A copy with ``changes`` applied. A value holding the separator
        would corrupt the other keys, so it is refused."""
        values = [self.permall, self.savestate, self.volatilestate]
        for key, value in changes.items():
            if " " in value:
                raise ValueError("a vTPM key's value cannot contain a space")
            values[TpmKey(key)] = value
        return TpmState(*values)


NVRAM_EFI_VARIABLES = "EFI-variables"

_UPDATE_VALUES = ("yes", "no")


def normalise_update(update: str | None) -> str:
    """``set_NVRAM_EFI_variables_v2``'s ``update`` flag: ``yes``/``no``;
    anything else (or absent) is ``unspecified``."""
    return update if update in _UPDATE_VALUES else "unspecified"


@attrs.frozen
class NvramWrite:
    """One write of a VM's ``EFI-variables`` plus xapi's ``update`` flag,
    which must travel with it through the disk cache."""

    value: str
    update: str = "unspecified"

    def encode(self) -> bytes:
        """The cache file's content (the flag is kept with the value)."""
        return json.dumps({"value": self.value, "update": self.update}).encode()

    @classmethod
    def decode(cls, data: bytes) -> "NvramWrite":
        doc = json.loads(data.decode())
        if not isinstance(doc, dict) or not isinstance(doc.get("value"), str):
            raise ValueError("not an NVRAM cache record")
        return cls(value=doc["value"], update=normalise_update(doc.get("update")))


def is_valid_uuid(text: str) -> bool:
    """True for a canonical (hyphenated, 36 characters) UUID string."""
    if not isinstance(text, str) or len(text) != 36:
        return False
    try:
        return str(_uuid.UUID(text)) == text.lower()
    except ValueError:
        return False


#: sun_path is 108 bytes including the terminating NUL (Linux).
MAX_SOCKET_PATH_BYTES = 107


def check_uuid(value: object, what: str = "VM") -> str:
    """``value`` in the one form xguard names VMs and vTPMs by (hyphenated,
    lower case: xapi's), so ``6A1F…`` and ``6a1f…`` are one VM, never two;
    InvalidUUID naming it when it is not a UUID of that shape."""
    if not isinstance(value, str) or not is_valid_uuid(value):
        raise InvalidUUID(f"invalid {what} uuid {value!r}")
    return value.lower()


def check_socket_path(path: object) -> str:
    """The normalised socket path; InvalidPath naming it when it is not
    absolute, holds a NUL byte or is too long for a UNIX socket."""
    if not isinstance(path, str) or not os.path.isabs(path):
        raise InvalidPath(f"socket path {path!r} is not absolute")
    if "\0" in path:
        raise InvalidPath(f"socket path {path!r} contains a NUL byte")
    path = os.path.normpath(path)
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
        raise InvalidPath(f"socket path {path} is longer than {MAX_SOCKET_PATH_BYTES} bytes")
    return path


#: The largest group id: gid_t is 32 bits, and (gid_t) -1 means "no change".
MAX_GID = 2**32 - 2


def check_gid(gid: object) -> int:
    """``gid`` if it is a group id (an int from 0 to MAX_GID); InvalidGid
    naming it otherwise."""
    if isinstance(gid, bool) or not isinstance(gid, int) or not 0 <= gid <= MAX_GID:
        raise InvalidGid(f"invalid gid {gid!r}: a group id is a number from 0 to {MAX_GID}")
    return gid


# -- lineage: what a delivery may overwrite (SPEC §6, "Other writers") -------

def digest(value: str | bytes) -> str:
    """A short, collision-free name of a value (an item's content), kept
    instead of the value to recognise it later."""
    data = value.encode("utf-8") if isinstance(value, str) else value
    return hashlib.blake2b(data, digest_size=16).hexdigest()


#: Per key of a service's items, the digests of the values upstream may
#: hold if nobody but xguard wrote since it last looked: the value it last
#: saw there, and values it sent whose outcome is unknown.
Accept = Mapping[int, frozenset[str]]


@attrs.frozen
class Base:
    """What a delivery is based on, and so what it may overwrite.

    - a Direct write (``check`` False): the VM is served here and upstream
      answers; its state is read (or known) and modified under the item's
      lock, as the upstream daemon does;
    - a cached write (``check`` True): upstream must still hold a state of
      xguard's own lineage — every key's value in ``accept``, or already
      the value being delivered — else another writer changed it, and the
      write is set aside instead. ``accept`` None: the base is unknown
      (xguard never saw the VM's state before the write): delivered only
      while the VM has run here without a break since the write
      (``continuous``: no other host can have written it), else set aside
      as unverified;
    - ``legacy``: files of the upstream daemon, or of xguard before it
      recorded bases: delivered as before (with a log line at start-up);
    - ``recovered``: the write was made before this process started (so
      the VM may have moved to another host meanwhile).
    """

    check: bool = False
    accept: Accept | None = None
    recovered: bool = False
    legacy: bool = False
    continuous: bool = True


#: A Direct write's base.
DIRECT = Base()


@attrs.frozen
class Outcome:
    """What a delivery did.

    - ``delivered``: upstream now holds it;
    - ``already``: upstream held it already (a crash between a delivery and
      the deletion of its file);
    - ``conflict``: another writer changed upstream since the base: its
      value stays, ours is set aside;
    - ``elsewhere``: the VM runs on another host: ours is set aside;
    - ``unverified``: nobody can say what the write was based on, and the
      VM does not run here: ours is set aside.

    ``ours``: for a conflict, the whole state of the item as xguard's
    lineage has it (the base's values with ours over them), when it is
    known; else only the values delivered.
    """

    kind: str
    reason: str = ""
    ours: Mapping[int, bytes] | None = None

    @property
    def set_aside(self) -> bool:
        return self.kind in ("conflict", "elsewhere", "unverified")


@attrs.frozen
class Residence:
    """Where xapi says a VM runs (VM.get_power_state, VM.get_resident_on)."""

    power_state: str
    #: The host's name (and reference), None when it runs nowhere.
    host: str | None = None
    #: Whether that host is the one xguard runs on (None: not known).
    here: bool | None = None

    @property
    def elsewhere(self) -> bool:
        """It runs (or is paused) on another host."""
        return self.power_state in ("Running", "Paused") and self.here is not True
