# -*- test-case-name: tests.unit.test_calls -*-
"""What upstream's calls do: which are in flight, how long they take, how
they end.

A hung xapi accepts connections and never answers: every call then waits
for its full ``--xapi-timeout`` (120 s by default) and, until the first one
expires, nothing says anything is wrong. So a call in flight longer than
``unresponsive_after`` seconds marks upstream "unresponsive since" the
start of the oldest such call (Status, metrics) and is logged once; the
mark goes, with one line, once no call has been in flight that long.

Observers (the metrics) are told every call's method, outcome
(``ok``, ``transient``, ``permanent``) and duration.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

__all__ = ["CallMonitor", "OUTCOMES"]

OUTCOMES = ("ok", "transient", "permanent")

CallObserver = Callable[[str, str, float], None]


class CallMonitor:
    """Tracks the calls in flight to one upstream.

    :param clock: times the calls.
    :param target: names upstream in the log lines.
    :param unresponsive_after: seconds a call may run before upstream is
        reported unresponsive.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, target: str, *,
                 unresponsive_after: float = 5.0) -> None:
        self._clock = clock
        self.target = target
        self.unresponsive_after = unresponsive_after
        self._ids = itertools.count()
        self._inflight: dict[int, tuple[str, float]] = {}
        self._observers: list[CallObserver] = []
        self._check: IDelayedCall | None = None
        #: Start of the oldest call in flight longer than the threshold.
        self.unresponsive_since: float | None = None

    def subscribe(self, observer: CallObserver) -> None:
        """``observer(method, outcome, seconds)`` after every call."""
        self._observers.append(observer)

    @property
    def oldest_inflight_start(self) -> float | None:
        # Tokens are handed out in start order and a dict keeps insertion
        # order: the first entry is the oldest (O(1); a boot storm has
        # hundreds of calls in flight).
        for _, start in self._inflight.values():
            return start
        return None

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def started(self, method: str) -> int:
        """A call starts; returns its token for :meth:`finished`."""
        token = next(self._ids)
        self._inflight[token] = (method, self._clock.seconds())
        self._watch()
        return token

    def finished(self, token: int, outcome: str) -> None:
        method, start = self._inflight.pop(token)
        elapsed = self._clock.seconds() - start
        for observer in self._observers:
            observer(method, outcome, elapsed)
        self._evaluate()
        oldest = self.oldest_inflight_start
        if self._check is not None and (oldest is None or start <= oldest):
            self.stop()  # the call it watched is done: watch the next oldest
            self._watch()

    def _watch(self) -> None:
        """Check again when the oldest call in flight reaches the threshold."""
        oldest = self.oldest_inflight_start
        if oldest is None or self._check is not None or self.unresponsive_since is not None:
            return
        delay = max(0.0, oldest + self.unresponsive_after - self._clock.seconds())
        self._check = self._clock.callLater(delay, self._checked)

    def _checked(self) -> None:
        self._check = None
        self._evaluate()
        self._watch()

    def _evaluate(self) -> None:
        now = self._clock.seconds()
        oldest = self.oldest_inflight_start
        hung = oldest is not None and now - oldest >= self.unresponsive_after
        if hung and self.unresponsive_since is None:
            assert oldest is not None
            self.unresponsive_since = oldest
            self.log.warn("upstream {target} unresponsive: a call has waited {seconds:.0f}s "
                          "for an answer ({n} in flight)", target=self.target,
                          seconds=now - oldest, n=len(self._inflight))
        elif not hung and self.unresponsive_since is not None:
            self.log.warn("upstream {target}: no call waits longer than {threshold}s any more "
                          "(after {seconds:.0f}s)", target=self.target,
                          threshold=self.unresponsive_after,
                          seconds=now - self.unresponsive_since)
            self.unresponsive_since = None
            self._watch()

    def stop(self) -> None:
        if self._check is not None and self._check.active():
            self._check.cancel()
        self._check = None
