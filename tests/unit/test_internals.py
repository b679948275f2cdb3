"""The private APIs xguard relies on (xguard/_internals) still exist and
behave as relied upon: an upgrade that changes one fails here, loudly."""

from __future__ import annotations

from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
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
    def test_treq_names_its_reactor_type(self) -> None:
        """treq annotates HTTPClient.request's reactor with _ITreqReactor,
        an interface of TCP, time and name resolution: xguard's client
        reactor type extends it (xguard.interfaces.IClientReactor)."""
        import inspect

        from twisted.internet.interfaces import (
            IReactorPluggableNameResolver,
            IReactorTCP,
            IReactorTime,
        )

        self.assertTrue(treq_internals.TreqReactor.extends(IReactorTCP))
        self.assertTrue(treq_internals.TreqReactor.extends(IReactorTime))
        self.assertTrue(treq_internals.TreqReactor.extends(IReactorPluggableNameResolver))
        self.assertIn("_ITreqReactor", str(inspect.signature(HTTPClient.request)))

    def test_client_reactor_is_treqs_plus_unix_without_importing_treq(self) -> None:
        """xguard.interfaces names treq's interfaces itself at run time (so
        importing it does not import treq): they must stay treq's."""
        from twisted.internet.interfaces import IReactorUNIX

        from xguard.interfaces import IClientReactor

        self.assertEqual(set(IClientReactor.__bases__),
                         {*treq_internals.TreqReactor.__bases__, IReactorUNIX})

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


class TwistedUnixAdoptionTests(SynchronousTestCase):
    """xguard._internals.twisted_unix: adopting an inherited listening
    socket keeps its file's mode and our backlog (the public
    adoptStreamPort does neither)."""

    def setUp(self) -> None:
        import os
        import shutil
        import socket
        import tempfile

        self.dir = tempfile.mkdtemp(prefix="xga")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "s")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(self.sock.close)
        self.sock.bind(self.path)
        self.sock.listen(1)
        os.chmod(self.path, 0o660)

    def test_public_api_still_opens_the_file_to_everyone(self) -> None:
        import os
        import socket
        import stat

        from twisted.internet.testing import MemoryReactor
        from twisted.internet.unix import Port
        from twisted.web.server import Site

        reactor = MemoryReactor()
        # The site's clock is not the global reactor's: its log-time updates
        # would outlive the test there.
        site = Site(Resource(), reactor=Clock())
        port = Port._fromListeningDescriptor(reactor, self.sock.fileno(), site)
        port.startListening()  # what adoptStreamPort(fd, AF_UNIX, f) runs
        self.addCleanup(port.socket.close)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o666)
        self.assertEqual(port.backlog, 50)
        self.assertIsInstance(port.socket, socket.socket)

    def test_adopt_keeps_mode_and_backlog(self) -> None:
        import os
        import stat

        from twisted.internet.testing import MemoryReactor
        from twisted.web.server import Site

        from xguard._internals.twisted_unix import adopt_unix_port

        reactor = MemoryReactor()
        port = adopt_unix_port(reactor, self.sock.fileno(), Site(Resource(), reactor=Clock()),
                               mode=0o660, backlog=7)
        self.addCleanup(port.socket.close)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o660)
        self.assertEqual((port.backlog, port.getHost().name), (7, os.fsencode(self.path)))
        self.assertIn(port, reactor.readers)
        # A duplicate: the caller's descriptor is its own.
        self.assertNotEqual(port.fileno(), self.sock.fileno())
        self.sock.close()
        self.assertEqual(port.socket.getsockname(), self.path)


class QuietPortTests(SynchronousTestCase):
    """xguard._internals.twisted_unix.QuietPort: what it takes from
    ``unix.Port`` (accepting, closing, the file's removal) still works with
    its own start, and it logs nothing per socket."""

    def setUp(self) -> None:
        import os
        import shutil
        import tempfile

        from twisted.internet.testing import MemoryReactorClock

        self.dir = tempfile.mkdtemp(prefix="xgq")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "s")
        self.reactor = MemoryReactorClock()

    def factory(self) -> object:
        from twisted.internet.protocol import Factory, Protocol

        factory = Factory.forProtocol(Protocol)
        factory.noisy = False
        return factory

    def listen(self, **kwargs: object) -> object:
        from xguard._internals.twisted_unix import listen_unix

        return listen_unix(self.reactor, self.path, self.factory(),  # type: ignore[arg-type]
                           mode=0o640, backlog=3, **kwargs)  # type: ignore[arg-type]

    def test_listens_with_mode_and_owner_set_before(self) -> None:
        import os
        import socket
        import stat

        from twisted.logger import capturedLogs

        seen = []

        def prepare(path: str) -> None:
            # Bound, not yet listening: nobody can connect yet.
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with probe, self.assertRaises(ConnectionRefusedError):
                probe.connect(path)
            seen.append(stat.S_IMODE(os.stat(path).st_mode))

        with capturedLogs() as events:
            port = self.listen(prepare=prepare)
        self.assertEqual(events, [])
        self.assertEqual(seen, [0o640])
        self.assertIn(port, self.reactor.readers)
        self.assertEqual(port.getHost().name, os.fsencode(self.path))  # type: ignore[attr-defined]
        self.assertEqual(port.backlog, 3)  # type: ignore[attr-defined]
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with client:
            client.connect(self.path)  # the kernel queues it: listening
        with capturedLogs() as events:
            port.stopListening()  # type: ignore[attr-defined]
            self.reactor.advance(0)
        self.assertEqual(events, [])
        self.assertFalse(os.path.exists(self.path))
        self.assertNotIn(port, self.reactor.readers)

    def test_keep_file_closes_without_removing_it(self) -> None:
        import os
        import socket
        import stat

        port = self.listen()
        port.keep_file = True  # type: ignore[attr-defined]
        port.stopListening()  # type: ignore[attr-defined]
        self.reactor.advance(0)
        self.assertTrue(stat.S_ISSOCK(os.stat(self.path).st_mode))
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with client, self.assertRaises(ConnectionRefusedError):
            client.connect(self.path)

    def test_failures_leave_nothing_bound(self) -> None:
        import os

        from twisted.internet.error import CannotListenError

        def refuse(path: str) -> None:
            raise PermissionError(path)

        with self.assertRaises(PermissionError):
            self.listen(prepare=refuse)
        self.assertFalse(os.path.exists(self.path))
        self.assertEqual(self.reactor.readers, set())
        with open(self.path, "w"):
            pass
        with self.assertRaises(CannotListenError):
            self.listen()
        self.assertTrue(os.path.isfile(self.path))  # not ours: left alone


class TwistedSystemdTests(SynchronousTestCase):
    """xguard._internals.twisted_systemd: importing twisted.internet.endpoints
    still takes LISTEN_PID/LISTEN_FDS from the environment, and what it
    took is read back, names and all (in a child the fake systemd's
    launcher starts with two descriptors)."""

    def test_endpoints_import_takes_the_variables_and_keeps_them(self) -> None:
        import os
        import subprocess
        import sys

        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        child = ("import os; import twisted.internet.endpoints; "
                 "left = sorted(k for k in os.environ if k.startswith('LISTEN_')); "
                 "from xguard.restart.handover import handed_over; "
                 "passed = [tuple(p) for p in handed_over()]; "
                 "print(left, passed, os.environ.get('LISTEN_FDNAMES'), os.get_inheritable(3))")
        out = subprocess.run(
            [sys.executable, "-S", "-m", "xguard.testing.sdexec", f"{r},{w}", "a:b", "--",
             sys.executable, "-c", child], pass_fds=[r, w], capture_output=True, text=True,
            env={**os.environ, "PYTHONPATH": repo}, timeout=60, check=True).stdout
        self.assertEqual(out.strip(), "['LISTEN_FDNAMES'] [(3, 'a'), (4, 'b')] None False")


class _Pending(Resource):
    isLeaf = True

    def render_PUT(self, request: Request) -> object:
        from twisted.web.server import NOT_DONE_YET
        return NOT_DONE_YET


class HTTPChannelStateTests(SynchronousTestCase):
    """xguard.domain.site's channel extends ChannelBase
    (xguard._internals.twisted_web), which gives public names to
    HTTPChannel's private state and hooks: the request line's parts, the
    transfer decoder, whether a request is being handled, the pipelined
    input it buffers, its framing-header and bad-request hooks. These are
    the names and meanings they rely on."""

    def channel(self, **hooks: object):  # type: ignore[no-untyped-def]
        from twisted.internet.testing import StringTransport
        from twisted.web.server import Site

        from xguard._internals.twisted_web import ChannelBase

        seen: dict[str, object] = {"framing": [], "bad": 0}

        class Probe(ChannelBase):
            def header_received(self, name: bytes, value: bytes) -> bool:
                seen["framing"].append((name, value))  # type: ignore[attr-defined]
                if name == b"Content-Length":
                    self.use_content_length(int(value))
                return True

            def bad_request(self) -> None:
                seen["bad"] += 1  # type: ignore[operator]
                super().bad_request()

            def allHeadersReceived(self) -> None:
                seen["target"], seen["version"] = self.request_target, self.request_version
                self.request_target = b"/rewritten"
                super().allHeadersReceived()
                seen["decoder"] = self._transferDecoder

        channel = Probe()
        channel.requestFactory = Site(_Pending()).requestFactory
        channel.site = Site(_Pending())
        transport = StringTransport()
        channel.makeConnection(transport)
        return channel, seen, transport

    def test_the_state_the_domain_channel_relies_on(self) -> None:
        from twisted.web import http

        channel, seen, _ = self.channel()
        self.assertFalse(channel.handling_request)
        self.assertIs(channel.waiting_for_transport, False)
        channel.dataReceived(b"PUT /tpm2-00.permall HTTP/1.1\r\nHost: x\r\n"
                             b"Content-Length: 3\r\n\r\nabc"
                             b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual((seen["target"], seen["version"]), (b"/tpm2-00.permall", b"HTTP/1.1"))
        self.assertEqual(seen["framing"], [(b"Host", b"x"), (b"Content-Length", b"3")])
        self.assertIsInstance(seen["decoder"], http._IdentityTransferDecoder)
        self.assertEqual(channel.requests[0].uri, b"/rewritten")
        # The PUT is being handled (its resource has not finished): the
        # pipelined GET waits, unparsed.
        self.assertTrue(channel.handling_request)
        self.assertEqual(channel.buffered_bytes, len(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"))
        self.assertIsInstance(channel.eager_read_limit, int)
        self.assertTrue(callable(channel.finish_body))
        channel.connectionLost(Exception("done"))

    def test_a_malformed_request_line_reaches_the_hook(self) -> None:
        channel, seen, transport = self.channel()
        channel.dataReceived(b"NOT A REQUEST LINE AT ALL\r\n\r\n")
        self.assertEqual(seen["bad"], 1)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400"))

    def test_set_logger_routes_twisted_web_lines(self) -> None:
        from twisted.logger import Logger

        from xguard._internals.twisted_web import set_logger

        channel, _, _ = self.channel()
        events: list[dict[str, object]] = []
        set_logger(channel, Logger(observer=events.append))
        channel.log.info("x")
        self.assertEqual(len(events), 1)
        channel.connectionLost(Exception("done"))
