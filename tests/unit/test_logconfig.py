"""--log-level filters every observer twistd installed, and can be undone."""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger, LogPublisher
from twisted.trial.unittest import SynchronousTestCase

from xguard.logconfig import apply_log_level


class LogLevelTests(SynchronousTestCase):
    def test_filters_below_level_and_undoes(self) -> None:
        publisher = LogPublisher()
        seen: list[dict[str, Any]] = []
        publisher.addObserver(seen.append)
        log = Logger(observer=publisher)
        undo = apply_log_level(publisher, "warn")
        log.info("quiet")
        log.warn("loud")
        self.assertEqual([e["log_format"] for e in seen], ["loud"])
        undo()
        log.info("back")
        self.assertEqual([e["log_format"] for e in seen], ["loud", "back"])
