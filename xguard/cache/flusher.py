# -*- test-case-name: tests.unit.test_flusher -*-
"""When cached versions are delivered: the cadence, the backoff, the rounds.

A ``LoopingCall`` gives the cadence and runs only while the cache is not
Direct (no polling while idle). Each round asks the machine what to deliver
(queue names when Engaged, a directory scan when Disengaged), delivers the
latest version of every item with one read-modify-write per VM (all of a
VM's pending keys coalesced: :mod:`xguard.cache.delivery` says what becomes
of them), several VMs in parallel up to ``max_concurrency``, deletes what
was delivered in one durable step, then lets the machine check whether the
cache is empty.

A round in which some VM must be retried (a transient failure, a bug)
keeps those items and waits ``backoff(attempt)`` (capped exponential with
jitter) — cut short when upstream answers again
(:class:`~xguard.upstream.reachability.Reachability`).

A large backlog takes a while: :class:`DrainProgress` tells it, in the log
(a line every :data:`PROGRESS_EVERY` seconds once it lasts longer: items
left, rate; one summary line at its end: items, time) and in Status
(:class:`~xguard.status.Drain`). It counts from the start of the first
delivery that went through, so an outage's failing rounds are not part of
it and log nothing.

The step never raises: a failing LoopingCall would stop for good. The
flusher knows the cache through narrow collaborators: its modes
(:class:`FlushModes`), its versions (:class:`FlushVersions`) and the
deliveries of one VM (:class:`FlushDeliveries`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import Protocol, cast

from twisted.application.internet import backoffPolicy
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    DeferredSemaphore,
    ensureDeferred,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..status import Drain
from .delivery import Result
from .layout import Item

__all__ = ["Flusher", "FlushModes", "FlushVersions", "DrainProgress", "default_backoff",
           "PROGRESS_EVERY"]

#: Seconds between two progress lines of a backlog being delivered (none for
#: a backlog delivered faster: only its summary line).
PROGRESS_EVERY = 5.0


def default_backoff() -> Callable[[int], float]:
    """1 s growing 1.5x to 60 s, plus up to 1 s of jitter."""
    return backoffPolicy(initialDelay=1.0, maxDelay=60.0, factor=1.5)


class FlushModes(Protocol):
    """The cache's modes, as the flusher feeds them
    (:class:`~xguard.cache.machine.CacheModes`)."""

    def next_batch(self) -> "Deferred[list[Item] | None]":
        "What to deliver now (None: nothing pending, stop polling)."

    def settle(self) -> "Deferred[None]":
        "A round ended: let the machine check whether the cache is empty."

    def mode(self) -> str:
        "Direct, Engaged or Disengaged."


class FlushVersions(Protocol):
    """The versions the flusher delivers
    (:class:`~xguard.cache.pending.PendingVersions`)."""

    def items(self) -> list[Item]:
        "Every item with a pending version."

    def round_done(self) -> "Deferred[None]":
        "The round ended: the delivered versions' files go, durably."


class FlushDeliveries(Protocol):
    """One VM's delivery (:class:`~xguard.cache.delivery.Deliveries`)."""

    service: str
    last_error: str | None
    #: Versions delivered since the start.
    delivered: int

    def deliver(self, vm: str, keys: set[int]) -> "Deferred[Result]":
        "Deliver (or set aside) the latest pending version of ``keys`` of ``vm``."

    def round_done(self) -> None:
        "The round's deletions are over: settle the VMs it delivered."


class DrainProgress:
    """A backlog being delivered: from the start of the first delivery
    that went through until the cache is Direct again (or the flusher
    stops).

    :param left: how many items are pending now.
    """

    def __init__(self, service: str, clock: IReactorTime, left: Callable[[], int], log: Logger,
                 *, every: float = PROGRESS_EVERY) -> None:
        self.service = service
        self.clock = clock
        self.left = left
        self.log = log
        self.every = every
        #: The drain now or the last one: when it started and ended, what the
        #: delivered count was when it started, and is now.
        self.started: float | None = None
        self.ended: float | None = None
        self.base = 0
        self.delivered = 0
        self._round_base = 0
        self._last_line = 0.0

    @property
    def active(self) -> bool:
        return self.started is not None and self.ended is None

    def round_started(self, delivered: int) -> None:
        """A round with work starts (``delivered``: the count so far)."""
        self._round_base = delivered

    def advanced(self, delivered: int, began: float) -> None:
        """A VM's delivery, begun at ``began``, ended (``delivered``: the
        count so far). A line at most every ``every`` seconds."""
        if not self.active:
            if delivered == self._round_base:
                return  # nothing delivered yet: no drain (an outage's rounds)
            self.started, self.ended, self.base = began, None, self._round_base
            self._last_line = began
        self.delivered = delivered - self.base
        now = self.clock.seconds()
        if now - self._last_line < self.every:
            return
        self._last_line = now
        elapsed = now - (self.started or now)
        rate = self.delivered / elapsed if elapsed > 0 else 0.0
        left = self.left()
        self.log.info("{service} cache: delivering the backlog: {items} left, {delivered} "
                      "delivered in {elapsed:.0f} s ({rate:.1f}/s){eta}",
                      service=self.service, items=_items(left), left=left,
                      delivered=self.delivered, elapsed=elapsed, rate=rate,
                      eta=f", about {left / rate:.0f} s to go" if rate > 0 else "")

    def finished(self, delivered: int, *, stopped: bool = False) -> None:
        """The cache is Direct again (or, ``stopped``, the flusher stops):
        one summary line."""
        if not self.active:
            return
        self.ended = now = self.clock.seconds()
        self.delivered = delivered - self.base
        elapsed = now - (self.started or now)
        rate = self.delivered / elapsed if elapsed > 0 else 0.0
        if stopped:
            left = self.left()
            self.log.info("{service} cache: delivery stopped: {items} delivered in "
                          "{elapsed:.1f} s, {left} left (delivered after the next start)",
                          service=self.service, items=_items(self.delivered),
                          delivered=self.delivered, elapsed=elapsed, left=left)
        else:
            self.log.info("{service} cache: backlog delivered: {items} in {elapsed:.1f} s "
                          "({rate:.1f}/s)", service=self.service, items=_items(self.delivered),
                          delivered=self.delivered, elapsed=elapsed, rate=rate)

    def status(self, left: int) -> Drain | None:
        """For Status: the drain now (``left`` items pending), or the last one."""
        if self.started is None:
            return None
        until = self.clock.seconds() if self.ended is None else self.ended
        elapsed = until - self.started
        return Drain(started=self.started, delivered=self.delivered,
                     left=0 if self.ended is not None else left,
                     rate=self.delivered / elapsed if elapsed > 0 else 0.0, ended=self.ended)


def _items(n: int) -> str:
    return "1 item" if n == 1 else f"{n} items"


class _State(enum.Enum):
    IDLE = "idle"                # Direct: the loop is stopped
    RUNNING = "running"          # rounds at the interval
    BACKING_OFF = "backing off"  # a round failed transiently; waiting to retry
    STOPPED = "stopped"          # not started yet, or stopped: no rounds


class Flusher:
    log = Logger()

    def __init__(self, modes: FlushModes, versions: FlushVersions,
                 deliveries: FlushDeliveries, clock: IReactorTime, *, interval: float,
                 backoff: Callable[[int], float], max_concurrency: int,
                 coalesce: bool = True) -> None:
        self.modes = modes
        self.versions = versions
        self.deliveries = deliveries
        #: All pending keys of one VM in one upstream read-modify-write.
        #: False only reproduces the upstream design for the benchmarks.
        self.coalesce = coalesce
        self.clock = clock
        self.interval = interval
        self.backoff = backoff
        self.semaphore = DeferredSemaphore(max_concurrency)
        # No round before resume(): the cache's recovery queues what it
        # found (and wakes the flusher) before the daemon serves the
        # sockets that say which VMs run here.
        self.state = _State.STOPPED
        #: Consecutive rounds that had to be retried (drives the backoff).
        self.attempt = 0
        self.retry: set[Item] = set()
        self._loop = LoopingCall(self._step)
        self._loop.clock = clock
        self._sleeping: tuple[IDelayedCall, Deferred[None]] | None = None
        self.progress = DrainProgress(deliveries.service, clock,
                                      lambda: len(versions.items()), self.log)

    # -- lifecycle ---------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._loop.running

    def wake(self) -> None:
        """There is work: make sure rounds run (first one after ``interval``)."""
        if self.state is not _State.STOPPED and not self._loop.running:
            self.state = _State.RUNNING
            self._loop.start(self.interval, now=False).addErrback(self._loop_died)

    def upstream_answers(self) -> None:
        """Upstream is back: a round waiting out its backoff runs now."""
        self.attempt = 0
        self._end_sleep()

    def stop(self) -> None:
        """No more rounds. A delivery in flight is abandoned: its file stays
        on disk until confirmed, so nothing is lost."""
        self.state = _State.STOPPED
        if self._loop.running:
            self._loop.stop()
        self._end_sleep()
        self.progress.finished(self.deliveries.delivered, stopped=True)

    def resume(self) -> None:
        """Rounds may run (from the next :meth:`wake`)."""
        if self.state is _State.STOPPED:
            self.state = _State.IDLE

    def _end_sleep(self) -> None:
        if self._sleeping is not None:
            call, d = self._sleeping
            self._sleeping = None
            if call.active():
                call.cancel()
            d.callback(None)

    def _loop_died(self, failure: Failure) -> None:  # pragma: no cover - _step never raises
        self.log.failure("cache flusher stopped", failure)

    # -- a round -----------------------------------------------------------
    def _step(self) -> "Deferred[None]":
        d = ensureDeferred(self._round())
        d.addErrback(lambda f: self.log.failure("cache flush round failed", f))
        return d

    async def _round(self) -> None:
        batch = await self.modes.next_batch()
        if batch is None:
            self.progress.finished(self.deliveries.delivered)
            if self._loop.running:
                self._loop.stop()  # Direct: nothing to do until woken
            if self.state is not _State.STOPPED:
                self.state = _State.IDLE
            return
        work = set(batch) | self.retry
        if not work:
            work = set(self.versions.items())
        self.retry = set()
        self.progress.round_started(self.deliveries.delivered)
        retry = await self.deliver(work)
        try:
            await self.versions.round_done()
        except Exception:
            self.log.failure("{service}: deleting the delivered versions failed; they stay "
                             "pending", service=self.deliveries.service)
            retry = True
        self.deliveries.round_done()
        if retry:
            self.attempt += 1
            self.state = _State.BACKING_OFF
            await self._sleep(self.backoff(self.attempt))
            if self.state is _State.BACKING_OFF:
                self.state = _State.RUNNING
            return
        self.attempt = 0
        self.deliveries.last_error = None
        await self.modes.settle()
        if self.modes.mode() == "Direct":
            self.progress.finished(self.deliveries.delivered)

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
        """Deliver ``items``; True if some must be retried (kept pending)."""
        per_vm: dict[str, set[int]] = {}
        for item in items:
            per_vm.setdefault(item.vm, set()).add(item.key)
        groups = sorted(per_vm.items())
        if not self.coalesce:  # the upstream design: one push per item
            groups = [(vm, {key}) for vm, keys in groups for key in sorted(keys)]
        ds = [self.semaphore.run(self._deliver, vm, keys) for vm, keys in groups]
        results = await DeferredList(ds, consumeErrors=True)
        failed: set[str] = set()
        for (vm, keys), (ok, value) in zip(groups, results):
            if not ok:  # pragma: no cover - Deliveries catches everything
                self.log.failure("cache delivery of {vm} failed", cast(Failure, value), vm=vm)
                value = Result.RETRY
            if value is Result.RETRY:
                self.retry.update(Item(vm, k) for k in keys)
                failed.add(vm)
        if failed and len(failed) < len(per_vm):
            # Upstream took the others: not an outage (the reachability
            # logs those), yet the whole flusher now backs off for these.
            self.log.warn("{service} cache: the deliveries of {failed} of {total} VMs failed "
                          "transiently while upstream took the others ({error}); they are "
                          "retried after a backoff", service=self.deliveries.service,
                          failed=len(failed), total=len(per_vm),
                          error=self.deliveries.last_error)
        return bool(failed)

    def _deliver(self, vm: str, keys: set[int]) -> "Deferred[Result]":
        began = self.clock.seconds()

        def ended(result: Result) -> Result:
            self.progress.advanced(self.deliveries.delivered, began)
            return result

        return self.deliveries.deliver(vm, keys).addCallback(ended)
