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
        port = Port._fromListeningDescriptor(reactor, self.sock.fileno(), Site(Resource()))
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
        port = adopt_unix_port(reactor, self.sock.fileno(), Site(Resource()), mode=0o660,
                               backlog=7)
        self.addCleanup(port.socket.close)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o660)
        self.assertEqual((port.backlog, port.getHost().name), (7, os.fsencode(self.path)))
        self.assertIn(port, reactor.readers)
        # A duplicate: the caller's descriptor is its own.
        self.assertNotEqual(port.fileno(), self.sock.fileno())
        self.sock.close()
        self.assertEqual(port.socket.getsockname(), self.path)


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
    """xguard.domain.site's channel subclasses HTTPChannel and reads or
    drives its private state: the request line's parts, the transfer
    decoder it chooses, whether a request is being handled, the pipelined
    input it buffers. These are the names and meanings it relies on."""

    def test_the_state_the_domain_channel_relies_on(self) -> None:
        from twisted.internet.testing import StringTransport
        from twisted.web import http
        from twisted.web.server import Site

        seen: dict[str, object] = {}

        class Probe(http.HTTPChannel):
            def allHeadersReceived(self) -> None:
                seen["path"], seen["version"] = self._path, self._version
                super().allHeadersReceived()
                seen["decoder"] = self._transferDecoder

        channel = Probe()
        channel.requestFactory = Site(_Pending()).requestFactory
        channel.site = Site(_Pending())
        transport = StringTransport()
        channel.makeConnection(transport)
        self.assertFalse(channel._handlingRequest)
        self.assertIs(channel._waitingForTransport, False)
        channel.dataReceived(b"PUT /tpm2-00.permall HTTP/1.1\r\nHost: x\r\n"
                             b"Content-Length: 3\r\n\r\nabc"
                             b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual((seen["path"], seen["version"]), (b"/tpm2-00.permall", b"HTTP/1.1"))
        self.assertIsInstance(seen["decoder"], http._IdentityTransferDecoder)
        # The PUT is being handled (its resource has not finished): the
        # pipelined GET waits in _dataBuffer, unparsed.
        self.assertTrue(channel._handlingRequest)
        self.assertEqual(b"".join(channel._dataBuffer), b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIsInstance(channel._optimisticEagerReadSize, int)
        # What the channel overrides or calls by name.
        for name in ("_maybeChooseTransferDecoder", "_finishRequestBody", "length"):
            self.assertTrue(hasattr(channel, name), name)
        channel.connectionLost(Exception("done"))
