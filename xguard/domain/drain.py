# -*- test-case-name: tests.unit.test_drain -*-
"""Draining a domain socket's connections when the daemon stops or hands
its sockets to a successor (issue 12): nothing a client was promised is
lost, and nobody is left waiting on a process that is going away.

Once the listening socket is no longer read (new connections wait in its
backlog for the next process), every connection already accepted is told
to take no new request (:meth:`Drainable.drain`):

- one idle between two requests (a kept-alive swtpm connection) is closed
  at once; its client reconnects and meets the next process;
- one whose request is on its way gets it received and answered, with
  ``Connection: close``, and is closed after the answer;
- one just accepted whose first request has not arrived yet (varstored
  connects and then sends) is waited for: closing it would lose a request
  the client already sent.

:meth:`Connections.drain` fires once every connection left has its
request in hand (the apps have it, so the caches' stop can persist and
answer it), or after a grace period, when the ones still silent are cut.
:meth:`Connections.closed` fires once every connection is closed (every
answer flushed), bounded too: a process must not exit before that.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

__all__ = ["Drainable", "Connections"]


class Drainable(Protocol):
    """A server connection that can be drained."""

    def drain(self) -> None:
        """Take no new request: close now if idle, else after the answer."""

    def settled(self) -> bool:
        """Needs nothing more from its client: its request is in hand (or
        answered and closing), or it is closed."""

    def abort(self) -> None:
        """Close now, whatever it was doing."""


class _Wait:
    def __init__(self, ready: Callable[[], bool], done: "Deferred[int]",
                 timer: IDelayedCall) -> None:
        self.ready = ready
        self.done = done
        self.timer = timer


class Connections:
    """The live connections of one socket.

    :param clock: bounds the waits.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._live: list[Drainable] = []
        self._waits: list[_Wait] = []
        self.draining = False

    def __len__(self) -> int:
        return len(self._live)

    def add(self, connection: Drainable) -> None:
        self._live.append(connection)
        if self.draining:
            connection.drain()

    def lost(self, connection: Drainable) -> None:
        if connection in self._live:
            self._live.remove(connection)
        self.changed()

    def changed(self) -> None:
        """A connection's state changed: see whether a wait is over."""
        for wait in list(self._waits):
            if wait.ready():
                self._finish(wait, 0)

    # -- stopping -------------------------------------------------------------------
    def drain(self, grace: float) -> "Deferred[int]":
        """Drain every connection; fires with how many were cut after
        ``grace`` seconds without a complete request."""
        self.draining = True
        for connection in list(self._live):
            connection.drain()
        return self._wait(lambda: all(c.settled() for c in self._live), grace,
                          lambda c: not c.settled())

    def closed(self, timeout: float, *, cut: bool = True) -> "Deferred[int]":
        """Fires once no connection is left, with how many were cut after
        ``timeout`` seconds (none when not ``cut``: then it only waits)."""
        return self._wait(lambda: not self._live, timeout, lambda c: cut)

    def _wait(self, ready: Callable[[], bool], timeout: float,
              cut: Callable[[Drainable], bool]) -> "Deferred[int]":
        if ready():
            return succeed(0)
        done: Deferred[int] = Deferred()
        wait = _Wait(ready, done, self._clock.callLater(timeout, lambda: self._expire(wait, cut)))
        self._waits.append(wait)
        return done

    def _expire(self, wait: _Wait, cut: Callable[[Drainable], bool]) -> None:
        victims = [c for c in self._live if cut(c)]
        self._finish(wait, len(victims))
        for connection in victims:
            connection.abort()

    def _finish(self, wait: _Wait, cut: int) -> None:
        if wait not in self._waits:
            return
        self._waits.remove(wait)
        if wait.timer.active():
            wait.timer.cancel()
        wait.done.callback(cut)
