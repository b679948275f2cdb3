"""The idle trimmer returns memory once per quiet period, never under load."""

from __future__ import annotations

import gc
import weakref

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from xguard.daemon.memory import (
    YOUNG_THRESHOLD,
    Activity,
    IdleTrimmer,
    freeze_startup,
    libc_trim,
    tune_collector,
)


class IdleTrimmerTests(SynchronousTestCase):
    def test_trims_once_after_activity_stops(self) -> None:
        clock, activity, trims = Clock(), [0], []
        trimmer = IdleTrimmer(clock, lambda: activity[0], interval=30,
                              trim=lambda: trims.append(clock.seconds()) or True)
        trimmer.start()
        clock.advance(30)
        self.assertEqual(trims, [])  # nothing happened: nothing to give back
        activity[0] = 5
        clock.advance(30)
        self.assertEqual(trims, [])  # busy during this period
        clock.advance(30)
        self.assertEqual(trims, [60.0 + 30])  # quiet now: one trim
        clock.advance(300)
        self.assertEqual(len(trims), 1)  # and only one
        trimmer.stop()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_a_failing_trim_does_not_stop_the_loop(self) -> None:
        clock, activity = Clock(), [0]

        def boom() -> bool:
            raise OSError("no")

        trimmer = IdleTrimmer(clock, lambda: activity[0], interval=1, trim=boom)
        trimmer.start()
        activity[0] = 1
        clock.advance(1)
        clock.advance(1)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        trimmer.stop()

    def test_libc_trim_runs(self) -> None:
        self.assertIn(libc_trim(), (True, False))

    def test_libc_trim_collects_cycles_first(self) -> None:
        import weakref

        class Node:
            pass

        gc.disable()
        self.addCleanup(gc.enable)
        a, b = Node(), Node()
        a.other, b.other = b, a  # type: ignore[attr-defined]
        gone = weakref.ref(a)
        del a, b
        self.assertIsNotNone(gone())  # a cycle: reference counting alone keeps it
        libc_trim()
        self.assertIsNone(gone())


class ActivityTests(SynchronousTestCase):
    def test_answers_after_a_quiet_period_bring_another_trim(self) -> None:
        """A storm: connections arrive, then their requests wait on upstream
        for longer than a period without a new connection, then are
        answered. The storm's garbage is freed when the answers go out:
        the trimmer must run after that, not only during the wait."""
        clock, activity, trims = Clock(), Activity(), []
        trimmer = IdleTrimmer(clock, activity, interval=10,
                              trim=lambda: trims.append(clock.seconds()) or True)
        trimmer.start()
        for _ in range(100):
            activity.connection()
        clock.advance(10)
        clock.advance(10)
        self.assertEqual(trims, [20.0])  # the wait looked quiet
        for _ in range(100):
            activity.answer()
        clock.advance(10)
        clock.advance(10)
        self.assertEqual(trims, [20.0, 40.0])
        trimmer.stop()


class FreezeStartupTests(SynchronousTestCase):
    def test_freezes_what_is_alive(self) -> None:
        self.addCleanup(gc.unfreeze)
        kept = [object() for _ in range(10)]
        frozen = freeze_startup()
        self.assertGreaterEqual(frozen, len(kept))
        self.assertEqual(frozen, gc.get_freeze_count())

    def test_young_garbage_collected_without_a_full_collection(self) -> None:
        """A full collection at start-up walked every object (40-55 ms with
        2,000 sockets) to find the same few import-time cycles each time:
        only the young generations are collected before the freeze."""
        self.addCleanup(gc.unfreeze)
        gc.collect()

        class Cycle:
            pass

        garbage = Cycle()
        garbage.me = garbage  # type: ignore[attr-defined]
        gone = weakref.ref(garbage)
        del garbage
        generations: list[int] = []

        def seen(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                generations.append(info["generation"])

        gc.callbacks.append(seen)
        self.addCleanup(gc.callbacks.remove, seen)
        freeze_startup()
        self.assertIsNone(gone())  # collected, not frozen
        self.assertTrue(generations)
        self.assertLess(max(generations), 2)


class TuneCollectorTests(SynchronousTestCase):
    def test_young_collections_rarer_older_unchanged(self) -> None:
        before = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *before)
        self.assertEqual(tune_collector(), (YOUNG_THRESHOLD, before[1], before[2]))
        self.assertEqual(gc.get_threshold()[0], YOUNG_THRESHOLD)
        self.assertGreater(YOUNG_THRESHOLD, before[0])
