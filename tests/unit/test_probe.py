"""The prober: while upstream gives no answer it asks once a second, one
question at a time; it stays quiet while upstream answers "not now", and
stops once upstream is back."""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from xguard.upstream.probe import Prober
from xguard.upstream.reachability import Reachability


class ProberTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.r = Reachability(self.clock, "xapi", settle=1)
        self.asked = 0
        self.answer: Deferred[None] | None = None
        self.up = False

        def probe() -> Deferred[None]:
            self.asked += 1
            if self.up:
                self.r.answered()
                return succeed(None)
            self.r.failed("CONNECTION_REFUSED")
            return succeed(None)

        self.prober = Prober(self.clock, self.r, probe, interval=1, timeout=5)

    def test_probes_every_second_until_upstream_answers(self) -> None:
        self.r.failed("CONNECTION_REFUSED")
        for _ in range(120):  # a 2-minute outage
            self.clock.advance(1)
        self.assertEqual(self.asked, 120)  # 60 a minute, each a refused connection
        self.up = True
        self.clock.advance(1)  # noticed within a second…
        self.clock.advance(1)  # …and back once it did not fail for the settle time
        self.assertIs(self.r.reachable, True)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.asked, 121)

    def test_quiet_while_upstream_answers_not_now(self) -> None:
        self.r.failed("HOST_STILL_BOOTING", answered=True)
        for _ in range(10):
            self.clock.advance(1)
        self.assertEqual(self.asked, 0)
        self.r.failed("CONNECTION_REFUSED")  # silent again: asked again
        self.clock.advance(1)
        self.assertEqual(self.asked, 1)
        self.prober.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_the_first_answer_after_silence_is_told_at_once(self) -> None:
        told: list[float] = []
        self.r.subscribe_answer(lambda: told.append(self.clock.seconds()))
        self.r.failed("CONNECTION_REFUSED")
        self.clock.advance(5)
        self.up = True
        self.clock.advance(1)
        self.assertEqual(told, [6.0])  # at the probe's answer, before the outage ends
        self.assertIs(self.r.reachable, False)
        self.clock.advance(1)
        self.assertIs(self.r.reachable, True)
        self.assertEqual(told, [6.0])

    def test_one_probe_at_a_time(self) -> None:
        hung: list[Deferred[None]] = []
        self.prober._probe = lambda: hung.append(Deferred()) or hung[-1]  # type: ignore[assignment]
        self.r.failed("TIMEOUT")
        for _ in range(4):
            self.clock.advance(1)
        self.assertEqual(len(hung), 1)  # waiting for the first
        self.clock.advance(1)  # its own deadline (5 s) passed: the next may go
        self.clock.advance(1)
        self.assertEqual(len(hung), 2)
        self.prober.stop()
        self.clock.advance(10)
        for d in hung:
            d.callback(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])
