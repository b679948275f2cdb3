"""Keyed locks serialize per key and cost nothing once released."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from xguard.util.locks import KeyedLocks


class KeyedLocksTests(SynchronousTestCase):
    def test_same_key_runs_in_order(self) -> None:
        locks = KeyedLocks()
        gate: Deferred[None] = Deferred()
        order: list[str] = []

        async def first() -> None:
            await gate
            order.append("first")

        async def second() -> None:
            order.append("second")

        d1 = locks.run("a", first)
        d2 = locks.run("a", second)
        self.assertEqual(order, [])
        self.assertTrue(locks.locked("a"))
        gate.callback(None)
        self.successResultOf(d1)
        self.successResultOf(d2)
        self.assertEqual(order, ["first", "second"])
        self.assertEqual(len(locks), 0)

    def test_other_keys_independent(self) -> None:
        locks = KeyedLocks()
        gate: Deferred[None] = Deferred()

        async def wait() -> None:
            await gate

        async def quick() -> str:
            return "done"

        locks.run("a", wait)
        self.assertEqual(self.successResultOf(locks.run("b", quick)), "done")
        gate.callback(None)

    def test_failure_releases(self) -> None:
        locks = KeyedLocks()

        async def boom() -> None:
            raise ValueError("x")

        self.failureResultOf(locks.run("a", boom), ValueError)
        self.assertFalse(locks.locked("a"))
        self.assertEqual(len(locks), 0)
