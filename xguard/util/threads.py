# -*- test-case-name: tests.unit.test_threads -*-
"""Blocking file I/O (fsyncs, SQLite) off the reactor thread.

A :class:`ThreadPoolRunner` is the production ``runner``: components take a
``runner(f, *args) -> Deferred`` and tests give them one that runs inline.
Its threads start with the daemon and are stopped by it, so a forgotten
pool can never keep the process alive after the reactor stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

__all__ = ["ThreadPoolRunner", "Runner"]

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

    def start(self) -> None:
        if not self._pool.started:
            self._pool.start()

    def stop(self) -> None:
        """Finish the work queued, then join the threads (idempotent)."""
        if not self._pool.joined:
            self._pool.stop()
