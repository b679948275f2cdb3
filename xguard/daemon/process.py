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
  start that fails exits non-zero once the reactor has shut down (twistd
  has no way to set an exit status). SIGHUP asks for a restart in place
  (:mod:`xguard.restart.reexec`); twistd itself does not use SIGHUP (its log file
  rotates on SIGUSR1).
- Why a start failed: :func:`known_start_failure` recognises the causes an
  operator can fix (:class:`StartupError`: another xguard on the state
  directory, a socket path in use, permission denied); each is one log line
  and has its own exit status (``EXIT_*``, doc/operations.md "Exit
  status"). Anything else is a bug or a surprise: its traceback is logged,
  and the exit status is 1.

The instance lock's descriptor is close-on-exec and released by the stop
anyway, so a restart in place takes it again in the new image.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import sys
from collections.abc import Callable
from types import ModuleType

from twisted.internet.error import CannotListenError, ReactorNotRunning
from twisted.logger import Logger

from ..errors import PathInUse
from ..interfaces import IProcessReactor

__all__ = ["InstanceLock", "ExitStatus", "StartupError", "AlreadyRunning", "SocketInUse",
           "NoAccess", "known_start_failure", "EXIT_FAILURE", "EXIT_USAGE",
           "EXIT_NO_ACCESS", "EXIT_IN_USE", "EXIT_RUNNING"]

# The exit statuses of a start that fails. systemd names them in
# ``systemctl status`` (``status=75/TEMPFAIL``): the LSB and BSD (sysexits)
# codes it knows were picked for what they say.
#: Anything unexpected (its traceback is in the log).
EXIT_FAILURE = 1
#: A bad option or configuration file (nothing was started).
EXIT_USAGE = 2
#: Permission denied (or a read-only file system) on a file or directory
#: xguard must write: the state directory, its lock, a socket's directory.
EXIT_NO_ACCESS = 4
#: A socket path xguard must listen on is in use by another process (the
#: control socket, the metrics endpoint), or is not a socket.
EXIT_IN_USE = 73
#: Another xguard runs on the same state directory.
EXIT_RUNNING = 75


class StartupError(Exception):
    """A reason start-up cannot go on that the operator can fix: logged as
    one line, without a traceback, and the process exits ``exit_status``."""

    exit_status = EXIT_FAILURE


class AlreadyRunning(StartupError, OSError):
    """Another xguard holds the state directory's instance lock (an OSError
    too, as :meth:`InstanceLock.acquire` always raised)."""

    exit_status = EXIT_RUNNING


class SocketInUse(StartupError):
    """A socket path (or address) to listen on is taken."""

    exit_status = EXIT_IN_USE


class NoAccess(StartupError):
    """A file or directory xguard must write refuses it."""

    exit_status = EXIT_NO_ACCESS


_NO_ACCESS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
_TAKEN = frozenset({errno.EADDRINUSE, errno.EEXIST})


def known_start_failure(error: BaseException | None) -> StartupError | None:
    """The known cause ``error`` is, or None for an unexpected one.

    - a :class:`StartupError` as it is;
    - a listen that failed (``CannotListenError``: address in use, or
      permission denied) and a domain socket path in use;
    - an ``OSError`` refusing access (EACCES, EPERM, EROFS), whose message
      names the file;
    - the refusal of ``xguard.util.unixsock.remove_stale`` to take over a
      live socket (EADDRINUSE), or a file that is not a socket (EEXIST), at
      the control or metrics socket's path.
    """
    if isinstance(error, StartupError):
        return error
    if isinstance(error, CannotListenError):
        cause = error.socketError
        if isinstance(cause, OSError) and cause.errno in _NO_ACCESS:
            return NoAccess(str(error))
        return SocketInUse(str(error))
    if isinstance(error, PathInUse):
        return SocketInUse(str(error))
    if isinstance(error, OSError):
        if error.errno in _NO_ACCESS:
            return NoAccess(str(error))
        if error.errno in _TAKEN and error.filename is None:
            # remove_stale's refusal: its message names the path already
            return SocketInUse(error.strerror or str(error))
        if error.errno == errno.EADDRINUSE:
            return SocketInUse(str(error))
    return None


class InstanceLock:
    """An exclusive, non-blocking flock on ``path`` (holding our pid)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        """:raises AlreadyRunning: naming the directory (and the other
            daemon's pid) when another daemon holds it.
        :raises OSError: the lock file cannot be opened (permissions)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            pid = f"pid {holder}, " if holder is not None else ""
            raise AlreadyRunning(f"another xguard is running on {os.path.dirname(self.path)} "
                                 f"({pid}it holds {self.path})") from None
        os.ftruncate(fd, 0)
        os.write(fd, b"%d\n" % os.getpid())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None


def _read_pid(fd: int) -> int | None:
    """The pid the lock's holder wrote into it, if it can be read."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


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

    # The handlers run between any two bytecodes of the main thread,
    # possibly inside a log observer's write or a lock's critical section:
    # they only hand the signal to the reactor (callFromThread is safe
    # there), which logs and acts. Logging from the handler itself once
    # left a daemon that never stopped after SIGTERM.
    def _stop(self, signum: int, frame: object) -> None:
        self._reactor.callFromThread(self._stop_reactor, signum)

    def _stop_reactor(self, signum: int) -> None:
        self.log.info("received signal {signum}, shutting down", signum=signum)
        if self._on_stop is not None:
            self._on_stop()
        try:
            self._reactor.stop()
        except ReactorNotRunning:
            pass  # already stopping (a second signal, or a restart under way)

    def _hangup(self, signum: int, frame: object) -> None:
        self._reactor.callFromThread(self._restart)

    def _restart(self) -> None:
        self.log.info("received SIGHUP: restarting in place")
        assert self._on_hangup is not None
        self._on_hangup()

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

    def start_failed(self, code: int = EXIT_FAILURE) -> None:
        """Stop the reactor (once it runs: the failure may come before),
        and exit ``code`` when it has shut down."""
        self._reactor.addSystemEventTrigger("after", "shutdown", self._flush_and_exit, code)
        self._reactor.callWhenRunning(self._reactor.stop)
