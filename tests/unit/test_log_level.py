"""Issue 18, item 4: the log level changed while the daemon runs
(``xguard-ctl log-level LEVEL``, the ``SetLogLevel`` command), back to the
configured one at the next start; Status shows it; and ``xguard-ctl
status`` names the fault switch file the daemon was given (item 9)."""

from __future__ import annotations

import io
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import LogEvent, Logger, LogLevel, formatEvent
from twisted.protocols import amp
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from tests.fakes import FakeUpstream, StoreKit, some_status
from tests.unit.test_control import ControlTestCase, MemoryRegistry
from xguard.control.commands import LOG_LEVELS, InvalidLogLevel, SetLogLevel, error_code
from xguard.control.ctl import format_status, run
from xguard.control.server import control_factory
from xguard.daemon import config, logconfig
from xguard.daemon.logconfig import LogLevels, level_filter
from xguard.status import CacheStatus, from_json, to_json


def _every_level(log: Logger) -> None:
    for name in ("debug", "info", "warn", "error", "critical"):
        getattr(log, name)("a {name} line", name=name)


class LogLevelsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.seen: list[LogEvent] = []
        self.levels = LogLevels("info")
        self.log = Logger(observer=level_filter(self.seen.append, self.levels),
                          namespace="xguard.test")
        self.patch(LogLevels, "log", self.log)

    def passed(self) -> list[str]:
        names = [e["name"] for e in self.seen if "name" in e]
        self.seen.clear()
        return names

    def test_the_filter_follows_the_level(self) -> None:
        _every_level(self.log)
        self.assertEqual(self.passed(), ["info", "warn", "error", "critical"])
        self.assertEqual(self.levels.set("debug", "d1"), "info")
        self.seen.clear()
        _every_level(self.log)
        self.assertEqual(self.passed(), ["debug", "info", "warn", "error", "critical"])
        self.assertEqual(self.levels.set("error", "d2"), "debug")
        self.seen.clear()
        _every_level(self.log)
        self.assertEqual(self.passed(), ["error", "critical"])
        self.assertEqual((self.levels.level, self.levels.configured), ("error", "info"))

    def test_debugging_follows_the_level(self) -> None:
        """What the domain sockets ask before making a debug line."""
        self.assertFalse(self.levels.debugging())
        self.levels.set("debug", "d1")
        self.assertTrue(self.levels.debugging())
        self.levels.set("warn", "d2")
        self.assertFalse(self.levels.debugging())

    def test_every_change_is_in_the_log(self) -> None:
        """Said at the more verbose of the two levels (info at least) while
        that level filters, so it passes whichever way the level goes."""
        for level in ("error", "warn", "debug", "error", "info", "info"):
            self.seen.clear()
            before = self.levels.level
            self.levels.set(level, "dbg")
            (line,) = self.seen
            self.assertEqual(formatEvent(line),
                             f"dbg: log level {level} (was {before}); the configured info "
                             "is back at the next start")
            self.assertGreaterEqual(line["log_level"], LogLevel.info)

    def test_unknown_levels_are_refused(self) -> None:
        for bad in ("loud", "warning", "critical", ""):
            self.assertRaises(ValueError, self.levels.set, bad)
            self.assertRaises(ValueError, LogLevels, bad)
        self.assertEqual(self.levels.level, "info")

    def test_one_list_of_levels(self) -> None:
        self.assertEqual(tuple(logconfig.LEVELS), LOG_LEVELS)
        self.assertEqual(config.LOG_LEVELS, LOG_LEVELS)


class SetLogLevelTests(ControlTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.levels = LogLevels("warn")
        self.patch(LogLevels, "log", Logger(observer=self.events.append))
        factory = control_factory(
            self.registry, self.vtpms, lambda: self.status,
            set_log_level=lambda level, dbg: (self.levels.set(level, dbg),
                                              self.levels.configured))
        self.client, self.server, self.pump = iosim.connectedServerAndClient(
            lambda: factory.buildProtocol(None), amp.AMP)

    def test_set(self) -> None:
        self.assertEqual(self.ok(SetLogLevel, dbg="op-1", level="debug"),
                         {"previous": "warn", "configured": "warn"})
        self.assertEqual(self.levels.level, "debug")
        self.assertIn("op-1: log level debug (was warn)", self.logged())

    def test_unknown_level(self) -> None:
        e = self.error(SetLogLevel, InvalidLogLevel, dbg="d", level="loud")
        self.assertEqual(error_code(e), "INVALID_LOG_LEVEL")
        self.assertIn("'loud'", str(e))
        self.assertEqual(self.levels.level, "warn")

    def test_a_daemon_without_it(self) -> None:
        factory = control_factory(self.registry, self.vtpms, lambda: self.status)
        client, _, pump = iosim.connectedServerAndClient(
            lambda: factory.buildProtocol(None), amp.AMP)
        outcome: Deferred[Any] = Deferred()
        client.callRemote(SetLogLevel, dbg="d", level="debug").chainDeferred(outcome)
        pump.flush()
        self.assertEqual(error_code(self.failureResultOf(outcome).value), "INTERNAL_ERROR")


class CtlTests(SynchronousTestCase):
    """``xguard-ctl log-level`` against a real locator over in-memory AMP."""

    def setUp(self) -> None:
        self.levels = LogLevels("info")
        self.patch(LogLevels, "log", Logger(observer=lambda e: None))
        kit = StoreKit(FakeUpstream())
        self.addCleanup(kit.cleanup)
        status = attrs.evolve(some_status(Swtpm=1), log_level="info",
                              fault_file="/run/xg/fault")
        self.factory = control_factory(
            MemoryRegistry(), kit.vtpm_contents(),
            lambda: attrs.evolve(status, log_level=self.levels.level),
            set_log_level=lambda level, dbg: (self.levels.set(level, dbg),
                                              self.levels.configured))
        self.pumps: list[iosim.IOPump] = []

    def connect(self, reactor: Any, path: str) -> "Deferred[amp.AMP]":
        client, _, pump = iosim.connectedServerAndClient(
            lambda: self.factory.buildProtocol(None), amp.AMP)
        self.pumps.append(pump)
        return succeed(client)

    def ctl(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        d = run(Clock(), argv, out, err, environ={}, connect=self.connect)
        for pump in self.pumps:
            pump.flush()
        return self.successResultOf(d), out.getvalue(), err.getvalue()

    def test_set_then_show(self) -> None:
        self.assertEqual(self.ctl("log-level", "--dbg", "ops", "debug"),
                         (0, "log level debug (was info); the configured info is back at "
                             "the next start\n", ""))
        self.assertEqual(self.levels.level, "debug")
        self.assertEqual(self.ctl("log-level"), (0, "debug\n", ""))
        code, out, _ = self.ctl("status")
        self.assertIn("log level: debug", out.splitlines())

    def test_a_bad_level_is_a_usage_error(self) -> None:
        code, out, err = self.ctl("log-level", "loud")
        self.assertEqual((code, out), (2, ""))
        self.assertIn("the log level is one of debug, info, warn, error, not 'loud'", err)
        self.assertEqual(self.levels.level, "info")


class FaultFileTests(SynchronousTestCase):
    """Item 9: the fault switch file shown is the one --fault-file names."""

    def test_status_names_the_configured_fault_file(self) -> None:
        status = attrs.evolve(some_status(Swtpm=1), cache_enabled=False,
                              fault_file="/run/xguard/no-cache")
        doc = to_json(status)
        self.assertEqual(doc["fault_file"], "/run/xguard/no-cache")
        text = format_status(from_json(doc))
        self.assertIn("the fault switch file /run/xguard/no-cache exists", text)
        self.assertNotIn("fist_disable", text)

    def test_no_cache_is_said_as_such(self) -> None:
        status = attrs.evolve(
            some_status(Swtpm=1), cache_enabled=False,
            services={name: CacheStatus(service=name, cache="off", enabled=False)
                      for name in ("Swtpm", "Varstored")})
        text = format_status(from_json(to_json(status)))
        self.assertIn("fail while it is down (--no-cache)", text)

    def test_an_older_daemon_s_document(self) -> None:
        doc = to_json(some_status(Swtpm=1))
        del doc["fault_file"], doc["log_level"]
        doc["cache_enabled"] = False
        status = from_json(doc)
        self.assertEqual((status.fault_file, status.log_level), (None, None))
        text = format_status(status)
        self.assertIn("/tmp/fist_disable_xapi_guard_cache, or the one --fault-file names,",
                      text)
        self.assertNotIn("log level", text)


class ComposeTests(SynchronousTestCase):
    """The daemon as built: Status carries the level and the fault file,
    and the control channel changes the level of the service's filter."""

    def test_wired(self) -> None:
        import os
        import tempfile

        from twisted.internet.testing import MemoryReactorClock

        from tests.unit.test_compose import config as compose_config
        from xguard.daemon.compose import build_service

        root = tempfile.mkdtemp(prefix="xgc")
        self.addCleanup(os.rmdir, root)
        self.patch(LogLevels, "log", Logger(observer=lambda e: None))
        service = build_service(compose_config(root, log_level="warn",
                                               fault_file="/run/xg/fault"),
                                MemoryReactorClock())
        status = service.status()
        self.assertEqual((status.log_level, status.fault_file), ("warn", "/run/xg/fault"))
        (listener,) = [s.start.__self__ for s in service.stages  # type: ignore[attr-defined]
                       if s.name == "the control channel"]
        locator = listener._factory.locator
        self.assertEqual(locator.set_log_level(dbg="d", level="debug"),
                         {"previous": "warn", "configured": "warn"})
        assert service.log_levels is not None
        self.assertEqual(service.log_levels.level, "debug")
        self.assertEqual(service.status().log_level, "debug")

    def test_the_daemon_s_log_filter_is_the_one_changed(self) -> None:
        """tap.makeService puts the service's levels in front of twistd's log."""
        import os
        import shutil
        import signal
        import tempfile

        from xguard.tap import Options, makeService

        root = tempfile.mkdtemp(prefix="xgt")
        self.addCleanup(shutil.rmtree, root)
        # The log file's observer takes SIGUSR1 (rotation) when it is free.
        self.addCleanup(signal.signal, signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))
        self.patch(Options, "default_config_file", os.path.join(root, "none.toml"))
        self.patch(LogLevels, "log", Logger(observer=lambda e: None))
        options = Options()
        options.parseOptions(["--state-dir", os.path.join(root, "state"), "--control",
                              "unix:" + os.path.join(root, "c.sock")])
        log_file = os.path.join(root, "xguard.log")
        options.parent = {"nodaemon": True, "logfile": log_file}  # type: ignore[attr-defined]
        service = makeService(options)
        observer = service.log_observer  # type: ignore[attr-defined]
        log = Logger(observer=observer, namespace="xguard.test")
        log.debug("first debug line")
        service.log_levels.set("debug")  # type: ignore[attr-defined]
        log.debug("second debug line")
        with open(log_file) as f:
            text = f.read()
        self.assertNotIn("first debug line", text)
        self.assertIn("second debug line", text)
