# -*- test-case-name: tests.unit.test_logconfig -*-
"""``--log-level``: twistd installs its log observers before our service
starts, so the level is applied by wrapping those observers in a
level filter when the service starts, and unwrapping them when it stops.

Convention for every log call in xguard: identifiers (VM/vTPM uuid, path,
dbg) and sizes only, never VM contents."""

from __future__ import annotations

from collections.abc import Callable

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    LogPublisher,
)

__all__ = ["apply_log_level", "LEVELS"]

LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}


def apply_log_level(publisher: LogPublisher, level: str) -> Callable[[], None]:
    """Filter every observer of ``publisher`` at ``level``; returns the undo."""
    predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])
    originals: list[ILogObserver] = list(publisher._observers)
    wrapped = [FilteringLogObserver(o, [predicate]) for o in originals]
    for original, wrapper in zip(originals, wrapped):
        publisher.removeObserver(original)
        publisher.addObserver(wrapper)

    def undo() -> None:
        for original, wrapper in zip(originals, wrapped):
            publisher.removeObserver(wrapper)
            publisher.addObserver(original)

    return undo
