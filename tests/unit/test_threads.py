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


class AcknowledgingTests(SynchronousTestCase):
    """A job that says when its caller may go on (a durable write) before
    it ends (unlinking what that write superseded)."""

    def run_jobs(self, job: Callable[..., Any]) -> tuple[list[Any], list[str]]:
        from xguard.util.threads import run_acknowledging

        reactor = FakeThreadReactor()
        runner = ThreadPoolRunner(reactor, "a", maxthreads=1)  # type: ignore[arg-type]
        runner.start()
        steps: list[str] = []
        d = run_acknowledging(runner, job, steps)
        runner.stop()
        results: list[Any] = []
        d.addBoth(results.append)
        self.assertEqual(results, [])  # fired on the reactor thread only
        for f, args in reactor.queue:
            f(*args)
        return results, steps

    def test_fires_when_acknowledged_while_the_rest_runs(self) -> None:
        seen: list[list[Any]] = []

        def job(steps: list[str], *, acknowledge: Callable[[], None]) -> str:
            steps.append("durable")
            acknowledge()
            acknowledge()  # once only
            steps.append("cleanup")
            return "ignored"

        results, steps = self.run_jobs(job)
        seen.append(results)
        self.assertEqual(results, [None])
        self.assertEqual(steps, ["durable", "cleanup"])

    def test_an_error_before_acknowledging_fails_it(self) -> None:
        def job(steps: list[str], *, acknowledge: Callable[[], None]) -> None:
            raise OSError(28, "No space left on device")

        results, _ = self.run_jobs(job)
        self.assertIsInstance(results[0].value, OSError)

    def test_an_error_after_acknowledging_is_logged_not_raised(self) -> None:
        def job(steps: list[str], *, acknowledge: Callable[[], None]) -> None:
            acknowledge()
            raise RuntimeError("cleanup broke")

        results, _ = self.run_jobs(job)
        self.assertEqual(results, [None])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_a_job_that_never_acknowledges_fires_when_it_ends(self) -> None:
        def job(steps: list[str], *, acknowledge: Callable[[], None]) -> None:
            steps.append("done")

        results, steps = self.run_jobs(job)
        self.assertEqual(results, [None])

    def test_any_runner_without_early_answers_runs_it_whole(self) -> None:
        from twisted.internet.defer import maybeDeferred

        from xguard.util.threads import run_acknowledging

        steps: list[str] = []

        def job(steps: list[str], *, acknowledge: Callable[[], None]) -> None:
            acknowledge()
            steps.append("after")

        d = run_acknowledging(lambda f, *a, **k: maybeDeferred(f, *a, **k), job, steps)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(steps, ["after"])
