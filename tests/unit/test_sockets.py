"""The domain socket registry on real UNIX sockets.

Listening, connecting and closing a port need a running reactor, so those
tests are trial TestCases, which run it for each test (the global reactor is
imported inside the tests only); input validation and the unknown-destroy
path are synchronous."""

from __future__ import annotations

import json
import os
import socket
import stat
import uuid
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from zope.interface.verify import verifyObject

from tests.shorttmp import short_tmp
from xguard.domain import activefile
from xguard.domain.activefile import Entry
from xguard.domain.site import DomainSite
from xguard.domain.sockets import BACKLOG, SocketRegistry, listen_backlog
from xguard.errors import InvalidPath, InvalidUUID, PathInUse, SocketMismatch
from xguard.interfaces import ISocketRegistry
from xguard.model import Service
from xguard.restart.fdstore import FdStore
from xguard.restart.handover import Handover

VM1 = "6c9d5f3e-8e1a-4a4f-9d63-0a6b4c1f7d21"
VM2 = "0f2a6b1c-3d4e-4f50-8a6b-7c8d9e0f1a2b"
GID = 4242


class Whoami(Resource):
    """Answers every GET with the socket's service and VM."""

    isLeaf = True

    def __init__(self, answer: bytes) -> None:
        super().__init__()
        self.answer = answer

    def render_GET(self, request: object) -> bytes:
        return self.answer


def site_factory(service: Service, vm_uuid: str) -> DomainSite:
    from twisted.internet import reactor
    return DomainSite(Whoami(f"{service.value} {vm_uuid}".encode()), reactor=reactor)


def read_file(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        doc: list[dict[str, Any]] = json.load(f)
    return doc


async def http_get(reactor: Any, path: str) -> bytes:
    """One HTTP/1.0 GET over the socket at ``path``; the whole answer."""

    class Get(Protocol):
        def __init__(self) -> None:
            self.data = b""
            self.done: Deferred[bytes] = Deferred()

        def connectionMade(self) -> None:
            self.transport.write(b"GET / HTTP/1.0\r\n\r\n")

        def dataReceived(self, data: bytes) -> None:
            self.data += data

        def connectionLost(self, reason: object) -> None:
            self.done.callback(self.data)

    proto = Get()
    await connectProtocol(UNIXClientEndpoint(reactor, path, timeout=5), proto)
    return await proto.done


def accepts(path: str) -> bool:
    """Does a listener answer at ``path``? (non-blocking probe)"""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        s.connect(path)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        s.close()
    return True


def stale_socket(path: str) -> None:
    """Leave a socket file nobody listens on (as a crashed daemon does)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()


class HeldRunner:
    """A runner whose blocking calls wait until the test releases them."""

    def __init__(self) -> None:
        self.calls: list[tuple[Deferred[Any], Callable[[], Any]]] = []
        self.count = 0
        self.failing = False

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        self.count += 1
        if f is not activefile.save:
            return succeed(f(*args))
        d: Deferred[Any] = Deferred()
        self.calls.append((d, lambda: f(*args)))
        return d

    def release(self) -> None:
        calls, self.calls = self.calls, []
        for d, run in calls:
            if self.failing:
                d.errback(OSError("disk full"))
            else:
                d.callback(run())


class Env:
    """A short directory for the sockets and the active file; every registry
    made here stops accepting when the test ends (in the order made)."""

    def __init__(self, case: TestCase) -> None:
        self.dir = short_tmp(case)
        self.active = os.path.join(self.dir, "run", "active.json")
        self.forgotten: list[str] = []
        self.registries: list[SocketRegistry] = []
        case.addCleanup(self.stop_accepting)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def registry(self, *, factory: Any = site_factory, **kwargs: Any) -> SocketRegistry:
        from twisted.internet import reactor

        r = SocketRegistry(reactor, self.active, factory,
                           on_forget=self.forgotten.append, **kwargs)
        self.registries.append(r)
        return r

    def stop_accepting(self) -> Deferred[None]:
        async def stop() -> None:
            for r in self.registries:
                await r.stop_accepting()

        return Deferred.fromCoroutine(stop())


class RealSocketTestCase(TestCase):
    """On the real reactor: trial's TestCase runs it for each test."""

    def setUp(self) -> None:
        self.env = Env(self)


# -- create -------------------------------------------------------------------

def queued_connections(path: str, attempts: int) -> int:
    """Open ``attempts`` connections at once while nothing accepts them
    (the reactor does not run during this call); how many the kernel
    queued before refusing with EAGAIN."""
    clients = []
    try:
        for _ in range(attempts):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            clients.append(s)
            s.setblocking(False)
            try:
                s.connect(path)
            except BlockingIOError:
                return len(clients) - 1
        return attempts
    finally:
        for s in clients:
            s.close()


class CreateTests(RealSocketTestCase):
    async def test_default_backlog_absorbs_a_burst_of_connections(self) -> None:
        env = self.env
        # A boot storm: many connections arrive while the reactor is busy; the
        # kernel must queue them (16 refused the 17th with EAGAIN).
        registry = env.registry()
        path = env.path("burst.sock")
        await registry.create(Service.VARSTORED, VM1, GID, path)
        self.assertGreaterEqual(BACKLOG, 128)
        self.assertEqual(queued_connections(path, 128), 128)

    async def test_backlog_is_configurable(self) -> None:
        env = self.env
        registry = env.registry(backlog=4)
        path = env.path("small.sock")
        await registry.create(Service.VARSTORED, VM1, GID, path)
        self.assertIn(queued_connections(path, 50), (4, 5))  # Linux queues backlog + 1


    async def test_create_listens_secures_and_records(self) -> None:
        env = self.env
        from twisted.internet import reactor

        registry = env.registry()
        path = env.path("vtpm.sock")
        await registry.create(Service.SWTPM, VM1, GID, path)
        st = os.stat(path)
        self.assertTrue(stat.S_ISSOCK(st.st_mode))
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o660)
        self.assertEqual((st.st_uid, st.st_gid), (0, GID))
        self.assertEqual(read_file(env.active), [
            {"vm_uuid": VM1, "path": path, "gid": GID, "typ": "Swtpm"}])
        answer = await http_get(reactor, path)
        self.assertTrue(answer.startswith(b"HTTP/1."))
        self.assertTrue(answer.endswith(f"Swtpm {VM1}".encode()))
        self.assertEqual(registry.entries(), [
            {"path": path, "vm_uuid": VM1, "gid": GID, "service": "Swtpm"}])
        self.assertEqual(registry.count_by_service(), {"Swtpm": 1, "Varstored": 0})

    async def test_create_same_path_twice_is_path_in_use(self) -> None:
        env = self.env
        registry = env.registry()
        path = env.path("dup.sock")
        await registry.create(Service.VARSTORED, VM1, GID, path)
        with self.assertRaisesRegex(PathInUse, path):
            await registry.create(Service.SWTPM, VM2, GID, path)
        # The first socket is untouched.
        self.assertTrue(accepts(path))
        self.assertEqual([e["vm_uuid"] for e in registry.entries()], [VM1])
        self.assertEqual(len(read_file(env.active)), 1)

    async def test_create_same_path_concurrently_one_wins(self) -> None:
        env = self.env
        registry = env.registry(runner=HeldRunner())
        path = env.path("race.sock")
        first = registry.create(Service.SWTPM, VM1, GID, path)
        with self.assertRaisesRegex(PathInUse, path):
            await registry.create(Service.SWTPM, VM2, GID, path)
        self.assertFalse(first.called)  # still waiting for its file write

    async def test_live_foreign_listener_is_path_in_use(self) -> None:
        env = self.env
        path = env.path("foreign.sock")
        foreign = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        foreign.bind(path)
        foreign.listen(1)
        try:
            registry = env.registry()
            with self.assertRaisesRegex(PathInUse, path):
                await registry.create(Service.SWTPM, VM1, GID, path)
            self.assertTrue(os.path.exists(path), "a foreign listener's socket file was removed")
            self.assertEqual(registry.entries(), [])
            self.assertFalse(os.path.exists(env.active))
        finally:
            foreign.close()

    async def test_non_socket_file_is_left_alone(self) -> None:
        env = self.env
        path = env.path("plain")
        with open(path, "w") as f:
            f.write("data")
        with self.assertRaisesRegex(PathInUse, path):
            await env.registry().create(Service.SWTPM, VM1, GID, path)
        with open(path) as f:
            self.assertEqual(f.read(), "data")

    async def test_stale_socket_file_is_replaced(self) -> None:
        env = self.env
        from twisted.internet import reactor

        path = env.path("stale.sock")
        stale_socket(path)
        self.assertFalse(accepts(path))
        await env.registry().create(Service.VARSTORED, VM1, GID, path)
        self.assertTrue((await http_get(reactor, path)).endswith(f"Varstored {VM1}".encode()))

    async def test_missing_parent_directory(self) -> None:
        env = self.env
        path = env.path("nodir/x.sock")
        with self.assertRaisesRegex(InvalidPath, "does not exist"):
            await env.registry().create(Service.SWTPM, VM1, GID, path)

    async def test_failed_file_write_undoes_the_socket(self) -> None:
        env = self.env
        runner = HeldRunner()
        registry = env.registry(runner=runner)
        path = env.path("undo.sock")
        d = registry.create(Service.SWTPM, VM1, GID, path)
        runner.failing = True
        runner.release()
        with self.assertRaisesRegex(OSError, "disk full"):
            await d
        self.assertFalse(os.path.exists(path))
        self.assertEqual(registry.entries(), [])
        # The path is free again.
        runner.failing = False
        d = registry.create(Service.SWTPM, VM1, GID, path)
        runner.release()
        await d
        self.assertTrue(accepts(path))

    async def test_concurrent_creates_are_all_recorded(self) -> None:
        env = self.env
        runner = HeldRunner()
        registry = env.registry(runner=runner)
        paths = [env.path(f"c{i}.sock") for i in range(10)]
        creates = [registry.create(Service.SWTPM, VM1, GID, p) for p in paths]
        while runner.calls:
            runner.release()
        for d in creates:
            await d
        self.assertEqual(sorted(e["path"] for e in read_file(env.active)), sorted(paths))
        # The nine creates that waited for the first write shared one rewrite.
        self.assertEqual(runner.count, 2)


# -- destroy ------------------------------------------------------------------

class DestroyTests(RealSocketTestCase):
    async def test_destroy_removes_socket_and_entry(self) -> None:
        env = self.env
        registry = env.registry()
        swtpm, varstored = env.path("t.sock"), env.path("v.sock")
        await registry.create(Service.SWTPM, VM1, GID, swtpm)
        await registry.create(Service.VARSTORED, VM1, GID, varstored)
        await registry.destroy(Service.SWTPM, GID, swtpm)
        self.assertFalse(os.path.exists(swtpm))
        self.assertEqual([e["path"] for e in read_file(env.active)], [varstored])
        self.assertEqual(registry.count_by_service(), {"Swtpm": 0, "Varstored": 1})
        self.assertEqual(env.forgotten, [])  # the VM still has a socket
        await registry.destroy(Service.VARSTORED, GID, varstored)
        self.assertFalse(os.path.exists(varstored))
        self.assertEqual(read_file(env.active), [])
        self.assertEqual(env.forgotten, [VM1])
        # The path can be served again.
        await registry.create(Service.SWTPM, VM2, GID, swtpm)
        self.assertTrue(accepts(swtpm))

    async def test_a_destroy_naming_another_service_or_gid_is_refused(self) -> None:
        """The socket stays, served and recorded: the orchestrator named
        another socket than the one at that path."""
        env = self.env
        registry = env.registry()
        swtpm = env.path("m.sock")
        await registry.create(Service.SWTPM, VM1, GID, swtpm)
        for service, gid in ((Service.VARSTORED, GID), (Service.SWTPM, GID + 1)):
            with self.assertRaises(SocketMismatch) as cm:
                await registry.destroy(service, gid, swtpm)
            self.assertIn(f"serves Swtpm of VM {VM1} with gid {GID}", str(cm.exception))
        self.assertTrue(accepts(swtpm))
        self.assertEqual([e["path"] for e in read_file(env.active)], [swtpm])
        self.assertEqual(env.forgotten, [])

    async def test_an_upper_case_uuid_is_the_same_vm(self) -> None:
        env = self.env
        registry = env.registry()
        await registry.create(Service.SWTPM, VM1.upper(), GID, env.path("u1.sock"))
        await registry.create(Service.VARSTORED, VM1, GID, env.path("u2.sock"))
        self.assertEqual({e["vm_uuid"] for e in read_file(env.active)}, {VM1})
        self.assertEqual(registry.vms(), {VM1})


# -- resume / stop ------------------------------------------------------------

class ResumeTests(RealSocketTestCase):
    async def test_resume_listens_again_and_skips_bad_entries(self) -> None:
        env = self.env
        from twisted.internet import reactor

        fresh, stale, bad = env.path("f.sock"), env.path("s.sock"), env.path("gone/b.sock")
        stale_socket(stale)
        activefile.save(env.active, [
            Entry(VM1, fresh, GID, Service.SWTPM),
            Entry(VM1, bad, GID, Service.SWTPM),
            Entry(VM2, stale, GID + 1, Service.VARSTORED),
        ])
        registry = env.registry()
        with capturedLogs() as events:
            await registry.resume()
        self.assertTrue(any(e["log_level"].name == "error" and e.get("path") == bad
                            for e in events))
        self.assertTrue((await http_get(reactor, fresh)).endswith(f"Swtpm {VM1}".encode()))
        self.assertTrue((await http_get(reactor, stale)).endswith(f"Varstored {VM2}".encode()))
        st = os.stat(stale)
        self.assertEqual((stat.S_IMODE(st.st_mode), st.st_gid), (0o660, GID + 1))
        self.assertEqual([e["path"] for e in read_file(env.active)], [fresh, stale])
        self.assertEqual([e["path"] for e in registry.entries()], [fresh, stale])

    async def test_resume_without_file_is_empty(self) -> None:
        env = self.env
        registry = env.registry()
        await registry.resume()
        self.assertEqual(registry.entries(), [])
        self.assertFalse(os.path.exists(env.active))

    async def test_stop_accepting_keeps_files_and_restart_resumes(self) -> None:
        env = self.env
        from twisted.internet import reactor

        registry = env.registry()
        paths = [env.path("k1.sock"), env.path("k2.sock")]
        for p in paths:
            await registry.create(Service.SWTPM, VM1, GID, p)
        before = read_file(env.active)
        files = {p: os.stat(p).st_ino for p in paths}
        await registry.stop_accepting()
        for p in paths:
            st = os.stat(p)
            self.assertTrue(stat.S_ISSOCK(st.st_mode))
            self.assertEqual(stat.S_IMODE(st.st_mode), 0o660)
            self.assertEqual(st.st_ino, files[p])  # the same file, kept
            self.assertFalse(accepts(p))
        self.assertEqual(read_file(env.active), before)
        with self.assertRaises(RuntimeError):
            await registry.create(Service.SWTPM, VM2, GID, env.path("late.sock"))
        # The restart.
        again = env.registry()
        await again.resume()
        for p in paths:
            self.assertTrue((await http_get(reactor, p)).endswith(f"Swtpm {VM1}".encode()))
        self.assertEqual(read_file(env.active), before)


# -- synchronous ---------------------------------------------------------------

class SynchronousTests(SynchronousTestCase):
    """What needs no listening socket (the reactor is never touched)."""

    def setUp(self) -> None:
        self.registry = SocketRegistry(object(), "/nonexistent/active.json", site_factory)

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(ISocketRegistry, self.registry))

    def test_invalid_uuid(self) -> None:
        f = self.failureResultOf(self.registry.create(Service.SWTPM, "nope", GID, "/x/a.sock"),
                                 InvalidUUID)
        self.assertIn("'nope'", str(f.value))

    def test_relative_path(self) -> None:
        f = self.failureResultOf(self.registry.create(Service.SWTPM, VM1, GID, "x/a.sock"),
                                 InvalidPath)
        self.assertIn("x/a.sock", str(f.value))

    def test_too_long_path(self) -> None:
        self.failureResultOf(self.registry.create(Service.SWTPM, VM1, GID, "/" + "x" * 200),
                             InvalidPath)

    def test_bad_gid(self) -> None:
        for gid in (-1, "5", True):
            self.failureResultOf(self.registry.create(Service.SWTPM, VM1, gid, "/x/a.sock"),
                                 ValueError)

    def test_destroy_unknown_succeeds_with_warning(self) -> None:
        with capturedLogs() as events:
            self.successResultOf(self.registry.destroy(Service.SWTPM, GID, "/x/none.sock"))
        self.assertEqual([e["log_level"].name for e in events], ["warn"])

    def test_backlog_is_capped_by_somaxconn(self) -> None:
        self.assertEqual(listen_backlog(10**9), socket.SOMAXCONN)
        self.assertEqual(listen_backlog(0), 1)
        self.assertEqual(listen_backlog(300), min(300, socket.SOMAXCONN))

    def test_listen_backlog_option(self) -> None:
        from twisted.python.usage import UsageError

        from xguard.tap import Options

        options = Options()
        options.parseOptions([])
        self.assertEqual(options.config.listen_backlog, 128)
        options = Options()
        options.parseOptions(["--listen-backlog", "2048"])
        self.assertEqual(options.config.listen_backlog, 2048)
        for bad in ("x", "0"):
            self.assertRaises(UsageError, Options().parseOptions, ["--listen-backlog", bad])

    def test_nothing_listed_initially(self) -> None:
        self.assertEqual(self.registry.entries(), [])
        self.assertEqual(self.registry.count_by_service(), {"Swtpm": 0, "Varstored": 0})

    def test_resume_fails_when_the_file_cannot_be_read(self) -> None:
        registry = SocketRegistry(object(), "/x/active.json", site_factory,
                                  runner=lambda f, *a: fail(OSError("EIO")))
        self.failureResultOf(registry.resume(), OSError)


# -- handover (issue 12) --------------------------------------------------------

def handed(pairs: list[tuple[str, int]]) -> Callable[[], list[Any]]:
    """What a re-exec hands the next image: duplicates of the descriptors
    (the old process's own are closed, as exec would close them)."""
    from xguard.restart.listenfds import Passed

    passed = [Passed(os.dup(fd), name) for name, fd in pairs]
    return lambda: passed


def successor(env: Env, pairs: list[tuple[str, int]], **kwargs: Any) -> SocketRegistry:
    handover = Handover(FdStore(Clock(), environ={}), take=handed(pairs))
    handover.inherit()
    return env.registry(handover=handover, **kwargs)


def predecessor(env: Env, **kwargs: Any) -> tuple[SocketRegistry, Any]:
    handover = Handover(FdStore(Clock(), environ={}), take=list)
    handover.reexec_pending = True  # a successor takes the sockets
    return env.registry(handover=handover, **kwargs), handover


def old_process_exits(old: SocketRegistry, pairs: list[tuple[str, int]]) -> None:
    """What the old process's exit does to what it handed over: its
    descriptors closed, its registry gone."""
    for _, fd in pairs:
        os.close(fd)
    old._sockets.clear()


def connect_and_send(path: str) -> socket.socket:
    """A client that connects and sends its request at once (varstored)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)  # raises if refused: the test fails
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    return s


def answer_of(s: socket.socket) -> bytes:
    s.setblocking(True)
    s.settimeout(10)
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    s.close()
    return data


class HandoverTests(RealSocketTestCase):
    async def test_handover_keeps_sockets_and_the_successor_serves_the_backlog(self) -> None:
        env = self.env
        from twisted.internet import reactor, threads

        old, _ = predecessor(env)
        paths = [env.path("h1.sock"), env.path("h2.sock")]
        await old.create(Service.SWTPM, VM1, GID, paths[0])
        await old.create(Service.VARSTORED, VM2, GID + 1, paths[1])
        await old.stop_accepting()
        await old.wait_closed()
        pairs = old.handed_over()
        self.assertEqual(sorted(n.startswith("xgd-") for n, _ in pairs), [True, True])
        # Between the two processes: files kept, connections wait in the backlog.
        waiting = [connect_and_send(p) for p in paths]
        for p in paths:
            self.assertTrue(stat.S_ISSOCK(os.stat(p).st_mode))
        new = successor(env, pairs)
        old_process_exits(old, pairs)
        with capturedLogs() as events:
            await new.resume()
        answers = await gatherResults([threads.deferToThread(answer_of, s) for s in waiting])
        self.assertTrue(answers[0].endswith(f"Swtpm {VM1}".encode()))
        self.assertTrue(answers[1].endswith(f"Varstored {VM2}".encode()))
        self.assertEqual([e["adopted"] for e in events if "adopted" in e], [2])
        self.assertFalse([e for e in events if e["log_level"].name in ("warn", "error")])
        st = os.stat(paths[1])
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o660)
        self.assertTrue((await http_get(reactor, paths[0])).endswith(f"Swtpm {VM1}".encode()))
        self.assertEqual(queued_connections(paths[0], 128), 128)  # --listen-backlog kept

    async def test_handover_file_is_the_truth(self) -> None:
        """A socket destroyed during the handover listens afresh; one whose
        entry left the file is closed (its file left, refusing); a stale
        descriptor and a foreign socket are closed; one log line each."""
        env = self.env
        from twisted.internet import reactor

        old, _ = predecessor(env)
        kept, gone, dropped = env.path("k.sock"), env.path("g.sock"), env.path("d.sock")
        for p in (kept, gone, dropped):
            await old.create(Service.SWTPM, VM1, GID, p)
        await old.stop_accepting()
        pairs = old.handed_over()
        os.unlink(gone)  # destroyed behind our back during the handover
        activefile.save(env.active, [e for e in activefile.load(env.active) if e.path != dropped])
        foreign = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        foreign.bind(env.path("f.sock"))
        foreign.listen(1)
        r, w = os.pipe()
        os.close(w)
        with capturedLogs() as events:
            new = successor(env, [*pairs, ("xgd-1-2-3", r), ("foreign", foreign.fileno())])
            old_process_exits(old, pairs)
            foreign.close()
            os.close(r)
            await new.resume()
        warned = {e.get("path"): e["reason"] for e in events if e["log_level"].name == "warn"}
        self.assertEqual(warned, {gone: "its socket file is gone",
                          dropped: "not in the active sockets file",
                          "no path": "not a socket",
                          env.path("f.sock"): "not in the active sockets file"})
        self.assertTrue((await http_get(reactor, kept)).endswith(f"Swtpm {VM1}".encode()))
        self.assertTrue((await http_get(reactor, gone)).endswith(f"Swtpm {VM1}".encode()))  # afresh
        self.assertTrue(os.path.exists(dropped))
        self.assertFalse(accepts(dropped))
        self.assertEqual(sorted(e["path"] for e in new.entries()), sorted([kept, gone]))

    async def test_handover_of_a_socket_replaced_during_it(self) -> None:
        env = self.env
        old, _ = predecessor(env)
        path = env.path("r.sock")
        await old.create(Service.SWTPM, VM1, GID, path)
        await old.stop_accepting()
        pairs = old.handed_over()
        os.unlink(path)
        stale_socket(path)  # someone else's file at the path now
        new = successor(env, pairs)
        old_process_exits(old, pairs)
        with capturedLogs() as events:
            await new.resume()
        self.assertEqual([e["reason"] for e in events if e["log_level"].name == "warn"], [
            "its socket file was replaced"])
        self.assertTrue(accepts(path))

    async def test_stop_without_successor_closes_and_keeps_files(self) -> None:
        env = self.env
        registry = env.registry(handover=Handover(FdStore(Clock(), environ={}), take=list))
        path = env.path("c.sock")
        await registry.create(Service.SWTPM, VM1, GID, path)
        await registry.stop_accepting()
        self.assertEqual(registry.handed_over(), [])
        self.assertFalse(accepts(path))
        self.assertTrue(os.path.exists(path))

    async def test_sockets_go_to_the_fd_store_and_leave_it_when_destroyed(self) -> None:
        env = self.env
        from twisted.internet import reactor

        from xguard.testing.fakesystemd import receive

        manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        manager.bind(env.path("notify"))
        store = FdStore(reactor, environ={"NOTIFY_SOCKET": env.path("notify")})
        registry = env.registry(handover=Handover(store, take=list))
        path = env.path("s.sock")
        await registry.create(Service.SWTPM, VM1, GID, path)
        stored = receive(manager, 5)
        (fd,) = stored.fds
        with socket.socket(fileno=fd) as copy:
            self.assertEqual(copy.getsockname(), path)
        name = stored.fields["FDNAME"]
        self.assertTrue(name.startswith("xgd-"))
        self.assertNotEqual(str(os.stat(path).st_ino), name)  # hex inode
        await registry.destroy(Service.SWTPM, GID, path)
        self.assertEqual(receive(manager, 5).fields, {"FDSTOREREMOVE": "1", "FDNAME": name})
        manager.close()

    async def test_sockets_with_clients_waiting_are_adopted_first(self) -> None:
        env = self.env
        old, _ = predecessor(env)
        paths = [env.path(f"o{i}.sock") for i in range(4)]
        vms = [str(uuid.uuid4()) for _ in paths]  # each socket's own VM, to tell them apart
        for p, vm in zip(paths, vms):
            await old.create(Service.SWTPM, vm, GID, p)
        await old.stop_accepting()
        pairs = old.handed_over()
        waiting = connect_and_send(paths[2])  # a VM writing during the restart
        served: list[str] = []  # the VM of each socket, in the order served

        def factory(service: Service, vm: str) -> Any:
            served.append(vm)
            return site_factory(service, vm)

        new = successor(env, pairs, factory=factory)
        old_process_exits(old, pairs)
        await new.resume()
        self.assertEqual(served[0], vms[2])
        self.assertEqual(sorted(served), sorted(vms))
        self.assertEqual([e["path"] for e in new.entries()], paths)  # the file's order is kept
        waiting.close()
