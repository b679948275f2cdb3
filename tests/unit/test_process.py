"""One daemon per state directory; and the unix-socket probe."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from xguard.daemon.process import EXIT_RUNNING, AlreadyRunning, InstanceLock
from xguard.util.observer import OneShotObserver
from xguard.util.unixsock import Found, probe, remove_stale


class InstanceLockTests(SynchronousTestCase):
    def test_second_holder_refused_naming_the_directory(self) -> None:
        root = tempfile.mkdtemp(prefix="xgl")
        self.addCleanup(shutil.rmtree, root)
        path = os.path.join(root, "xguard.lock")
        first, second = InstanceLock(path), InstanceLock(path)
        first.acquire()
        with open(path) as f:
            self.assertEqual(f.read(), f"{os.getpid()}\n")
        e = self.assertRaises(AlreadyRunning, second.acquire)
        self.assertIn(root, str(e))
        self.assertIn(f"pid {os.getpid()}", str(e))
        self.assertEqual(e.exit_status, EXIT_RUNNING)
        first.release()
        second.acquire()  # released: free again
        second.release()


class ProbeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = tempfile.mkdtemp(prefix="xgp")
        self.addCleanup(shutil.rmtree, self.root)
        self.path = os.path.join(self.root, "s")

    def test_absent_stale_live_other(self) -> None:
        self.assertIs(probe(self.path), Found.ABSENT)
        live = socket.socket(socket.AF_UNIX)
        self.addCleanup(live.close)
        live.bind(self.path)
        self.assertIs(probe(self.path), Found.STALE)  # bound, not listening
        live.listen(1)
        self.assertIs(probe(self.path), Found.LIVE)
        self.assertRaises(OSError, remove_stale, self.path)
        self.assertTrue(os.path.exists(self.path))  # never taken over
        live.close()
        self.assertTrue(remove_stale(self.path))
        self.assertFalse(os.path.exists(self.path))
        with open(self.path, "w"):
            pass
        self.assertIs(probe(self.path), Found.OTHER)
        e = self.assertRaises(OSError, remove_stale, self.path, "control socket")
        self.assertIn("not a socket", str(e))


class ObserverTests(SynchronousTestCase):
    def test_every_waiter_gets_the_one_result(self) -> None:
        o: OneShotObserver[int] = OneShotObserver()
        early, gone = o.when_fired(), o.when_fired()
        gone.cancel()
        self.failureResultOf(gone)
        o.fire(7)
        self.assertEqual((self.successResultOf(early), self.successResultOf(o.when_fired())),
                         (7, 7))
        self.assertRaises(RuntimeError, o.fire, 8)

    def test_failure_reaches_every_waiter(self) -> None:
        from twisted.python.failure import Failure
        o: OneShotObserver[int] = OneShotObserver()
        d = o.when_fired()
        o.fire(Failure(ValueError("x")))
        self.failureResultOf(d, ValueError)
        self.failureResultOf(o.when_fired(), ValueError)
