"""xguard-ctl against an in-process daemon side (xguard.control.ctl)."""

from __future__ import annotations

import errno
import io
import json
import os
import socket
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectError, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.fakes import FakeUpstream, StoreKit
from tests.shorttmp import short_tmp
from tests.unit.test_control import VM, MemoryRegistry
from xguard.control.ctl import DEFAULT_CONTROL, duration, format_sockets, format_status, run
from xguard.control.server import control_factory
from xguard.model import Service
from xguard.status import (
    CacheStatus,
    DaemonStatus,
    SetAside,
    UpstreamStatus,
    from_json,
    to_json,
)

MiB = 1024 * 1024


class CtlTestCase(SynchronousTestCase):
    """Runs xguard-ctl's core with a fake connector handing it one end of an
    in-memory AMP connection to a real ControlLocator."""

    def setUp(self) -> None:
        self.registry = MemoryRegistry()
        self.upstream = FakeUpstream()
        self.vtpm = self.upstream.add_vm(VM)
        q = SetAside(id="Swtpm/" + VM, service="Swtpm", vm=VM, keys=(0,), kind="refused",
                     reason="UUID_INVALID", since=None, held=False, complete=False,
                     file="/q/1")
        self.status = DaemonStatus(
            version="0", ready=True, cache_enabled=True,
            upstream=UpstreamStatus(kind="xapi", target="xapi unix:/var/lib/xcp/xapi",
                                    reachable=True),
            sockets={"Swtpm": 2, "Varstored": 3},
            services={
                "Swtpm": CacheStatus(service="Swtpm", mode="Engaged", queue_depth=4,
                                     pending={VM: 2, "x": 1}, quarantined=(q, q)),
                "Varstored": CacheStatus(service="Varstored"),
            },
        )
        kit = StoreKit(self.upstream)
        self.addCleanup(kit.cleanup)
        self.factory = control_factory(self.registry, kit.vtpm_contents(), lambda: self.status)
        self.connected_to: list[str] = []
        self.servers: list[amp.AMP] = []
        self.pumps: list[iosim.IOPump] = []

    def connect(self, reactor: Any, path: str) -> "Deferred[amp.AMP]":
        """A new in-memory connection per run, as a real connect would be."""
        self.connected_to.append(path)
        client, server, pump = iosim.connectedServerAndClient(
            lambda: self.factory.buildProtocol(None), amp.AMP)
        self.servers.append(server)
        self.pumps.append(pump)
        return succeed(client)

    def flush(self) -> None:
        for pump in self.pumps:
            pump.flush()

    def ctl(self, *argv: str, stdin: str = "", environ: dict[str, str] | None = None
            ) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        d = run(Clock(), argv, out, err, stdin=io.StringIO(stdin), environ=environ or {},
                connect=self.connect)
        self.flush()
        return self.successResultOf(d), out.getvalue(), err.getvalue()


class CommandTests(CtlTestCase):
    def test_varstore_create_and_destroy(self) -> None:
        self.assertEqual(self.ctl("varstore_create", "dbg", VM, "107", "/run/v.sock"),
                         (0, "", ""))
        self.assertTrue(self.pumps[-1].clientIO.disconnecting)  # ctl hung up
        entry = self.registry.sockets["/run/v.sock"]
        self.assertEqual((entry["vm_uuid"], entry["gid"], entry["service"]),
                         (VM, 107, Service.VARSTORED))
        self.assertEqual(self.ctl("varstore_destroy", "dbg", "107", "/run/v.sock"), (0, "", ""))
        self.assertEqual(self.registry.sockets, {})

    def test_vtpm_create_and_destroy(self) -> None:
        self.assertEqual(self.ctl("vtpm_create", "dbg", VM, "108", "/run/t.sock")[0], 0)
        self.assertIs(self.registry.sockets["/run/t.sock"]["service"], Service.SWTPM)
        self.assertEqual(self.ctl("vtpm_destroy", "dbg", "108", "/run/t.sock")[0], 0)
        self.assertEqual(self.registry.sockets, {})

    def test_daemon_error_exits_1_naming_the_path(self) -> None:
        self.ctl("vtpm_create", "dbg", VM, "1", "/run/t.sock")
        code, out, err = self.ctl("varstore_create", "dbg", VM, "1", "/run/t.sock")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("PATH_IN_USE", err)
        self.assertIn("/run/t.sock", err)

    def test_a_tcp_control_endpoint_is_a_usage_error(self) -> None:
        """The control channel is a UNIX socket only: say so, rather than
        'no such socket'."""
        for argv in (("-c", "tcp:127.0.0.1:9", "status"), ("status", "-c", "tcp:9")):
            code, out, err = self.ctl(*argv)
            self.assertEqual((code, out), (2, ""))
            self.assertIn("UNIX socket only", err)
        self.assertEqual(self.connected_to, [])
        self.assertEqual(self.ctl("-c", "unix:/run/x.sock", "status")[0], 3)  # degraded

    def test_invalid_uuid_exits_1(self) -> None:
        code, _, err = self.ctl("vtpm_create", "dbg", "nope", "1", "/run/t.sock")
        self.assertEqual(code, 1)
        self.assertIn("INVALID_UUID", err)
        self.assertIn("nope", err)

    def test_relative_path_exits_1(self) -> None:
        code, _, err = self.ctl("vtpm_destroy", "dbg", "1", "t.sock")
        self.assertEqual(code, 1)
        self.assertIn("INVALID_PATH", err)

    def test_set_and_get_contents(self) -> None:
        self.assertEqual(self.ctl("vtpm_set_contents", "d", self.vtpm, "AA BB CC"), (0, "", ""))
        self.assertEqual(self.upstream.vtpms[self.vtpm], "AA BB CC")
        self.assertEqual(self.ctl("vtpm_get_contents", "d", self.vtpm), (0, "AA BB CC\n", ""))

    def test_contents_from_stdin_round_trip(self) -> None:
        contents = "QUJD" * MiB + " eHl6 "
        self.assertEqual(self.ctl("vtpm_set_contents", "d", self.vtpm, "-",
                                  stdin=contents + "\n")[0], 0)
        self.assertEqual(self.upstream.vtpms[self.vtpm], contents)
        code, out, _ = self.ctl("vtpm_get_contents", "d", self.vtpm)
        self.assertEqual((code, out), (0, contents + "\n"))

    def test_upstream_error_exits_1(self) -> None:
        code, _, err = self.ctl("vtpm_get_contents", "d", VM)
        self.assertEqual(code, 1)
        self.assertIn("UPSTREAM_ERROR", err)
        self.assertIn("UUID_INVALID", err)

    def test_list_table(self) -> None:
        self.ctl("vtpm_create", "dbg", VM, "108", "/run/t.sock")
        code, out, _ = self.ctl("list")
        self.assertEqual(code, 0)
        header, row = out.splitlines()
        self.assertEqual(header.split(), ["SERVICE", "VM_UUID", "GID", "PATH"])
        self.assertEqual(row.split(), ["Swtpm", VM, "108", "/run/t.sock"])

    def test_list_json(self) -> None:
        self.ctl("vtpm_create", "dbg", VM, "108", "/run/t.sock")
        code, out, _ = self.ctl("list", "--json")
        self.assertEqual(json.loads(out), [{"path": "/run/t.sock", "vm_uuid": VM, "gid": 108,
                                            "service": "Swtpm"}])

    def test_json_is_one_line_for_every_command(self) -> None:
        self.ctl("vtpm_create", "dbg", VM, "108", "/run/t.sock")
        for command, status in (("list", 0), ("status", 3)):  # 3: degraded (set aside)
            code, out, _ = self.ctl(command, "--json")
            self.assertEqual((code, out.count("\n")), (status, 1), out)
            self.assertTrue(out.endswith("\n"))
            json.loads(out)

    def test_status_json_is_the_raw_document(self) -> None:
        code, out, _ = self.ctl("status", "--json")
        self.assertEqual((code, json.loads(out)), (3, to_json(self.status)))

    def test_status_table(self) -> None:
        code, out, _ = self.ctl("status")
        self.assertEqual(code, 3)  # degraded: writes set aside
        self.assertEqual(out.splitlines()[0], "health: degraded: Swtpm: 2 writes set aside "
                                              "(refused 2): see xguard-ctl set-aside")
        rows = {line.split()[0]: line.split() for line in out.splitlines()}
        self.assertEqual(rows["SERVICE"], ["SERVICE", "MODE", "CACHE", "QUEUE", "PENDING",
                                           "QUARANTINED", "UPSTREAM", "SOCKETS"])
        self.assertEqual(rows["Swtpm"], ["Swtpm", "Engaged", "on", "4", "3", "2", "reachable",
                                         "2"])
        self.assertEqual(rows["Varstored"], ["Varstored", "Direct", "on", "0", "0", "0",
                                             "reachable", "3"])
        self.assertIn("xapi unix:/var/lib/xcp/xapi", out)


class ControlPathTests(CtlTestCase):
    def test_default(self) -> None:
        self.ctl("list")
        self.assertEqual(self.connected_to, [DEFAULT_CONTROL])

    def test_environment(self) -> None:
        self.ctl("list", environ={"XGUARD_CONTROL": "/tmp/env.sock"})
        self.assertEqual(self.connected_to, ["/tmp/env.sock"])

    def test_option_wins(self) -> None:
        self.ctl("--control", "/tmp/opt.sock", "list", environ={"XGUARD_CONTROL": "/x"})
        self.ctl("--control", "unix:/tmp/u.sock", "list")
        self.assertEqual(self.connected_to, ["/tmp/opt.sock", "/tmp/u.sock"])

    def test_unreachable(self) -> None:
        def refuse(reactor: Any, path: str) -> "Deferred[amp.AMP]":
            return fail(ConnectionRefusedError("no one home"))
        out, err = io.StringIO(), io.StringIO()
        d = run(Clock(), ["--control", "/tmp/gone.sock", "status"], out, err, environ={},
                connect=refuse)
        self.assertEqual(self.successResultOf(d), 1)
        self.assertIn("cannot reach xguard at /tmp/gone.sock", err.getvalue())
        self.assertIn("is xguard running?", err.getvalue())

    def failing_connect(self, error: Exception) -> tuple[int, str]:
        def connect(reactor: Any, path: str) -> "Deferred[amp.AMP]":
            return fail(error)
        out, err = io.StringIO(), io.StringIO()
        d = run(Clock(), ["--control", "/run/x.sock", "status"], out, err, environ={},
                connect=connect)
        return self.successResultOf(d), err.getvalue()

    def test_daemon_not_running_hints(self) -> None:
        # The errors UNIXClientEndpoint fails with (twisted.internet.error.getConnectError).
        for error, reason in [(ConnectError(errno.ENOENT, "No such file or directory"),
                               "no such socket"),
                              (ConnectionRefusedError(errno.ECONNREFUSED, "refused"),
                               "connection refused")]:
            code, err = self.failing_connect(error)
            self.assertEqual(code, 1)
            self.assertEqual(err.count("\n"), 1, err)
            self.assertIn(f"cannot reach xguard at /run/x.sock: {reason}", err)
            self.assertIn("is xguard running?", err)
            self.assertIn("--control PATH", err)
            self.assertNotIn("Errno", err)

    def test_permission_denied_hint(self) -> None:
        code, err = self.failing_connect(ConnectError(errno.EACCES, "Permission denied"))
        self.assertEqual(code, 1)
        self.assertIn("the control socket is root-only; run as root", err)

    def test_connection_lost_mid_command(self) -> None:
        out, err = io.StringIO(), io.StringIO()
        d = run(Clock(), ["list"], out, err, environ={}, connect=self.connect, euid=0)
        self.servers[-1].transport.loseConnection()
        self.flush()
        self.assertEqual(self.successResultOf(d), 1)
        self.assertIn("closed the connection", err.getvalue())
        self.assertNotIn("root", err.getvalue())

    def test_closed_on_a_non_root_user_says_why(self) -> None:
        out, err = io.StringIO(), io.StringIO()
        d = run(Clock(), ["list"], out, err, environ={}, connect=self.connect, euid=1000)
        self.servers[-1].transport.loseConnection()
        self.flush()
        self.assertEqual(self.successResultOf(d), 1)
        self.assertIn("serves root only; run as root", err.getvalue())

    def test_options_after_the_command(self) -> None:
        self.assertEqual(self.ctl("status", "--control", "/tmp/after.sock")[0], 3)
        self.assertEqual(self.ctl("list", "--json", "-c", "unix:/tmp/c.sock")[0], 0)
        self.assertEqual(self.ctl("vtpm_get_contents", "--control", "/tmp/g.sock", "d",
                                  self.vtpm)[0], 0)
        # after the command wins over before it, as the nearer one
        self.ctl("--control", "/tmp/before.sock", "list", "--control", "/tmp/near.sock")
        self.assertEqual(self.connected_to, ["/tmp/after.sock", "/tmp/c.sock", "/tmp/g.sock",
                                             "/tmp/near.sock"])


class UsageTests(CtlTestCase):
    def assertUsage(self, *argv: str) -> str:
        code, out, err = self.ctl(*argv)
        self.assertEqual((code, out), (2, ""), argv)
        self.assertEqual(self.connected_to, [])
        return err

    def test_no_command(self) -> None:
        self.assertIn("command is required", self.assertUsage())

    def test_unknown_command(self) -> None:
        self.assertIn("bogus", self.assertUsage("bogus"))

    def test_wrong_argument_count(self) -> None:
        self.assertUsage("vtpm_create", "dbg", VM, "1")
        self.assertUsage("vtpm_get_contents", "dbg")
        self.assertUsage("list", "extra")

    def test_bad_gid(self) -> None:
        self.assertIn("GID", self.assertUsage("varstore_create", "d", VM, "wheel", "/p"))
        self.assertIn("GID", self.assertUsage("vtpm_destroy", "d", "1.5", "/p"))

    def test_unknown_option(self) -> None:
        self.assertUsage("list", "--yaml")

    def test_help(self) -> None:
        code, out, err = self.ctl("--help")
        self.assertEqual(code, 0)
        for name in ["varstore_create", "varstore_destroy", "vtpm_create", "vtpm_destroy",
                     "vtpm_set_contents", "vtpm_get_contents", "list", "status"]:
            self.assertIn(name, out)
        code, out, _ = self.ctl("vtpm_create", "--help")
        self.assertEqual(code, 0)
        self.assertIn("DBG VM_UUID GID PATH", out)


class FormatTests(SynchronousTestCase):
    def test_status_missing_services_show_dash(self) -> None:
        lines = format_status(from_json({})).splitlines()
        self.assertEqual(lines[4].split(), ["Swtpm", "-", "-", "-", "-", "-", "-", "-"])
        self.assertEqual(lines[5].split(), ["Varstored", "-", "-", "-", "-", "-", "-", "-"])

    def test_status_outage_in_human_time(self) -> None:
        since = datetime(2026, 11, 28, 14, 2, 11, tzinfo=UTC).timestamp()
        status = from_json({
            "upstream": {"target": "xapi", "reachable": False, "last_error": "refused"},
            "services": {"Swtpm": {"mode": "Engaged", "queue_depth": 1, "pending": {VM: 7},
                                   "outage_since": since, "last_error": "CONNECTION_REFUSED"},
                         "Varstored": {"mode": "Direct"}},
        })
        text = format_status(status, now=since + 192, tz=UTC)
        self.assertIn("down for 3m12s, since 14:02:11", text)
        self.assertNotIn(str(since), text)
        self.assertIn("Swtpm last error: CONNECTION_REFUSED", text)
        self.assertIn("upstream last error: refused", text)
        varstored = [line for line in text.splitlines() if line.startswith("Varstored")][0]
        self.assertIn("unreachable", varstored)
        # another day: the date is shown; no clock: the start only
        self.assertIn("since 2026-11-28 14:02:11",
                      format_status(status, now=since + 86400 * 2, tz=UTC))
        self.assertIn("down since 2026-11-28 14:02:11", format_status(status, tz=UTC))

    def test_durations(self) -> None:
        self.assertEqual([duration(s) for s in (0, 45, 192, 3600 * 2 + 300, 86400 + 3 * 3600,
                                                -5)],
                         ["0s", "45s", "3m12s", "2h05m", "1d03h", "0s"])

    def test_errors_hidden_once_recovered(self) -> None:
        text = format_status(from_json({
            "upstream": {"target": "xapi", "reachable": True, "last_error": "refused"},
            "services": {"Swtpm": {"mode": "Direct", "outage_since": None,
                                   "last_error": "CONNECTION_REFUSED"}},
        }))
        self.assertNotIn("error", text)

    def test_fault_switch_shown(self) -> None:
        text = format_status(from_json({
            "cache_enabled": False,
            "services": {"Swtpm": {"mode": "Direct", "enabled": False},
                         "Varstored": {"mode": "Direct", "enabled": False}}}))
        self.assertIn("cache: OFF", text)
        self.assertIn("/tmp/fist_disable_xapi_guard_cache", text)
        rows = {line.split()[0]: line.split() for line in text.splitlines()[1:]}
        self.assertEqual(rows["Swtpm"][2], "OFF")
        on = format_status(from_json({"cache_enabled": True,
                                      "services": {"Swtpm": {"mode": "Direct", "enabled": True}}}))
        self.assertIn("cache: on", on)
        self.assertEqual(on.splitlines()[4].split()[2], "on")

    def test_disk_error_shown(self) -> None:
        text = format_status(from_json({"services": {"Swtpm": {
            "disk_error": "No space left on device", "disk_error_since": 5.0}}}))
        self.assertIn("Swtpm cache disk error: No space left on device", text)

    def test_sockets_empty(self) -> None:
        self.assertEqual(format_sockets([]).split(), ["SERVICE", "VM_UUID", "GID", "PATH"])


# -- over a real UNIX socket, on the real reactor (trial's TestCase runs it) ---
class RealSocketTests(TestCase):
    def setUp(self) -> None:
        self.dir = short_tmp(self)

    async def test_real_unix_socket(self) -> None:
        from twisted.internet import reactor

        registry = MemoryRegistry()
        upstream = FakeUpstream()
        kit = StoreKit(upstream)
        factory = control_factory(registry, kit.vtpm_contents(), lambda: DaemonStatus(
            version="0", ready=True, cache_enabled=True, services={},
            upstream=UpstreamStatus(kind="fake", target="fake"),
            sockets={"Swtpm": len(registry.sockets)}))
        path = os.path.join(self.dir, "c.sock")
        port = reactor.listenUNIX(path, factory)
        try:
            out, err = io.StringIO(), io.StringIO()
            code = await run(reactor, ["--control", path, "vtpm_create", "d", VM, "7", "/run/s"],
                             out, err, environ={})
            self.assertEqual((code, err.getvalue()), (0, ""))
            self.assertEqual(registry.sockets["/run/s"]["gid"], 7)
            code = await run(reactor, ["--control", path, "status", "--json"], out, err,
                             environ={})
            self.assertEqual(code, 0)
            self.assertEqual(json.loads(out.getvalue())["sockets"], {"Swtpm": 1})
        finally:
            kit.cleanup()
            await port.stopListening()

    async def test_real_unreachable_socket(self) -> None:
        from twisted.internet import reactor

        path = os.path.join(self.dir, "none.sock")
        out, err = io.StringIO(), io.StringIO()
        code = await run(reactor, ["--control", path, "list"], out, err, environ={})
        self.assertEqual(code, 1)
        self.assertIn(f"cannot reach xguard at {path}: no such socket; is xguard running?",
                      err.getvalue())

    async def test_real_refused_socket(self) -> None:
        """A socket file nobody listens on (a daemon that died) is refused."""
        from twisted.internet import reactor

        path = os.path.join(self.dir, "dead.sock")
        dead = socket.socket(socket.AF_UNIX)
        dead.bind(path)
        dead.close()
        out, err = io.StringIO(), io.StringIO()
        code = await run(reactor, ["list", "--control", path], out, err, environ={})
        self.assertEqual(code, 1)
        self.assertIn(f"cannot reach xguard at {path}: connection refused", err.getvalue())


class MainTests(SynchronousTestCase):
    """The console script's exit status, in a real process."""

    def check(self, argv: list[str], code: int, needle: str) -> None:
        proc = subprocess.run([sys.executable, "-c",
                               "from xguard.control.ctl import main; main()", *argv],
                              capture_output=True, text=True, timeout=30)
        self.assertEqual(proc.returncode, code, proc.stderr)
        self.assertIn(needle, proc.stdout + proc.stderr)

    def test_unreachable(self) -> None:
        self.check(["--control", "/nonexistent/xg.sock", "list"], 1, "cannot reach xguard")

    def test_usage_error(self) -> None:
        self.check(["vtpm_destroy", "d", "gid", "/p"], 2, "GID")

    def test_help(self) -> None:
        self.check(["--help"], 0, "vtpm_set_contents")
