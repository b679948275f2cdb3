"""xguard-cache-convert: pending writes in the format older daemons read."""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from xguard.cache.entry import Entry, decode, encode
from xguard.daemon.convert import convert, main
from xguard.daemon.process import InstanceLock
from xguard.model import NvramWrite, digest

VM = "11111111-1111-4111-8111-111111111111"


class ConvertTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = tempfile.mkdtemp(prefix="xgv")
        self.addCleanup(shutil.rmtree, self.root, True)

    def put(self, service: str, key: int, ts: int, raw: bytes) -> str:
        d = os.path.join(self.root, service, VM, str(key))
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, str(ts))
        with open(path, "wb") as f:
            f.write(raw)
        return path

    def read(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def test_checked_files_become_their_content(self) -> None:
        ours = self.put("Swtpm", 0, 5, encode(Entry(b"cDI=", {0: frozenset({digest("p")})})))
        old = self.put("Swtpm", 1, 5, b"czE=")  # the upstream daemon's already
        record = NvramWrite("TjI=", "yes").encode()
        nvram = self.put("Varstored", 0, 5, encode(Entry(record, None)))
        torn = self.put("Swtpm", 2, 5, encode(Entry(b"djI="))[:-2])
        self.assertEqual(convert(self.root), (2, 1, [torn]))
        self.assertEqual(self.read(ours), b"cDI=")
        self.assertEqual(self.read(old), b"czE=")
        self.assertEqual(self.read(nvram), record)
        # What this xguard reads back is what an older one would: the content.
        self.assertEqual(decode(self.read(ours)), Entry(b"cDI=", legacy=True))

    def test_refused_while_a_daemon_runs(self) -> None:
        lock = InstanceLock(os.path.join(self.root, "xguard.lock"))
        lock.acquire()
        self.addCleanup(lock.release)
        with self.assertRaises(SystemExit) as cm:
            main(["--state-dir", self.root])
        self.assertEqual(cm.exception.code, 1)
