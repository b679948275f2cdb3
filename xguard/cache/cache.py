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
- :mod:`~xguard.cache.flusher`: delivery rounds of what is on disk.

``vm_locks`` is one delivery lock per VM: every upstream delivery this
cache makes (a Direct attempt, the flusher) holds it until upstream
answers, so an abandoned Direct attempt still blocks newer deliveries of
its VM and a late answer can never overwrite a newer version. (The vTPM
sink also takes the vTPM's read-modify-write lock, shared with the control
channel.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from twisted.internet.defer import Deferred, DeferredQueue, gatherResults, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from ..interfaces import IItemSink, IItemWriter, IStatusSource
from ..status import CacheStatus
from ..util.locks import KeyedLocks
from ..util.threads import Runner
from .attempts import DirectAttempts
from .flusher import Flusher, default_backoff
from .layout import Batch, Item, Version
from .machine import CacheModes, _CacheCore
from .pending import PendingVersions

__all__ = ["WriteBackCache"]


@implementer(IItemWriter, IStatusSource)
class WriteBackCache:
    log = Logger()

    def __init__(self, sink: IItemSink, root: str, *, clock: IReactorTime, runner: Runner,
                 monotonic_ns: Callable[[], int], queue_size: int = 512,
                 direct_deadline: float = 3.0, max_concurrency: int = 8,
                 backoff: Callable[[int], float] | None = None,
                 enabled: Callable[[], bool] = lambda: True, interval: float = 0.5,
                 coalesce: bool = True) -> None:
        self.sink = sink
        self.service = sink.service
        self.clock = clock
        self.monotonic_ns = monotonic_ns
        self.enabled = enabled
        self.vm_locks = KeyedLocks()
        self.versions = PendingVersions(root, self.service, clock=clock, runner=runner,
                                        monotonic_ns=monotonic_ns)
        self.attempts = DirectAttempts(sink, self.vm_locks, clock=clock,
                                       deadline=direct_deadline,
                                       give_up=lambda batch: self.modes.failed_transient(batch),
                                       delivered=self.versions.superseded_by)
        self.queue: DeferredQueue[Version] = DeferredQueue(size=queue_size)
        self.modes = CacheModes(_CacheCore(
            self.service.value, self.queue, self.attempts, self.versions,
            wake_flusher=lambda: self.flusher.wake(),
            flusher_retrying=lambda: self.flusher.has_work(), log=self.log))
        self.flusher = Flusher(self.modes, self.versions, sink, self.vm_locks, clock,
                               interval=interval, backoff=backoff or default_backoff(),
                               max_concurrency=max_concurrency, coalesce=coalesce)

    # -- start / stop ------------------------------------------------------
    def recover(self) -> "Deferred[None]":
        """Start-up recovery (before anything listens), then the first mode."""
        def recovered(versions: list[Version]) -> None:
            if versions:
                self.log.info("{service} cache: {n} pending items recovered",
                              service=self.service.value, n=len(versions))
            self.modes.start(versions)
        return self.versions.recover().addCallback(recovered)

    def start(self) -> None:
        """Let the flusher run (it polls only while something is pending)."""
        self.flusher.resume()
        if self.modes.mode() != "Direct":
            self.flusher.wake()

    def stop(self) -> "Deferred[None]":
        """Stop flushing; Direct writes in flight are persisted now (and
        acknowledged), so shutdown never waits for upstream."""
        self.flusher.stop()
        return gatherResults([self.attempts.stop(), *self.versions.cleanups()],
                             consumeErrors=True).addCallback(lambda _: None)

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
        if not self.enabled():
            return self.vm_locks.run(vm_uuid, lambda: self._write_through(batch))
        return self.modes.write(batch)

    def _write_through(self, batch: Batch) -> "Deferred[None]":
        """Cache disabled: upstream or an error, like DirectWriter."""
        d = maybeDeferred(self.sink.deliver, batch.vm, batch.contents())
        return d.addCallback(lambda _: self.versions.superseded_by(batch.versions))

    def pending(self, vm_uuid: str, key: int) -> "Deferred[bytes | None]":
        return self.versions.latest(Item(vm_uuid, key)).addCallback(
            lambda found: None if found is None else found[1])

    def has_pending(self, vm_uuid: str) -> bool:
        return self.versions.has_pending(vm_uuid)

    def pending_vms(self) -> set[str]:
        return self.versions.vms()

    # -- IStatusSource -----------------------------------------------------
    def status(self) -> CacheStatus:
        versions = self.versions
        oldest = versions.oldest_stamp()
        return CacheStatus(
            service=self.service.value,
            mode=self.modes.mode(),
            enabled=bool(self.enabled()),
            queue_depth=len(self.queue.pending),
            pending=versions.per_vm(),
            quarantined=tuple(versions.quarantined),
            last_error=self.flusher.last_error,
            delivered=self.flusher.delivered,
            disk_error=versions.disk_error,
            disk_error_since=versions.disk_error_since,
            # Stamps are CLOCK_MONOTONIC: turned into the clock's time.
            oldest_pending_since=None if oldest is None else
            self.clock.seconds() - max(0, self.monotonic_ns() - oldest) / 1e9,
            pending_bytes=versions.total_bytes(),
            deadline_fallbacks=self.attempts.deadline_fallbacks,
        )
