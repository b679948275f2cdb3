# -*- test-case-name: tests.unit.test_cache -*-
"""Direct writes in flight: the one place a write waits for upstream.

A Direct write is sent upstream at once; the guest is answered when
upstream took it, or — when upstream failed transiently or did not answer
within the direct deadline — once the write is durable on disk instead
(``give_up``: the machine then moves to Engaged). The upstream call is
never cancelled: it keeps the VM's delivery lock until it resolves, so
nothing newer of that VM is delivered before it, and a late success can
never overwrite a newer version.

Each attempt's state is one explicit value (:class:`AttemptState`), changed
in one method, with the deadline timer it owns.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from ..errors import TransientUpstreamError
from ..interfaces import IItemSink
from ..model import DIRECT
from ..util.locks import KeyedLocks
from .layout import Batch, Version
from .lineage import Lineage

__all__ = ["AttemptState", "DirectAttempts"]


class AttemptState(enum.Enum):
    SENDING = "sending"    # upstream has it; the deadline runs
    ANSWERED = "answered"  # upstream took it or refused it: the guest has its answer
    ON_DISK = "on disk"    # given up (transient failure, deadline, stop): made durable here


class _Attempt:
    """One Direct write: its batch, the guest's answer, its state."""

    def __init__(self, batch: Batch, done: "Deferred[None]") -> None:
        self.batch = batch
        self.done = done
        self.state = AttemptState.SENDING
        self.timer: IDelayedCall | None = None
        #: Fires once a given-up attempt is durable (or failed to be).
        self.on_disk: Deferred[None] | None = None


class DirectAttempts:
    """The Direct writes of one service in flight.

    :param give_up: makes a batch durable on disk and queues it (the
        machine's Engaged path); its Deferred fires once it is durable.
    :param delivered: upstream took a batch (older versions of its items
        must go).
    """

    log = Logger()

    def __init__(self, sink: IItemSink, vm_locks: KeyedLocks, lineage: Lineage, *,
                 clock: IReactorTime, deadline: float,
                 give_up: Callable[[Batch], "Deferred[None]"],
                 delivered: Callable[[Iterable[Version]], "Deferred[None]"],
                 settles: Callable[[str], bool]) -> None:
        self.sink = sink
        self.vm_locks = vm_locks
        self.lineage = lineage
        self._settles = settles
        self.clock = clock
        self.deadline = deadline
        self._give_up_to_disk = give_up
        self._delivered = delivered
        self._sending: set[_Attempt] = set()
        #: Direct writes upstream did not answer in time (made durable here).
        self.deadline_fallbacks = 0

    def start(self, batch: Batch, done: "Deferred[None]") -> None:
        """Send ``batch`` upstream in its VM's turn; ``done`` fires once it
        is durable (upstream or disk), or fails with upstream's refusal."""
        attempt = _Attempt(batch, done)
        self._sending.add(attempt)
        attempt.timer = self.clock.callLater(self.deadline, self._deadline_passed, attempt)
        self.vm_locks.run(batch.vm, lambda: self._run(attempt))

    def stop(self) -> "Deferred[None]":
        """Every attempt still waiting for upstream goes to disk now (and is
        acknowledged): a stop never waits for upstream."""
        on_disk = [self._give_up(a, "shutting down") for a in list(self._sending)]
        return gatherResults([d for d in on_disk if d is not None],
                             consumeErrors=True).addCallback(lambda _: None)

    async def _run(self, attempt: _Attempt) -> None:
        if attempt.state is not AttemptState.SENDING:
            return  # its deadline passed while waiting its turn: it is on disk already
        batch = attempt.batch
        contents = batch.contents()
        # Until upstream answers, it may hold this (a file written meanwhile
        # records it: see xguard.cache.lineage).
        self.lineage.sending(batch.vm, contents)
        try:
            await maybeDeferred(self.sink.deliver, batch.vm, contents, DIRECT)
        except TransientUpstreamError as e:
            on_disk = self._give_up(attempt, str(e))
            if on_disk is not None:
                try:
                    await on_disk  # durable before this VM's next delivery starts
                except Exception:
                    pass  # the client was told (CacheUnavailable)
            return
        except Exception as e:
            if attempt.state is AttemptState.SENDING:
                self._to(attempt, AttemptState.ANSWERED)
                attempt.done.errback(e)
            else:
                self.log.info("late failure of an abandoned write of VM {vm}: {error}",
                              vm=batch.vm, error=str(e))
            return
        if self._settles(batch.vm):
            self.lineage.settled(batch.vm)
        if attempt.state is AttemptState.SENDING:
            self._to(attempt, AttemptState.ANSWERED)
            await self._delivered(batch.versions)
            attempt.done.callback(None)

    def _deadline_passed(self, attempt: _Attempt) -> None:
        if attempt.state is AttemptState.SENDING:
            self.deadline_fallbacks += 1
        self._give_up(attempt, "no answer within the deadline")

    def _give_up(self, attempt: _Attempt, reason: str) -> "Deferred[None] | None":
        """Treat the attempt as a transient failure: durable on disk,
        queued, Engaged, acknowledged. The upstream call is not cancelled.
        Returns when it is on disk (None: it was answered already)."""
        if attempt.state is not AttemptState.SENDING:
            return attempt.on_disk
        self._to(attempt, AttemptState.ON_DISK)
        self.log.debug("write of VM {vm} goes to disk: {reason}",
                       vm=attempt.batch.vm, reason=reason)
        d = self._give_up_to_disk(attempt.batch)
        d.addCallbacks(lambda _: attempt.done.callback(None), attempt.done.errback)
        attempt.on_disk = d
        return d

    def _to(self, attempt: _Attempt, state: AttemptState) -> None:
        """The one place an attempt changes state: it leaves SENDING once."""
        assert attempt.state is AttemptState.SENDING, (attempt.state, state)
        attempt.state = state
        self._sending.discard(attempt)
        if attempt.timer is not None and attempt.timer.active():
            attempt.timer.cancel()
