# -*- test-case-name: tests.unit.test_service -*-
"""The daemon as one service that starts and stops its parts in order.

It builds nothing: :mod:`xguard.daemon.compose` builds every part from the
configuration and hands them over as :class:`Stage` objects, so this
module is only the lifecycle, testable with fakes.

Start runs the stages in order (the instance lock, the I/O threads, the
upstream, the last known state, the caches' recovery, the domain sockets,
the caches' deliveries, the control channel …); a stage that fails stops
the start. A cause the operator can fix (another xguard on the state
directory, a socket path in use, permission denied:
:func:`~xguard.daemon.process.known_start_failure`) is one error line and
its own exit status; anything else is logged with its traceback and the
process exits 1. Readiness (``READY=1``) is only told once every stage
started.

Stop runs the ``stop`` of every started stage in reverse order (so the
control channel and the domain sockets stop accepting before in-flight
writes are persisted, and the upstream and the threads go last). A stop
that fails is logged and the next still runs; one that takes longer than
``stop_timeout`` is left behind (logged) so that shutdown always finishes.
``MultiService`` would stop children concurrently, which is why the order
is written out here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure

from ..status import DaemonStatus
from ..util.deadlines import DeadlineExceeded, within
from .logconfig import LogLevels
from .logconfig import attach as attach_log_observer
from .process import ExitStatus, known_start_failure

__all__ = ["Stage", "XguardService"]

Step = Callable[[], "Awaitable[Any] | Deferred[Any] | None"]


@attrs.frozen
class Stage:
    """One part of the daemon: how it starts, and how it stops."""

    name: str
    start: Step
    stop: Step | None = None


class XguardService(Service):
    """Starts ``stages`` in order, stops the started ones in reverse.

    :param stages: the daemon's parts, in start order.
    :param ready: called once every stage started (tells systemd READY=1).
    :param status: builds the Status document (the control channel's).
    :param exit_status: makes a failed start exit 1 (and SIGTERM exit 0).
    :param stop_timeout: seconds one stop step may take before shutdown
        goes on without it.
    :param log_levels: the level of the log's filter (``log_observer``),
        which the control channel can change.
    """

    log = Logger()
    name = "xguard"
    #: The observer twistd is to log to (--log-level, syslog/journald
    #: severities), set by xguard.tap; see xguard.daemon.logconfig.
    log_observer: ILogObserver | None = None

    def __init__(self, stages: Sequence[Stage], *, clock: IReactorTime,
                 ready: Callable[[], None], status: Callable[[], DaemonStatus],
                 exit_status: ExitStatus, privileged: Callable[[], object] = lambda: None,
                 stop_timeout: float = 10.0, log_levels: LogLevels | None = None) -> None:
        self.stages = list(stages)
        self.log_levels = log_levels
        self.clock = clock
        self._ready = ready
        self.status = status
        self.exit_status = exit_status
        self._privileged = privileged
        self.stop_timeout = stop_timeout
        self.ready = False
        self._started: list[Stage] = []
        self._starting: Deferred[None] | None = None
        #: The stage being started (named when it fails).
        self._stage: Stage | None = None
        self._stopping = False

    # -- start ---------------------------------------------------------------
    def setServiceParent(self, parent: Any) -> None:
        if self.log_observer is not None:
            attach_log_observer(parent, self.log_observer)
        super().setServiceParent(parent)  # type: ignore[no-untyped-call]  # Twisted's, untyped

    def privilegedStartService(self) -> None:
        self._privileged()
        super().privilegedStartService()  # type: ignore[no-untyped-call]

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.exit_status.install()
        self._starting = ensureDeferred(self._start())
        self._starting.addErrback(self._start_failed)

    async def _start(self) -> None:
        for stage in self.stages:
            self._stage = stage
            began = self.clock.seconds()
            await maybeDeferred(stage.start)
            self._started.append(stage)
            self.log.debug("started {stage} in {seconds:.3f}s", stage=stage.name,
                           seconds=self.clock.seconds() - began)
        self._stage = None
        self.ready = True
        self._ready()

    def _start_failed(self, failure: Failure) -> None:
        """One line for a known cause, the traceback for anything else."""
        stage = self._stage.name if self._stage is not None else "?"
        if self._stopping and failure.check(CancelledError):
            self.log.info("stopped while starting {stage}", stage=stage)
            return  # a stop asked for: its exit status stands
        known = known_start_failure(failure.value)
        if known is None:
            self.log.failure("xguard failed to start (starting {stage})", failure, stage=stage)
            self.exit_status.start_failed()
            return
        self.log.error("xguard cannot start: {reason} (exit status {code})",
                       reason=str(known), code=known.exit_status, stage=stage)
        self.exit_status.start_failed(known.exit_status)

    # -- stop ----------------------------------------------------------------
    def stopService(self) -> "Deferred[None]":
        super().stopService()  # type: ignore[no-untyped-call]
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        self.log.info("xguard stopping")
        self._stopping = True
        if self._starting is not None and not self._starting.called:
            self._starting.cancel()
        self.ready = False
        while self._started:
            stage = self._started.pop()
            if stage.stop is None:
                continue
            try:
                await within(self.clock, self.stop_timeout, maybeDeferred(stage.stop),
                             f"stopping {stage.name}")
            except DeadlineExceeded:
                self.log.error("stopping {stage} takes longer than {seconds}s: going on "
                               "without it", stage=stage.name, seconds=self.stop_timeout)
            except Exception:
                self.log.failure("stopping {stage} failed; going on", stage=stage.name)
        self.log.info("xguard stopped")
