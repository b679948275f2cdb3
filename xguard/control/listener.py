# -*- test-case-name: tests.unit.test_control_listener -*-
"""Where the control channel listens: a UNIX socket, root only.

A socket file left by a killed daemon is replaced; one a live process
serves is never taken over (start-up fails, naming it). The socket is made
0600 whatever the umask (``--control`` must be a UNIX endpoint: see
:mod:`xguard.config`).
"""

from __future__ import annotations

import os

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IListeningPort, IReactorUNIX
from twisted.internet.protocol import ServerFactory

from ..durable import makedirs
from ..unixsock import remove_stale
from .server import control_endpoint

__all__ = ["ControlListener"]

MODE = 0o600


class ControlListener:
    """Listens on ``description`` (``unix:PATH``) with ``factory``.

    :param path: the socket file of ``description``.
    """

    def __init__(self, reactor: IReactorUNIX, description: str, path: str,
                 factory: ServerFactory) -> None:
        self._reactor = reactor
        self.description = description
        self.path = path
        self._factory = factory
        self._port: IListeningPort | None = None

    def check(self) -> None:
        """Before anything starts: a stale file is removed, a live
        listener refuses the start (another daemon, or another program)."""
        remove_stale(self.path, "control socket")

    def listen(self) -> "Deferred[None]":
        async def run() -> None:
            makedirs(os.path.dirname(self.path), 0o755)
            self._port = await control_endpoint(self._reactor, self.description).listen(
                self._factory)
            os.chmod(self.path, MODE)
        return ensureDeferred(run())

    def stop(self) -> "Deferred[None]":
        port, self._port = self._port, None
        if port is None:
            return Deferred.fromCoroutine(_done())
        return Deferred.fromCoroutine(_stop(port))


async def _done() -> None:
    return None


async def _stop(port: IListeningPort) -> None:
    await port.stopListening()
