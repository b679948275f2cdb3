"""xapi's HTTP client logs nothing per connection (xguard.upstream.agent):
every retry during an outage used to log "Starting factory" and "Stopping
factory" for Twisted's HTTP client factory."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.error import ConnectError
from twisted.web.resource import Resource
from twisted.web.server import Site

from xguard.upstream.agent import make_client, make_pool


@pytest.fixture
def captured() -> Iterator[list[dict[str, Any]]]:
    from twisted.logger import globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def _factory_lines(events: list[dict[str, Any]]) -> list[str]:
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in events if "factory" in formatEvent(e).lower()]


async def _refused(reactor: Any, endpoint: str) -> None:
    client, url = make_client(reactor, endpoint)
    for _ in range(3):  # three retries of an outage
        with pytest.raises(ConnectError):
            await client.post(url, b"{}")


@pytest_twisted.ensureDeferred
async def test_refused_unix_retries_are_silent(captured: list[dict[str, Any]],
                                               short_tmp: str) -> None:
    from twisted.internet import reactor

    await _refused(reactor, "unix:" + os.path.join(short_tmp, "nobody-home.sock"))
    assert _factory_lines(captured) == []


@pytest_twisted.ensureDeferred
async def test_refused_http_retries_are_silent(captured: list[dict[str, Any]]) -> None:
    from twisted.internet import reactor

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    await _refused(reactor, f"http://127.0.0.1:{port}")
    assert _factory_lines(captured) == []


@pytest_twisted.ensureDeferred
async def test_answered_calls_are_silent(captured: list[dict[str, Any]],
                                         short_tmp: str) -> None:
    from twisted.internet import reactor

    class Echo(Resource):
        isLeaf = True

        def render_POST(self, request: Any) -> bytes:
            return b"{}"

    site = Site(Echo())
    site.noisy = False
    path = os.path.join(short_tmp, "x.sock")
    port = reactor.listenUNIX(path, site)
    pool = make_pool(reactor)
    client, url = make_client(reactor, "unix:" + path, pool=pool)
    try:
        for _ in range(2):
            response = await client.post(url, b"{}")
            assert await response.content() == b"{}"
    finally:
        await pool.closeCachedConnections()
        await port.stopListening()
    assert _factory_lines(captured) == []
