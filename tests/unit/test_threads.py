"""The production runner: blocking work on a private pool, answered on the
reactor thread; stopping it joins the threads (nothing keeps the process
alive after the daemon stopped)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from xguard.util.threads import ThreadPoolRunner


class FakeThreadReactor:
    """callFromThread queues; the test runs the queue after joining."""

    def __init__(self) -> None:
        self.queue: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        self.queue.append((f, args))


class ThreadPoolRunnerTests(SynchronousTestCase):
    def test_runs_off_this_thread_and_stops(self) -> None:
        reactor = FakeThreadReactor()
        runner = ThreadPoolRunner(reactor, "t", maxthreads=1)  # type: ignore[arg-type]
        runner.start()
        d = runner(lambda x: (x * 2, threading.current_thread()), 21)
        runner.stop()  # joins the thread: the job is done
        runner.stop()
        for f, args in reactor.queue:
            f(*args)
        value, thread = self.successResultOf(d)
        self.assertEqual(value, 42)
        self.assertIsNot(thread, threading.current_thread())
        self.assertFalse(any(t.name.startswith("t-") and t.is_alive()
                             for t in threading.enumerate()))
