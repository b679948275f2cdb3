from __future__ import annotations

import os
import uuid

from twisted.internet.task import deferLater
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.unit.cachehelpers import VM1, VM2, VM3, Env
from xguard.cache.flusher import default_backoff
from xguard.errors import TransientUpstreamError


class FlusherTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.env = Env(queue_size=16)
        self.addCleanup(self.env.cleanup)
        self.cache = self.env.cache
        self.successResultOf(self.cache.recover())
        self.cache.start()
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def tearDown(self) -> None:
        self.successResultOf(self.cache.stop())
        self.assertEqual(self.env.clock.getDelayedCalls(), [])

    def messages(self, word: str) -> list[dict]:
        return [e for e in self.events if word in e.get("log_format", "")]

    def test_backoff_timing_and_outage_logged_once(self) -> None:
        up = self.env.upstream
        up.down = True
        self.successResultOf(self.cache.write(VM1, 0, b"a"))
        calls = up.count("vtpm_for_vm")
        seen = []
        for _ in range(16):  # 8 s in 0.5 s steps
            self.env.clock.advance(0.5)
            seen.append(up.count("vtpm_for_vm") - calls)
        # rounds at 0.5; backoff(1)=2 s until 2.5, next tick 3.0; backoff(2)=4 s
        # until 7.0, next tick 7.5
        self.assertEqual(seen, [1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3])
        self.assertEqual(len(self.messages("unreachable")), 1)
        self.assertEqual(up.reachability.down_since, 0.0)
        self.assertEqual(self.cache.status().last_error, "CONNECTION_REFUSED")
        up.down = False
        self.env.settle()
        self.assertEqual(len(self.messages("answers again")), 1)
        self.assertEqual(self.messages("unreachable")[0]["log_level"],
                         self.messages("answers again")[0]["log_level"])
        self.assertIsNone(up.reachability.down_since)
        self.assertIsNone(self.cache.status().last_error)
        self.assertEqual(self.cache.status().delivered, 1)

    def test_upstream_answering_ends_the_backoff(self) -> None:
        """Whoever sees upstream answer again (a read, the control channel),
        cached writes go at once rather than at the end of the backoff."""
        up = self.env.upstream
        up.down = True
        self.successResultOf(self.cache.write(VM1, 0, b"a"))
        for _ in range(20):
            self.env.clock.advance(0.5)  # backoff grows to 8 s and more
        up.down = False
        self.successResultOf(up.get_nvram(VM2))  # someone's call succeeds
        self.env.clock.advance(up.reachability.settle)  # and nothing fails meanwhile
        self.env.clock.advance(0.5)
        self.assertEqual(self.env.tpm(VM1), "a")
        self.env.settle()

    def test_a_bug_never_quarantines(self) -> None:
        """Only upstream's refusals quarantine: an unexpected exception is a
        bug in xguard, logged with its traceback; the write stays pending
        and is delivered once the bug is gone."""
        up = self.env.upstream
        up.down = True
        self.successResultOf(self.cache.write(VM1, 0, b"a"))
        up.down = False
        deliver = self.env.sink.deliver
        self.env.sink.deliver = lambda vm, items, base: 1 / 0  # type: ignore[method-assign]
        for _ in range(10):
            self.env.clock.advance(1.0)
        self.assertEqual(self.cache.status().quarantined, ())
        self.assertEqual(self.cache.status().pending, {VM1: 1})
        bugs = [e for e in self.events if e.get("log_failure") is not None]
        self.assertTrue(bugs)
        self.assertTrue(all(e["log_failure"].check(ZeroDivisionError) for e in bugs))
        self.flushLoggedErrors(ZeroDivisionError)
        self.env.sink.deliver = deliver  # type: ignore[method-assign]
        self.env.settle()
        self.assertEqual(self.env.tpm(VM1), "a")
        self.assertEqual(self.cache.status().pending, {})

    def test_a_damaged_pending_file_is_set_aside_never_delivered(self) -> None:
        up = self.env.upstream
        up.down = True
        self.successResultOf(self.cache.write(VM1, 0, b"a"))
        ((item, (ts,)),) = self.cache.versions.index.items()
        path = os.path.join(self.env.root, "Swtpm", VM1, "0", str(ts))
        with open(path, "r+b") as f:
            f.seek(-1, os.SEEK_END)
            f.write(b"b")  # a flipped byte: the content no longer matches its checksum
        up.down = False
        self.env.settle()
        (q,) = self.cache.status().quarantined
        self.assertEqual((q.vm, q.keys, q.kind), (VM1, (0,), "damaged"))
        self.assertIn("checksum mismatch", q.reason)
        self.assertEqual(self.env.tpm(VM1), "")  # nothing delivered
        self.assertFalse(os.path.exists(path))

    def test_undecodable_legacy_file_is_refused(self) -> None:
        """A file of the upstream daemon's format (no checksum) that is not
        a key's content: upstream could never take it."""
        up = self.env.upstream
        up.down = True
        self.successResultOf(self.cache.write(VM1, 0, b"a"))
        ((item, (ts,)),) = self.cache.versions.index.items()
        path = os.path.join(self.env.root, "Swtpm", VM1, "0", str(ts))
        with open(path, "wb") as f:
            f.write(b"\xff\xfe")  # not ASCII, not a key's content
        up.down = False
        self.env.settle()
        (q,) = self.cache.status().quarantined
        self.assertEqual((q.vm, q.keys, q.kind), (VM1, (0,), "refused"))
        self.assertIn("VTPM_CONTENTS_INVALID", q.reason)

    def test_coalesced_per_vm(self) -> None:
        up = self.env.upstream
        up.down = True
        for key in (0, 1, 2):
            self.successResultOf(self.cache.write(VM1, key, b"k%d" % key))
        up.down = False
        before = up.count("set_vtpm_contents")
        self.env.settle()
        self.assertEqual(up.count("set_vtpm_contents"), before + 1)
        self.assertEqual(self.env.tpm(VM1), "k0 k1 k2")

    def test_no_coalesce_knob_pushes_each_item(self) -> None:
        env = Env(coalesce=False)
        self.addCleanup(env.cleanup)
        self.successResultOf(env.cache.recover())
        env.cache.start()
        env.upstream.down = True
        for key in (0, 1, 2):
            self.successResultOf(env.cache.write(VM1, key, b"k%d" % key))
        env.upstream.down = False
        before = env.upstream.count("set_vtpm_contents")
        env.settle()
        self.assertEqual(env.upstream.count("set_vtpm_contents"), before + 3)
        self.assertEqual(env.tpm(VM1), "k0 k1 k2")
        self.successResultOf(env.cache.stop())

    def test_parallel_across_vms_bounded(self) -> None:
        env = Env(queue_size=16, max_concurrency=2)
        self.addCleanup(env.cleanup)
        self.successResultOf(env.cache.recover())
        env.cache.start()
        env.upstream.down = True
        for vm in (VM1, VM2, VM3):
            self.successResultOf(env.cache.write(vm, 0, b"x"))
        env.upstream.down = False
        env.upstream.hold = True
        env.clock.advance(0.5)
        self.assertEqual(env.upstream.held, 2)  # two VMs at once, not one, not three
        env.upstream.hold = False
        while env.upstream.held:
            env.upstream.release()
        env.settle()
        self.assertEqual([env.tpm(vm) for vm in (VM1, VM2, VM3)], ["x"] * 3)
        self.successResultOf(env.cache.stop())

    def test_transient_error_in_coalesced_push_keeps_items(self) -> None:
        up = self.env.upstream
        up.down = True
        self.successResultOf(self.cache.write(VM2, 0, b"a"))
        up.down = False
        up.fail_next(TransientUpstreamError(["HOST_STILL_BOOTING"]))
        self.env.settle()
        self.assertEqual(self.env.tpm(VM2), "a")
        self.assertEqual(self.cache.status().pending, {})

    def test_a_round_with_some_deliveries_failing_says_so_once(self) -> None:
        """Upstream took one VM's writes and failed another's transiently:
        the round backs off for the one, and the operator reads one line
        for the round (an outage, where every delivery fails, is the
        reachability's to log)."""
        up = self.env.upstream
        up.down = True
        self.successResultOf(self.cache.write(VM1, 0, b"a"))
        self.successResultOf(self.cache.write(VM2, 0, b"b"))
        self.env.clock.advance(0.5)  # a round during the outage
        self.assertEqual(self.messages("failed transiently"), [])
        up.down = False
        self.successResultOf(up.get_nvram(VM3))  # upstream answers: the backoff ends
        up.fail_next(TransientUpstreamError(["HOST_STILL_BOOTING"]))
        self.env.clock.advance(up.reachability.settle)
        self.env.clock.advance(0.5)
        lines = self.messages("failed transiently")
        self.assertEqual(len(lines), 1)
        text = formatEvent(lines[0])
        self.assertIn("1 of 2 VMs", text)
        self.assertIn("HOST_STILL_BOOTING", text)
        self.assertEqual(lines[0]["log_level"], LogLevel.warn)
        self.env.settle()
        self.assertEqual((self.env.tpm(VM1), self.env.tpm(VM2)), ("a", "b"))
        self.assertEqual(len(self.messages("failed transiently")), 1)

    def test_default_backoff_is_capped(self) -> None:
        policy = default_backoff()
        self.assertLessEqual(policy(100), 61.0)
        self.assertGreaterEqual(policy(100), 60.0)


class DrainProgressTests(SynchronousTestCase):
    """A large backlog tells its progress (items left, rate) every few
    seconds, and one summary line (items, time) at its end; Status shows
    the same (``drain``). An outage's failing rounds are no drain."""

    VMS = [str(uuid.UUID(int=n, version=4)) for n in range(1, 31)]

    def setUp(self) -> None:
        self.env = Env(queue_size=64, max_concurrency=2)
        self.addCleanup(self.env.cleanup)
        for vm in self.VMS:
            self.env.upstream.add_vm(vm)
            self.env.live.add(vm)
        self.cache = self.env.cache
        self.successResultOf(self.cache.recover())
        self.cache.start()
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def slow(self) -> None:
        """From now on, each VM's delivery takes a second of the clock."""
        deliver = self.env.sink.deliver
        self.env.sink.deliver = lambda vm, items, base: deferLater(  # type: ignore[method-assign]
            self.env.clock, 1.0, deliver, vm, items, base)

    def lines(self, word: str) -> list[str]:
        return [formatEvent(e) for e in self.events if word in e.get("log_format", "")]

    def backlog(self) -> None:
        self.env.upstream.down = True
        for vm in self.VMS:
            self.successResultOf(self.cache.write(vm, 0, b"x"))

    def test_progress_then_one_summary(self) -> None:
        self.backlog()
        for _ in range(40):  # 20 s of outage: failing rounds, backing off
            self.env.clock.advance(0.5)
        self.assertEqual(self.lines("backlog"), [])
        self.assertIsNone(self.cache.status().drain)
        self.env.upstream.down = False
        self.slow()
        self.cache.upstream_answers()
        start = self.env.clock.seconds()
        seen = []
        while self.cache.status().mode != "Direct":
            self.env.clock.advance(0.5)
            drain = self.cache.status().drain
            if drain is not None and drain.ended is None:
                seen.append(drain)
        progress = self.lines("delivering the backlog")
        # 30 VMs, two at a time, a second each: 15 s; a line every 5 s.
        self.assertEqual(len(progress), 3, progress)
        self.assertEqual(progress[0], "Swtpm cache: delivering the backlog: 21 items left, 9 "
                         "delivered in 5 s (1.8/s), about 12 s to go")
        (summary,) = self.lines("backlog delivered")
        self.assertIn("Swtpm cache: backlog delivered: 30 items in 15.", summary)
        drain = self.cache.status().drain
        assert drain is not None
        self.assertEqual((drain.delivered, drain.left), (30, 0))
        self.assertGreaterEqual(drain.started, start - 0.5)
        self.assertIsNotNone(drain.ended)
        self.assertAlmostEqual(drain.rate, 30 / (drain.ended - drain.started))  # type: ignore[operator]
        # Status followed it on the way: fewer left, more delivered.
        self.assertTrue(seen)
        self.assertEqual(seen[0].left + seen[0].delivered, 30)
        self.assertEqual([d.delivered for d in seen], sorted(d.delivered for d in seen))
        self.assertTrue(all(e["log_level"] is LogLevel.info for e in self.events
                            if "backlog" in e.get("log_format", "")))
        self.successResultOf(self.cache.stop())

    def test_a_short_backlog_logs_only_its_summary(self) -> None:
        self.env.upstream.down = True
        self.successResultOf(self.cache.write(VM1, 0, b"x"))
        self.slow()
        self.env.upstream.down = False
        self.env.settle()
        self.assertEqual(self.lines("delivering the backlog"), [])
        (summary,) = self.lines("backlog delivered")
        self.assertIn("backlog delivered: 1 item in 1.0 s", summary)
        self.successResultOf(self.cache.stop())

    def test_a_stop_mid_drain_says_what_is_left(self) -> None:
        self.backlog()
        self.env.upstream.down = False
        self.slow()
        for _ in range(12):
            self.env.clock.advance(0.5)
        self.successResultOf(self.cache.stop())
        (line,) = self.lines("delivery stopped")
        self.assertRegex(line, r"Swtpm cache: delivery stopped: \d+ items delivered in [\d.]+ s, "
                               r"\d+ left \(delivered after the next start\)")
        self.assertEqual(self.lines("backlog delivered"), [])
        self.env.settle()
