"""systemd notifications reach $NOTIFY_SOCKET, or nothing happens."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid

from twisted.trial.unittest import SynchronousTestCase

from xguard.restart import sdnotify


class NotifyTests(SynchronousTestCase):
    def bind(self, address: str) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.bind(address)
        sock.settimeout(5)
        return sock

    def test_ready_to_path_socket(self) -> None:
        d = tempfile.mkdtemp(prefix="xg")
        self.addCleanup(shutil.rmtree, d, True)
        path = os.path.join(d, "notify")
        server = self.bind(path)
        self.assertTrue(sdnotify.notify(sdnotify.READY, {"NOTIFY_SOCKET": path}))
        self.assertEqual(server.recv(100), b"READY=1")

    def test_stopping_to_abstract_socket(self) -> None:
        name = "xg-test-" + uuid.uuid4().hex
        server = self.bind("\0" + name)
        self.assertTrue(sdnotify.notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name}))
        self.assertEqual(server.recv(100), b"STOPPING=1")

    def test_unset_is_a_no_op(self) -> None:
        self.assertFalse(sdnotify.notify(sdnotify.READY, {}))
        self.assertFalse(sdnotify.notify(sdnotify.READY, {"NOTIFY_SOCKET": ""}))

    def test_process_environment_is_default(self) -> None:
        old = os.environ.pop("NOTIFY_SOCKET", None)
        if old is not None:
            self.addCleanup(os.environ.__setitem__, "NOTIFY_SOCKET", old)
        self.assertFalse(sdnotify.notify(sdnotify.READY))

    def test_nobody_listening_is_not_fatal(self) -> None:
        d = tempfile.mkdtemp(prefix="xg")
        self.addCleanup(shutil.rmtree, d, True)
        self.assertFalse(sdnotify.notify(sdnotify.READY,
                                         {"NOTIFY_SOCKET": os.path.join(d, "gone")}))

    def test_not_a_socket_address_is_ignored(self) -> None:
        self.assertFalse(sdnotify.notify(sdnotify.READY, {"NOTIFY_SOCKET": "vsock:2:1"}))
