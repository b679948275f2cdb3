"""The fd store client (xguard.restart.fdstore) against a real datagram socket that
receives what systemd would: FDSTORE=1/FDSTOREREMOVE=1 with SCM_RIGHTS."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile

from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from xguard.restart import sdnotify
from xguard.restart.fdstore import FdStore
from xguard.testing.fakesystemd import receive


class FdStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="xgf")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "notify")
        self.manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(self.manager.close)
        self.manager.bind(self.path)
        self.clock = Clock()
        self.addCleanup(lambda: self.assertEqual(self.clock.getDelayedCalls(), []))

    def listener(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(s.close)
        s.bind(os.path.join(self.dir, f"l{s.fileno()}"))
        s.listen(4)
        return s

    def store(self, **env: str) -> FdStore:
        return FdStore(self.clock, environ={"NOTIFY_SOCKET": self.path, **env})

    def test_stores_a_duplicate_with_its_name(self) -> None:
        store = self.store()
        self.assertTrue(store.enabled)
        sock = self.listener()
        store.add("xgd-1-2-abc", [sock.fileno()])
        self.successResultOf(store.flushed())
        message = receive(self.manager, 1)
        self.addCleanup(lambda: [os.close(fd) for fd in message.fds])
        self.assertEqual(message.fields, {"FDSTORE": "1", "FDNAME": "xgd-1-2-abc"})
        (fd,) = message.fds
        # The very same socket (a duplicate), and ours was not consumed.
        self.assertEqual(os.fstat(fd).st_ino, os.fstat(sock.fileno()).st_ino)
        with socket.socket(fileno=os.dup(fd)) as copy:
            self.assertEqual(copy.getsockname(), sock.getsockname())

    def test_remove_by_name(self) -> None:
        store = self.store()
        store.remove("xgd-1-2-abc")
        message = receive(self.manager, 1)
        self.assertEqual(message.fields, {"FDSTOREREMOVE": "1", "FDNAME": "xgd-1-2-abc"})
        self.assertEqual(message.fds, [])

    def test_many_descriptors_split_at_the_kernel_limit(self) -> None:
        store = self.store()
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        store.add("many", [r] * (sdnotify.MAX_FDS + 2))
        sizes = []
        for _ in range(2):
            message = receive(self.manager, 1)
            sizes.append(len(message.fds))
            for fd in message.fds:
                os.close(fd)
        self.assertEqual(sizes, [sdnotify.MAX_FDS, 2])

    def test_full_queue_waits_and_keeps_order(self) -> None:
        """systemd busy: the datagram queue fills; the rest is sent later,
        in order, without blocking (the reactor goes on meanwhile)."""
        store = self.store()
        sock = self.listener()
        sent = 0
        while not store._queue and sent < 100_000:  # until one is held back
            store.add(f"n{sent}", [sock.fileno()])
            sent += 1
        self.assertTrue(store._queue)
        flushed = store.flushed()
        self.assertNoResult(flushed)
        names = []
        while len(names) < sent:
            try:
                message = receive(self.manager, 0)
            except TimeoutError:
                self.clock.advance(1)
                continue
            names.append(message.fields["FDNAME"])
            for fd in message.fds:
                os.close(fd)
        self.assertEqual(names, [f"n{i}" for i in range(sent)])
        self.successResultOf(flushed)

    def test_unreachable_manager_is_told_once_and_disables(self) -> None:
        store = FdStore(self.clock, environ={"NOTIFY_SOCKET": os.path.join(self.dir, "gone")})
        sock = self.listener()
        before = len(os.listdir("/proc/self/fd"))
        with capturedLogs() as events:
            store.add("a", [sock.fileno()])
            store.add("b", [sock.fileno()])
        self.assertEqual([e["log_level"].name for e in events], ["warn"])
        self.assertFalse(store.enabled)
        self.assertEqual(len(os.listdir("/proc/self/fd")), before)  # no leaked copies

    def test_disabled_without_a_manager_or_with_fdstore_0(self) -> None:
        for env in ({}, {"NOTIFY_SOCKET": self.path, "FDSTORE": "0"},
                    {"NOTIFY_SOCKET": "vsock:1:2"}):
            store = FdStore(self.clock, environ=env)
            self.assertFalse(store.enabled)
            store.add("a", [0])
            store.remove("a")
            self.successResultOf(store.flushed())
        self.manager.setblocking(False)
        self.assertRaises(BlockingIOError, self.manager.recv, 10)

    def test_limit_is_told_once(self) -> None:
        store = self.store(FDSTORE="1")
        sock = self.listener()
        with capturedLogs() as events:
            for name in ("a", "b", "c"):
                store.add(name, [sock.fileno()])
        self.assertEqual(store.limit, 1)
        self.assertEqual([e["log_level"].name for e in events], ["warn"])
        for _ in range(3):
            for fd in receive(self.manager, 1).fds:
                os.close(fd)

    def test_invalid_name(self) -> None:
        self.assertRaises(ValueError, self.store().add, "a:b", [0])

    def test_stop_drops_the_queue(self) -> None:
        store = self.store()
        sock = self.listener()
        while not store._queue:
            store.add("x", [sock.fileno()])
        flushed = store.flushed()
        store.stop()
        self.successResultOf(flushed)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        # Drain what was sent.
        self.manager.setblocking(False)
        while True:
            try:
                for fd in receive(self.manager, 0).fds:
                    os.close(fd)
            except TimeoutError:
                break
