# -*- test-case-name: tests.unit.test_admission -*-
"""Admission: how many requests of one service's sockets are in the apps at
once, and in which order the others go in.

In a boot storm every socket has a request on its way and upstream takes
24 at a time. Without admission each of them builds its whole handler
chain (Klein's routing, the app's coroutines and Deferreds, the payload
decoded and encoded again) and waits with it at upstream's door: at 1,000
VMs that was ~15,000 coroutines and 21,000 Deferreds at the peak, and
pymalloc keeps the arenas of such a peak for the life of the process (the
idle RSS after a storm, doc/performance.md). Admission keeps a received
request as Twisted parsed it (its headers and body) until the apps may
take it, so what is built per request is bounded by ``limit``, not by the
number of sockets.

Order: one request per socket at a time (a socket's app serves its
requests one by one anyway), sockets in turn, in the order their requests
arrived: a VM that opens many connections waits for its own requests, and
every VM with a request waiting goes in before any VM goes in twice.

What admission must never do is couple one VM's fate to another's
upstream: a request can wait for upstream far longer than its share of
the daemon's time (a read with no local answer while xapi hangs, until
xapi's timeout). A request that has been in the apps for ``stall_after``
seconds therefore stops counting against ``limit``: the gate paces work
while upstream answers and lets everything through at ``limit`` per
``stall_after`` when it does not. A socket that drains (a stop, a
handover, its VM gone) has every request it holds let in at once, so that
the caches' stop finds them in the apps.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

__all__ = ["Admission", "DEFAULT_LIMIT", "STALL_AFTER"]

#: Requests of one service in the apps at once (upstream takes 24 calls
#: at a time; the rest are answered locally in well under a millisecond).
DEFAULT_LIMIT = 32

#: Seconds after which a request in the apps no longer holds its place.
STALL_AFTER = 0.5

#: Lets a request into the apps; returns a Deferred that fires when it no
#: longer needs its place (its answer is finished, or its client gone),
#: or None when there was nothing to do.
Enter = Callable[[], "Deferred[Any] | None"]


class _Place:
    """One admitted request's place in the gate."""

    __slots__ = ("owner", "counted", "timer")

    def __init__(self, owner: Hashable) -> None:
        self.owner = owner
        self.counted = True
        self.timer: IDelayedCall | None = None


class Admission:
    """The admission gate of one service's sockets.

    :param clock: times the stall of an admitted request.
    :param limit: requests counted in the apps at once (0: no gate).
    :param stall_after: seconds after which an admitted request stops
        counting.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, limit: int = DEFAULT_LIMIT,
                 stall_after: float = STALL_AFTER) -> None:
        self._clock = clock
        self.limit = limit
        self.stall_after = stall_after
        #: Admitted requests that still count against ``limit``.
        self.counted = 0
        #: Owners with a request admitted and not yet done.
        self._busy: set[Hashable] = set()
        #: Each owner's requests not yet admitted, in arrival order.
        self._waiting: dict[Hashable, deque[Enter]] = {}
        #: Owners whose next request may go in (waiting, not busy), in turn.
        self._turns: deque[Hashable] = deque()
        self._pumping = False

    @property
    def waiting(self) -> int:
        """Requests received and not yet admitted."""
        return sum(len(q) for q in self._waiting.values())

    def enter(self, owner: Hashable, enter: Enter) -> None:
        """Let ``enter`` in now if there is room and ``owner`` has nothing
        in the apps; else queue it for ``owner``'s turn."""
        if self.limit <= 0:
            enter()
            return
        queue = self._waiting.get(owner)
        if queue is None:
            if owner not in self._busy and self.counted < self.limit:
                self._admit(owner, enter)
                return
            queue = self._waiting[owner] = deque()
            if owner not in self._busy:
                self._turns.append(owner)
        queue.append(enter)

    def release(self, owner: Hashable) -> None:
        """``owner`` drains: what it has waiting goes in now, in order (the
        apps must have every request the drain says is in hand; whatever
        it receives from now on its socket lets in without asking)."""
        queue = self._waiting.pop(owner, None)
        if queue is None:
            return
        if owner in self._turns:
            self._turns.remove(owner)
        while queue:
            self._call(queue.popleft())

    def _admit(self, owner: Hashable, enter: Enter) -> None:
        place = _Place(owner)
        self._busy.add(owner)
        self.counted += 1
        done = self._call(enter)
        if done is None:
            self._done(place)
            return
        place.timer = self._clock.callLater(self.stall_after, self._stalled, place)
        done.addBoth(self._finished, place)

    def _call(self, enter: Enter) -> "Deferred[Any] | None":
        try:
            return enter()
        except Exception:
            self.log.failure("letting a request in failed")
            return None

    def _finished(self, result: object, place: _Place) -> None:
        if place.timer is not None and place.timer.active():
            place.timer.cancel()
        self._done(place)

    def _stalled(self, place: _Place) -> None:
        place.timer = None
        if place.counted:
            place.counted = False
            self.counted -= 1
            self._pump()

    def _done(self, place: _Place) -> None:
        if place.counted:
            place.counted = False
            self.counted -= 1
        owner = place.owner
        self._busy.discard(owner)
        if self._waiting.get(owner):
            self._turns.append(owner)
        self._pump()

    def _pump(self) -> None:
        """Let the next owners in, in turn, while there is room."""
        if self._pumping:
            return  # the loop below goes on
        self._pumping = True
        try:
            while self._turns and self.counted < self.limit:
                owner = self._turns.popleft()
                queue = self._waiting[owner]
                enter = queue.popleft()
                if not queue:
                    del self._waiting[owner]
                self._admit(owner, enter)
        finally:
            self._pumping = False
