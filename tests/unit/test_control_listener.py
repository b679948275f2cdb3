"""The control socket's listener: root-only mode, stale files replaced,
and handed over across a restart like the domain sockets (issue 12)."""

from __future__ import annotations

import os
import socket
import stat

from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from tests.shorttmp import short_tmp
from xguard.control.listener import ControlListener
from xguard.restart.fdstore import FdStore
from xguard.restart.handover import Handover
from xguard.restart.listenfds import Passed


class Hello(Protocol):
    def connectionMade(self) -> None:
        self.transport.write(b"hello")
        self.transport.loseConnection()


def factory() -> ServerFactory:
    f = ServerFactory.forProtocol(Hello)
    f.noisy = False
    return f


def hello(path: str) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        return s.recv(100)


def listener(path: str, handover: Handover) -> ControlListener:
    from twisted.internet import reactor

    return ControlListener(reactor, "unix:" + path, path, factory(), handover)


class ListenerTests(TestCase):
    """On the real reactor: trial's TestCase runs it for each test."""

    def setUp(self) -> None:
        self.path = os.path.join(short_tmp(self), "ctl.sock")

    async def test_handed_over_control_socket_keeps_callers_waiting(self) -> None:
        from twisted.internet import threads

        path = self.path
        old_handover = Handover(FdStore(Clock(), environ={}), take=list)
        old = listener(path, old_handover)
        old.check()
        await old.listen()
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(await threads.deferToThread(hello, path), b"hello")
        old_handover.reexec_pending = True
        await old.stop()
        (name, fd), = old.handed_over()
        self.assertTrue(name.startswith("xgc-"))
        waiting = threads.deferToThread(hello, path)  # an xguard-ctl call meanwhile
        passed = [Passed(os.dup(fd), name)]
        os.close(fd)  # the old image is gone
        handover = Handover(FdStore(Clock(), environ={}), take=lambda: passed)
        handover.inherit()
        new = listener(path, handover)
        new.check()  # would refuse a live socket at the path: this one is ours
        await new.listen()
        self.assertEqual(await waiting, b"hello")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        await new.stop()
        self.assertFalse(os.path.exists(path))

    def test_a_live_stranger_still_refuses_the_start(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(self.path)
        s.listen(1)
        try:
            with self.assertRaisesRegex(OSError, "in use"):
                listener(self.path, Handover(FdStore(Clock(), environ={}), take=list)).check()
        finally:
            s.close()
