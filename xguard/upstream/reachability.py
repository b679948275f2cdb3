# -*- test-case-name: tests.unit.test_reachability -*-
"""Whether upstream answers, as the calls made to it see it.

One instance per upstream, fed by every call's outcome: any answer (even
an API error) proves upstream is there; a transient failure (refused,
timed out, ``HOST_STILL_BOOTING`` …) says it is not. An outage is logged
once when it starts and once when it ends, at the same level, whoever made
the calls (domain reads, cache deliveries, the control channel), so a long
outage writes two lines, not one per retry.

An outage ends once upstream has answered and then not failed for
``settle`` seconds (one): an xapi that answers reads but still refuses writes
(``HOST_STILL_BOOTING`` on some calls) is not "back", and must not flap
the log at every retry.

Others subscribe to the transitions: the caches' flushers retry at once
when upstream answers again.

Facts, not beliefs: every call takes a ticket when it starts
(:meth:`Reachability.call_started`), and its answer is reported with it.
The last-known-state store drops a stopped VM's copy only once upstream
answered a call started after the VM's last socket went
(:meth:`Reachability.subscribe_answered_call`) — not on the belief that
upstream is up, nor on the outage's declared end.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

__all__ = ["Reachability"]


class Reachability:
    """Tri-state: None (no call answered or failed yet), True, False.

    :param clock: timestamps the outage's start, times ``settle``.
    :param target: names upstream in the log lines.
    :param settle: seconds without a failure, after an answer, that end an
        outage.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, target: str, *, settle: float = 1.0) -> None:
        self._clock = clock
        self.target = target
        self.settle = settle
        self._last_failure = 0.0
        self._check: IDelayedCall | None = None
        self.reachable: bool | None = None
        #: When the current outage started (None while reachable).
        self.down_since: float | None = None
        #: The transient error that started (or last prolonged) the outage.
        self.last_error: str | None = None
        #: During an outage: whether upstream answered at all (with "not
        #: now", e.g. HOST_STILL_BOOTING) or gave no answer (refused, timed
        #: out). Only the latter is probed (xguard.upstream.probe).
        self.answering = False
        self._observers: list[Callable[[bool], None]] = []
        self._answer_observers: list[Callable[[], None]] = []
        self._call_observers: list[Callable[[int], None]] = []
        #: The ticket of the last call started (0: none yet).
        self.last_ticket = 0

    def subscribe(self, observer: Callable[[bool], None]) -> None:
        """Call ``observer(True)`` when upstream answers again after being
        down or unknown, ``observer(False)`` when an outage starts."""
        self._observers.append(observer)

    def subscribe_answer(self, observer: Callable[[], None]) -> None:
        """Call ``observer()`` at the first answer after upstream gave none
        (the prober's, typically): retry now, without waiting for the
        outage's end to be declared."""
        self._answer_observers.append(observer)

    def subscribe_answered_call(self, observer: Callable[[int], None]) -> None:
        """Call ``observer(ticket)`` whenever upstream answers (success, or
        an API error) a call that took ``ticket`` when it started."""
        self._call_observers.append(observer)

    def call_started(self) -> int:
        """A call starts: its ticket, greater than every earlier call's."""
        self.last_ticket += 1
        return self.last_ticket

    def answered(self, ticket: int | None = None) -> None:
        """A call got an answer from upstream (``ticket``: the call's)."""
        if ticket is not None:
            for call_observer in list(self._call_observers):
                try:
                    call_observer(ticket)
                except Exception:
                    self.log.failure("reachability observer failed")
        if self.reachable is None:
            self.reachable = True
            self._notify(True)
            return
        if self.reachable is not False:
            return
        if not self.answering:
            self.answering = True
            for observer in list(self._answer_observers):
                try:
                    observer()
                except Exception:
                    self.log.failure("reachability observer failed")
        if self._check is None:
            self._check = self._clock.callLater(self.settle, self._settled,
                                                self._clock.seconds())

    def _settled(self, answered_at: float) -> None:
        self._check = None
        if self.reachable is not False or self._last_failure > answered_at:
            return  # it failed again since that answer: still down
        since = self.down_since
        self.reachable, self.down_since, self.last_error = True, None, None
        self.answering = False
        if since is not None:
            self.log.warn("upstream {target} answers again after {seconds:.1f}s",
                          target=self.target, seconds=answered_at - since)
        self._notify(True)

    def stop(self) -> None:
        """No more timers (the daemon stops)."""
        if self._check is not None and self._check.active():
            self._check.cancel()
        self._check = None

    def failed(self, error: str, *, answered: bool = False) -> None:
        """A call failed transiently: upstream is not there (``answered``
        False), or answered that it is not ready."""
        self.last_error = error
        self.answering = answered
        self._last_failure = self._clock.seconds()
        if self.reachable is False:
            return
        self.reachable, self.down_since = False, self._last_failure
        self.log.warn("upstream {target} unreachable ({error}); VM writes are cached and "
                      "reads served from the last known state until it answers",
                      target=self.target, error=error)
        self._notify(False)

    def _notify(self, up: bool) -> None:
        for observer in list(self._observers):
            try:
                observer(up)
            except Exception:
                self.log.failure("reachability observer failed")
