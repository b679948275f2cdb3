"""Where the log goes and at which severity (xguard.daemon.logconfig): syslog
datagrams as a syslog daemon receives them, journald's stdout prefixes,
the --log-level filter, and Twisted's per-port chatter demoted to debug."""

from __future__ import annotations

import io
import os
import socket
import tempfile
from typing import Any

from twisted.application.service import Application
from twisted.internet.protocol import Factory
from twisted.logger import ILogObserver, Logger, LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.shorttmp import short_tmp
from xguard.daemon.logconfig import (
    JournalStreamObserver,
    SyslogObserver,
    attach,
    level_filter,
    observer_for,
    stream_is_journal,
)

LEVELS = ["debug", "info", "warn", "error", "critical"]


def _emit_every_level(observer: Any) -> None:
    log = Logger(observer=observer, namespace="xguard.test")
    for name in LEVELS:
        getattr(log, name)("a {name} line", name=name)


class FakeDevLog:
    """A datagram socket standing in for /dev/log: what syslog receives."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "log")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)

    def received(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(65536).decode())
            except BlockingIOError:
                return out

    def close(self) -> None:
        self.sock.close()
        os.unlink(self.path)


class SyslogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="xg")
        self.devlog = FakeDevLog(self.dir)
        self.addCleanup(os.rmdir, self.dir)
        self.addCleanup(lambda: self.devlog.close())

    def observer(self, **kw: Any) -> SyslogObserver:
        observer = SyslogObserver(address=self.devlog.path, getpid=lambda: 4242, **kw)
        self.addCleanup(observer.close)
        return observer

    def test_every_level_at_its_severity_facility_daemon_tag_with_pid(self) -> None:
        _emit_every_level(self.observer())
        got = self.devlog.received()
        # PRI = facility daemon (3) * 8 + severity: debug 7, info 6,
        # warning 4, err 3, crit 2. twistd's own sends warn as info (14)
        # and error as alert (9), facility user.
        self.assertEqual([m.split(">", 1)[0] for m in got],
                         ["<31", "<30", "<28", "<27", "<26"])
        for message, name in zip(got, LEVELS):
            self.assertRegex(message, r"^<\d+>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d "
                                      r"xguard\[4242\]: a " + name + " line$")

    def test_prefix_renames_the_tag(self) -> None:
        Logger(observer=self.observer(tag="guard2")).info("hello")
        self.assertIn(" guard2[4242]: hello", self.devlog.received()[0])

    def test_traceback_lines_keep_the_event_severity(self) -> None:
        try:
            raise ZeroDivisionError("boom")
        except ZeroDivisionError:
            Logger(observer=self.observer()).failure("delivery failed", Failure())
        got = self.devlog.received()
        self.assertGreater(len(got), 2)
        self.assertTrue(all(m.startswith("<26>") for m in got), got)
        self.assertIn("ZeroDivisionError", got[-1])

    def test_a_full_syslog_socket_drops_instead_of_blocking(self) -> None:
        observer = self.observer()
        for i in range(5000):  # far beyond the datagram queue
            Logger(observer=observer).info("line {i}", i=i)
        got = self.devlog.received()
        self.assertGreater(observer.dropped, 0)
        self.assertEqual(len(got) + observer.dropped, 5000)

    def test_reconnects_after_the_syslog_daemon_restarts(self) -> None:
        observer = self.observer()
        Logger(observer=observer).info("one")
        self.devlog.close()
        Logger(observer=observer).info("lost: nobody listens")  # dropped, no raise
        self.devlog = FakeDevLog(self.dir)
        Logger(observer=observer).info("two")
        self.assertEqual(len(self.devlog.received()), 1)


class JournalTests(SynchronousTestCase):
    def test_sd_daemon_prefixes(self) -> None:
        out = io.StringIO()
        _emit_every_level(JournalStreamObserver(out))
        self.assertEqual(out.getvalue().splitlines(),
                         ["<7>a debug line", "<6>a info line", "<4>a warn line",
                          "<3>a error line", "<2>a critical line"])

    def test_journal_stream_detection(self) -> None:
        with tempfile.TemporaryFile("w+") as f, tempfile.TemporaryFile("w+") as other:
            st = os.fstat(f.fileno())
            value = f"{st.st_dev}:{st.st_ino}"
            self.assertTrue(stream_is_journal(f, {"JOURNAL_STREAM": value}))
            self.assertFalse(stream_is_journal(other, {"JOURNAL_STREAM": value}))
            self.assertFalse(stream_is_journal(f, {}))
            self.assertFalse(stream_is_journal(f, {"JOURNAL_STREAM": "junk"}))
            self.assertFalse(stream_is_journal(io.StringIO(), {"JOURNAL_STREAM": value}))


class LevelTests(SynchronousTestCase):
    def test_filters_below_level(self) -> None:
        for level, expected in [("debug", LEVELS), ("info", LEVELS[1:]),
                                ("warn", LEVELS[2:]), ("error", LEVELS[3:])]:
            seen: list[dict[str, Any]] = []
            _emit_every_level(level_filter(seen.append, level))
            self.assertEqual([e["name"] for e in seen], expected, level)


def twistd_options(**kw: Any) -> dict[str, Any]:
    return {"syslog": False, "prefix": "twisted", "logfile": None, "nodaemon": False, **kw}


class ChoiceTests(SynchronousTestCase):
    """observer_for follows twistd's options as twistd would."""

    def choose(self, level: str = "info", environ: dict[str, str] | None = None,
               stdout: Any = None, **kw: Any) -> Any:
        return observer_for(twistd_options(**kw), level, call_from_thread=lambda f: f(),
                            environ=environ or {}, stdout=stdout)

    def test_foreground_on_a_terminal_is_twistds_text(self) -> None:
        out = io.StringIO()
        _emit_every_level(self.choose(nodaemon=True, stdout=out))
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 4)  # info and above
        self.assertIn("[xguard.test#warn] a warn line", lines[1])

    def test_foreground_on_the_journal_has_priorities(self) -> None:
        with tempfile.TemporaryFile("w+") as out:
            st = os.fstat(out.fileno())
            observer = self.choose(nodaemon=True, stdout=out, level="warn",
                                   environ={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
            _emit_every_level(observer)
            out.seek(0)
            self.assertEqual(out.read().splitlines(),
                             ["<4>a warn line", "<3>a error line", "<2>a critical line"])

    def test_logfile(self) -> None:
        with tempfile.TemporaryDirectory(prefix="xg") as d:
            path = os.path.join(d, "x.log")
            observer = self.choose(logfile=path)
            self.assertFalse(os.path.exists(path))  # opened at the first event
            _emit_every_level(observer)
            with open(path) as f:
                self.assertEqual(len(f.read().splitlines()), 4)

    def test_syslog(self) -> None:
        with tempfile.TemporaryDirectory(prefix="xg") as d:
            devlog = FakeDevLog(d)
            observer = observer_for(twistd_options(syslog=True, nodaemon=True), "warn",
                                    call_from_thread=lambda f: f(),
                                    syslog_address=devlog.path)
            _emit_every_level(observer)
            got = devlog.received()
            self.assertEqual([m[:4] for m in got], ["<28>", "<27>", "<26>"])
            self.assertIn(f" xguard[{os.getpid()}]: ", got[0])
            devlog.close()

    def test_daemon_logging_to_stdout_is_left_to_twistd(self) -> None:
        self.assertIsNone(self.choose(logfile="-"))

    def test_attached_to_the_application_only(self) -> None:
        application = Application("xguard")
        observer = self.choose(nodaemon=True, stdout=io.StringIO())
        attach(application, observer)
        self.assertIs(application.getComponent(ILogObserver), observer)
        attach(object(), observer)  # not an application: ignored


# -- Twisted's own per-port lines, from a real listening port ----------------
class ChatterTests(TestCase):
    """On the real reactor: trial's TestCase runs it for each test."""

    def setUp(self) -> None:
        self.captured: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.captured.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.captured.append)

    async def test_port_chatter_is_debug(self) -> None:
        from twisted.internet import reactor

        captured = self.captured
        factory = Factory()
        factory.noisy = False
        path = os.path.join(short_tmp(self), "p.sock")
        port = reactor.listenUNIX(path, factory)
        await port.stopListening()
        chatter = [e for e in captured if path in str(e.get("message", ""))]
        # "Factory starting on …", "(UNIX Port … Closed)"
        self.assertEqual(len(chatter), 2, captured)
        self.assertTrue(all(e["log_level"] == LogLevel.info for e in chatter))

        at_info: list[dict[str, Any]] = []
        at_debug: list[dict[str, Any]] = []
        for event in chatter:
            level_filter(at_info.append, "info")(event)
            level_filter(at_debug.append, "debug")(event)
        self.assertEqual(at_info, [])
        self.assertEqual([e["log_level"] for e in at_debug], [LogLevel.debug, LogLevel.debug])
        # others see them unchanged
        self.assertTrue(all(e["log_level"] == LogLevel.info for e in chatter))

    def test_amp_connection_chatter_is_debug(self) -> None:
        from twisted.internet.error import ConnectionDone
        from twisted.internet.testing import StringTransport
        from twisted.protocols import amp

        captured = self.captured
        protocol = amp.AMP()
        protocol.makeConnection(StringTransport())
        protocol.connectionLost(Failure(ConnectionDone()))
        chatter = [e for e in captured if e.get("log_namespace") == "twisted.protocols.amp"]
        self.assertEqual(len(chatter), 2, captured)
        at_info: list[dict[str, Any]] = []
        for event in chatter:
            level_filter(at_info.append, "info")(event)
        self.assertEqual(at_info, [])
