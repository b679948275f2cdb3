# -*- test-case-name: tests.unit.test_delivery -*-
"""One VM's cached writes, delivered — or set aside, never lost.

The flusher (:mod:`xguard.cache.flusher`) decides when; this module
decides what happens to the latest version of each pending key of one VM,
under the VM's delivery lock:

- its VM has a *held* unit (a write of it was set aside while it runs
  here): they join the unit, upstream is not asked (they continue the
  lineage that was set aside);
- otherwise the sink delivers them with the base their files recorded
  (:mod:`xguard.cache.lineage`): upstream still holds a state of xguard's
  lineage → delivered (or already there); another writer changed it, or
  the VM runs on another host → set aside together, upstream untouched;
- upstream's proof that the write can never succeed (the VM or vTPM is
  gone, the content is refused) → set aside;
- anything else upstream says is transient: the versions stay pending
  and are retried with backoff. A VM whose writes keep failing for longer
  than ``stuck_after`` raises one alert (log line, Status, metric), and
  one line when they are delivered after all;
- an exception inside xguard is a bug: logged with its traceback, the
  versions stay pending and are retried.

A vTPM's keys are always handled together: delivered together, or set
aside together, never mixed with another writer's.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import Protocol

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ..errors import PermanentUpstreamError, TransientUpstreamError
from ..interfaces import IItemSink
from ..model import Base
from ..util.locks import KeyedLocks
from .aside import SetAsideStore
from .entry import Entry
from .layout import Version
from .lineage import Lineage

__all__ = ["Deliveries", "Result", "STUCK_AFTER"]

#: Seconds a VM's writes may keep failing before one alert is raised.
STUCK_AFTER = 600.0


class Result(enum.Enum):
    DONE = "done"    # delivered, already there, or set aside
    RETRY = "retry"  # transient failure, or a bug: kept, retried later


class _Versions(Protocol):
    """The versions on disk (:class:`~xguard.cache.pending.PendingVersions`)."""

    recovered: set[Version]

    async def snapshot(self, vm: str,
                       keys: Iterable[int]) -> dict[int, tuple[Version, Entry]]: ...
    async def delivered(self, version: Version) -> None: ...
    def settles(self, vm: str) -> bool: ...


class Deliveries:
    """Delivers one VM's pending versions at a time (see the module)."""

    log = Logger()

    def __init__(self, versions: _Versions, sink: IItemSink, vm_locks: KeyedLocks, *,
                 lineage: Lineage, aside: SetAsideStore, clock: IReactorTime,
                 stuck_after: float = STUCK_AFTER) -> None:
        self.versions = versions
        self.sink = sink
        self.vm_locks = vm_locks
        self.lineage = lineage
        self.aside = aside
        self.clock = clock
        self.stuck_after = stuck_after
        self.service = sink.service.value
        #: Versions delivered since the start.
        self.delivered = 0
        #: The last transient failure (None once a round succeeds).
        self.last_error: str | None = None
        #: VMs whose writes fail now, since when; and those alerted about.
        self.failing: dict[str, float] = {}
        self.stuck: dict[str, float] = {}
        #: VMs delivered (or found already there) in the current round.
        self._delivered_vms: set[str] = set()

    def deliver(self, vm: str, keys: set[int]) -> "Deferred[Result]":
        """Deliver the latest pending version of each of ``keys`` of ``vm``,
        under its delivery lock: a Direct attempt of this VM still in
        flight (even abandoned) finishes first; the snapshot is taken
        inside."""
        return self.vm_locks.run(vm, lambda: self._locked(vm, keys))

    async def _locked(self, vm: str, keys: set[int]) -> Result:
        try:
            snapshot = await self.versions.snapshot(vm, keys)
            if not snapshot:
                return Result.DONE
            return await self._push(vm, snapshot)
        except Exception as e:  # a bug (ours): keep the items, retry later
            self.log.failure("{service}: delivering the cached writes of VM {vm} failed "
                             "(a bug in xguard); they stay pending and are retried",
                             service=self.service, vm=vm)
            self.last_error = f"{type(e).__name__}: {e}"
            return Result.RETRY

    async def _push(self, vm: str, snapshot: Mapping[int, tuple[Version, Entry]]) -> Result:
        contents = {key: entry.content for key, (_, entry) in snapshot.items()}
        versions = [version for version, _ in snapshot.values()]
        if self.aside.holds(vm):
            await self.aside.add(vm, kind="conflict", reason="", values=contents,
                                 complete=False)
            await self._done(vm, versions)
            return Result.DONE
        accept = self.lineage.for_delivery(vm, [entry.accept for _, entry in snapshot.values()])
        base = Base(check=True, accept=accept,
                    recovered=any(v in self.versions.recovered for v in versions),
                    legacy=any(entry.legacy for _, entry in snapshot.values()),
                    # only an unknown base asks (a lookup of the VM's record)
                    continuous=accept is not None or all(
                        self.lineage.continuous(vm, v.ts) for v in versions))
        self.lineage.sending(vm, contents)
        try:
            outcome = await maybeDeferred(self.sink.deliver, vm, contents, base)
        except TransientUpstreamError as e:
            self.last_error = str(e)
            self._failed(vm, str(e))
            return Result.RETRY
        except PermanentUpstreamError as e:
            self._answered(vm)
            await self._set_aside(vm, versions, "refused", "upstream refuses it for good: "
                                  + " ".join(e.codes), contents)
            return Result.DONE
        self._answered(vm)
        if outcome.set_aside:
            await self._set_aside(vm, versions, outcome.kind, outcome.reason,
                                  outcome.ours or contents)
            return Result.DONE
        await self._done(vm, versions)
        self._delivered_vms.add(vm)  # settled once the round's files are gone
        self.delivered += len(versions)
        return Result.DONE

    def round_done(self) -> None:
        """The round's delivered files are deleted (or pending again): what
        was sent for its VMs is forgotten where nothing else of them is
        pending (:meth:`_Versions.settles` says why not before)."""
        vms, self._delivered_vms = self._delivered_vms, set()
        for vm in vms:
            if self.versions.settles(vm):
                self.lineage.settled(vm)

    async def _done(self, vm: str, versions: list[Version]) -> None:
        for version in versions:
            await self.versions.delivered(version)

    async def _set_aside(self, vm: str, versions: list[Version], kind: str, reason: str,
                         values: Mapping[int, bytes]) -> None:
        """Durably set aside, then no longer pending (the files go at the
        end of the round)."""
        new = await self.aside.add(vm, kind=kind, reason=reason, values=values,
                                   complete=False)
        await self._done(vm, versions)
        if new:
            self.log.error(
                "{service}: the cached writes of VM {vm} (keys {keys}) are set aside, not "
                "delivered: {reason}. Upstream keeps its value; see xguard-ctl set-aside",
                service=self.service, vm=vm, keys=",".join(str(k) for k in sorted(values)),
                reason=reason)

    # -- failing for long ------------------------------------------------------------
    def _failed(self, vm: str, error: str) -> None:
        now = self.clock.seconds()
        since = self.failing.setdefault(vm, now)
        if vm not in self.stuck and now - since >= self.stuck_after:
            self.stuck[vm] = since
            self.log.error("{service}: the cached writes of VM {vm} have failed for {minutes:.0f}"
                           " min ({error}); they stay pending and are retried",
                           service=self.service, vm=vm, minutes=(now - since) / 60,
                           error=error)

    def _answered(self, vm: str) -> None:
        since = self.failing.pop(vm, None)
        if self.stuck.pop(vm, None) is not None and since is not None:
            self.log.error("{service}: the cached writes of VM {vm} went through after "
                           "failing for {minutes:.0f} min", service=self.service, vm=vm,
                           minutes=(self.clock.seconds() - since) / 60)
