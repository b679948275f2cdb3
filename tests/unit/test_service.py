"""The service's lifecycle alone, with fake stages: start in order, ready
only once all started, a failed start exits 1, stop in reverse whatever
fails or hangs."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from tests.fakes import FakeSignals, InlineReactor, some_status
from xguard.daemon.process import ExitStatus
from xguard.daemon.service import Stage, XguardService


class Recorder:
    def __init__(self) -> None:
        self.events: list[str] = []

    def step(self, name: str, result: Any = None) -> Any:
        def run() -> Any:
            self.events.append(name)
            return result
        return run


class ServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = InlineReactor()
        self.r = Recorder()
        self.exits: list[int] = []
        self.signals = FakeSignals()
        self.log: list[dict[str, Any]] = []

    def service(self, stages: list[Stage]) -> XguardService:
        exit_status = ExitStatus(self.reactor, signals=self.signals,  # type: ignore[arg-type]
                                 exit=self.exits.append)
        s = XguardService(stages, clock=self.reactor, ready=self.r.step("READY"),
                          status=some_status, exit_status=exit_status,
                          privileged=self.r.step("rlimits"), stop_timeout=5)
        s.log = Logger(observer=self.log.append)
        return s

    def stages(self, n: int = 3) -> list[Stage]:
        return [Stage(f"s{i}", self.r.step(f"start s{i}"), self.r.step(f"stop s{i}"))
                for i in range(n)]

    def test_start_in_order_then_ready_stop_in_reverse(self) -> None:
        s = self.service(self.stages())
        s.privilegedStartService()
        s.startService()
        self.assertEqual(self.r.events, ["rlimits", "start s0", "start s1", "start s2", "READY"])
        self.assertTrue(s.ready)
        self.successResultOf(s.stopService())
        self.assertEqual(self.r.events[-3:], ["stop s2", "stop s1", "stop s0"])
        self.assertFalse(s.ready)

    def test_ready_only_once_every_stage_started(self) -> None:
        slow: Deferred[None] = Deferred()
        stages = self.stages(1) + [Stage("slow", lambda: slow)] + self.stages(1)
        s = self.service(stages)
        s.startService()
        self.assertNotIn("READY", self.r.events)
        slow.callback(None)
        self.assertEqual(self.r.events[-1], "READY")

    def test_failed_start_stops_and_exits_1(self) -> None:
        """An unexpected failure: its traceback, naming the stage; exit 1."""
        stages = [Stage("a", self.r.step("start a"), self.r.step("stop a")),
                  Stage("lock", lambda: fail(RuntimeError("a bug")))]
        s = self.service(stages)
        s.startService()
        self.assertNotIn("READY", self.r.events)
        self.assertFalse(s.ready)
        (failed,) = [e for e in self.log if e.get("log_failure")]
        self.assertTrue(failed["log_failure"].check(RuntimeError))
        self.assertEqual(failed["stage"], "lock")
        # The reactor is stopped once it runs, and exit(1) follows shutdown.
        self.reactor.run()  # MemoryReactor: runs the callWhenRunning calls
        self.assertTrue(self.reactor.hasStopped)
        triggers = self.reactor.triggers["after"]["shutdown"]
        ((exit_fn, args, _),) = triggers
        exit_fn(*args)
        self.assertEqual(self.exits, [1])
        self.successResultOf(s.stopService())
        self.assertEqual(self.r.events, ["start a", "stop a"])  # only what started

    def exit_after_shutdown(self) -> int:
        self.reactor.run()
        self.assertTrue(self.reactor.hasStopped)
        ((exit_fn, args, _),) = self.reactor.triggers["after"]["shutdown"]
        exit_fn(*args)
        (code,) = self.exits
        return code

    def test_known_causes_are_one_line_and_their_exit_status(self) -> None:
        """Issue 18, item 2: the reason on one error line, no traceback."""
        import errno
        import os
        import shutil
        import socket
        import tempfile

        from twisted.internet.error import CannotListenError

        from xguard.daemon.process import (
            EXIT_IN_USE,
            EXIT_NO_ACCESS,
            EXIT_RUNNING,
            InstanceLock,
        )
        from xguard.util.unixsock import remove_stale

        root = tempfile.mkdtemp(prefix="xgs")
        self.addCleanup(shutil.rmtree, root)
        holder = InstanceLock(os.path.join(root, "xguard.lock"))
        holder.acquire()
        self.addCleanup(holder.release)
        live = socket.socket(socket.AF_UNIX)
        self.addCleanup(live.close)
        live.bind(os.path.join(root, "control.sock"))
        live.listen(1)
        plain = os.path.join(root, "metrics.sock")
        with open(plain, "w"):
            pass

        def raises(f: Any) -> Any:
            def run() -> Any:
                f()
            return run

        cases = [
            (raises(InstanceLock(os.path.join(root, "xguard.lock")).acquire), EXIT_RUNNING,
             f"another xguard is running on {root} (pid {os.getpid()}, it holds"),
            (raises(lambda: remove_stale(os.path.join(root, "control.sock"),
                                         "control socket")),
             EXIT_IN_USE, "control socket " + root),
            (raises(lambda: remove_stale(plain, "metrics socket")),
             EXIT_IN_USE, f"metrics socket {plain} exists and is not a socket"),
            (lambda: fail(CannotListenError("127.0.0.1", 9101,
                                            OSError(errno.EADDRINUSE,
                                                    "Address already in use"))),
             EXIT_IN_USE, "Address already in use"),
            (lambda: fail(PermissionError(errno.EACCES, "Permission denied", "/s/xguard.lock")),
             EXIT_NO_ACCESS, "Permission denied: '/s/xguard.lock'"),
        ]
        for start, code, reason in cases:
            self.log.clear()
            self.exits.clear()
            self.reactor = InlineReactor()
            s = self.service([Stage("a", lambda: None), Stage("b", start)])
            s.startService()
            self.assertEqual([e for e in self.log if e.get("log_failure")], [], reason)
            (line,) = [e for e in self.log if e["log_level"] == LogLevel.error]
            text = formatEvent(line)
            self.assertTrue(text.startswith("xguard cannot start: "), text)
            self.assertIn(reason, text)
            self.assertNotIn("\n", text)
            self.assertEqual(self.exit_after_shutdown(), code, text)
            self.assertIn(f"(exit status {code})", text)

    def test_a_stop_during_start_is_no_failure(self) -> None:
        slow: Deferred[None] = Deferred()
        s = self.service(self.stages(1) + [Stage("slow", lambda: slow)])
        s.startService()
        self.successResultOf(s.stopService())
        self.assertEqual([e for e in self.log if e.get("log_failure")], [])
        self.assertFalse(any(e["log_level"] == LogLevel.error for e in self.log))
        self.assertEqual(self.reactor.triggers.get("after", {}).get("shutdown", []), [])

    def test_a_failing_stop_does_not_skip_the_rest(self) -> None:
        """e.g. the control socket file was removed while the daemon ran."""
        stages = self.stages(1) + [
            Stage("control", lambda: None, lambda: fail(OSError(2, "No such file")))
        ] + self.stages(1)
        s = self.service(stages)
        s.startService()
        self.successResultOf(s.stopService())
        self.assertEqual(self.r.events[-2:], ["stop s0", "stop s0"])
        (failed,) = [e for e in self.log if e.get("log_failure")]
        self.assertIn("control", failed["stage"])

    def test_a_hanging_stop_is_left_behind(self) -> None:
        stages = self.stages(1) + [Stage("upstream", lambda: None, lambda: Deferred())]
        s = self.service(stages)
        s.startService()
        d = s.stopService()
        self.assertNoResult(d)
        self.reactor.advance(5)
        self.successResultOf(d)
        self.assertEqual(self.r.events[-1], "stop s0")
        self.assertTrue(any("takes longer" in e["log_format"] for e in self.log))

    def test_sigterm_stops_the_reactor_and_exits_0(self) -> None:
        s = self.service(self.stages(1))
        s.startService()
        self.reactor.run()
        self.assertEqual(set(self.signals.handlers), {15, 2})
        self.reactor.hasStopped = False
        self.signals.handlers[15](15, None)
        self.assertTrue(self.reactor.hasStopped)
        self.assertEqual(self.exits, [])  # no os._exit: twistd exits 0 by itself
        self.assertEqual(self.reactor.triggers.get("after", {}).get("shutdown", []), [])

    def test_status_is_served(self) -> None:
        s = self.service([])
        self.assertEqual(s.status().version, "test")
