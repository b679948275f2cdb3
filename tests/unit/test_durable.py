"""atomic_write leaves either the old or the new content, with modes set."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from xguard.util.durable import atomic_write, makedirs, safe_unlink


class DurableTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="xgd")
        self.addCleanup(shutil.rmtree, self.dir, True)
        os.umask(0o022)

    def test_write_replaces_and_leaves_no_temp(self) -> None:
        path = os.path.join(self.dir, "f")
        atomic_write(path, b"one")
        atomic_write(path, b"two")
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"two")
        self.assertEqual(os.listdir(self.dir), ["f"])
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

    def test_mode(self) -> None:
        path = os.path.join(self.dir, "g")
        atomic_write(path, b"x", mode=0o644)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o644)

    def test_failure_removes_temp_and_keeps_old(self) -> None:
        path = os.path.join(self.dir, "h")
        atomic_write(path, b"old")
        self.assertRaises(TypeError, atomic_write, path, "not bytes")  # type: ignore[arg-type]
        self.assertEqual(sorted(os.listdir(self.dir)), ["h"])
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"old")

    def test_makedirs_mode_despite_umask(self) -> None:
        old = os.umask(0o077)
        try:
            target = os.path.join(self.dir, "a", "b")
            makedirs(target, 0o755)
        finally:
            os.umask(old)
        self.assertEqual(stat.S_IMODE(os.stat(target).st_mode), 0o755)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(target)).st_mode), 0o755)

    def test_makedirs_survives_a_concurrent_prune_of_a_parent(self) -> None:
        """The cache prunes empty directories while writes create them:
        the parent made a moment ago may be gone when the leaf is made."""
        real_mkdir = os.mkdir
        vm, leaf = os.path.join(self.dir, "vm"), os.path.join(self.dir, "vm", "0")
        pruned = []

        def mkdir(path: str, mode: int = 0o777) -> None:
            if path == leaf and not pruned:
                os.rmdir(vm)  # the pruner saw it empty
                pruned.append(vm)
            real_mkdir(path, mode)

        self.patch(os, "mkdir", mkdir)
        makedirs(leaf)
        self.assertEqual(pruned, [vm])
        self.assertTrue(os.path.isdir(leaf))

    def test_safe_unlink(self) -> None:
        path = os.path.join(self.dir, "i")
        atomic_write(path, b"x")
        self.assertTrue(safe_unlink(path))
        self.assertFalse(safe_unlink(path))
