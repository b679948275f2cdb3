# -*- test-case-name: tests.unit.test_flusher -*-
"""Delivers cached versions upstream.

A ``LoopingCall`` gives the cadence and runs only while the cache is not
Direct (no polling while idle). Each round asks the machine what to deliver
(queue names when Engaged, a directory scan when Disengaged), delivers the
latest version of every item with one read-modify-write per VM (all of a
VM's pending keys coalesced), several VMs in parallel up to
``max_concurrency``, then lets the machine check whether the cache is empty.
A round with transient failures sleeps ``backoff(attempt)`` seconds on the
injected clock (capped exponential with jitter) before the next one; the
outage is logged once when it starts and once when it ends. A version
refused permanently moves to quarantine. The step never raises: a failing
LoopingCall would stop for good.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from twisted.application.internet import backoffPolicy
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    DeferredSemaphore,
    ensureDeferred,
    maybeDeferred,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ..errors import TransientUpstreamError
from .layout import Item, Version

if TYPE_CHECKING:
    from .cache import WriteBackCache

__all__ = ["Flusher", "default_backoff"]


def default_backoff() -> Callable[[int], float]:
    """1 s growing 1.5x to 60 s, plus up to 1 s of jitter."""
    return backoffPolicy(initialDelay=1.0, maxDelay=60.0, factor=1.5)


class Flusher:
    log = Logger()

    def __init__(self, cache: "WriteBackCache", clock: IReactorTime, *, interval: float,
                 backoff: Callable[[int], float], max_concurrency: int,
                 coalesce: bool = True) -> None:
        self.cache = cache
        #: All pending keys of one VM in one upstream read-modify-write.
        #: False only reproduces the upstream design for the benchmarks.
        self.coalesce = coalesce
        self.clock = clock
        self.interval = interval
        self.backoff = backoff
        self.semaphore = DeferredSemaphore(max_concurrency)
        self.retry: set[Item] = set()
        self.attempt = 0
        self.outage_since: float | None = None
        self.outage_delivered = 0
        self.delivered = 0
        self.last_error: str | None = None
        self._loop = LoopingCall(self._step)
        self._loop.clock = clock
        self._sleeping: tuple[IDelayedCall, Deferred[None]] | None = None
        self._stopped = False

    # -- lifecycle ---------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._loop.running

    def wake(self) -> None:
        """There is work: make sure rounds run (first one after ``interval``)."""
        if not self._stopped and not self._loop.running:
            self._loop.start(self.interval, now=False).addErrback(self._loop_died)

    def stop(self) -> None:
        """No more rounds. A delivery in flight is abandoned: its file stays
        on disk until confirmed, so nothing is lost."""
        self._stopped = True
        if self._loop.running:
            self._loop.stop()
        if self._sleeping is not None:
            call, d = self._sleeping
            self._sleeping = None
            if call.active():
                call.cancel()
            d.callback(None)

    def resume(self) -> None:
        self._stopped = False

    def _loop_died(self, failure: Any) -> None:  # pragma: no cover - _step never raises
        self.log.failure("cache flusher stopped", failure)

    # -- outage ------------------------------------------------------------
    def failed(self, error: BaseException) -> None:
        """A transient failure: the first one starts an outage (logged once)."""
        self.last_error = str(error)
        if self.outage_since is None:
            self.outage_since = self.clock.seconds()
            self.outage_delivered = 0
            self.log.warn("{service}: upstream unreachable ({error}); caching writes",
                          service=self.cache.service.value, error=str(error))

    def _recovered(self) -> None:
        if self.outage_since is not None:
            self.log.info("{service}: upstream recovered, {n} items delivered",
                          service=self.cache.service.value, n=self.outage_delivered)
            self.outage_since = None
        self.attempt = 0

    # -- a round -----------------------------------------------------------
    def _step(self) -> "Deferred[None]":
        d = ensureDeferred(self._round())
        d.addErrback(lambda f: self.log.failure("cache flush round failed", f))
        return d

    async def _round(self) -> None:
        machine = self.cache.machine
        batch = await machine.next_batch()
        if batch is None:
            if self._loop.running:
                self._loop.stop()  # Direct: nothing to do until woken
            return
        work = set(batch) | self.retry
        if not work:
            work = set(self.cache.pending_items())
        self.retry = set()
        transient = await self.deliver(work)
        if transient:
            self.attempt += 1
            await self._sleep(self.backoff(self.attempt))
            return
        self._recovered()
        await self.cache.lock.run(machine.settle)

    def _sleep(self, seconds: float) -> "Deferred[None]":
        d: Deferred[None] = Deferred()

        def wake() -> None:
            self._sleeping = None
            d.callback(None)

        self._sleeping = (self.clock.callLater(seconds, wake), d)
        return d

    def has_work(self) -> bool:
        return bool(self.retry)

    async def deliver(self, items: Iterable[Item]) -> bool:
        """Deliver ``items``; True if some failed transiently (kept for retry)."""
        per_vm: dict[str, set[int]] = {}
        for item in items:
            per_vm.setdefault(item.vm, set()).add(item.key)
        groups = sorted(per_vm.items())
        if not self.coalesce:  # the upstream design: one push per item
            groups = [(vm, {key}) for vm, keys in groups for key in sorted(keys)]
        ds = [self.semaphore.run(self._deliver_vm, vm, keys) for vm, keys in groups]
        results = await DeferredList(ds, consumeErrors=True)
        transient = False
        for ok, value in results:
            if not ok:  # pragma: no cover - _deliver_vm catches everything
                self.log.failure("cache delivery failed", value)
                transient = True
            elif value:
                transient = True
        return transient

    def _deliver_vm(self, vm: str, keys: set[int]) -> "Deferred[bool]":
        # Under the VM's delivery lock: a Direct attempt of this VM still in
        # flight (even abandoned) finishes first; the snapshot is taken inside.
        return self.cache.vm_locks.run(vm, lambda: self._deliver_locked(vm, keys))

    async def _deliver_locked(self, vm: str, keys: set[int]) -> bool:
        try:
            snapshot = await self.cache.snapshot(vm, keys)
            if not snapshot:
                return False
            return await self._push(vm, snapshot)
        except Exception as e:  # never let one VM break the round
            self.log.failure("cache delivery of {vm} failed", vm=vm)
            self.retry.update(Item(vm, k) for k in keys)
            self.last_error = str(e)
            return True

    async def _push(self, vm: str, snapshot: dict[int, tuple[Version, bytes]]) -> bool:
        contents = {k: c for k, (_, c) in snapshot.items()}
        try:
            await maybeDeferred(self.cache.sink.deliver, vm, contents)
        except TransientUpstreamError as e:
            self.failed(e)
            self.retry.update(v.item for v, _ in snapshot.values())
            return True
        except Exception as e:  # permanent: split a coalesced push, then quarantine
            if len(snapshot) > 1:
                transient = False
                for key in sorted(snapshot):
                    transient = await self._push(vm, {key: snapshot[key]}) or transient
                return transient
            ((version, _),) = snapshot.values()
            self.last_error = str(e)
            await self.cache.quarantine(version, _reason(e))
            return False
        for version, _ in snapshot.values():
            await self.cache.delivered(version)
        self.delivered += len(snapshot)
        self.outage_delivered += len(snapshot)
        return False


def _reason(e: BaseException) -> str:
    codes = getattr(e, "codes", None)
    return " ".join(codes) if codes else f"{type(e).__name__}: {e}"


