"""Deadlines: waiting is bounded without cancelling the work, and a read
falls back to a local answer only when it has one."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from xguard.errors import PermanentUpstreamError, TransientUpstreamError
from xguard.util.deadlines import within, within_or


class WithinTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def test_answer_in_time(self) -> None:
        work: Deferred[str] = Deferred()
        d = within(self.clock, 3, work)
        work.callback("x")
        self.assertEqual(self.successResultOf(d), "x")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_failure_in_time_passes_through(self) -> None:
        work: Deferred[str] = Deferred()
        d = within(self.clock, 3, work)
        work.errback(PermanentUpstreamError(["UUID_INVALID"]))
        self.failureResultOf(d, PermanentUpstreamError)

    def test_past_the_deadline_is_transient_and_work_goes_on(self) -> None:
        work: Deferred[str] = Deferred()
        d = within(self.clock, 3, work, "vTPM read")
        self.clock.advance(3)
        f = self.failureResultOf(d, TransientUpstreamError)
        self.assertEqual(f.value.codes, ["TIMEOUT", "vTPM read"])
        self.assertFalse(work.called)  # not cancelled
        work.errback(TransientUpstreamError(["CONNECTION_REFUSED"]))  # late: quiet
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_a_late_bug_is_logged(self) -> None:
        work: Deferred[str] = Deferred()
        within(self.clock, 1, work).addErrback(lambda f: None)
        self.clock.advance(1)
        work.errback(ZeroDivisionError())
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class WithinOrTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def test_upstream_answer_wins_in_time(self) -> None:
        work: Deferred[str] = Deferred()
        d = within_or(self.clock, 3, work, "copy")
        work.callback("upstream")
        self.assertEqual(self.successResultOf(d), "upstream")

    def test_fallback_past_the_deadline(self) -> None:
        work: Deferred[str] = Deferred()
        d = within_or(self.clock, 3, work, "copy")
        self.clock.advance(3)
        self.assertEqual(self.successResultOf(d), "copy")
        self.assertFalse(work.called)  # the read goes on, under its lock

    def test_fallback_on_a_transient_failure(self) -> None:
        work: Deferred[str] = Deferred()
        d = within_or(self.clock, 3, work, "copy")
        work.errback(TransientUpstreamError(["CONNECTION_REFUSED"]))
        self.assertEqual(self.successResultOf(d), "copy")

    def test_a_permanent_failure_is_not_hidden(self) -> None:
        work: Deferred[str] = Deferred()
        d = within_or(self.clock, 3, work, "copy")
        work.errback(PermanentUpstreamError(["HANDLE_INVALID"]))
        self.failureResultOf(d, PermanentUpstreamError)

    def test_without_fallback_upstream_is_waited_for(self) -> None:
        """Nothing local to answer with: no deadline, the answer or the
        error comes from upstream, however late."""
        work: Deferred[str] = Deferred()
        d = within_or(self.clock, 3, work, None)
        self.clock.advance(60)
        self.assertNoResult(d)
        work.callback("late")
        self.assertEqual(self.successResultOf(d), "late")
        failing: Deferred[str] = Deferred()
        d2 = within_or(self.clock, 3, failing, None)
        failing.errback(TransientUpstreamError(["CONNECTION_REFUSED"]))
        self.failureResultOf(d2, TransientUpstreamError)
