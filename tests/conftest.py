"""pytest's settings for the whole suite.

Two ways of running the reactor meet here. The unit tests and properties
that need it are trial TestCases (they run under trial as well as
pytest): trial's TestCase runs the global reactor itself, for each test,
and stops it again. The integration tests that drive the daemon with
Twisted clients use pytest-twisted, which runs that same reactor in a
greenlet from the first plain test function on, for good; a trial
TestCase that needs the reactor after that fails with ReactorAlreadyRunning
(pytest-dev/pytest-twisted#147). So trial's TestCases run first: a session
of the whole suite runs them before any plain test function starts
pytest-twisted's reactor.
"""

from __future__ import annotations

import pytest
from _pytest.unittest import TestCaseFunction


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    # A stable sort: each group keeps its order.
    items.sort(key=lambda item: not isinstance(item, TestCaseFunction))
