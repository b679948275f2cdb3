# -*- test-case-name: tests.unit.test_threads -*-
"""Blocking file I/O (fsyncs, SQLite) off the reactor thread.

A :class:`ThreadPoolRunner` is the production ``runner``: components take a
``runner(f, *args) -> Deferred`` and tests give them one that runs inline.
Its threads start with the daemon and are stopped by it, so a forgotten
pool can never keep the process alive after the reactor stopped.

:func:`run_acknowledging` runs a job that lets its caller go on before it
ends: a cached write is acknowledged once its version is durable, while
the same job unlinks the version it superseded (one hand-off to the pool,
and the unlink off the acknowledgement's path).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

__all__ = ["ThreadPoolRunner", "Runner", "run_acknowledging"]

_log = Logger()

#: What components take to run blocking work.
Runner = Callable[..., "Deferred[Any]"]


class ThreadPoolRunner:
    """A runner on a private thread pool of at most ``maxthreads``."""

    def __init__(self, reactor: IReactorFromThreads, name: str, maxthreads: int) -> None:
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=maxthreads, name=name)

    def __call__(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> "Deferred[Any]":
        if not self._pool.started and not self._pool.joined:
            self._pool.start()  # first use before start(): e.g. a tool
        return deferToThreadPool(self._reactor, self._pool, f, *args, **kwargs)

    def acknowledging(self, f: Callable[..., Any], *args: Any) -> "Deferred[None]":
        """Run ``f(*args, acknowledge=…)`` on the pool; the Deferred fires
        (on the reactor thread) when ``f`` calls ``acknowledge()`` or ends,
        whichever comes first. An error before that fails it; one after
        it is logged (the caller has gone on)."""
        if not self._pool.started and not self._pool.joined:
            self._pool.start()
        d: Deferred[None] = Deferred()
        call = self._reactor.callFromThread
        fired = threading.Event()

        def acknowledge() -> None:
            if not fired.is_set():
                fired.set()
                call(d.callback, None)

        def job() -> None:
            try:
                f(*args, acknowledge=acknowledge)
            except BaseException:
                failure = Failure()
                if fired.is_set():
                    call(_late_failure, f, failure)
                else:
                    fired.set()
                    call(d.errback, failure)
                return
            acknowledge()

        self._pool.callInThread(job)
        return d

    def start(self) -> None:
        if not self._pool.started:
            self._pool.start()

    def stop(self) -> None:
        """Finish the work queued, then join the threads (idempotent)."""
        if not self._pool.joined:
            self._pool.stop()


def _late_failure(f: Callable[..., Any], failure: Failure) -> None:
    _log.failure("after its acknowledgement, {job} failed", failure,
                 job=getattr(f, "__qualname__", repr(f)))


def run_acknowledging(runner: Runner, f: Callable[..., Any], *args: Any) -> "Deferred[None]":
    """``f(*args, acknowledge=…)`` through ``runner``, answered as soon as
    ``f`` acknowledges where the runner can do that
    (:meth:`ThreadPoolRunner.acknowledging`); any other runner (inline, in
    tests) answers when ``f`` ends."""
    early = getattr(runner, "acknowledging", None)
    if early is not None:
        return early(f, *args)  # type: ignore[no-any-return]
    return runner(f, *args, acknowledge=lambda: None).addCallback(lambda _: None)
