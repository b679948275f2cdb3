# -*- test-case-name: tests.unit.test_locks -*-
"""Keyed DeferredLocks: one lock per vTPM (or VM) serializes every upstream
read-modify-write of it, whoever asks (domain socket, flusher, control)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import TypeVar

from twisted.internet.defer import Deferred, DeferredLock, ensureDeferred

__all__ = ["KeyedLocks"]

T = TypeVar("T")


class KeyedLocks:
    """Locks created on demand and dropped when nobody holds or waits for
    them, so thousands of VMs cost nothing while idle."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, DeferredLock] = {}
        self._users: dict[Hashable, int] = {}

    def run(self, key: Hashable, f: Callable[[], Awaitable[T]]) -> "Deferred[T]":
        """Run ``f()`` holding ``key``'s lock; callers queue in order."""
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = DeferredLock()
        self._users[key] = self._users.get(key, 0) + 1

        def release(result: object) -> object:
            self._users[key] -= 1
            if self._users[key] == 0:
                del self._users[key]
                del self._locks[key]
            return result

        d: Deferred[T] = lock.run(lambda: ensureDeferred(_as_coro(f)))
        d.addBoth(release)
        return d

    def locked(self, key: Hashable) -> bool:
        """True while someone holds ``key``'s lock."""
        lock = self._locks.get(key)
        return lock is not None and lock.locked

    def __len__(self) -> int:
        return len(self._locks)


async def _as_coro(f: Callable[[], Awaitable[T]]) -> T:
    return await f()
