"""pytest's settings for the whole suite.

The tests that need the real reactor are trial TestCases (they run under
trial as well as pytest): trial's TestCase runs the global reactor itself,
for each test, and stops it again. pytest-twisted, where it is installed
(older checkouts listed it in the test extra), runs that same reactor in a
greenlet from the first plain test function on (its pytest_pyfunc_call
hook takes every one), and from then on each trial TestCase that needs the
reactor fails with ReactorAlreadyRunning and an unclean reactor. So it is
blocked here: nothing uses it."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # Unregisters it (if loaded) before any test runs: its greenlet is
    # created at configure time but only started by a test.
    config.pluginmanager.set_blocked("twisted")
