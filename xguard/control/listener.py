# -*- test-case-name: tests.unit.test_control_listener -*-
"""Where the control channel listens: a UNIX socket, root only.

A socket file left by a killed daemon is replaced; one a live process
serves is never taken over (start-up fails, naming it). The socket is made
0600 whatever the umask (``--control`` must be a UNIX endpoint: see
:mod:`xguard.daemon.config`).

Like the domain sockets, it is handed over across a restart
(:mod:`xguard.restart.handover`): stored in systemd's fd store when it listens,
adopted by the next process (which then has nothing stale to replace),
kept open but unread while a successor takes over, so an ``xguard-ctl``
call made meanwhile waits instead of failing.
"""

from __future__ import annotations

import os

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger

from .._internals.twisted_unix import adopt_unix_port
from ..interfaces import IServerReactor
from ..restart.handover import CONTROL, Claimed, Handover
from ..util.durable import makedirs
from ..util.unixsock import remove_stale
from .server import control_endpoint

__all__ = ["ControlListener"]

MODE = 0o600
#: Twisted's default for a unix: endpoint, which a fresh listen gets.
BACKLOG = 50


class ControlListener:
    """Listens on ``description`` (``unix:PATH``) with ``factory``.

    :param path: the socket file of ``description``.
    :param handover: the sockets handed over at start, and where ours go.
    """

    log = Logger()

    def __init__(self, reactor: IServerReactor, description: str, path: str,
                 factory: ServerFactory, handover: Handover | None = None) -> None:
        self._reactor = reactor
        self.description = description
        self.path = path
        self._factory = factory
        self._handover = handover
        self._port: IListeningPort | None = None
        self._claimed: Claimed | None = None
        self._name: str | None = None

    def check(self) -> None:
        """Before anything starts: a socket handed over for our path is
        taken; otherwise a stale file is removed, and a live listener
        refuses the start (another daemon, or another program)."""
        if self._handover is not None:
            self._claimed = self._handover.claim(CONTROL, self.path)
            if self._claimed is not None:
                return
        remove_stale(self.path, "control socket")

    def listen(self) -> "Deferred[None]":
        async def run() -> None:
            claimed, self._claimed = self._claimed, None
            if claimed is not None:
                try:
                    self._port = adopt_unix_port(self._reactor, claimed.fd, self._factory,
                                                 mode=MODE, backlog=BACKLOG)
                finally:
                    os.close(claimed.fd)
                self._name = claimed.name
                os.chmod(self.path, MODE)
                return
            makedirs(os.path.dirname(self.path), 0o755)
            self._port = await control_endpoint(self._reactor, self.description).listen(
                self._factory)
            os.chmod(self.path, MODE)
            if self._handover is not None:
                try:
                    self._name = self._handover.stored(CONTROL, self.path,
                                                       self._port.fileno())  # type: ignore[attr-defined]
                except OSError as e:
                    self.log.warn("the control socket will not be handed over on restart: "
                                  "{error}", error=str(e))
        return ensureDeferred(run())

    def stop(self) -> "Deferred[None]":
        """Stop accepting. With a successor the socket stays open (and its
        file), unread, until the process exits or execs."""
        port = self._port
        if port is None:
            return succeed(None)
        if self._handover is not None and self._handover.keep_open():
            port.stopReading()  # type: ignore[attr-defined]
            return succeed(None)
        self._port = None
        return ensureDeferred(_stop(port))

    def handed_over(self) -> list[tuple[str, int]]:
        """(name, descriptor) of the socket, for a re-exec."""
        if self._port is None or self._name is None:
            return []
        return [(self._name, int(self._port.fileno()))]  # type: ignore[attr-defined]


async def _stop(port: IListeningPort) -> None:
    stopped = port.stopListening()
    if stopped is not None:
        await stopped
