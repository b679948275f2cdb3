# -*- test-case-name: tests.unit.test_reexec -*-
"""Restart in place, for hosts without systemd's fd store (or to pick up
an upgrade without asking the service manager): SIGHUP or ``xguard-ctl
restart`` makes the daemon stop as for a handover and ``execve`` its own
command line, same pid, with its listening sockets inherited
(``LISTEN_FDS``/``LISTEN_FDNAMES``/``LISTEN_PID`` = its own pid, the
convention systemd uses, read by :mod:`xguard.restart.handover`), as nginx and
HAProxy do for seamless reloads.

The stop is the ordinary one (every stage, in reverse), except that the
domain sockets and the control socket stop being read instead of being
closed: connections made from then on wait in their backlog until the new
image adopts them. In-flight requests are answered or persisted first (the
caches' stop), and the instance lock is released (the new image takes it
again). The exec happens once the reactor has shut down.

Refused (with the reason, to the caller): when twistd daemonized the
process (it would fork again: a new pid a supervisor does not know), before
the daemon is ready, and while a restart is already under way. Under
systemd, ``RELOADING=1`` is sent instead of ``STOPPING=1`` (systemd would
otherwise wait for the main process to exit), and the new image's
``READY=1`` ends the reload.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorCore
from twisted.logger import Logger

from ..errors import RestartRefused
from . import listenfds
from .handover import Handover

__all__ = ["Launch", "Reexec", "RestartRefused"]

Sockets = Callable[[], "list[tuple[str, int]]"]


@attrs.frozen
class Launch:
    """How this process was started: what a re-exec runs again.

    :param executable: the interpreter.
    :param argv: its whole command line (``sys.orig_argv``: with ``-m``
        and the script as they were given).
    :param pidfile: twistd's ``--pidfile``: removed before the exec when it
        holds our pid (the new twistd would take it for another daemon),
        written again by the new image.
    :param foreground: twistd's ``-n``: a daemonized twistd forks again on
        start, so a re-exec would not keep its pid.
    """

    executable: str = sys.executable
    argv: tuple[str, ...] = tuple(getattr(sys, "orig_argv", sys.argv))
    pidfile: str | None = None
    foreground: bool = True


class Reexec:
    """Restarts the daemon in place (see the module).

    :param reactor: stopped to run the ordinary stop, then the exec runs
        after its shutdown.
    :param handover: told a successor takes the sockets (they stay open).
    :param sockets: (name, descriptor) of every socket to pass, read once
        everything stopped.
    :param is_ready: whether the daemon finished starting.
    :param execve: ``os.execve`` (a fake in tests).
    """

    log = Logger()

    def __init__(self, reactor: IReactorCore, handover: Handover, sockets: Sockets, *,
                 launch: Launch, is_ready: Callable[[], bool],
                 environ: Mapping[str, str] | None = None,
                 getpid: Callable[[], int] = os.getpid,
                 execve: Callable[[str, list[str], dict[str, str]], Any] = os.execve,
                 place: Callable[[Sequence[int]], None] = listenfds.place,
                 exit: Callable[[int], Any] = os._exit) -> None:
        self._reactor = reactor
        self._handover = handover
        self._sockets = sockets
        self.launch = launch
        self._is_ready = is_ready
        self._environ = environ
        self._getpid = getpid
        self._execve = execve
        self._place = place
        self._exit = exit
        self._cancelled = False

    def request(self, why: str) -> None:
        """Begin a restart in place.

        :raises RestartRefused: saying why it cannot be done now.
        """
        if not self.launch.foreground:
            raise RestartRefused("xguard runs daemonized (twistd without -n): a re-exec "
                                 "would fork a new process; restart it with its service "
                                 "manager, or run it with -n")
        if self._handover.reexec_pending:
            raise RestartRefused("a restart is already under way")
        if not self._is_ready():
            raise RestartRefused("xguard is still starting")
        if not os.access(self.launch.executable, os.X_OK):
            raise RestartRefused(f"cannot execute {self.launch.executable}")
        self.log.info("restarting in place ({why}): the listening sockets are handed over "
                      "to the new image", why=why)
        self._handover.reexec_pending = True
        self._reactor.addSystemEventTrigger("after", "shutdown", self._exec)
        self._reactor.stop()

    def on_signal(self) -> None:
        """SIGHUP: restart, or log why not."""
        try:
            self.request("SIGHUP")
        except RestartRefused as e:
            self.log.warn("not restarting on SIGHUP: {reason}", reason=str(e))

    def cancel(self) -> None:
        """A stop was asked for during the restart: exit instead of exec
        (the sockets close with the process)."""
        if self._handover.reexec_pending and not self._cancelled:
            self._cancelled = True
            self.log.info("stopping instead of restarting in place")

    def _exec(self) -> None:
        """Everything stopped: hand the sockets over and exec."""
        if self._cancelled:
            return
        pairs = self._sockets()
        pid = self._getpid()
        env = {k: v for k, v in (os.environ if self._environ is None else self._environ).items()
               if k not in listenfds.VARIABLES}
        if pairs:
            env.update(listenfds.environment([name for name, _ in pairs], pid))
        self._remove_pidfile(pid)
        self.log.info("exec {argv} with {count} listening sockets",
                      argv=" ".join(self.launch.argv), count=len(pairs))
        try:
            self._place([fd for _, fd in pairs])
            self._execve(self.launch.executable, list(self.launch.argv), env)
        except OSError as e:
            # The descriptors were moved over the log's: say it on stderr.
            os.write(2, f"xguard: restart in place failed: cannot exec "
                        f"{self.launch.executable}: {e}\n".encode())
            self._exit(1)

    def _remove_pidfile(self, pid: int) -> None:
        path = self.launch.pidfile
        if not path:
            return
        try:
            with open(path) as f:
                mine = f.read().strip() == str(pid)
            if mine:
                os.unlink(path)
        except OSError as e:
            self.log.warn("cannot remove the pid file {path} before the re-exec: {error}",
                          path=path, error=str(e))
