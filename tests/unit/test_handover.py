"""Matching handed-over descriptors to the active sockets file
(xguard.restart.handover): the file is the truth, every mismatch is closed and
logged once. Fakes for the system calls; real sockets for inspect()."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
from typing import Any

from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from xguard.restart.handover import (
    CONTROL,
    DOMAIN,
    Claimed,
    Handover,
    fd_name,
    inspect,
    parse_name,
)
from xguard.restart.listenfds import take

PID = 4242


class RecordingStore:
    """The fd store's calls, recorded."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.calls: list[tuple[str, str, list[int]]] = []

    def add(self, name: str, fds: list[int]) -> None:
        self.calls.append(("add", name, list(fds)))

    def remove(self, name: str) -> None:
        self.calls.append(("remove", name, []))


def st(ino: int, mode: int = stat.S_IFSOCK | 0o660, dev: int = 0x2a) -> os.stat_result:
    return os.stat_result((mode, ino, dev, 1, 0, 0, 0, 0, 0, 0))


class World:
    """Descriptors and files as the fakes see them."""

    def __init__(self) -> None:
        self.sockets: dict[int, tuple[str | None, str | None]] = {}  # fd -> inspect()
        self.files: dict[str, os.stat_result] = {}
        self.closed: list[int] = []

    def lstat(self, path: str) -> os.stat_result:
        try:
            return self.files[path]
        except KeyError:
            raise FileNotFoundError(path) from None

    def handover(self, names: list[str], store: Any = None) -> Handover:
        env = {"LISTEN_PID": str(PID), "LISTEN_FDS": str(len(names)),
               "LISTEN_FDNAMES": ":".join(names)}
        self.env = env
        h = Handover(store or RecordingStore(), take=lambda: take(env, PID),
                     inspect=lambda fd: self.sockets.get(fd, (None, "not a socket")),
                     lstat=self.lstat, close=self.closed.append)
        return h

    def listening(self, fd: int, path: str, ino: int, kind: str = DOMAIN) -> str:
        """fd 3+ bound to ``path`` whose file has ``ino``; returns its name."""
        self.sockets[fd] = (path, None)
        self.files[path] = st(ino)
        return fd_name(kind, path, self.files[path])


def warnings(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["log_level"].name == "warn"]


class HandoverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.w = World()

    def test_names_are_valid_and_parse(self) -> None:
        name = fd_name(DOMAIN, "/run/xen/a:b/ü.sock", st(0x1234))
        self.assertNotIn(":", name)
        self.assertTrue(name.isascii() and len(name) < 255)
        parsed = parse_name(name)
        assert parsed is not None
        self.assertEqual((parsed.kind, parsed.dev, parsed.ino), (DOMAIN, 0x2a, 0x1234))
        for other in ("control", "xgd-1-2", "xgd-x-1-ab", "yyd-1-2-ab", "unknown"):
            self.assertIsNone(parse_name(other), other)

    def test_matching_socket_is_adopted_once(self) -> None:
        a = self.w.listening(3, "/s/a", 10)
        b = self.w.listening(4, "/s/b", 11)
        h = self.w.handover([a, b])
        with capturedLogs() as events:
            h.inherit()
            self.assertEqual(h.claim(DOMAIN, "/s/b"), Claimed(4, b))
            self.assertEqual(h.claim(DOMAIN, "/s/a"), Claimed(3, a))
            self.assertIsNone(h.claim(DOMAIN, "/s/a"))  # nothing left for it
            self.assertIsNone(h.claim(DOMAIN, "/s/new"))
            h.release_unclaimed()
        self.assertEqual(warnings(events), [])
        self.assertEqual(self.w.closed, [])  # the caller adopts and closes them
        self.assertEqual((h.handed, h.adopted, h.refused), (2, 2, 0))
        self.assertNotIn("LISTEN_FDS", self.w.env)

    def test_stale_and_foreign_descriptors_are_refused_at_once(self) -> None:
        ok = self.w.listening(3, "/s/a", 10)
        self.w.sockets[4] = (None, "not an open descriptor (Bad file descriptor)")
        self.w.sockets[5] = ("/s/c", "not listening")
        self.w.sockets[6] = (None, "not a UNIX socket (AF_INET)")
        store = RecordingStore()
        h = self.w.handover([ok, "xgd-1-2-aa", "foreign", "xgd-3-4-bb"], store)
        with capturedLogs() as events:
            h.inherit()
        lines = warnings(events)
        self.assertEqual([e["fd"] for e in lines], [4, 5, 6])
        self.assertIn("not listening", lines[1]["reason"])
        self.assertEqual(self.w.closed, [4, 5, 6])
        self.assertEqual(store.calls, [("remove", n, []) for n in
                                       ("xgd-1-2-aa", "foreign", "xgd-3-4-bb")])
        self.assertEqual(h.claim(DOMAIN, "/s/a"), Claimed(3, ok))

    def test_socket_file_gone_or_replaced_during_the_handover(self) -> None:
        """The file is the truth: the entry listens afresh, the old socket
        (no longer reachable by its path) is closed."""
        gone = self.w.listening(3, "/s/gone", 10)
        replaced = self.w.listening(4, "/s/replaced", 11)
        not_sock = self.w.listening(5, "/s/file", 12)
        del self.w.files["/s/gone"]
        self.w.files["/s/replaced"] = st(99)
        self.w.files["/s/file"] = st(12, mode=stat.S_IFREG | 0o644)
        store = RecordingStore()
        h = self.w.handover([gone, replaced, not_sock], store)
        h.inherit()
        with capturedLogs() as events:
            for path in ("/s/gone", "/s/replaced", "/s/file"):
                self.assertIsNone(h.claim(DOMAIN, path))
        reasons = [e["reason"] for e in warnings(events)]
        self.assertEqual(reasons, ["its socket file is gone", "its socket file was replaced",
                                   "its path is no longer a socket"])
        self.assertEqual(self.w.closed, [3, 4, 5])
        self.assertEqual([c[1] for c in store.calls], [gone, replaced, not_sock])

    def test_names_that_are_not_ours_for_that_path(self) -> None:
        self.w.listening(3, "/s/a", 10)
        other_path = fd_name(DOMAIN, "/s/other", st(10))
        h = self.w.handover([other_path])
        h.inherit()
        with capturedLogs() as events:
            self.assertIsNone(h.claim(DOMAIN, "/s/a"))
        self.assertIn("not as xguard names", warnings(events)[0]["reason"])
        # The control socket's name is not a domain socket's.
        w = World()
        control = w.listening(3, "/s/ctl", 10, kind=CONTROL)
        h = w.handover([control])
        h.inherit()
        self.assertIsNone(h.claim(DOMAIN, "/s/ctl"))
        h = w.handover([control])
        w.closed.clear()
        h.inherit()
        self.assertEqual(h.claim(CONTROL, "/s/ctl"), Claimed(3, control))

    def test_two_for_one_path_the_right_one_wins(self) -> None:
        old = self.w.listening(3, "/s/a", 10)
        new = self.w.listening(4, "/s/a", 11)  # the file now is 11
        h = self.w.handover([old, new])
        h.inherit()
        with capturedLogs() as events:
            self.assertEqual(h.claim(DOMAIN, "/s/a"), Claimed(4, new))
        self.assertEqual(self.w.closed, [3])
        self.assertEqual(len(warnings(events)), 1)

    def test_socket_not_in_the_file_is_closed(self) -> None:
        kept = self.w.listening(3, "/s/kept", 10)
        destroyed = self.w.listening(4, "/s/destroyed", 11)
        moved = self.w.listening(5, "/s/moved", 12)
        self.w.files["/s/moved"] = st(13)  # someone else's file now
        store = RecordingStore()
        h = self.w.handover([kept, destroyed, moved], store)
        h.inherit()
        self.assertEqual(h.claim(DOMAIN, "/s/kept"), Claimed(3, kept))
        with capturedLogs() as events:
            h.release_unclaimed()
        lines = warnings(events)
        self.assertEqual([(e["path"], e["reason"]) for e in lines],
                         [("/s/destroyed", "not in the active sockets file"),
                          ("/s/moved", "not in the active sockets file")])
        self.assertEqual(self.w.closed, [4, 5])
        self.assertEqual(store.calls, [("remove", destroyed, []), ("remove", moved, [])])

    def test_a_refused_duplicate_never_removes_the_adopted_name(self) -> None:
        name = self.w.listening(3, "/s/a", 10)
        self.w.sockets[4] = ("/s/a", None)
        store = RecordingStore()
        h = self.w.handover([name, name], store)
        h.inherit()
        self.assertEqual(h.claim(DOMAIN, "/s/a"), Claimed(3, name))
        self.assertEqual(self.w.closed, [4])
        self.assertEqual(store.calls, [])

    def test_a_bad_descriptor_before_a_good_one_of_its_name_keeps_the_name(self) -> None:
        """Removing a name from the store removes every descriptor under it:
        a bad copy handed over first must not take the good one's place in
        the store with it."""
        name = self.w.listening(4, "/s/a", 10)
        self.w.sockets[3] = (None, "not an open descriptor (Bad file descriptor)")
        store = RecordingStore()
        h = self.w.handover([name, name], store)
        h.inherit()
        self.assertEqual(self.w.closed, [3])
        self.assertEqual(h.claim(DOMAIN, "/s/a"), Claimed(4, name))
        self.assertEqual(store.calls, [])

    def test_malformed_or_foreign_variables(self) -> None:
        env = {"LISTEN_PID": str(PID), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a"}
        h = Handover(RecordingStore(), take=lambda: take(env, PID))
        with capturedLogs() as events:
            h.inherit()
        self.assertEqual([e["log_level"].name for e in events], ["error"])
        self.assertIsNone(h.claim(DOMAIN, "/s/a"))
        env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "a"}
        h = Handover(RecordingStore(), take=lambda: take(env, PID))
        with capturedLogs() as events:
            h.inherit()
        self.assertEqual((list(events), env, h.handed), ([], {}, 0))

    def test_stored_names_the_file_and_dropped_removes(self) -> None:
        self.w.files["/s/a"] = st(77)
        store = RecordingStore()
        h = self.w.handover([], store)
        name = h.stored(DOMAIN, "/s/a", 9)
        self.assertEqual(name, fd_name(DOMAIN, "/s/a", st(77)))
        h.dropped(name)
        h.dropped(None)
        self.assertEqual(store.calls, [("add", name, [9]), ("remove", name, [])])

    def test_keep_open(self) -> None:
        self.assertTrue(self.w.handover([], RecordingStore(enabled=True)).keep_open())
        h = self.w.handover([], RecordingStore(enabled=False))
        self.assertFalse(h.keep_open())
        h.reexec_pending = True
        self.assertTrue(h.keep_open())


class InspectTests(SynchronousTestCase):
    """inspect() on real descriptors."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="xgi")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def sock(self, family: int = socket.AF_UNIX, kind: int = socket.SOCK_STREAM) -> socket.socket:
        s = socket.socket(family, kind)
        self.addCleanup(s.close)
        return s

    def test_listening_unix_stream_socket(self) -> None:
        s = self.sock()
        path = os.path.join(self.dir, "l")
        s.bind(path)
        s.listen(1)
        self.assertEqual(inspect(s.fileno()), (path, None))

    def test_everything_else(self) -> None:
        bound = self.sock()
        bound.bind(os.path.join(self.dir, "b"))
        dgram = self.sock(kind=socket.SOCK_DGRAM)
        dgram.bind(os.path.join(self.dir, "d"))
        tcp = self.sock(socket.AF_INET)
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(1)
        abstract = self.sock()
        abstract.bind(f"\0xg-inspect-test-{os.getpid()}")
        abstract.listen(1)
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        os.close(w)
        cases = {
            bound.fileno(): "not listening",
            dgram.fileno(): "not a stream socket",
            tcp.fileno(): "not a UNIX socket",
            abstract.fileno(): "not bound to a file path",
            r: "not a socket",
            w: "not an open descriptor",
        }
        for fd, expected in cases.items():
            path, problem = inspect(fd)
            self.assertIn(expected, problem or "", fd)
