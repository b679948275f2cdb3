"""Issue 18, item 1: an xapi restart writes two warning lines, one when the
outage starts and one when it ends, whatever its length; every retry (the
prober's logins once a second, other callers' failures, a hold of
HOST_STILL_BOOTING after xapi is back) is debug.

The xapi client, its reachability and the prober, as the daemon wires them,
against a fake xapi that can be stopped (connections fail) and held
("still booting"), on a Clock."""

from __future__ import annotations

from typing import Any

from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectError
from twisted.internet.task import Clock, LoopingCall
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IAgent
from zope.interface import implementer

from tests.unit.test_xapi import VM, FakeXapi, XapiError
from xguard.upstream.probe import Prober
from xguard.upstream.xapi import XapiUpstream

_SERIOUS = (LogLevel.warn, LogLevel.error, LogLevel.critical)


class RestartingXapi(FakeXapi):
    """A FakeXapi that answers HOST_STILL_BOOTING to everything while
    ``booting``."""

    booting = False

    def dispatch(self, method: str, params: list[Any]) -> Any:
        if self.booting:
            raise XapiError(["HOST_STILL_BOOTING"])
        return super().dispatch(method, params)


@implementer(IAgent)
class StoppableAgent:
    """Connections fail while ``down`` (xapi's socket is there, nobody
    listens: ``ConnectError``, as the issue's log shows)."""

    def __init__(self, inner: IAgent) -> None:
        self.inner = inner
        self.down = False

    def request(self, method: bytes, uri: bytes, headers: Any = None,
                bodyProducer: Any = None) -> "Deferred[Any]":
        if self.down:
            return fail(ConnectError(string="Connection refused"))
        return self.inner.request(method, uri, headers, bodyProducer)


class OutageLogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.xapi = RestartingXapi()
        self.xapi.add_vm(VM)
        self.agent = StoppableAgent(RequestTraversalAgent(self.xapi))
        self.up = XapiUpstream(self.clock, HTTPClient(self.agent), "http://xapi/jsonrpc",
                               timeout=10, description="xapi unix:/var/lib/xcp/xapi")
        self.prober = Prober(self.clock, self.up.reachability, self.up.probe)
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        # Another caller, as the cache's flusher or a guest's read: a call
        # every 2 seconds, failing while xapi is away.
        self.loop = LoopingCall(lambda: self.up.get_nvram(VM).addErrback(lambda f: None))
        self.loop.clock = self.clock
        self.loop.start(2)

    def tearDown(self) -> None:
        self.loop.stop()
        self.prober.stop()
        self.successResultOf(self.up.close())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def ours(self, levels: tuple[LogLevel, ...]) -> list[str]:
        return [e.get("log_format", "") for e in self.events
                if str(e.get("log_namespace", "")).startswith("xguard")
                and e.get("log_level") in levels]

    def run_for(self, seconds: int) -> None:
        for _ in range(seconds * 10):
            self.clock.advance(0.1)

    def test_an_outage_and_a_hold_are_two_lines(self) -> None:
        self.run_for(10)  # up: one login
        self.agent.down = True
        self.run_for(60)  # stopped a minute: ~60 probes, ~30 other calls
        self.agent.down = False
        self.xapi.booting = True
        self.run_for(30)  # back, but HOST_STILL_BOOTING for 30 s
        self.xapi.booting = False
        self.run_for(10)
        self.assertIs(self.up.reachability.reachable, True)
        self.assertGreater(self.xapi.count("session.login_with_password"), 3)
        serious = self.ours(_SERIOUS)
        self.assertEqual(len(serious), 2, serious)
        start, end = [e for e in self.events if e.get("log_format") in serious]
        self.assertIn("unreachable", start["log_format"])
        self.assertIn("answers again", end["log_format"])
        self.assertEqual(start["log_level"], end["log_level"])
        self.assertEqual(round(end["seconds"]), 90)
        # The retries are still there, at debug.
        retries = [f for f in self.ours((LogLevel.debug,)) if f.startswith("Login to")]
        self.assertGreater(len(retries), 60)

    def test_short_outages_are_two_lines_each(self) -> None:
        for _ in range(3):
            self.run_for(10)
            self.agent.down = True
            self.run_for(25)
            self.agent.down = False
        self.run_for(10)
        self.assertEqual(len(self.ours(_SERIOUS)), 6)

    def test_a_failing_login_is_an_outage_not_a_line_per_retry(self) -> None:
        """xapi answers, but refuses the login with a code that proves
        nothing (transient): one outage, named by the code."""
        self.run_for(3)
        self.up._session = None
        self.xapi.script = [("error", ["SESSION_AUTHENTICATION_FAILED", "root"],
                             "session.login_with_password")] * 10
        self.run_for(30)
        serious = [e for e in self.events if e.get("log_level") in _SERIOUS]
        self.assertEqual(len(serious), 2, serious)
        self.assertEqual(serious[0]["error"], "SESSION_AUTHENTICATION_FAILED root")

    def test_a_login_refused_for_good_is_one_warning(self) -> None:
        """Proof the login can never succeed (a permanent code): a warning,
        once until a login succeeds."""
        self.run_for(3)
        self.up._session = None
        self.xapi.script = [("error", ["INVALID_VALUE", "originator"],
                             "session.login_with_password")] * 10
        self.run_for(30)
        serious = self.ours(_SERIOUS)
        self.assertEqual(len(serious), 1, serious)
        self.assertIn("refused", serious[0])
