# -*- test-case-name: tests.unit.test_site -*-
"""Read turns: one connection of a socket parses input per reactor
iteration, however many connections the client opened.

The reactor serves every connection with data in one iteration, so a VM
opening many connections to its socket gets as many units of HTTP parsing
per iteration (a chunked read, up to 256 chunks, is ~0.5 ms): with 8
connections sending cheap-to-refuse requests in a loop, another VM's
request waited ~20 ms at the median. With turns, a connection whose socket
already had its turn in this iteration keeps what it read and stops
reading until the next iteration, where the next waiting connection (in
order) takes the turn. Each VM's socket thus costs at most one read per
iteration, like its apps cost one step (the VM's queue).
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["ReadTurns", "TurnTaker"]


class TurnTaker(Protocol):
    """A connection that can wait for a turn to read."""

    def resume_reading(self) -> None:
        """Your turn: process what you kept, and read again."""


class ReadTurns:
    """The read turns of one socket.

    :param clock: starts a new iteration's turn (``callLater(0)``).
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._taken = False
        #: The connections waiting for a turn, in order (an ordered dict
        #: by identity: an empty one is 64 bytes, where a deque and a set
        #: were 976, for each of a host's thousands of sockets).
        self._waiting: dict[int, TurnTaker] = {}
        self._next: IDelayedCall | None = None

    def take(self, reader: TurnTaker) -> bool:
        """True if ``reader`` may process input now; else it is queued and
        will be told (``resume_reading``) when its turn comes."""
        if not self._taken:
            self._taken = True
            if self._next is None:
                self._next = self._clock.callLater(0, self._new_iteration)
            return True
        self._waiting.setdefault(id(reader), reader)
        return False

    def forget(self, reader: TurnTaker) -> None:
        """``reader`` is gone: it will not be given a turn."""
        self._waiting.pop(id(reader), None)

    def _new_iteration(self) -> None:
        self._next = None
        self._taken = False
        while self._waiting and not self._taken:
            reader = self._waiting.pop(next(iter(self._waiting)))
            reader.resume_reading()

    def stop(self) -> None:
        """The socket closed: no more turns."""
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None
        self._waiting.clear()
