"""DomainSite: body limits, timeouts, keep-alive and Connection: close, on a
real HTTPChannel driven with raw bytes over a StringTransport and a Clock."""

from __future__ import annotations

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from xguard.domain.site import MAX_BODY, DomainSite

__all__ = ["Wire", "parse_responses", "http_request"]


def http_request(method: bytes, path: bytes, body: bytes | None = None,
                 headers: dict[bytes, bytes] | None = None) -> bytes:
    """Raw HTTP/1.1 request bytes, as a client would write them."""
    lines = [method + b" " + path + b" HTTP/1.1", b"Host: localhost"]
    for name, value in (headers or {}).items():
        lines.append(name + b": " + value)
    if body is not None:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


def parse_responses(data: bytes, head: bool = False) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """Split what the server wrote into (code, headers, body) responses.
    Bodies are delimited by Content-Length or chunking (not for HEAD)."""
    out = []
    while data:
        head_part, sep, data = data.partition(b"\r\n\r\n")
        assert sep, "incomplete response head"
        status, *header_lines = head_part.split(b"\r\n")
        code = int(status.split(b" ")[1])
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if head or code in (204, 304):
            body = b""
        elif b"content-length" in headers:
            n = int(headers[b"content-length"])
            body, data = data[:n], data[n:]
        elif headers.get(b"transfer-encoding") == b"chunked":
            body = b""
            while True:
                size_line, _, data = data.partition(b"\r\n")
                n = int(size_line, 16)
                body += data[:n]
                data = data[n + 2:]
                if n == 0:
                    break
        else:
            body, data = data, b""
        out.append((code, headers, body))
    return out


class Wire:
    """One client connection to a DomainSite, in memory."""

    def __init__(self, resource: object, clock: Clock | None = None, **kwargs: object) -> None:
        self.clock = clock or Clock()
        self.site = DomainSite(resource, reactor=self.clock, **kwargs)  # type: ignore[arg-type]
        self.protocol = self.site.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def responses(self, head: bool = False) -> list[tuple[int, dict[bytes, bytes], bytes]]:
        return parse_responses(self.transport.value(), head=head)

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting or self.transport.disconnected

    def lose(self) -> None:
        """The connection is gone (as the reactor would report it)."""
        self.protocol.connectionLost(Failure(ConnectionDone()))


class _Echo(Resource):
    """Answers with the body's size; records every request it saw."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bytes] = []

    def render_POST(self, request: object) -> bytes:
        body = request.content.read()  # type: ignore[attr-defined]
        self.seen.append(body)
        answer = b"%d" % len(body)
        request.setHeader(b"content-length", b"%d" % len(answer))  # type: ignore[attr-defined]
        return answer


class SiteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.resource = _Echo()
        self.wire = Wire(self.resource, timeout=10)

    def tearDown(self) -> None:
        self.wire.lose()
        self.assertEqual(self.wire.clock.getDelayedCalls(), [])

    def test_answers_a_request(self) -> None:
        self.wire.send(http_request(b"POST", b"/", b"hello"))
        [(code, headers, body)] = self.wire.responses()
        self.assertEqual((code, body), (200, b"5"))
        self.assertFalse(self.wire.closed)

    def test_keep_alive_serves_several_requests(self) -> None:
        for body in (b"a", b"bb", b"ccc"):
            self.wire.send(http_request(b"POST", b"/", body))
        self.assertEqual([r[2] for r in self.wire.responses()], [b"1", b"2", b"3"])
        self.assertFalse(self.wire.closed)

    def test_connection_close_is_honoured(self) -> None:
        self.wire.send(http_request(b"POST", b"/", b"x", {b"Connection": b"close"}))
        [(code, headers, body)] = self.wire.responses()
        self.assertEqual((code, headers[b"connection"]), (200, b"close"))
        self.assertTrue(self.wire.closed)

    def test_body_at_limit_is_accepted(self) -> None:
        wire = Wire(self.resource, max_body=100)
        wire.send(http_request(b"POST", b"/", b"x" * 100))
        self.assertEqual(wire.responses()[0][:1], (200,))
        wire.lose()

    def test_content_length_over_limit_is_413_before_the_body(self) -> None:
        # Only the head is sent: the refusal does not wait for the body.
        self.wire.send(b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1))
        [(code, headers, body)] = self.wire.responses()
        self.assertEqual(code, 413)
        self.assertTrue(self.wire.closed)
        self.wire.send(b"x" * 1000)
        self.assertEqual(self.resource.seen, [])

    def test_chunked_body_over_limit_is_413(self) -> None:
        wire = Wire(self.resource, max_body=100)
        wire.send(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        wire.send(b"40\r\n" + b"x" * 64 + b"\r\n")
        self.assertEqual(wire.transport.value(), b"")
        wire.send(b"40\r\n" + b"x" * 64 + b"\r\n0\r\n\r\n")
        self.assertEqual([r[0] for r in wire.responses()], [413])
        self.assertTrue(wire.closed)
        self.assertEqual(self.resource.seen, [])
        wire.lose()

    def test_chunked_body_under_limit_is_served(self) -> None:
        wire = Wire(self.resource, max_body=100)
        wire.send(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"5\r\nhello\r\n0\r\n\r\n")
        self.assertEqual(wire.responses()[0][2], b"5")
        wire.lose()

    def test_silent_client_is_dropped_after_timeout(self) -> None:
        self.wire.clock.advance(9.9)
        self.assertFalse(self.wire.closed)
        self.wire.clock.advance(0.2)
        self.assertTrue(self.wire.closed)

    def test_client_stalled_mid_request_is_dropped(self) -> None:
        self.wire.send(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
        self.wire.clock.advance(10.1)
        self.assertTrue(self.wire.closed)
        self.assertEqual(self.resource.seen, [])

    def test_trickling_client_is_dropped(self) -> None:
        # A byte every few seconds resets the idle timer, not the deadline.
        request = http_request(b"POST", b"/", b"slow")
        for byte in request[:8]:
            self.wire.send(bytes([byte]))
            self.wire.clock.advance(3)
        self.assertTrue(self.wire.closed)
        self.assertEqual(self.resource.seen, [])

    def test_idle_keep_alive_connection_is_closed(self) -> None:
        self.wire.send(http_request(b"POST", b"/", b"x"))
        self.wire.clock.advance(5)
        self.assertFalse(self.wire.closed)
        self.wire.clock.advance(6)
        self.assertTrue(self.wire.closed)

    def test_timed_out_client_is_aborted_if_it_lingers(self) -> None:
        self.wire.clock.advance(10)
        self.assertTrue(self.wire.transport.disconnecting)
        self.wire.clock.advance(60)
        self.assertTrue(self.wire.transport.disconnected)

    def test_log_holds_no_body(self) -> None:
        events: list[dict[str, object]] = []
        self.wire.site._log = Logger(observer=events.append)
        self.wire.send(http_request(b"POST", b"/path", b"SECRET-NVRAM"))
        self.assertEqual(len(events), 1)
        self.assertEqual((events[0]["method"], events[0]["path"], events[0]["code"]),
                         ("POST", "/path", 200))
        self.assertNotIn("SECRET", repr(events))

    def test_no_access_log_timer(self) -> None:
        before = len(self.wire.clock.getDelayedCalls())
        self.wire.site.doStart()
        self.assertEqual(len(self.wire.clock.getDelayedCalls()), before)
        self.wire.site.doStop()
