# -*- test-case-name: tests.unit.test_deadlines -*-
"""A guest must never wait for xapi's full timeout (SPEC §6): reads and
writes give upstream a short deadline, then fall back to local state.

:func:`within` waits for a Deferred at most ``seconds``; past it the waiter
gets a :class:`TransientUpstreamError` but the work is *not* cancelled: an
upstream call in flight keeps its locks until it resolves, so nothing newer
can overtake it, and its late result (or failure) is consumed quietly.
:func:`within_or` is the reads' rule: the deadline applies only when there
is a local answer to give instead.
"""

from __future__ import annotations

from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..errors import TransientUpstreamError, UpstreamError

__all__ = ["within", "within_or", "DeadlineExceeded"]

T = TypeVar("T")
log = Logger(namespace="xguard.util.deadlines")


class DeadlineExceeded(TransientUpstreamError):
    """The work did not finish within its deadline (it goes on)."""

    def __init__(self, what: str, seconds: float) -> None:
        super().__init__(["TIMEOUT", what], f"{what}: no answer within {seconds}s")


def within(clock: IReactorTime, seconds: float, work: "Deferred[T]",
           what: str = "upstream") -> "Deferred[T]":
    """``work``'s result, or :class:`DeadlineExceeded` (a transient error)
    after ``seconds``."""
    if work.called:
        return work
    out: Deferred[T] = Deferred()

    def expire() -> None:
        if not out.called:
            out.errback(DeadlineExceeded(what, seconds))

    timer = clock.callLater(seconds, expire)

    def done(result: Any) -> None:
        if timer.active():
            timer.cancel()
        if out.called:
            # Too late: the caller moved on. An upstream error needs no
            # report (upstream's reachability already noted it); anything
            # else is a bug and must not vanish.
            if isinstance(result, Failure) and not result.check(UpstreamError):
                log.failure("{what}: late failure after the deadline", result, what=what)
            return None
        if isinstance(result, Failure):
            out.errback(result)
        else:
            out.callback(result)
        return None

    work.addBoth(done)
    return out


def within_or(clock: IReactorTime, seconds: float, work: "Deferred[T]", fallback: T | None,
              what: str = "upstream") -> "Deferred[T]":
    """``work``'s result; ``fallback`` instead if it fails transiently or
    takes over ``seconds``. With no fallback (None), ``work`` is waited for
    whole: waiting longer for upstream beats a certain error."""
    if fallback is None:
        return work

    def fall_back(failure: Failure) -> T:
        failure.trap(TransientUpstreamError)
        return fallback

    return within(clock, seconds, work, what).addErrback(fall_back)
