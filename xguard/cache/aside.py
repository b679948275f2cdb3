# -*- test-case-name: tests.unit.test_aside -*-
"""Writes set aside: acknowledged, never delivered, never silently undone
(SPEC §6, "Only proof … sets it aside" and "Other writers").

A write is set aside when it can never reach upstream as it is: another
writer changed upstream since its base (a *conflict*), its VM runs on
another host (*elsewhere*), upstream refused it for good (*refused*), or
its file failed its check (*damaged*). The operator lists them
(``xguard-ctl set-aside``) and resolves each: push ours, keep upstream's,
or export ours to a file, then keep upstream's.

Layout, below ``STATE_DIR/quarantine/<Service>/<vm-uuid>/``:

- ``aside``: one *unit* per VM and service, a checked file
  (:mod:`xguard.util.checked`, kind ``aside``) holding our values of the
  item's keys (for a vTPM, its three keys together when they are known:
  they are set aside and pushed together, never mixed with another
  lineage's), why, since when, and whether it is *held*;
- ``<key>/<timestamp>`` with ``<timestamp>.reason``: a single file moved
  aside as it was (a damaged file, or one refused by an earlier xguard).

A unit is *held* when it was set aside while its VM had a socket here:
until that VM's last socket goes, its sockets keep reading the
acknowledged values (the views read them after the pending versions) and
its new writes join the unit instead of upstream — they continue the
lineage that was set aside. A unit of a VM that is not served here (after
a host crash, a migration) is never read by anyone.

Blocking file work runs through the injected runner.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping

import attrs
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ..model import Service
from ..status import SetAside
from ..util.checked import Damaged, seal, unseal
from ..util.durable import atomic_write, fsync_dir, makedirs
from ..util.threads import Runner
from .layout import KEYS, QUARANTINE, is_vm_dir, parse_key, parse_timestamp

__all__ = ["SetAsideStore", "UNIT", "REASON_SUFFIX"]

UNIT = "aside"
REASON_SUFFIX = ".reason"
_KIND = "aside"
_VERSION = 1


@attrs.frozen
class _Unit:
    vm: str
    kind: str
    reason: str
    since: float
    values: Mapping[int, bytes]
    complete: bool
    held: bool

    def to_bytes(self) -> bytes:
        doc = {"kind": self.kind, "reason": self.reason, "since": self.since,
               "complete": self.complete, "held": self.held,
               "values": {str(k): v.decode("latin-1") for k, v in sorted(self.values.items())}}
        return seal(_KIND, _VERSION, json.dumps(doc, sort_keys=True).encode("ascii"))

    @classmethod
    def from_bytes(cls, vm: str, raw: bytes) -> "_Unit":
        _, payload = unseal(raw, _KIND)
        try:
            doc = json.loads(payload)
            return cls(vm=vm, kind=str(doc["kind"]), reason=str(doc["reason"]),
                       since=float(doc["since"]), complete=bool(doc["complete"]),
                       held=bool(doc["held"]),
                       values={int(k): v.encode("latin-1") for k, v in doc["values"].items()})
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise Damaged(f"bad set-aside record: {e}") from None


class SetAsideStore:
    """The set-aside writes of one service.

    :param is_live: whether a VM has a socket here now.
    :param clock: the wall clock (when an item was set aside).
    """

    log = Logger()

    def __init__(self, root: str, service: Service, *, runner: Runner, clock: IReactorTime,
                 is_live: Callable[[str], bool]) -> None:
        self.base = os.path.join(root, QUARANTINE, service.value)
        self.service = service
        self._runner = runner
        self._clock = clock
        self._is_live = is_live
        self._units: dict[str, _Unit] = {}
        self._files: dict[str, SetAside] = {}  # by id
        #: Units created since the start, by kind (the metrics' counters).
        self.created: dict[str, int] = {}

    # -- start -------------------------------------------------------------------
    def load(self) -> "Deferred[None]":
        """Read what is set aside (before anything listens)."""
        def loaded(found: tuple[dict[str, _Unit], dict[str, SetAside]]) -> None:
            self._units, self._files = found
            if self._units or self._files:
                self.log.warn("{service}: {n} writes are set aside; see xguard-ctl set-aside",
                              service=self.service.value,
                              n=len(self._units) + len(self._files))
        return self._runner(self._load).addCallback(loaded)

    def _load(self) -> tuple[dict[str, _Unit], dict[str, SetAside]]:
        units: dict[str, _Unit] = {}
        files: dict[str, SetAside] = {}
        if not os.path.isdir(self.base):
            return units, files
        for vm in sorted(os.listdir(self.base)):
            vm_dir = os.path.join(self.base, vm)
            if not is_vm_dir(vm) or not os.path.isdir(vm_dir):
                continue
            for name in sorted(os.listdir(vm_dir)):
                path = os.path.join(vm_dir, name)
                if name == UNIT:
                    with open(path, "rb") as f:
                        raw = f.read()
                    try:
                        units[vm] = _Unit.from_bytes(vm, raw)
                    except Damaged as e:
                        self.log.error("{service}: the set-aside record {path} is damaged "
                                       "({error}); it is listed as a damaged file",
                                       service=self.service.value, path=path, error=str(e))
                        item = self._file_item(vm, 0, path, f"damaged set-aside record: {e}")
                        files[item.id] = item
                    continue
                key = parse_key(self.service, name)
                if key is None or not os.path.isdir(path):
                    continue
                for entry in sorted(os.listdir(path)):
                    if parse_timestamp(entry) is None:
                        continue
                    file = os.path.join(path, entry)
                    try:
                        with open(file + REASON_SUFFIX, "rb") as f:
                            reason = f.read().decode("utf-8", "replace")
                    except FileNotFoundError:
                        reason = "unknown"
                    item = self._file_item(vm, key, file, reason)
                    files[item.id] = item
        return units, files

    def _file_item(self, vm: str, key: int, path: str, reason: str) -> SetAside:
        try:
            since = os.stat(path).st_mtime
        except OSError:
            since = None
        kind = "damaged" if reason.startswith("damaged") else "refused"
        return SetAside(id=os.path.relpath(path, os.path.dirname(self.base)),
                        service=self.service.value, vm=vm, keys=(key,), kind=kind,
                        reason=reason, since=since, held=False, complete=False, file=path)

    # -- what the cache asks -------------------------------------------------------
    def holds(self, vm: str) -> bool:
        """Whether ``vm``'s sockets read a unit (and its writes join it)."""
        unit = self._units.get(vm)
        return unit is not None and unit.held and self._is_live(vm)

    def held_value(self, vm: str, key: int) -> bytes | None:
        """Our value of ``key`` while the unit is held (None: not held, or
        the unit does not know that key)."""
        if not self.holds(vm):
            return None
        return self._units[vm].values.get(key)

    def items(self) -> list[SetAside]:
        """Everything set aside, as the operator sees it."""
        out = [self._unit_item(unit) for unit in self._units.values()]
        return sorted(out + list(self._files.values()), key=lambda item: item.id)

    def _unit_item(self, unit: _Unit) -> SetAside:
        return SetAside(id=f"{self.service.value}/{unit.vm}", service=self.service.value,
                        vm=unit.vm, keys=tuple(sorted(unit.values)), kind=unit.kind,
                        reason=unit.reason, since=unit.since,
                        held=unit.held and self._is_live(unit.vm), complete=unit.complete,
                        file=os.path.join(self.base, unit.vm, UNIT))

    # -- setting aside -------------------------------------------------------------
    def add(self, vm: str, *, kind: str, reason: str, values: Mapping[int, bytes],
            complete: bool) -> "Deferred[bool]":
        """Set ``values`` of ``vm`` aside, durably, joining its unit if it
        has one (newer values replace older ones; the first reason and
        time stay). Held when the VM has a socket here. Fires True when a
        new unit was made."""
        old = self._units.get(vm)
        if old is None:
            unit = _Unit(vm=vm, kind=kind, reason=reason, since=self._clock.seconds(),
                         values=dict(values), complete=complete or self._complete(values),
                         held=self._is_live(vm))
        else:
            merged = {**old.values, **values}
            unit = attrs.evolve(old, values=merged,
                                complete=old.complete or complete or self._complete(merged))
        return self._save(unit).addCallback(lambda _: old is None)

    def _complete(self, values: Mapping[int, bytes]) -> bool:
        return set(values) >= KEYS[self.service]

    def _save(self, unit: _Unit) -> "Deferred[None]":
        path = os.path.join(self.base, unit.vm, UNIT)

        def write() -> None:
            makedirs(os.path.dirname(path), 0o700)
            atomic_write(path, unit.to_bytes(), mode=0o600)

        def saved(_: object) -> None:
            new = unit.vm not in self._units
            self._units[unit.vm] = unit
            if new:
                self.created[unit.kind] = self.created.get(unit.kind, 0) + 1

        return self._runner(write).addCallback(saved)

    def moved(self, vm: str, key: int, path: str, reason: str) -> SetAside:
        """A single file was moved aside (see ``VersionFiles.quarantine``)."""
        item = self._file_item(vm, key, path, reason)
        self._files[item.id] = item
        self.created[item.kind] = self.created.get(item.kind, 0) + 1
        return item

    # -- the VM's sockets ----------------------------------------------------------
    def release(self, vm: str) -> "Deferred[None]":
        """``vm``'s last socket is gone: its unit is no longer read, and a
        VM started here again reads upstream's state."""
        unit = self._units.get(vm)
        if unit is None or not unit.held:
            return succeed(None)
        return self._save(attrs.evolve(unit, held=False))

    def release_unserved(self) -> "Deferred[None]":
        """After a restart: units of VMs that came back without a socket
        (the host crashed, the VM stopped meanwhile) are no longer held."""
        async def run() -> None:
            for vm in [vm for vm, unit in self._units.items()
                       if unit.held and not self._is_live(vm)]:
                await self.release(vm)
        return ensureDeferred(run())

    # -- resolving -----------------------------------------------------------------
    def get(self, item_id: str) -> SetAside | None:
        return next((item for item in self.items() if item.id == item_id), None)

    def values(self, item_id: str) -> "Deferred[dict[int, bytes]]":
        """Our values of the item ``item_id`` (a file's raw bytes)."""
        item = self.get(item_id)
        if item is None:
            raise KeyError(item_id)
        unit = self._units.get(item.vm)
        if unit is not None and item.id == self._unit_item(unit).id:
            return succeed(dict(unit.values))

        def read() -> dict[int, bytes]:
            with open(item.file, "rb") as f:
                return {item.keys[0]: f.read()}
        return self._runner(read)

    def remove(self, item_id: str) -> "Deferred[None]":
        """Forget the item ``item_id``, durably."""
        item = self.get(item_id)
        if item is None:
            raise KeyError(item_id)

        def delete() -> None:
            for path in (item.file, item.file + REASON_SUFFIX):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            directory = os.path.dirname(item.file)
            fsync_dir(directory)
            for d in (directory, os.path.dirname(directory)):
                if d.startswith(self.base + os.sep) and not os.listdir(d):
                    shutil.rmtree(d, ignore_errors=True)

        def removed(_: object) -> None:
            if self._units.get(item.vm) is not None and item.file.endswith(os.sep + UNIT):
                del self._units[item.vm]
            self._files.pop(item.id, None)

        return self._runner(delete).addCallback(removed)
