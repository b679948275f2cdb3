# -*- test-case-name: tests.unit.test_loglimit -*-
"""A log observer that bounds how much one VM socket can make xguard log.

Everything logged about a domain socket's requests (refusals, timeouts,
upstream failures met by a request, even tracebacks of bugs) passes through
one :class:`RateLimitedObserver` per socket: the first ``burst`` events of a
window go through, the rest are counted, and one line with the count is
written when the window ends. A guest flooding its socket therefore costs
dom0 at most ``burst + 1`` lines per window, whatever it sends. Debug
events pass unlimited: they are only written when an operator asks for
them (``--log-level debug``).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import ILogObserver, Logger, LogLevel, globalLogPublisher
from zope.interface import implementer

__all__ = ["RateLimitedObserver", "BURST", "WINDOW"]

#: Lines per socket and window before lines are only counted.
BURST = 5
#: Seconds of a window.
WINDOW = 60.0


@implementer(ILogObserver)
class RateLimitedObserver:
    """Forwards at most ``burst`` events (info and above) per ``window``.

    :param clock: times the windows.
    :param label: names the socket in the summary line (the VM uuid).
    :param forward: where events go (the global log publisher).
    """

    def __init__(self, clock: IReactorTime, label: str, *,
                 forward: ILogObserver = globalLogPublisher, burst: int = BURST,
                 window: float = WINDOW) -> None:
        self._clock = clock
        self._label = label
        self._forward = forward
        self._burst = burst
        self._window = window
        self._window_end = -1.0
        self._sent = 0
        self._suppressed = 0
        self._summary: IDelayedCall | None = None
        self._log = Logger(namespace="xguard.domain.loglimit", observer=forward)

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_level", LogLevel.info) < LogLevel.info:
            self._forward(event)
            return
        now = self._clock.seconds()
        if now >= self._window_end:
            self._report()
            self._window_end = now + self._window
            self._sent = 0
        if self._sent < self._burst:
            self._sent += 1
            self._forward(event)
            return
        self._suppressed += 1
        if self._summary is None:
            self._summary = self._clock.callLater(self._window_end - now, self._report)

    @property
    def suppressed(self) -> int:
        """Events counted but not written in the current window."""
        return self._suppressed

    def _report(self) -> None:
        if self._summary is not None:
            if self._summary.active():
                self._summary.cancel()
            self._summary = None
        if self._suppressed:
            self._log.info(
                "Suppressed {count} more log lines about requests on the socket of VM "
                "{vm} in {window:.0f}s", count=self._suppressed, vm=self._label,
                window=self._window)
            self._suppressed = 0

    def stop(self) -> None:
        """The socket is closing: report what is still counted, stop timing."""
        self._report()
