# -*- test-case-name: tests.unit.test_cache -*-
"""The durable write-back cache of one service: the :class:`IItemWriter`
the domain sockets and the orchestrator write through, and its status.

A write is acknowledged only once it is durable: upstream took it (Direct)
or it is on disk (``.pre``, fsync, rename, directory fsync). This class is
only the face; the parts, each in its module:

- :mod:`~xguard.cache.machine`: the modes (Direct, Engaged, Disengaged)
  and the core they act on, behind the service lock (no upstream call
  ever runs under it);
- :mod:`~xguard.cache.pending`: the versions on disk and their index;
- :mod:`~xguard.cache.attempts`: Direct writes in flight and their
  deadline;
- :mod:`~xguard.cache.flusher`: delivery rounds of what is on disk, and
  :mod:`~xguard.cache.delivery`: what becomes of one VM's writes;
- :mod:`~xguard.cache.lineage`: the base each write records, and what a
  delivery may overwrite;
- :mod:`~xguard.cache.aside`: writes set aside, until the operator
  resolves them (:meth:`WriteBackCache.resolve`).

``vm_locks`` is one delivery lock per VM: every upstream delivery this
cache makes (a Direct attempt, the flusher) holds it until upstream
answers, so an abandoned Direct attempt still blocks newer deliveries of
its VM and a late answer can never overwrite a newer version. (The vTPM
sink also takes the vTPM's read-modify-write lock, shared with the control
channel.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from twisted.internet.defer import (
    Deferred,
    DeferredQueue,
    ensureDeferred,
    maybeDeferred,
)
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from ..errors import NotSetAside, ResolutionRefused
from ..interfaces import IItemSink, IItemWriter, ISetAsideSource, IStatusSource
from ..model import DIRECT
from ..status import CacheStatus, SetAside
from ..util.locks import KeyedLocks
from ..util.threads import Runner
from .aside import UNIT, SetAsideStore
from .attempts import DirectAttempts
from .delivery import STUCK_AFTER, Deliveries
from .entry import Entry
from .flusher import Flusher, default_backoff
from .layout import KEYS, Batch, Item, Version
from .lineage import Lineage, LineageRecords
from .machine import CacheModes, _CacheCore
from .pending import PendingVersions

__all__ = ["WriteBackCache"]


@implementer(IItemWriter, IStatusSource, ISetAsideSource)
class WriteBackCache:
    log = Logger()

    def __init__(self, sink: IItemSink, root: str, *, clock: IReactorTime, runner: Runner,
                 monotonic_ns: Callable[[], int], queue_size: int = 512,
                 direct_deadline: float = 3.0, max_concurrency: int = 8,
                 backoff: Callable[[int], float] | None = None,
                 enabled: Callable[[], bool] = lambda: True, interval: float = 0.5,
                 coalesce: bool = True, is_live: Callable[[str], bool] = lambda vm: False,
                 stuck_after: float = STUCK_AFTER,
                 make_room: Callable[[int], "Deferred[int]"] | None = None,
                 records: LineageRecords | None = None) -> None:
        self.sink = sink
        self.service = sink.service
        self.clock = clock
        self.monotonic_ns = monotonic_ns
        self.enabled = enabled
        self.vm_locks = KeyedLocks()
        self.lineage = Lineage(self.service, sink.last_seen, records,
                               monotonic_ns=monotonic_ns)
        self._is_live = is_live
        self.aside = SetAsideStore(root, self.service, runner=runner, clock=clock,
                                   is_live=is_live)
        self.versions = PendingVersions(root, self.service, clock=clock, runner=runner,
                                        monotonic_ns=monotonic_ns, lineage=self.lineage,
                                        aside=self.aside, make_room=make_room)
        self.attempts = DirectAttempts(sink, self.vm_locks, self.lineage, clock=clock,
                                       deadline=direct_deadline,
                                       give_up=lambda batch: self.modes.failed_transient(batch),
                                       delivered=self.versions.superseded_by,
                                       settles=self.versions.settles)
        self.queue: DeferredQueue[Version] = DeferredQueue(size=queue_size)
        self.modes = CacheModes(_CacheCore(
            self.service.value, self.queue, self.attempts, self.versions,
            wake_flusher=lambda: self.flusher.wake(),
            flusher_retrying=lambda: self.flusher.has_work(), log=self.log))
        self.deliveries = Deliveries(self.versions, sink, self.vm_locks, lineage=self.lineage,
                                     aside=self.aside, clock=clock, stuck_after=stuck_after)
        self.flusher = Flusher(self.modes, self.versions, self.deliveries, clock,
                               interval=interval, backoff=backoff or default_backoff(),
                               max_concurrency=max_concurrency, coalesce=coalesce)

    # -- start / stop ------------------------------------------------------
    def recover(self) -> "Deferred[None]":
        """Start-up recovery (before anything listens), then the first mode."""
        async def run() -> None:
            await self.aside.load()
            versions = await self.versions.recover()
            if versions:
                self.log.info("{service} cache: {n} pending items recovered",
                              service=self.service.value, n=len(versions))
            self.modes.start(versions)
        return ensureDeferred(run())

    def sockets_resumed(self) -> "Deferred[None]":
        """The sockets of the active file are served again: writes set
        aside for VMs that did not come back are no longer held, and the
        recovered writes of those VMs are of a life that ended (if the VM
        starts here again, another host may have written meanwhile: their
        unknown bases no longer let them through)."""
        for vm in self.versions.vms():
            if not self._is_live(vm):
                self.lineage.vm_gone(vm, pending=True)
        return self.aside.release_unserved()

    def vm_gone(self, vm: str) -> "Deferred[None]":
        """``vm``'s last socket was destroyed: what was set aside for it is
        no longer read (a VM started again reads upstream's state), and its
        writes whose base is unknown can no longer be delivered blindly."""
        self.lineage.vm_gone(vm, pending=self.versions.holds(vm))
        return self.aside.release(vm)

    def start(self) -> None:
        """Let the flusher run (it polls only while something is pending)."""
        self.flusher.resume()
        if self.modes.mode() != "Direct":
            self.flusher.wake()

    def stop(self) -> "Deferred[None]":
        """Stop flushing; Direct writes in flight are persisted now (and
        acknowledged), so shutdown never waits for upstream."""
        self.flusher.stop()
        return self.attempts.stop()

    def upstream_answers(self) -> None:
        """Upstream is back: deliveries waiting out a backoff go now."""
        self.flusher.upstream_answers()

    # -- IItemWriter -------------------------------------------------------
    def write(self, vm_uuid: str, key: int, content: bytes) -> "Deferred[None]":
        return self.write_many(vm_uuid, {key: content})

    def write_many(self, vm_uuid: str, changes: Mapping[int, bytes]) -> "Deferred[None]":
        """Write several items of one VM as one batch (all or none
        acknowledged), newer than every write acknowledged before."""
        batch = self.versions.stamp(vm_uuid, changes.items())
        if self.aside.holds(vm_uuid):
            # The VM runs the lineage that was set aside: its writes join it
            # (on disk, then the unit), never upstream; even with the cache
            # switched off.
            return self.modes.failed_transient(batch)
        if not self.enabled():
            return self.vm_locks.run(vm_uuid, lambda: self._write_through(batch))
        return self.modes.write(batch)

    def _write_through(self, batch: Batch) -> "Deferred[None]":
        """Cache disabled: upstream or an error, like DirectWriter."""
        contents = batch.contents()
        self.lineage.sending(batch.vm, contents)
        d = maybeDeferred(self.sink.deliver, batch.vm, contents, DIRECT)
        return d.addCallback(lambda _: self.versions.superseded_by(batch.versions))

    def pending(self, vm_uuid: str, key: int) -> "Deferred[bytes | None]":
        """The latest acknowledged value not delivered: a pending version,
        else a held set-aside value (its VM keeps reading what it wrote)."""
        def found(latest: tuple[Version, Entry] | None) -> bytes | None:
            if latest is not None:
                return latest[1].content
            return self.aside.held_value(vm_uuid, key)
        return self.versions.latest(Item(vm_uuid, key)).addCallback(found)

    def has_pending(self, vm_uuid: str) -> bool:
        """Also while a delivered version's file is not durably gone: the
        VM's lineage records (xguard.state.known) must outlive it."""
        return self.versions.holds(vm_uuid)

    def pending_vms(self) -> set[str]:
        return self.versions.vms()

    # -- set aside (the operator's) ------------------------------------------
    def set_aside(self) -> list[SetAside]:
        return self.aside.items()

    def set_aside_values(self, item_id: str) -> "Deferred[dict[int, bytes]]":
        """Our values of a set-aside item (to export them)."""
        async def run() -> dict[int, bytes]:
            return await self.aside.values(self._item(item_id).id)
        return ensureDeferred(run())

    def resolve(self, item_id: str, action: str) -> "Deferred[None]":
        """Resolve a set-aside item: ``push`` ours over upstream's, or
        ``keep`` upstream's (``exported``: the same, once ours is saved
        elsewhere). Logged. Refused (ValueError, saying why) when it cannot
        be done as asked (ResolutionRefused, saying why)."""
        async def run() -> None:
            await self._resolve(self._item(item_id), action)
        return ensureDeferred(run())

    def _item(self, item_id: str) -> SetAside:
        item = self.aside.get(item_id)
        if item is None:
            raise NotSetAside(f"no write is set aside as {item_id!r} (see xguard-ctl set-aside)")
        return item

    async def _resolve(self, item: SetAside, action: str) -> None:
        if action not in ("push", "keep", "exported"):
            raise ResolutionRefused(f"unknown resolution {action!r}: push, keep or export")
        if action == "push":
            await self._push(item)
        elif item.held:
            raise ResolutionRefused(
                f"VM {item.vm} runs here and keeps writing the state that was set aside: "
                "stop it first, or push ours")
        else:
            await self.aside.remove(item.id)
        self.log.warn("{service}: set-aside write {id} resolved: {how}",
                      service=self.service.value, id=item.id,
                      how={"push": "ours pushed over upstream's",
                           "keep": "upstream's kept, ours dropped",
                           "exported": "upstream's kept, ours exported"}[action])

    async def _push(self, item: SetAside) -> None:
        if item.kind == "damaged" or not item.file.endswith(UNIT):
            raise ResolutionRefused(
                f"{item.id} holds the bytes of a single file ({item.reason}): it cannot be "
                "pushed; export it, or keep upstream's")
        if not item.complete:
            raise ResolutionRefused(
                f"only key(s) {','.join(map(str, item.keys))} of {item.id} are known: pushing "
                "them over upstream's other keys would mix two states; export it, or keep "
                "upstream's")
        values = await self.aside.values(item.id)

        async def push() -> None:
            # Writes the VM made since join the push: they continue its lineage.
            pending = await self.versions.snapshot(item.vm, sorted(KEYS[self.service]))
            merged = {**values, **{k: entry.content for k, (_, entry) in pending.items()}}
            self.lineage.sending(item.vm, merged)
            await maybeDeferred(self.sink.deliver, item.vm, merged, DIRECT)
            for version, _ in pending.values():
                await self.versions.delivered(version)
            await self.versions.round_done()
            await self.aside.remove(item.id)

        await self.vm_locks.run(item.vm, push)

    # -- IStatusSource -----------------------------------------------------
    def status(self) -> CacheStatus:
        versions = self.versions
        oldest = versions.oldest_stamp()
        pending = versions.per_vm()
        return CacheStatus(
            service=self.service.value,
            mode=self.modes.mode(),
            enabled=bool(self.enabled()),
            queue_depth=len(self.queue.pending),
            pending=pending,
            quarantined=tuple(self.aside.items()),
            stuck=dict(self.deliveries.stuck),
            set_aside_total=dict(self.aside.created),
            last_error=self.deliveries.last_error,
            delivered=self.deliveries.delivered,
            disk_error=versions.disk_error,
            disk_error_since=versions.disk_error_since,
            # Stamps are CLOCK_MONOTONIC: turned into the clock's time.
            oldest_pending_since=None if oldest is None else
            self.clock.seconds() - max(0, self.monotonic_ns() - oldest) / 1e9,
            pending_bytes=versions.total_bytes(),
            deadline_fallbacks=self.attempts.deadline_fallbacks,
            drain=self.flusher.progress.status(left=sum(pending.values())),
        )
