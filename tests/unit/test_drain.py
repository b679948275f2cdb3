"""Draining a domain socket's connections at a stop or a handover
(xguard.domain.drain through DomainSite), on a real HTTPChannel over
in-memory transports and a Clock."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from tests.unit.test_site import Wire, http_request

GRACE = 2.0


class Held(Resource):
    """Answers once the test releases the request (an upstream write in
    flight)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[object] = []

    def render_PUT(self, request: object) -> object:
        self.pending.append(request)
        return NOT_DONE_YET

    def release(self) -> None:
        pending, self.pending = self.pending, []
        for request in pending:
            if request._disconnected:  # type: ignore[attr-defined]
                continue  # the apps watch notifyFinish() for this
            request.setHeader(b"content-length", b"2")  # type: ignore[attr-defined]
            request.write(b"ok")  # type: ignore[attr-defined]
            request.finish()  # type: ignore[attr-defined]


PUT = http_request(b"PUT", b"/k", b"data")


class DrainTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.app = Held()
        self.wire = Wire(self.app, timeout=60)
        self.site, self.clock = self.wire.site, self.wire.clock

    def tearDown(self) -> None:
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def finished(self, wire: Wire) -> None:
        """The reactor reports the close the server asked for."""
        self.assertTrue(wire.closed)
        wire.lose()

    def test_no_connection_no_wait(self) -> None:
        self.wire.lose()
        self.assertEqual(self.successResultOf(self.site.drain(GRACE)), 0)
        self.assertEqual(self.successResultOf(self.site.closed(GRACE)), 0)

    def test_idle_kept_alive_connection_closes_at_once(self) -> None:
        self.wire.send(PUT)
        self.app.release()
        self.assertFalse(self.wire.closed)  # kept alive
        self.assertEqual(self.successResultOf(self.site.drain(GRACE)), 0)
        self.finished(self.wire)
        self.assertEqual(self.successResultOf(self.site.closed(GRACE)), 0)
        [(code, headers, _)] = self.wire.responses()
        self.assertEqual(code, 200)

    def test_request_in_hand_is_answered_with_connection_close(self) -> None:
        self.wire.send(PUT)
        self.assertEqual(len(self.app.pending), 1)
        self.assertEqual(self.successResultOf(self.site.drain(GRACE)), 0)
        closed = self.site.closed(GRACE)
        self.assertNoResult(closed)
        self.assertFalse(self.wire.closed)
        self.app.release()  # e.g. the cache's stop persists and answers it
        [(code, headers, body)] = self.wire.responses()
        self.assertEqual((code, headers[b"connection"], body), (200, b"close", b"ok"))
        self.finished(self.wire)
        self.assertEqual(self.successResultOf(closed), 0)

    def test_fresh_connection_is_waited_for_then_served(self) -> None:
        """varstored connects, then sends: the accepted connection's request
        must not be lost."""
        drained = self.site.drain(GRACE)
        self.assertNoResult(drained)
        self.assertFalse(self.wire.closed)
        self.clock.advance(GRACE / 2)
        self.wire.send(PUT)
        self.assertEqual(self.successResultOf(drained), 0)
        self.app.release()
        [(code, headers, _)] = self.wire.responses()
        self.assertEqual((code, headers[b"connection"]), (200, b"close"))
        self.finished(self.wire)

    def test_request_on_its_way_is_received(self) -> None:
        self.wire.send(PUT)
        self.app.release()
        self.wire.send(PUT[:20])  # the next request, half arrived
        drained = self.site.drain(GRACE)
        self.assertNoResult(drained)
        self.wire.send(PUT[20:])
        self.assertEqual(self.successResultOf(drained), 0)
        self.app.release()
        self.assertEqual([r[1].get(b"connection") for r in self.wire.responses()],
                         [None, b"close"])
        self.finished(self.wire)

    def test_silent_connections_are_cut_after_the_grace(self) -> None:
        second = Wire.another(self.wire)
        second.send(PUT)  # this one is served
        drained = self.site.drain(GRACE)
        self.clock.advance(GRACE)
        self.assertEqual(self.successResultOf(drained), 1)
        self.assertTrue(self.wire.closed)
        self.wire.lose()
        closed = self.site.closed(GRACE)
        self.app.release()
        self.finished(second)
        self.assertEqual(self.successResultOf(closed), 0)

    def test_closed_is_bounded(self) -> None:
        self.wire.send(PUT)
        self.successResultOf(self.site.drain(GRACE))
        closed = self.site.closed(GRACE)
        self.clock.advance(GRACE)
        self.assertEqual(self.successResultOf(closed), 1)
        self.assertTrue(self.wire.closed)
        self.wire.lose()
        self.app.release()  # too late: nobody to answer
        self.assertEqual(self.wire.responses(), [])

    def test_connection_accepted_while_draining_takes_one_request(self) -> None:
        self.wire.lose()
        self.successResultOf(self.site.drain(GRACE))
        late = Wire.another(self.wire)
        late.send(PUT)
        self.app.release()
        [(code, headers, _)] = late.responses()
        self.assertEqual(headers[b"connection"], b"close")
        self.finished(late)

    def test_closed_without_cutting_only_waits(self) -> None:
        self.wire.send(PUT)
        self.successResultOf(self.site.drain(GRACE))
        waited = self.site.closed(0.25, cut=False)
        self.clock.advance(0.25)
        self.assertEqual(self.successResultOf(waited), 0)
        self.assertFalse(self.wire.closed)  # still answering
        self.app.release()
        self.finished(self.wire)
