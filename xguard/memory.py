# -*- test-case-name: tests.unit.test_memory -*-
"""Give memory freed after a burst back to the operating system.

A boot storm briefly holds thousands of requests (bodies, JSON-RPC
payloads); once they are done CPython frees the objects but glibc keeps the
pages, so an idle daemon that went through a storm looks three times its
real size. ``malloc_trim(0)`` returns them. It runs from a LoopingCall on
the injected clock, and only after a period without requests, so it never
competes with traffic.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

__all__ = ["IdleTrimmer", "libc_trim"]


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


def libc_trim() -> bool:
    """``malloc_trim(0)`` where glibc provides it; False elsewhere."""
    trim = _malloc_trim()
    return trim is not None and bool(trim(0))


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
