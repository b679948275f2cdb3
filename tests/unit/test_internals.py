"""The private APIs xguard relies on (xguard/_internals) still exist and
behave as relied upon: an upgrade that changes one fails here, loudly."""

from __future__ import annotations

from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from xguard._internals import treq as treq_internals
from xguard._internals import twisted_web


class TwistedWebClientTests(SynchronousTestCase):
    def test_failure_classes(self) -> None:
        for cls in (*twisted_web.NO_ANSWER, *twisted_web.STALE_CONNECTION,
                    twisted_web.ResponseDone):
            self.assertTrue(issubclass(cls, BaseException), cls)
        # A never-received response is a failed response (jsonrpc relies on it).
        from twisted.web import _newclient
        self.assertTrue(issubclass(_newclient.ResponseNeverReceived, _newclient.ResponseFailed))


class _Echo(Resource):
    isLeaf = True
    seen: list[bytes] = []

    def render_POST(self, request: Request) -> bytes:
        self.seen.append(request.uri)
        return b"ok"


class TreqFixedURLTests(SynchronousTestCase):
    def test_treq_takes_it_and_asks_it_for_its_uri(self) -> None:
        calls: list[bool] = []

        class Counting(treq_internals.FixedURL):  # type: ignore[misc]
            def to_uri(self, *a: object, **k: object) -> treq_internals.FixedURL:
                calls.append(True)
                return super().to_uri(*a, **k)

        echo = _Echo()
        agent = RequestTraversalAgent(echo)
        client = HTTPClient(agent)
        url = Counting.from_text("http://xapi/jsonrpc")
        d: Deferred[object] = client.post(url)
        agent.flush()
        self.successResultOf(d)
        self.assertEqual(calls, [True])  # treq still converts through to_uri()
        self.assertEqual(echo.seen[-1], b"/jsonrpc")
        fixed = treq_internals.FixedURL.from_text("http://a/jsonrpc")
        self.assertIs(fixed.to_uri(), fixed)
        self.assertIs(fixed.to_text(), fixed.to_text())
        self.assertEqual(fixed.to_text(), "http://a/jsonrpc")
