# -*- test-case-name: tests.unit.test_observer -*-
"""Many waiters, one result: the small helper xguard uses wherever several
callers wait for the same piece of work (one login shared by every call,
one handle lookup shared by a VM's two sockets, one rewrite of the
active-sockets file shared by every change made while the previous one
ran). magic-wormhole's ``observer.py`` is the model.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

__all__ = ["OneShotObserver"]

T = TypeVar("T")


class OneShotObserver(Generic[T]):
    """Hands one result (or failure) to every waiter, including those that
    arrive after it fired. A waiter cancelling its Deferred leaves the
    others and the work alone."""

    def __init__(self) -> None:
        self._waiters: list[Deferred[T]] = []
        self._result: T | Failure | None = None
        self._fired = False

    def when_fired(self) -> "Deferred[T]":
        d: Deferred[T] = Deferred()
        if self._fired:
            self._deliver(d)
        else:
            self._waiters.append(d)
        return d

    def fire(self, result: "T | Failure") -> None:
        """Give every waiter ``result`` (a Failure is errbacked)."""
        if self._fired:
            raise RuntimeError("OneShotObserver fired twice")
        self._fired, self._result = True, result
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            self._deliver(d)

    def _deliver(self, d: "Deferred[T]") -> None:
        if d.called:
            return  # the waiter gave up (cancelled)
        if isinstance(self._result, Failure):
            d.errback(self._result)
        else:
            d.callback(self._result)  # type: ignore[arg-type]
