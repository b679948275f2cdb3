"""The control channel's protocol: garbage on the control socket costs a
bounded amount of log and ends the connection (xguard.control.protocol)."""

from __future__ import annotations

import os
import random
from typing import Any

from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.fakes import FakeUpstream, StoreKit, some_status
from tests.unit.test_control import MemoryRegistry
from xguard.control.commands import Status
from xguard.control.protocol import MAX_DETAIL, ControlProtocol
from xguard.control.server import control_factory


def raw(pairs: list[tuple[bytes, bytes]]) -> bytes:
    """AMP boxes on the wire, as given (keys < 256 bytes, values < 64 KiB)."""
    out = b""
    for key, value in pairs:
        out += len(key).to_bytes(2, "big") + key + len(value).to_bytes(2, "big") + value
    return out + b"\x00\x00"


BIG = b"\xff" * 65535


def garbage_samples() -> dict[str, bytes]:
    rng = random.Random(8)
    return {
        "box without a command": raw([(b"k%d" % i, BIG) for i in range(50)]),
        "answer to nothing asked": raw([(b"_answer", BIG), (b"k", BIG)]),
        "error for nothing asked": raw([(b"_error", BIG), (b"_error_code", b"X"),
                                        (b"_error_description", BIG)]),
        "unparsable argument": raw([(b"_command", b"VtpmCreate"), (b"_ask", b"1"),
                                    (b"dbg", b"d"), (b"vm_uuid", b"u"), (b"path", b"/p"),
                                    (b"gid", b"9" * 65535)]),
        "missing arguments": raw([(b"_command", b"VtpmCreate"), (b"_ask", b"2"),
                                  (b"x", BIG)]),
        "unknown command": raw([(b"_command", BIG[:255] * 200), (b"_ask", b"3")]),
        "random bytes": bytes(rng.getrandbits(8) for _ in range(200_000)),
        "oversized key": b"\x01\x00" + b"k" * 256,
    }


class GarbageTests(SynchronousTestCase):
    def setUp(self) -> None:
        kit = StoreKit(FakeUpstream())
        self.addCleanup(kit.cleanup)
        self.factory = control_factory(MemoryRegistry(), kit.vtpm_contents(), some_status)

    def connect(self) -> tuple[amp.AMP, StringTransport]:
        proto = self.factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def send(self, data: bytes) -> tuple[list[dict[str, Any]], StringTransport]:
        proto, transport = self.connect()
        with capturedLogs() as events:
            for start in range(0, len(data), 65536):
                proto.dataReceived(data[start:start + 65536])
            proto.connectionLost(Failure(ConnectionError()))
        return list(events), transport

    @staticmethod
    def size(events: list[dict[str, Any]]) -> int:
        total = 0
        for event in events:
            total += len(formatEvent(event))
            failure = event.get("log_failure")
            if failure is not None:
                total += len(failure.getTraceback())
        return total

    def test_control_connections_use_the_bounded_protocol(self) -> None:
        gate = self.connect()[0]  # the root-only gate in front of it
        self.assertIsInstance(gate.wrapped, ControlProtocol)  # type: ignore[attr-defined]

    def test_each_kind_of_garbage_is_logged_in_a_few_hundred_bytes(self) -> None:
        for name, data in garbage_samples().items():
            with self.subTest(name):
                events, transport = self.send(data)
                self.assertLessEqual(self.size(events), 4 * MAX_DETAIL + 600, name)
                self.assertTrue(transport.disconnecting, name)
                self.assertNotIn("log_failure", [k for e in events for k in e], name)

    def test_megabytes_of_garbage_make_kilobytes_of_log(self) -> None:
        # The issue: 3.3 MB sent made 13 MB of log.
        sent = logged = 0
        for _ in range(3):
            for data in garbage_samples().values():
                events, _ = self.send(data)
                sent += len(data)
                logged += self.size(events)
        self.assertGreater(sent, 3_000_000)
        self.assertLess(logged, 30_000)

    def test_a_bug_in_a_responder_is_logged_with_where_not_with_its_whole_text(self) -> None:
        class Broken(amp.CommandLocator):
            @Status.responder
            def status(self) -> dict[str, Any]:
                raise RuntimeError("x" * 100_000)

        proto = ControlProtocol(locator=Broken())
        transport = StringTransport()
        proto.makeConnection(transport)
        with capturedLogs() as events:
            proto.dataReceived(raw([(b"_command", b"Status"), (b"_ask", b"1")]))
        errors = [e for e in events if e["log_level"] >= LogLevel.warn]
        self.assertEqual(len(errors), 1)
        text = formatEvent(errors[0])
        self.assertIn("RuntimeError: xxx", text)
        self.assertIn("(in status", text)
        self.assertLess(len(text), 2000)
        # The client gets AMP's unknown error and the connection ends.
        self.assertIn(b"UNKNOWN", transport.value())
        self.assertTrue(transport.disconnecting)

    def test_good_commands_still_work(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(raw([(b"_command", b"Status"), (b"_ask", b"7")]))
        self.assertIn(b"_answer", transport.value())
        self.assertFalse(transport.disconnecting)

    def test_random_streams(self) -> None:
        rng = random.Random(1)
        for _ in range(30):
            data = os.urandom(rng.randrange(1, 5000))
            events, _ = self.send(data)
            self.assertLessEqual(self.size(events), 4 * MAX_DETAIL + 600)
