"""``xguard-ctl status`` says the daemon's health: its first line (the
verdict and why) and its exit status (0 healthy, 3 degraded, 4 failed; 1
no answer), in every form (table, ``--json``, ``--quiet``); and a backlog
being delivered, or the last one."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime

import attrs
from twisted.internet.defer import fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.unit.test_control import VM
from tests.unit.test_ctl import CtlTestCase
from xguard.control.ctl import HEALTH_EXIT, format_status, run
from xguard.status import CacheStatus, Drain, UpstreamStatus, from_json


class HealthExitTests(CtlTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.status = attrs.evolve(self.status, services={
            "Swtpm": CacheStatus(service="Swtpm"), "Varstored": CacheStatus(service="Varstored")})

    def test_healthy_exits_0(self) -> None:
        code, out, err = self.ctl("status")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out.splitlines()[0], "health: healthy")

    def test_degraded_exits_3(self) -> None:
        self.status = attrs.evolve(self.status, upstream=UpstreamStatus(
            kind="xapi", target="t", reachable=False, last_error="CONNECTION_REFUSED"))
        code, out, _ = self.ctl("status")
        self.assertEqual(code, 3)
        self.assertEqual(out.splitlines()[0], "health: degraded: upstream unreachable "
                                              "(CONNECTION_REFUSED): 0 writes cached")

    def test_failed_exits_4(self) -> None:
        self.status = attrs.evolve(self.status, ready=False, services={
            "Swtpm": CacheStatus(service="Swtpm", stuck={VM: 1.0})})
        code, out, _ = self.ctl("status")
        self.assertEqual(code, 4)
        self.assertEqual(out.splitlines()[0], "health: failed: not ready: starting, stopping or "
                                              "restarting; Swtpm: the writes of 1 VM have failed "
                                              "for longer than --stuck-after")

    def test_every_form_exits_alike(self) -> None:
        self.status = attrs.evolve(self.status, ready=False)
        code, out, _ = self.ctl("status", "--json")
        self.assertEqual(code, 4)
        self.assertEqual(json.loads(out)["health"]["verdict"], "failed")
        for flag in ("--quiet", "-q"):
            self.assertEqual(self.ctl("status", flag), (4, "", ""))

    def test_no_answer_exits_1(self) -> None:
        out, err = io.StringIO(), io.StringIO()
        d = run(Clock(), ["status", "-q"], out, err, environ={},
                connect=lambda reactor, path: fail(ConnectionRefusedError()))
        self.assertEqual(self.successResultOf(d), 1)
        self.assertIn("cannot reach xguard", err.getvalue())

    def test_exit_statuses_are_distinct(self) -> None:
        self.assertEqual(HEALTH_EXIT, {"healthy": 0, "degraded": 3, "failed": 4})


class DrainFormatTests(SynchronousTestCase):
    def test_a_backlog_being_delivered(self) -> None:
        now = datetime(2026, 11, 28, 14, 2, 11, tzinfo=UTC).timestamp()
        status = from_json({"ready": True, "services": {"Swtpm": {
            "mode": "Disengaged", "pending": {VM: 3800},
            "drain": {"started": now - 17, "delivered": 1200, "left": 3800, "rate": 70.6}}}})
        text = format_status(status, now=now, tz=UTC)
        self.assertIn("Swtpm delivering the backlog: 3800 items left, 1200 delivered in 17s "
                      "(70.6/s), about 53s to go\n", text)

    def test_the_last_backlog(self) -> None:
        now = datetime(2026, 11, 28, 14, 2, 11, tzinfo=UTC).timestamp()
        drain = Drain(started=now - 100, delivered=5000, left=0, rate=68.5, ended=now - 27)
        status = from_json({"ready": True, "services": {"Varstored": {"mode": "Direct"}}})
        status = attrs.evolve(status, services={"Varstored": CacheStatus(
            service="Varstored", drain=drain)})
        text = format_status(status, now=now, tz=UTC)
        self.assertIn("Varstored last backlog: 5000 items delivered in 1m13s (68.5/s), ended "
                      "14:01:44\n", text)
        self.assertTrue(text.startswith("health: healthy\n"))
