"""Restart in place (issue 12): the re-exec itself with a fake execve, the
SIGHUP and SIGTERM handlers, the control channel's Restart command and
``xguard-ctl restart``."""

from __future__ import annotations

import io
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from tests.fakes import FakeSignals, InlineReactor, StoreKit
from tests.unit.test_ctl import CtlTestCase
from xguard.control.commands import RestartRefused
from xguard.control.ctl import run
from xguard.control.server import control_factory
from xguard.daemon.process import ExitStatus
from xguard.restart.fdstore import FdStore
from xguard.restart.handover import Handover
from xguard.restart.reexec import Launch, Reexec


class Recorded:
    """The exec that would have happened."""

    def __init__(self) -> None:
        self.execs: list[tuple[str, list[str], dict[str, str]]] = []
        self.placed: list[list[int]] = []
        self.exits: list[int] = []

    def execve(self, path: str, argv: Sequence[str], env: Mapping[str, str]) -> None:
        self.execs.append((path, list(argv), dict(env)))

    def place(self, fds: Sequence[int]) -> None:
        self.placed.append(list(fds))


class ReexecTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        # Running and not yet stopped, whatever the fake's initial flags:
        # until Twisted 26.4 a new MemoryReactor said hasStopped = True.
        self.reactor.running = True
        self.reactor.hasStopped = False
        self.handover = Handover(FdStore(Clock(), environ={}), take=list)
        self.rec = Recorded()
        self.ready = True
        self.dir = tempfile.mkdtemp(prefix="xgr")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def reexec(self, **launch: Any) -> Reexec:
        launch.setdefault("executable", sys.executable)
        launch.setdefault("argv", ("python", "-m", "xguard", "-n", "--pidfile="))
        return Reexec(self.reactor, self.handover,
                      lambda: [("xgd-1-2-aa", 17), ("xgc-1-3-bb", 18)],
                      launch=Launch(**launch), is_ready=lambda: self.ready,
                      environ={"NOTIFY_SOCKET": "/run/n", "LISTEN_FDS": "9", "PATH": "/bin"},
                      getpid=lambda: 4242, execve=self.rec.execve, place=self.rec.place,
                      exit=self.rec.exits.append)

    def shut_down(self) -> None:
        """What the reactor does after stop(): the shutdown triggers."""
        self.assertTrue(self.reactor.hasStopped)
        for phase in ("before", "during", "after"):
            for f, args, kwargs in self.reactor.triggers.get(phase, {}).get("shutdown", []):
                f(*args, **kwargs)

    def test_stops_then_execs_the_same_command_with_the_sockets(self) -> None:
        r = self.reexec()
        r.request("test")
        self.assertTrue(self.handover.reexec_pending)  # the stop keeps sockets open
        self.assertTrue(self.handover.keep_open())
        self.assertEqual(self.rec.execs, [])  # not before everything stopped
        self.shut_down()
        [(path, argv, env)] = self.rec.execs
        self.assertEqual((path, argv), (sys.executable,
                                        ["python", "-m", "xguard", "-n", "--pidfile="]))
        self.assertEqual(env, {"NOTIFY_SOCKET": "/run/n", "PATH": "/bin", "LISTEN_PID": "4242",
                               "LISTEN_FDS": "2", "LISTEN_FDNAMES": "xgd-1-2-aa:xgc-1-3-bb"})
        self.assertEqual(self.rec.placed, [[17, 18]])

    def test_refusals(self) -> None:
        self.ready = False
        self.assertIn("still starting", str(self.assertRaises(
            RestartRefused, self.reexec().request, "t")))
        self.ready = True
        self.assertIn("daemonized", str(self.assertRaises(
            RestartRefused, self.reexec(foreground=False).request, "t")))
        self.assertIn("cannot execute", str(self.assertRaises(
            RestartRefused, self.reexec(executable="/nonexistent/python").request, "t")))
        self.assertFalse(self.reactor.hasStopped)
        r = self.reexec()
        r.request("t")
        self.assertIn("already", str(self.assertRaises(RestartRefused, r.request, "t")))

    def test_sigterm_during_the_restart_stops_instead(self) -> None:
        r = self.reexec()
        r.request("t")
        r.cancel()
        self.shut_down()
        self.assertEqual(self.rec.execs, [])

    def test_pid_file_holding_our_pid_is_removed_first(self) -> None:
        mine, other = os.path.join(self.dir, "mine.pid"), os.path.join(self.dir, "other.pid")
        with open(mine, "w") as f:
            f.write("4242\n")
        with open(other, "w") as f:
            f.write("99\n")
        self.reexec(pidfile=mine).request("t")
        self.shut_down()
        self.assertFalse(os.path.exists(mine))
        self.reactor.hasStopped = False
        self.handover.reexec_pending = False
        self.reactor.triggers.clear()
        self.reexec(pidfile=other).request("t")
        self.shut_down()
        self.assertTrue(os.path.exists(other))

    def test_failed_exec_exits_1(self) -> None:
        def fail(*args: Any) -> None:
            raise FileNotFoundError(2, "No such file or directory")

        r = self.reexec()
        r._execve = fail
        r.request("t")
        self.shut_down()
        self.assertEqual(self.rec.exits, [1])

    def test_sighup_refused_is_logged_not_raised(self) -> None:
        self.ready = False
        with capturedLogs() as events:
            self.reexec().on_signal()
        self.assertIn("still starting", events[-1]["reason"])


def _installed(reactor: MemoryReactorClock) -> tuple[FakeSignals, list[str]]:
    """An ExitStatus's handlers installed on ``reactor`` (running), and the
    list its restart and stop callbacks append to."""
    signals, calls = FakeSignals(), []
    status = ExitStatus(reactor, signals=signals,  # type: ignore[arg-type]
                        on_hangup=lambda: calls.append("hup"),
                        on_stop=lambda: calls.append("stop"))
    status.install()
    reactor.running = True
    status._install()
    return signals, calls


class SignalTests(SynchronousTestCase):
    def test_sighup_restarts_sigterm_cancels(self) -> None:
        reactor = InlineReactor()
        signals, calls = _installed(reactor)
        signals.handlers[signal.SIGHUP](signal.SIGHUP, None)
        self.assertEqual(calls, ["hup"])
        signals.handlers[signal.SIGTERM](signal.SIGTERM, None)
        self.assertEqual(calls, ["hup", "stop"])
        self.assertTrue(reactor.hasStopped)
        # A second signal while stopping is not an error.
        signals.handlers[signal.SIGINT](signal.SIGINT, None)

    def test_handlers_only_hand_the_signal_to_the_reactor(self) -> None:
        """A signal handler runs between any two bytecodes of the main
        thread, possibly inside a log observer's write: logging from it can
        re-enter that write (a deadlocked or broken log, a daemon that never
        stops). So the handlers only schedule; the reactor logs and acts."""
        scheduled: list[tuple[Any, tuple[Any, ...]]] = []

        class Deferring(MemoryReactorClock):
            def callFromThread(self, f: Any, *args: Any) -> None:
                scheduled.append((f, args))

        reactor = Deferring()
        signals, calls = _installed(reactor)
        with capturedLogs() as events:
            signals.handlers[signal.SIGHUP](signal.SIGHUP, None)
            signals.handlers[signal.SIGTERM](signal.SIGTERM, None)
        self.assertEqual(events, [])
        self.assertEqual(calls, [])
        self.assertEqual(len(scheduled), 2)
        with capturedLogs() as events:
            for f, args in scheduled:
                f(*args)
        self.assertEqual(calls, ["hup", "stop"])
        self.assertTrue(reactor.hasStopped)
        self.assertEqual([e["log_format"].split(":")[0].split(",")[0] for e in events],
                         ["received SIGHUP", "received signal {signum}"])

    def test_without_a_restart_sighup_keeps_its_default(self) -> None:
        signals = FakeSignals()
        status = ExitStatus(InlineReactor(), signals=signals)  # type: ignore[arg-type]
        status._install()
        self.assertNotIn(signal.SIGHUP, signals.handlers)


class ControlRestartTests(CtlTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.restarts: list[str] = []
        self.refuse: str | None = None

        def restart(dbg: str) -> None:
            if self.refuse:
                raise RestartRefused(self.refuse)
            self.restarts.append(dbg)

        kit = StoreKit(self.upstream)
        self.addCleanup(kit.cleanup)
        self.factory = control_factory(self.registry, kit.vtpm_contents(), lambda: self.status,
                                       restart=restart)

    def test_restart_then_wait_for_ready(self) -> None:
        self.assertEqual(self.ctl("restart", "upgrade-42"),
                         (0, "xguard restarted in place and is ready\n", ""))
        self.assertEqual(self.restarts, ["upgrade-42"])
        self.assertEqual(len(self.connected_to), 2)  # Restart, then Status

    def test_refused_says_why(self) -> None:
        self.refuse = "xguard is still starting"
        code, out, err = self.ctl("restart")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("RESTART_REFUSED: xguard is still starting", err)

    def test_daemon_without_restart(self) -> None:
        kit = StoreKit(self.upstream)
        self.addCleanup(kit.cleanup)
        self.factory = control_factory(self.registry, kit.vtpm_contents(), lambda: self.status)
        code, _, err = self.ctl("restart")
        self.assertEqual(code, 1)
        self.assertIn("RESTART_REFUSED", err)

    def test_not_ready_again_in_time(self) -> None:
        import attrs

        self.status = attrs.evolve(self.status, ready=False)
        clock = Clock()
        out, err = io.StringIO(), io.StringIO()
        d = run(clock, ["restart", "--timeout", "1"], out, err, environ={},
                connect=self.connect)
        for _ in range(20):
            self.flush()
            clock.advance(0.1)
        self.flush()
        self.assertEqual(self.successResultOf(d), 1)
        self.assertIn("not ready again within 1s", err.getvalue())


class FastExitTests(SynchronousTestCase):
    def test_exit_after_shutdown_flushes_then_exits(self) -> None:
        reactor, exits = InlineReactor(), []
        status = ExitStatus(reactor, signals=FakeSignals(),  # type: ignore[arg-type]
                            exit=exits.append)
        status.exit_after_shutdown(0)
        self.assertEqual(exits, [])
        for f, args, kwargs in reactor.triggers["after"]["shutdown"]:
            f(*args, **kwargs)
        self.assertEqual(exits, [0])
