# -*- test-case-name: tests.unit.test_probe -*-
"""Notice upstream's return within about a second, whatever the outage's
length.

While upstream gives no answer at all (connections refused, calls timing
out), the caches' flushers back off (up to a minute between rounds) and
nothing else may call upstream, so its return would be noticed late. The
prober asks upstream one cheap question every ``interval`` seconds (for
xapi a login; see ``IUpstream.probe``): against a stopped xapi that is one
refused connection a second, nothing for xapi itself; once xapi accepts
again, a single login. Its answer ends the outage (after the reachability's
settle time), which sends the cached writes at once.

It does not probe while upstream answers "not now" (HOST_STILL_BOOTING):
xapi is there, and the flushers' backoff paces the retries.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ..util.deadlines import within
from .reachability import Reachability

__all__ = ["Prober"]


class Prober:
    """Probes upstream while it gives no answer.

    :param probe: one cheap call (its outcome reaches ``reachability``).
    :param interval: seconds between probes.
    :param timeout: seconds a probe may take (a hung upstream).
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, reachability: Reachability,
                 probe: Callable[[], "Deferred[None]"], *, interval: float = 1.0,
                 timeout: float = 5.0) -> None:
        self._clock = clock
        self._reachability = reachability
        self._probe = probe
        self._timeout = timeout
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock
        self._interval = interval
        self._inflight = False
        self._stopped = False
        self.probes = 0
        self._started_at = 0  # self.probes when this outage's probing began
        reachability.subscribe(self._changed)

    def _changed(self, up: bool) -> None:
        if not up and not self._stopped and not self._loop.running:
            # Per-retry detail is debug: the outage itself is logged twice
            # (its start and its end) by the reachability.
            self.log.debug("probing upstream {target} every {interval}s until it answers",
                           target=self._reachability.target, interval=self._interval)
            self._started_at = self.probes
            self._loop.start(self._interval, now=False)

    def _tick(self) -> None:
        r = self._reachability
        if r.reachable is not False:
            self._loop.stop()  # back
            self.log.debug("upstream {target} is back: stopped probing after {n} probes",
                           target=r.target, n=self.probes - self._started_at)
            return
        if r.answering or self._inflight:
            return  # it answers "not now" (no need to ask); or one at a time
        self._inflight = True
        self.probes += 1

        def done(_: object) -> None:
            self._inflight = False

        within(self._clock, self._timeout, maybeDeferred(self._probe), "probe").addBoth(done)

    def stop(self) -> None:
        self._stopped = True
        if self._loop.running:
            self._loop.stop()
