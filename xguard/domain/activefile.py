# -*- test-case-name: tests.unit.test_activefile -*-
"""The active-sockets file: the list of domain sockets a restart must listen
on again (SPEC §7). The format is the upstream daemon's, so an upgrade or a
downgrade keeps the VMs' sockets::

    [{"vm_uuid": "...", "path": "/...", "gid": 107, "typ": "Swtpm"}, ...]

Loading is tolerant: a daemon that cannot start because of a damaged list
would take every VM's sockets down with it, so bad input costs only the
entries it spoils.
"""

from __future__ import annotations

import json
import os
from typing import Any

import attrs
from twisted.logger import Logger

from ..model import Service, check_gid, check_socket_path, check_uuid
from ..util.durable import atomic_write, makedirs

__all__ = ["Entry", "load", "save", "dumps", "CORRUPT_SUFFIX"]

log = Logger(namespace="xguard.domain.activefile")

#: An unparseable file is copied next to itself with this suffix before the
#: next save replaces it, so an operator can still see what it held.
CORRUPT_SUFFIX = ".corrupt"


def _check(check: Any) -> Any:
    """An attrs validator from a model check (one validation everywhere)."""
    def validate(instance: object, attribute: object, value: object) -> None:
        check(value)
    return validate


@attrs.frozen
class Entry:
    """One domain socket: who it serves (``vm_uuid``, ``service``), where it
    listens (``path``) and which group may connect (``gid``)."""

    vm_uuid: str = attrs.field(converter=check_uuid)
    path: str = attrs.field(converter=check_socket_path)
    gid: int = attrs.field(validator=_check(check_gid))
    service: Service = attrs.field(validator=attrs.validators.instance_of(Service))
    #: The record as the file holds it, encoded once: the file is rewritten
    #: whole at every change, so in a boot storm each save would otherwise
    #: encode every socket again (6.5 ms of the GIL for 2000 sockets).
    encoded: bytes = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "encoded", json.dumps(self.to_json()).encode("utf-8"))

    def to_json(self) -> dict[str, Any]:
        """The upstream daemon's record (the service is called ``typ``)."""
        return {"vm_uuid": self.vm_uuid, "path": self.path, "gid": self.gid,
                "typ": self.service.value}

    @classmethod
    def from_json(cls, doc: object) -> "Entry":
        """Parse one record; ValueError says what is wrong with it."""
        if not isinstance(doc, dict):
            raise ValueError("entry is not an object")
        missing = [k for k in ("vm_uuid", "path", "gid", "typ") if k not in doc]
        if missing:
            raise ValueError(f"entry lacks {', '.join(missing)}")
        try:
            service = Service(doc["typ"])
        except ValueError:
            raise ValueError(f"unknown socket type {doc['typ']!r}") from None
        return cls(vm_uuid=doc["vm_uuid"], path=doc["path"], gid=doc["gid"], service=service)


def load(path: str) -> list[Entry]:
    """The entries of the file at ``path``.

    A missing file is an empty list (first start). An unparseable file is
    logged, copied to ``path + CORRUPT_SUFFIX`` and treated as empty. Invalid
    entries are skipped with a warning; the others are returned in order.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    try:
        doc = json.loads(data.decode("utf-8"))
        if not isinstance(doc, list):
            raise ValueError("not a JSON list")
    except ValueError as e:
        _keep_corrupt(path, data, str(e))
        return []
    entries = []
    for index, item in enumerate(doc):
        try:
            entries.append(Entry.from_json(item))
        except (ValueError, TypeError) as e:
            log.warn("active sockets file {path}: skipping entry {index}: {reason}",
                     path=path, index=index, reason=str(e))
    return entries


def _keep_corrupt(path: str, data: bytes, reason: str) -> None:
    copy = path + CORRUPT_SUFFIX
    try:
        atomic_write(copy, data, mode=0o600)
    except OSError as e:
        log.error("active sockets file {path} is unreadable ({reason}); no socket resumes "
                  "from it, and keeping a copy failed: {error}",
                  path=path, reason=reason, error=str(e))
        return
    log.error("active sockets file {path} is unreadable ({reason}); no socket resumes "
              "from it; its content was kept in {copy}", path=path, reason=reason, copy=copy)


def dumps(entries: list[Entry]) -> bytes:
    """The file's content for ``entries``: what ``json.dumps`` of their
    records gives, joined from each entry's :attr:`Entry.encoded`."""
    return b"[" + b", ".join(e.encoded for e in entries) + b"]"


def save(path: str, entries: list[Entry]) -> None:
    """Replace the file atomically (temp file, fsync, rename, directory
    fsync), creating its directory (0755) if needed. Blocking: call it
    through a runner."""
    parent = os.path.dirname(path)
    if parent:
        makedirs(parent, 0o755)
    atomic_write(path, dumps(entries), mode=0o644)
