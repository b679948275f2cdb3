"""DomainSite: framing, body limits, lingering refusals, timeouts,
keep-alive and Connection: close, rate-limited logging, on a real
HTTPChannel driven with raw bytes over a StringTransport and a Clock."""

from __future__ import annotations

from twisted.internet.address import UNIXAddress
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from xguard.domain.loglimit import RateLimitedObserver
from xguard.domain.site import MAX_BODY, DomainSite

__all__ = ["Wire", "TurnClock", "HalfCloseTransport", "parse_responses", "http_request"]


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


class TurnClock(Clock):
    """A Clock whose ``advance`` is one reactor iteration: it runs the calls
    due when it starts, not those they schedule for now, which a real
    reactor keeps for its next iteration (after polling for I/O)."""

    def advance(self, amount: float) -> None:
        self.rightNow += amount
        self._sortCalls()
        due = [call for call in self.calls if call.getTime() <= self.seconds()]
        for call in due:
            if call in self.calls:  # not cancelled by an earlier one
                self.calls.remove(call)
                call.called = 1
                call.func(*call.args, **call.kw)


class HalfCloseTransport(StringTransport):
    """A StringTransport like a domain socket's connection: its addresses
    are UNIX addresses (no host, no port), and it can shut its writing side
    only (``loseWriteConnection``)."""

    write_closed = False

    def __init__(self) -> None:
        super().__init__(hostAddress=UNIXAddress("/run/xg/vm.sock"), peerAddress=UNIXAddress(None))

    def loseWriteConnection(self) -> None:
        self.write_closed = True


class Wire:
    """One client connection to a DomainSite, in memory.

    :param events: when given, the site's log lines (rate limited) are
        appended there instead of going to the global log.
    """

    def __init__(self, resource: object, clock: Clock | None = None,
                 events: list[dict[str, object]] | None = None, **kwargs: object) -> None:
        self.clock = clock or TurnClock()
        self.site = DomainSite(resource, reactor=self.clock, **kwargs)  # type: ignore[arg-type]
        self._connect(events)

    @classmethod
    def another(cls, wire: "Wire") -> "Wire":
        """A second connection to ``wire``'s socket."""
        other = cls.__new__(cls)
        other.clock, other.site = wire.clock, wire.site
        other._connect(None)
        return other

    def _connect(self, events: list[dict[str, object]] | None) -> None:
        if events is not None:
            self.site.log_observer = RateLimitedObserver(self.clock, "vm",
                                                         forward=events.append)
        self.protocol = self.site.buildProtocol(None)
        self.transport = HalfCloseTransport()
        self.protocol.makeConnection(self.transport)

    def reconnect(self, transport: StringTransport | None = None) -> None:
        """Drop this connection and open another one to the same site."""
        self.lose()
        self.protocol = self.site.buildProtocol(None)
        self.transport = transport or HalfCloseTransport()
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes, pump: bool = True) -> None:
        """Deliver ``data``, then (unless ``pump`` is false) let the
        reactor take the turns the apps' stepped work asks for."""
        self.protocol.dataReceived(data)
        if pump:
            self.pump()

    def pump(self) -> int:
        """Run reactor iterations until nothing is due now; returns how
        many that took (with a TurnClock: the steps of stepped work)."""
        turns = 0
        while any(call.getTime() <= self.clock.seconds()
                  for call in self.clock.getDelayedCalls()):
            self.clock.advance(0)
            turns += 1
        return turns

    def responses(self, head: bool = False) -> list[tuple[int, dict[bytes, bytes], bytes]]:
        return parse_responses(self.transport.value(), head=head)

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting or self.transport.disconnected

    def lose(self) -> None:
        """The connection is gone (as the reactor would report it)."""
        self.protocol.connectionLost(Failure(ConnectionDone()))


class _Echo(Resource):
    """Answers with the body's size; records every request it saw (its
    body, target and the host name Twisted reports for it)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bytes] = []
        self.targets: list[tuple[bytes, bytes]] = []

    def render_POST(self, request: object) -> bytes:
        body = request.content.read()  # type: ignore[attr-defined]
        self.seen.append(body)
        self.targets.append((request.uri,  # type: ignore[attr-defined]
                             request.getRequestHostname()))  # type: ignore[attr-defined]
        answer = b"%d" % len(body)
        request.setHeader(b"content-length", b"%d" % len(answer))  # type: ignore[attr-defined]
        return answer

    render_GET = render_POST


def codes(wire: Wire) -> list[int]:
    return [r[0] for r in wire.responses()]


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
        self.assertEqual((code, headers[b"connection"]), (413, b"close"))
        self.assertTrue(self.wire.transport.write_closed)
        self.wire.send(b"x" * 1000)
        self.assertEqual(self.resource.seen, [])

    def test_chunked_body_over_limit_is_413_from_its_chunk_sizes(self) -> None:
        wire = Wire(self.resource, max_body=100)
        wire.send(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        wire.send(b"40\r\n" + b"x" * 64 + b"\r\n")
        self.assertEqual(wire.transport.value(), b"")
        wire.send(b"40\r\n")
        self.assertEqual(codes(wire), [413])
        wire.send(b"x" * 64 + b"\r\n0\r\n\r\n")
        self.assertEqual(codes(wire), [413])
        self.assertTrue(wire.transport.write_closed)
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
        self.wire.site.requests_log = Logger(observer=events.append)
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


class HostTests(SynchronousTestCase):
    """Host means nothing on a UNIX socket: requests without it are served
    (HTTP/1.0 has none; Klein used to ask the UNIX address for one)."""

    def setUp(self) -> None:
        self.resource = _Echo()

    def serve(self, raw: bytes) -> list[int]:
        wire = Wire(self.resource)
        wire.send(raw)
        result = codes(wire)
        wire.lose()
        self.assertEqual(wire.clock.getDelayedCalls(), [])
        return result

    def test_http10_without_host(self) -> None:
        self.assertEqual(self.serve(b"POST / HTTP/1.0\r\nContent-Length: 2\r\n\r\nab"), [200])
        self.assertEqual(self.resource.targets, [(b"/", b"localhost")])

    def test_http11_without_host(self) -> None:
        self.assertEqual(self.serve(b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nab"), [200])

    def test_host_header_is_ignored(self) -> None:
        self.assertEqual(self.serve(b"GET / HTTP/1.1\r\nHost: \xff\xfe:99999\r\n\r\n"), [200])
        self.assertEqual(self.resource.targets, [(b"/", b"localhost")])


class TargetTests(SynchronousTestCase):
    """RFC 9112 §3.2: origin-form and absolute-form are served, nothing
    else; a target must be printable ASCII and decode to UTF-8."""

    def setUp(self) -> None:
        self.resource = _Echo()

    def serve(self, target: bytes) -> list[int]:
        wire = Wire(self.resource)
        wire.send(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        result = codes(wire)
        wire.lose()
        return result

    def test_absolute_form_is_served_as_its_path(self) -> None:
        for target, served in [(b"http://x/tpm2-00.permall", b"/tpm2-00.permall"),
                               (b"HTTPS://host:80/a?b=c", b"/a?b=c"),
                               (b"http://x", b"/"), (b"http://x?q", b"/?q")]:
            self.assertEqual(self.serve(target), [200], target)
            self.assertEqual(self.resource.targets[-1][0], served)

    def test_other_forms_are_400(self) -> None:
        for target in [b"xtpm2-00.permall", b"tpm2-00.permall", b"ftp://x/a", b"http:/a",
                       b"example.com:80", b"http://x#frag"]:
            self.assertEqual(self.serve(target), [400], target)
        self.assertEqual(self.resource.targets, [])

    def test_bytes_outside_printable_ascii_are_400(self) -> None:
        self.assertEqual(self.serve(b"/tpm2-00\x80permall"), [400])
        self.assertEqual(self.serve(b"/\xaf"), [400])
        self.assertEqual(self.resource.targets, [])

    def test_percent_encoding_must_decode_to_utf8(self) -> None:
        self.assertEqual(self.serve(b"/%ff"), [400])
        self.assertEqual(self.serve(b"/%C3%A9"), [200])


class FramingTests(SynchronousTestCase):
    """RFC 9112 §6: one way to frame a body, or 400."""

    def setUp(self) -> None:
        self.resource = _Echo()
        self.wire = Wire(self.resource, max_body=1000)

    def tearDown(self) -> None:
        self.wire.lose()
        self.assertEqual(self.wire.clock.getDelayedCalls(), [])

    def head(self, *lines: bytes, version: bytes = b"HTTP/1.1") -> bytes:
        return b"POST / " + version + b"\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n"

    def test_chunked_then_identity_is_400(self) -> None:
        self.wire.send(self.head(b"Transfer-Encoding: chunked", b"Transfer-Encoding: identity")
                       + b"5\r\nhello\r\n0\r\n\r\n")
        self.assertEqual(codes(self.wire), [400])
        self.assertEqual(self.resource.seen, [])

    def test_content_length_with_identity_is_400(self) -> None:
        self.wire.send(self.head(b"Content-Length: 5", b"Transfer-Encoding: identity") + b"hello")
        self.assertEqual(codes(self.wire), [400])
        self.assertEqual(self.resource.seen, [])

    def test_content_length_with_chunked_is_400(self) -> None:
        self.wire.send(self.head(b"Transfer-Encoding: chunked", b"Content-Length: 5") + b"hello")
        self.assertEqual(codes(self.wire), [400])
        self.assertTrue(self.wire.transport.write_closed)  # a lingering close

    def test_codings_other_than_a_single_chunked_are_400(self) -> None:
        for coding in [b"gzip", b"gzip, chunked", b"chunked, chunked", b"chunked;x=1",
                       b"identity", b""]:
            wire = Wire(self.resource)
            wire.send(self.head(b"Transfer-Encoding: " + coding) + b"0\r\n\r\n")
            self.assertEqual(codes(wire), [400], coding)
            wire.lose()
        self.assertEqual(self.resource.seen, [])

    def test_chunked_in_any_case_and_list_form_is_served(self) -> None:
        self.wire.send(self.head(b"Transfer-Encoding: ChUnKeD ,") +
                       b"5;ext=1\r\nhello\r\n0\r\nTrailer: x\r\n\r\n")
        self.assertEqual([r[2] for r in self.wire.responses()], [b"5"])

    def test_chunked_on_http10_is_400(self) -> None:
        self.wire.send(self.head(b"Transfer-Encoding: chunked", version=b"HTTP/1.0")
                       + b"0\r\n\r\n")
        self.assertEqual(codes(self.wire), [400])

    def test_two_content_lengths_are_400(self) -> None:
        self.wire.send(self.head(b"Content-Length: 1", b"Content-Length: 1") + b"x")
        self.assertEqual(codes(self.wire), [400])
        self.assertTrue(self.wire.transport.write_closed)

    def test_huge_content_length_is_413_not_a_crash(self) -> None:
        # 5,000 digits: Python's int() refuses that many (ValueError).
        self.wire.send(self.head(b"Content-Length: " + b"9" * 5000))
        self.assertEqual(codes(self.wire), [413])

    def test_leading_zeros_are_fine(self) -> None:
        self.wire.send(self.head(b"Content-Length: " + b"0" * 5000 + b"2") + b"ab")
        self.assertEqual([r[2] for r in self.wire.responses()], [b"2"])

    def test_malformed_chunks_are_400(self) -> None:
        for body in [b"x\r\n", b"5\r\nhelloXX", b"5 5\r\nhello\r\n", b"-1\r\n",
                     b"0\r\nno colon\r\n\r\n", b"1" * 2000]:
            wire = Wire(self.resource)
            wire.send(self.head(b"Transfer-Encoding: chunked") + body)
            self.assertEqual(codes(wire), [400], body)
            wire.lose()

    def test_many_tiny_chunks_are_refused_early(self) -> None:
        # 10,000 one-byte chunks in one read: refused after MAX_CHUNKS,
        # without decoding the rest (Twisted's decoder took ~60 ms here).
        received: list[bytes] = []
        self.wire.send(self.head(b"Transfer-Encoding: chunked"), pump=False)
        request = self.wire.protocol.requests[-1]
        original = request.handleContentChunk
        request.handleContentChunk = lambda data: (received.append(data), original(data))
        self.wire.send(b"1\r\nx\r\n" * 10_000 + b"0\r\n\r\n")
        self.assertEqual(codes(self.wire), [400])
        self.assertEqual(received, [])
        self.assertEqual(self.resource.seen, [])

    def test_malformed_request_line_is_400(self) -> None:
        self.wire.send(b"GET /\r\n\r\n")
        self.assertEqual(codes(self.wire), [400])
        self.assertTrue(self.wire.transport.write_closed)

    def test_overlong_header_line_is_400(self) -> None:
        self.wire.send(b"GET / HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n")
        self.assertEqual(codes(self.wire), [400])

    def test_pipelined_request_after_a_good_one_is_refused_alone(self) -> None:
        self.wire.send(http_request(b"POST", b"/", b"ok")
                       + self.head(b"Transfer-Encoding: gzip") + b"zzz")
        self.assertEqual(codes(self.wire), [200, 400])
        self.assertEqual(self.resource.seen, [b"ok"])
        self.assertTrue(self.wire.transport.write_closed)


class LingerTests(SynchronousTestCase):
    """A refused client still sending its body reads the answer: our side
    is shut, the rest is read and dropped, up to a bound."""

    def setUp(self) -> None:
        self.resource = _Echo()
        self.wire = Wire(self.resource, max_body=100, linger_bytes=1000, linger_timeout=5)
        self.wire.send(b"PUT / HTTP/1.1\r\nContent-Length: 5000\r\n\r\n" + b"x" * 100)

    def tearDown(self) -> None:
        self.wire.lose()
        self.assertEqual(self.wire.clock.getDelayedCalls(), [])

    def test_answer_then_shut_writing_only(self) -> None:
        self.assertEqual(codes(self.wire), [413])
        self.assertTrue(self.wire.transport.write_closed)
        self.assertFalse(self.wire.closed)

    def test_reads_and_drops_up_to_the_bound(self) -> None:
        self.wire.send(b"x" * 900)
        self.assertFalse(self.wire.closed)
        self.wire.send(b"x" * 200)
        self.assertTrue(self.wire.closed)
        self.assertEqual(codes(self.wire), [413])
        self.assertEqual(self.resource.seen, [])

    def test_closes_after_the_linger_timeout(self) -> None:
        self.wire.clock.advance(4.9)
        self.assertFalse(self.wire.closed)
        self.wire.clock.advance(0.2)
        self.assertTrue(self.wire.closed)

    def test_client_closing_first_ends_it(self) -> None:
        self.wire.lose()
        self.assertEqual(self.wire.clock.getDelayedCalls(), [])

    def test_without_half_close_the_connection_is_closed(self) -> None:
        wire = Wire(self.resource, max_body=100)
        wire.reconnect(StringTransport())
        wire.send(b"PUT / HTTP/1.1\r\nContent-Length: 5000\r\n\r\n")
        self.assertEqual(codes(wire), [413])
        self.assertTrue(wire.closed)
        wire.lose()


class _Chatty(_Echo):
    """Answers as _Echo, and logs at debug through the socket's logger;
    records whether the request said it came over TLS."""

    secure: list[bool] = []

    def render_POST(self, request: object) -> bytes:
        site = request.channel.site  # type: ignore[attr-defined]
        site.logger("test").debug("a routine detail")
        self.secure.append(request.isSecure())  # type: ignore[attr-defined]
        return super().render_POST(request)


class DebugGateTests(SynchronousTestCase):
    """Debug lines cost a request an event each even when the level drops
    them: with debugging off they are not made at all."""

    def served(self, debugging: bool) -> list[dict[str, object]]:
        from twisted.logger import LogLevel, capturedLogs

        socket_events: list[dict[str, object]] = []
        wire = Wire(_Chatty(), events=socket_events, debugging=lambda: debugging)
        with capturedLogs() as events:
            wire.send(http_request(b"POST", b"/", b"x"))
        self.assertEqual(codes(wire), [200])
        wire.lose()
        return [e for e in [*events, *socket_events] if e["log_level"] == LogLevel.debug]

    def test_debug_lines_only_while_debugging(self) -> None:
        self.assertEqual(self.served(False), [])
        formats = {e["log_format"] for e in self.served(True)}
        self.assertEqual(formats, {"a routine detail", "VM {vm}: {method} {path} -> {code}"})


class SecureTests(SynchronousTestCase):
    def test_a_domain_request_is_never_secure(self) -> None:
        """A UNIX socket: no TLS to ask the transport about (Klein asks on
        every request, and the adaptation lookup was 1.5% of a cached
        write's CPU), even from a transport that says otherwise."""
        from twisted.internet.interfaces import ISSLTransport
        from zope.interface import directlyProvides

        _Chatty.secure = []
        wire = Wire(_Chatty())
        directlyProvides(wire.transport, ISSLTransport)
        wire.send(http_request(b"POST", b"/", b"x"))
        wire.lose()
        self.assertEqual(_Chatty.secure, [False])


class LogLimitTests(SynchronousTestCase):
    """A guest flooding its socket with bad requests writes a bounded
    number of lines, then one with the count; never any content."""

    def test_refusals_are_rate_limited(self) -> None:
        events: list[dict[str, object]] = []
        clock = Clock()
        for n in range(50):
            wire = Wire(_Echo(), clock=clock, events=events)
            wire.send(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\nSECRET-%d" % n)
            wire.lose()
        # One observer per site: these are 50 sockets, each within its burst.
        self.assertEqual(len(events), 50)
        events.clear()
        wire = Wire(_Echo(), clock=clock, events=events)
        for n in range(50):
            wire.reconnect()
            wire.send(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\nSECRET-%d" % n)
        wire.lose()
        self.assertEqual(len(events), 5)
        clock.advance(60)
        self.assertEqual(len(events), 6)
        self.assertEqual(events[-1]["count"], 45)
        self.assertNotIn("SECRET", repr(events))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_site_stop_reports_what_was_counted(self) -> None:
        events: list[dict[str, object]] = []
        clock = Clock()
        wire = Wire(_Echo(), clock=clock, events=events)
        for _ in range(7):
            wire.reconnect()
            wire.send(b"BAD\r\n\r\n")
        wire.lose()
        wire.site.doStart()
        wire.site.doStop()
        self.assertEqual([e.get("count") for e in events][-1], 2)
        self.assertEqual(clock.getDelayedCalls(), [])


class ReadTurnTests(SynchronousTestCase):
    """One connection of a socket parses input per reactor iteration,
    however many connections its client opened."""

    def setUp(self) -> None:
        self.resource = _Echo()
        self.first = Wire(self.resource)
        self.others = [Wire.another(self.first) for _ in range(7)]

    def tearDown(self) -> None:
        for wire in [self.first, *self.others]:
            wire.lose()
        self.first.pump()  # the next iteration's turn, with nobody waiting
        self.assertEqual(self.first.clock.getDelayedCalls(), [])

    def test_one_connection_per_iteration(self) -> None:
        wires = [self.first, *self.others]
        for n, wire in enumerate(wires):
            wire.send(http_request(b"POST", b"/", b"%d" % n), pump=False)
        # In this iteration only the first was parsed; the others keep what
        # they read and stop reading.
        self.assertEqual(self.resource.seen, [b"0"])
        self.assertEqual([w.transport.producerState for w in self.others], ["paused"] * 7)
        for turn in range(1, 8):
            self.first.clock.advance(0)
            self.assertEqual(len(self.resource.seen), turn + 1)
        self.assertEqual(self.resource.seen, [b"%d" % n for n in range(8)])
        self.assertEqual([w.transport.producerState for w in wires], ["producing"] * 8)
        self.assertEqual([codes(w) for w in wires], [[200]] * 8)

    def test_another_socket_is_not_made_to_wait(self) -> None:
        other = Wire(_Echo(), clock=self.first.clock)
        for wire in [self.first, *self.others]:
            wire.send(http_request(b"POST", b"/", b"x"), pump=False)
        other.send(http_request(b"POST", b"/", b"y"), pump=False)
        self.assertEqual(codes(other), [200])
        other.lose()
        self.first.pump()

    def test_a_connection_lost_while_waiting_loses_its_turn(self) -> None:
        self.first.send(http_request(b"POST", b"/", b"a"), pump=False)
        self.others[0].send(http_request(b"POST", b"/", b"b"), pump=False)
        self.others[1].send(http_request(b"POST", b"/", b"c"), pump=False)
        self.others[0].lose()
        self.first.pump()
        self.assertEqual(self.resource.seen, [b"a", b"c"])

    def test_a_turn_does_not_resume_what_http_paused(self) -> None:
        # A client that reads none of its answers: HTTPChannel stops reading
        # it (write buffer full); its turn must not start reading again.
        waiting = self.others[0]
        self.first.send(http_request(b"POST", b"/", b"a"), pump=False)
        waiting.send(http_request(b"POST", b"/", b"b"), pump=False)
        waiting.protocol.pauseProducing()  # the transport's buffer is full
        self.first.pump()
        self.assertEqual(waiting.transport.producerState, "paused")
        self.assertEqual(self.resource.seen, [b"a", b"b"])
        waiting.protocol.resumeProducing()  # drained
        self.assertEqual(waiting.transport.producerState, "producing")

    def test_refused_connections_discard_without_a_turn(self) -> None:
        self.first.send(http_request(b"POST", b"/", b"a"), pump=False)
        self.others[0].send(b"BAD\r\n\r\n")
        self.first.send(b"x" * 100, pump=False)  # data after its turn: kept
        self.assertEqual(codes(self.others[0]), [400])
