# -*- test-case-name: tests.unit.test_process -*-
"""What the daemon is to the operating system: one instance per state
directory, and an exit status systemd and the orchestrator can trust.

- :class:`InstanceLock`: an exclusive ``flock`` on ``STATE_DIR/xguard.lock``
  for the daemon's lifetime (the kernel drops it if the process dies, so a
  crash never leaves it stale), taken before anything else: a second daemon
  on the same state would fight over the cache, the sockets and the
  active-sockets file.
- :class:`ExitStatus`: SIGTERM/SIGINT shut down cleanly and exit 0 (SPEC
  §2) — Twisted's own handlers make twistd re-raise the signal after
  shutdown, which systemd and the orchestrator would see as a crash — and a
  start that fails exits 1 once the reactor has shut down (twistd has no
  way to set an exit status). SIGHUP asks for a restart in place
  (:mod:`xguard.restart.reexec`); twistd itself does not use SIGHUP (its log file
  rotates on SIGUSR1).

The instance lock's descriptor is close-on-exec and released by the stop
anyway, so a restart in place takes it again in the new image.
"""

from __future__ import annotations

import fcntl
import os
import signal
import sys
from collections.abc import Callable
from types import ModuleType

from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger

from ..interfaces import IProcessReactor

__all__ = ["InstanceLock", "ExitStatus"]


class InstanceLock:
    """An exclusive, non-blocking flock on ``path`` (holding our pid)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        """:raises OSError: naming the directory when another daemon holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OSError(f"another xguard is running on {os.path.dirname(self.path)} "
                          f"(it holds {self.path})") from None
        os.ftruncate(fd, 0)
        os.write(fd, b"%d\n" % os.getpid())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None


class ExitStatus:
    """Installs the signal handlers that make a stop exit 0, and makes a
    failed start exit 1.

    :param signals: the ``signal`` module (a fake in tests).
    :param exit: ``os._exit`` (a fake in tests): after shutdown, so every
        stop step ran; ``sys.exit`` would only end twistd's main loop.
    :param on_hangup: called (in the reactor) on SIGHUP: a restart in
        place. Without it SIGHUP keeps its default (terminate).
    :param on_stop: called (in the reactor) on SIGTERM/SIGINT before the
        stop: a restart under way becomes a stop.
    """

    log = Logger()

    def __init__(self, reactor: IProcessReactor, *, signals: ModuleType = signal,
                 exit: Callable[[int], None] = os._exit,
                 on_hangup: Callable[[], None] | None = None,
                 on_stop: Callable[[], None] | None = None) -> None:
        self._reactor = reactor
        self._signals = signals
        self._exit = exit
        self._on_hangup = on_hangup
        self._on_stop = on_stop

    def install(self) -> None:
        """Replace twistd's SIGTERM/SIGINT handlers once the reactor runs
        (twistd installs its own when it starts the reactor)."""
        self._reactor.callWhenRunning(self._install)

    def _install(self) -> None:
        for signum in (self._signals.SIGTERM, self._signals.SIGINT):
            self._signals.signal(signum, self._stop)
        if self._on_hangup is not None:
            self._signals.signal(self._signals.SIGHUP, self._hangup)

    def _stop(self, signum: int, frame: object) -> None:
        self.log.info("received signal {signum}, shutting down", signum=signum)
        self._reactor.callFromThread(self._stop_reactor)

    def _stop_reactor(self) -> None:
        if self._on_stop is not None:
            self._on_stop()
        try:
            self._reactor.stop()
        except ReactorNotRunning:
            pass  # already stopping (a second signal, or a restart under way)

    def _hangup(self, signum: int, frame: object) -> None:
        self.log.info("received SIGHUP: restarting in place")
        assert self._on_hangup is not None
        self._reactor.callFromThread(self._on_hangup)

    def exit_after_shutdown(self, code: int) -> None:
        """Exit with ``code`` as soon as the reactor has shut down (every
        stop step ran), skipping the interpreter's teardown: ~0.2 s during
        which a successor waiting for this process to exit cannot start."""
        self._reactor.addSystemEventTrigger("after", "shutdown", self._flush_and_exit, code)

    def _flush_and_exit(self, code: int) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass
        self._exit(code)

    def start_failed(self) -> None:
        """Stop the reactor (once it runs: the failure may come before),
        and exit 1 when it has shut down."""
        self._reactor.addSystemEventTrigger("after", "shutdown", self._exit, 1)
        self._reactor.callWhenRunning(self._reactor.stop)
