# -*- test-case-name: tests.unit.test_memory -*-
"""The daemon's memory after bursts: given back, and cheap to collect.

A boot storm briefly holds thousands of requests (bodies, JSON-RPC
payloads); once they are done CPython frees the objects but glibc keeps the
pages, so an idle daemon that went through a storm looks three times its
real size. ``malloc_trim(0)`` returns them. It runs from a LoopingCall on
the injected clock, and only after a period without connections or
answers, so it never competes with traffic. :func:`freeze_startup` keeps
the objects that live until exit out of every full collection, and
:func:`tune_collector` makes collections of a burst's short-lived objects
rarer.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

__all__ = ["Activity", "IdleTrimmer", "freeze_startup", "libc_trim", "tune_collector",
           "YOUNG_THRESHOLD"]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, looked up once: ``find_library`` runs
    ``ldconfig`` (milliseconds), not something to do on the reactor thread
    at every trim."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    return trim


def freeze_startup() -> int:
    """Collect the young generations, then move every object alive after
    start-up (modules, classes, each domain socket's site) out of the
    cyclic collector's reach; returns how many. They live until the
    process exits, yet every full collection would walk them again: during
    a 1000-VM boot storm the 15 full collections took 7.2 s of the daemon's
    40 s of CPU, 4.9 s with the start-up frozen. Garbage made later is
    collected as before.

    Not a full collection: with 2,000 sockets it walked 108,000 objects
    (40-55 ms before READY=1, on every start and restart) to find the same
    11 import-time objects each time, which the freeze now keeps; garbage
    of the start itself is young and still collected."""
    gc.collect(1)
    gc.freeze()
    return gc.get_freeze_count()


#: Container allocations (net) between two young collections, instead of
#: CPython's 700. Almost everything a request allocates (Deferreds, headers,
#: parsers) is freed by reference counting when the request ends; at 700 a
#: 1000-VM boot storm ran ~1200 collections, each walking the in-flight
#: requests of the moment, and the full collections they trigger walk all
#: of them: about 15% of the storm's CPU, growing with the storm. At 20000
#: the same storm runs a few dozen (bench: 17-19 s of daemon CPU instead
#: of 21-24 s). The cost: cyclic garbage lives a few thousand allocations
#: longer.
YOUNG_THRESHOLD = 20_000


def tune_collector() -> tuple[int, int, int]:
    """Collect young objects less often (see :data:`YOUNG_THRESHOLD`);
    the older generations keep their thresholds. Returns the new ones."""
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
    return gc.get_threshold()


def libc_trim() -> bool:
    """Collect what cyclic garbage is left (with young collections rare, a
    burst's last cycles would otherwise wait for the next burst), then
    ``malloc_trim(0)`` where glibc provides it (False elsewhere). Run when
    idle: the collection's cost then delays no one."""
    gc.collect()
    trim = _malloc_trim()
    return trim is not None and bool(trim(0))


class Activity:
    """What the trimmer watches: domain connections accepted and requests
    answered. Answers count too because a storm's requests can wait on
    upstream for longer than a quiet period without any new connection:
    counting connections alone let the trimmer run once in the middle of a
    storm, and never after the storm's garbage was freed."""

    def __init__(self) -> None:
        self.events = 0

    def connection(self) -> None:
        self.events += 1

    def answer(self) -> None:
        self.events += 1

    def __call__(self) -> int:
        return self.events


class IdleTrimmer:
    """Trims once per quiet period: ``activity()`` counts requests; a
    check every ``interval`` seconds trims if some happened since the last
    trim but none since the previous check."""

    log = Logger()

    def __init__(self, clock: IReactorTime, activity: Callable[[], int], *,
                 interval: float = 10.0, trim: Callable[[], bool] = libc_trim) -> None:
        self._activity = activity
        self._trim = trim
        self._seen = activity()
        self._trimmed_at = self._seen
        self._loop = LoopingCall(self._check)
        self._loop.clock = clock
        self._interval = interval

    def start(self) -> None:
        self._loop.start(self._interval, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def _check(self) -> None:
        now = self._activity()
        quiet = now == self._seen
        self._seen = now
        if quiet and now != self._trimmed_at:
            self._trimmed_at = now
            try:
                self._trim()
            except Exception:  # never stop the loop
                self.log.failure("malloc_trim failed")
