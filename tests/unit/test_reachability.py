"""Reachability: an outage is logged once at its start and once at its end,
at the same level, and observers hear each transition once."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from xguard.upstream.reachability import Reachability


class ReachabilityTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.events: list[dict[str, Any]] = []
        self.r = Reachability(self.clock, "xapi unix:/x")
        self.r.log = Logger(observer=self.events.append)
        self.seen: list[bool] = []
        self.r.subscribe(self.seen.append)

    def test_outage_logged_once_each_way(self) -> None:
        self.r.answered()
        self.assertEqual((self.r.reachable, self.seen, self.events), (True, [True], []))
        self.clock.advance(10)
        for _ in range(5):
            self.r.failed("CONNECTION_REFUSED")
            self.clock.advance(1)
        self.assertEqual((self.r.reachable, self.r.down_since), (False, 10))
        self.assertEqual(self.r.last_error, "CONNECTION_REFUSED")
        for _ in range(3):
            self.r.answered()
        self.assertEqual(self.seen, [True, False])  # not yet: it must stay up a while
        self.clock.advance(2)
        self.assertEqual(self.seen, [True, False, True])
        start, end = self.events
        self.assertEqual(start["log_level"], end["log_level"])
        self.assertEqual(end["seconds"], 5.0)
        self.assertIsNone(self.r.last_error)
        self.assertIsNone(self.r.down_since)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_answers_mixed_with_failures_are_still_an_outage(self) -> None:
        """xapi answers reads but refuses writes (HOST_STILL_BOOTING on
        VTPM.set_contents): no "answers again" line at every retry."""
        self.r.failed("CONNECTION_REFUSED")
        for _ in range(10):
            self.r.answered()  # VTPM.get_contents
            self.clock.advance(0.01)
            self.r.failed("HOST_STILL_BOOTING")  # VTPM.set_contents
            self.clock.advance(1.5)
        self.assertEqual(self.seen, [False])
        self.assertEqual(len(self.events), 1)
        self.assertEqual(self.r.last_error, "HOST_STILL_BOOTING")
        self.r.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_unknown_until_a_call_tells(self) -> None:
        self.assertIsNone(self.r.reachable)
        self.r.failed("TIMEOUT")
        self.assertEqual(self.seen, [False])

    def test_a_failing_observer_does_not_stop_the_others(self) -> None:
        def broken(up: bool) -> None:
            raise RuntimeError("observer bug")
        r = Reachability(self.clock, "t")
        r.log = Logger(observer=self.events.append)
        seen: list[bool] = []
        r.subscribe(broken)
        r.subscribe(seen.append)
        r.answered()
        self.assertEqual(seen, [True])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 0)  # logged, not raised
        self.assertTrue(any(e.get("log_failure") for e in self.events))
