"""The per-socket log rate limit (xguard.domain.loglimit)."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from xguard.domain.loglimit import RateLimitedObserver


class RateLimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.events: list[dict[str, Any]] = []
        self.limiter = RateLimitedObserver(self.clock, "vm-1", forward=self.events.append,
                                           burst=3, window=60)
        self.log = Logger(namespace="test", observer=self.limiter)

    def tearDown(self) -> None:
        self.limiter.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_burst_then_one_summary_per_window(self) -> None:
        for n in range(100):
            self.log.info("refused {n}", n=n)
        self.assertEqual([e["n"] for e in self.events], [0, 1, 2])
        self.clock.advance(59)
        self.assertEqual(len(self.events), 3)
        self.clock.advance(1)
        self.assertEqual(len(self.events), 4)
        self.assertEqual((self.events[-1]["count"], self.events[-1]["vm"]), (97, "vm-1"))
        self.log.warn("again")
        self.assertEqual(self.events[-1]["log_format"], "again")

    def test_every_level_from_info_up_counts(self) -> None:
        self.log.info("a")
        self.log.warn("b")
        self.log.error("c")
        self.log.critical("d")
        self.log.failure("e", failure=Failure(ValueError("bug")))
        self.assertEqual(len(self.events), 3)
        self.assertEqual(self.limiter.suppressed, 2)

    def test_debug_is_not_limited(self) -> None:
        for _ in range(10):
            self.log.debug("d")
        self.assertEqual(len(self.events), 10)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_quiet_windows_cost_nothing(self) -> None:
        for _ in range(3):
            self.log.info("x")
            self.clock.advance(61)
        self.assertEqual(len(self.events), 3)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_reports_and_cancels(self) -> None:
        for _ in range(5):
            self.log.info("x")
        self.limiter.stop()
        self.assertEqual(self.events[-1]["count"], 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_line_after_the_window_starts_a_new_one(self) -> None:
        for _ in range(5):
            self.log.info("x")
        self.clock.advance(60)  # the summary
        for _ in range(5):
            self.log.info("y")
        self.assertEqual([e.get("count") for e in self.events],
                         [None, None, None, 2, None, None, None])
