"""The control channel serves root only: ``--control`` accepts UNIX endpoints
only, and every connection's peer credentials are checked (SPEC §1.2, §2)."""

from __future__ import annotations

import socket
import struct
from typing import Any

from twisted.internet.interfaces import ISystemHandle
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tests.fakes import FakeUpstream, StoreKit, some_status
from tests.unit.test_control import MemoryRegistry
from xguard.control.server import control_factory, peer_credentials
from xguard.daemon.config import Config
from xguard.tap import Options


class _FakeSocket:
    """What SO_PEERCRED answers for a peer with ``uid``."""

    def __init__(self, pid: int, uid: int, gid: int) -> None:
        self.creds = struct.pack("iII", pid, uid, gid)
        self.asked: list[tuple[int, int, int]] = []

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        self.asked.append((level, option, size))
        return self.creds


@implementer(ISystemHandle)
class _SocketTransport(StringTransport):
    """An in-memory transport that, like a real one, has a socket behind it."""

    def __init__(self, handle: Any) -> None:
        super().__init__()
        self.handle = handle

    def getHandle(self) -> Any:
        return self.handle


def _status_box() -> bytes:
    return amp.Box(_command=b"Status", _ask=b"1").serialize()


class PeerCredentialTests(SynchronousTestCase):
    def setUp(self) -> None:
        kit = StoreKit(FakeUpstream())
        self.addCleanup(kit.cleanup)
        self.factory = control_factory(MemoryRegistry(), kit.vtpm_contents(), some_status)
        self.events: list[dict[str, Any]] = []
        self.factory.log = Logger(observer=self.events.append)  # type: ignore[attr-defined]

    def connect(self, handle: Any) -> _SocketTransport:
        transport = _SocketTransport(handle)
        protocol = self.factory.buildProtocol(None)
        protocol.makeConnection(transport)
        protocol.dataReceived(_status_box())
        return transport

    def test_root_is_served(self) -> None:
        handle = _FakeSocket(pid=42, uid=0, gid=0)
        transport = self.connect(handle)
        self.assertEqual(handle.asked, [(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)])
        self.assertIn(b"_answer", transport.value())
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.events, [])

    def test_other_uid_is_closed_unread_with_one_log_line(self) -> None:
        transport = self.connect(_FakeSocket(pid=4242, uid=65534, gid=65534))
        self.assertEqual(transport.value(), b"")  # no answer: AMP never saw the box
        self.assertTrue(transport.disconnected or transport.disconnecting)
        self.assertEqual(len(self.events), 1)
        event = self.events[0]
        self.assertEqual((event["log_level"].name, event["uid"], event["pid"]),
                         ("warn", 65534, 4242))

    def test_unreadable_credentials_are_refused(self) -> None:
        class Broken:
            def getsockopt(self, *args: Any) -> bytes:
                raise OSError(92, "Protocol not available")

        transport = self.connect(Broken())
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnected or transport.disconnecting)
        self.assertEqual(len(self.events), 1)

    def test_refused_connection_loss_does_not_reach_amp(self) -> None:
        transport = _SocketTransport(_FakeSocket(1, 1000, 1000))
        protocol = self.factory.buildProtocol(None)
        protocol.makeConnection(transport)
        protocol.connectionLost(None)  # must not raise from an unconnected AMP

    def test_real_socket_credentials(self) -> None:
        """SO_PEERCRED of a real UNIX socket pair names this process."""
        import os

        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        self.assertEqual(peer_credentials(_SocketTransport(a)), (os.getpid(), os.getuid()))

    def test_in_memory_transport_has_no_peer_process(self) -> None:
        self.assertIsNone(peer_credentials(StringTransport()))


class ControlEndpointOptionTests(SynchronousTestCase):
    def parse(self, *argv: str) -> Config:
        options = Options()
        options.parseOptions(list(argv))
        return options.config

    def test_unix_forms_accepted(self) -> None:
        self.assertEqual(self.parse("--control", "unix:/run/x/c.sock").control_path,
                         "/run/x/c.sock")
        self.assertEqual(self.parse("--control", "unix:/run/x/c.sock:mode=600").control_path,
                         "/run/x/c.sock")
        self.assertEqual(self.parse("--control", "unix:address=/run/c.sock").control_path,
                         "/run/c.sock")

    def test_anything_else_refused_with_a_clear_message(self) -> None:
        for value in ("tcp:9999", "tcp:9999:interface=127.0.0.1", "ssl:443",
                      "/run/x/c.sock", "unix:relative.sock", "unix:/" + "x" * 120):
            with self.assertRaises(UsageError) as caught:
                self.parse("--control", value)
            self.assertIn("--control", str(caught.exception))
        with self.assertRaises(UsageError) as caught:
            self.parse("--control", "tcp:9999")
        self.assertIn("UNIX socket", str(caught.exception))
        self.assertIn("root", str(caught.exception))
