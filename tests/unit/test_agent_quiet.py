"""xapi's HTTP client logs nothing per connection (xguard.upstream.agent):
every retry during an outage used to log "Starting factory" and "Stopping
factory" for Twisted's HTTP client factory."""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet.error import ConnectError
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.shorttmp import short_tmp
from xguard.upstream.agent import make_client, make_pool


def _factory_lines(events: list[dict[str, Any]]) -> list[str]:
    return [formatEvent(e) for e in events if "factory" in formatEvent(e).lower()]


class QuietTests(TestCase):
    """On the real reactor: trial's TestCase runs it for each test."""

    def setUp(self) -> None:
        self.captured: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.captured.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.captured.append)

    async def _refused(self, reactor: Any, endpoint: str) -> None:
        client, url = make_client(reactor, endpoint)
        for _ in range(3):  # three retries of an outage
            with self.assertRaises(ConnectError):
                await client.post(url, b"{}")

    async def test_refused_unix_retries_are_silent(self) -> None:
        from twisted.internet import reactor

        await self._refused(reactor, "unix:" + os.path.join(short_tmp(self), "nobody-home.sock"))
        self.assertEqual(_factory_lines(self.captured), [])

    async def test_refused_http_retries_are_silent(self) -> None:
        from twisted.internet import reactor

        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()  # nothing listens there now
        await self._refused(reactor, f"http://127.0.0.1:{port}")
        self.assertEqual(_factory_lines(self.captured), [])

    async def test_answered_calls_are_silent(self) -> None:
        from twisted.internet import reactor

        class Echo(Resource):
            isLeaf = True

            def render_POST(self, request: Any) -> bytes:
                return b"{}"

        site = Site(Echo())
        site.noisy = False
        path = os.path.join(short_tmp(self), "x.sock")
        port = reactor.listenUNIX(path, site)
        pool = make_pool(reactor)
        client, url = make_client(reactor, "unix:" + path, pool=pool)
        try:
            for _ in range(2):
                response = await client.post(url, b"{}")
                self.assertEqual(await response.content(), b"{}")
        finally:
            await pool.closeCachedConnections()
            await port.stopListening()
        self.assertEqual(_factory_lines(self.captured), [])
