"""Each domain request's latency, from its arrival in full to its answer's
last byte, as DomainSite reports it (``on_response``) for the
``xguard_domain_request_duration_seconds`` histogram; refusals are
counted, not timed."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from tests.unit.test_site import Wire, http_request
from xguard.domain.site import MAX_BODY


class _Slow(Resource):
    """Answers after ``delay`` seconds of the clock (an upstream call)."""

    isLeaf = True

    def __init__(self, clock: Clock, delay: float) -> None:
        super().__init__()
        self.clock, self.delay = clock, delay

    def render_GET(self, request: Any) -> object:
        def answer() -> None:
            request.setHeader(b"content-length", b"2")
            request.write(b"ok")
            request.finish()
        deferLater(self.clock, self.delay, answer)
        return NOT_DONE_YET


class LatencyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.seen: list[tuple[int, float | None]] = []
        self.wire = Wire(_Slow(self.clock, 0.25), clock=self.clock, timeout=10,
                         on_response=lambda code, seconds: self.seen.append((code, seconds)))

    def tearDown(self) -> None:
        self.wire.lose()

    def test_from_arrival_to_answer(self) -> None:
        request = http_request(b"GET", b"/tpm2-00.permall")
        self.wire.send(request[:10])
        self.clock.advance(3)  # a client slow to send: not xguard's latency
        self.wire.send(request[10:])
        self.assertEqual(self.seen, [])
        self.clock.advance(0.25)
        self.assertEqual(self.seen, [(200, 0.25)])
        self.assertEqual(self.wire.responses()[0][2], b"ok")

    def test_refusals_are_counted_not_timed(self) -> None:
        self.wire.send(http_request(b"PUT", b"/x", headers={
            b"Content-Length": b"%d" % (MAX_BODY + 1)}))
        self.assertEqual(self.seen, [(413, None)])
