"""The control channel's responders, driven through real AMP protocols over
an in-memory connection (xguard.control.server, xguard.control.commands)."""

from __future__ import annotations

import json
import shutil
import tempfile
from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.logger import Logger, formatEvent
from twisted.protocols import amp
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.fakes import FakeUpstream, some_status, sync_runner
from xguard.control.commands import (
    ControlError,
    ListSockets,
    RemotePermanentUpstreamError,
    Status,
    VarstoreCreate,
    VarstoreDestroy,
    VtpmCreate,
    VtpmDestroy,
    VtpmGetContents,
    VtpmSetContents,
    error_code,
)
from xguard.control.server import ControlLocator, control_endpoint, control_factory
from xguard.errors import (
    InvalidContents,
    InvalidGid,
    InvalidPath,
    InvalidUUID,
    PathInUse,
    PermanentUpstreamError,
    TransientUpstreamError,
)
from xguard.interfaces import ISocketRegistry
from xguard.model import Service
from xguard.state.contents import VtpmContents
from xguard.state.direct import DirectWriter
from xguard.state.known import KnownState
from xguard.state.sinks import VtpmSink
from xguard.status import CacheStatus, from_json, to_json
from xguard.util.locks import KeyedLocks

VM = "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0"
VM2 = "11111111-2222-3333-4444-555555555555"
MiB = 1024 * 1024


@implementer(ISocketRegistry)
class MemoryRegistry:
    """An ISocketRegistry keeping its sockets in a dict (no listening)."""

    def __init__(self) -> None:
        self.sockets: dict[str, dict[str, Any]] = {}
        self.failure: Exception | None = None
        self.warnings: list[str] = []

    def create(self, service: Service, vm_uuid: str, gid: int, path: str) -> "Deferred[None]":
        if self.failure is not None:
            return fail(self.failure)
        if path in self.sockets:
            return fail(PathInUse(f"{path} is already served"))
        self.sockets[path] = {"path": path, "vm_uuid": vm_uuid, "gid": gid, "service": service}
        return succeed(None)

    def destroy(self, service: Service, gid: int, path: str) -> "Deferred[None]":
        if self.sockets.pop(path, None) is None:
            self.warnings.append(path)
        return succeed(None)

    def entries(self) -> list[dict[str, Any]]:
        return list(self.sockets.values())

    def resume(self) -> "Deferred[None]":
        return succeed(None)

    def stop_accepting(self) -> "Deferred[None]":
        return succeed(None)


class ControlTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.registry = MemoryRegistry()
        self.clock = Clock()
        self.upstream = FakeUpstream(self.clock)
        self.vtpm = self.upstream.add_vm(VM)
        root = tempfile.mkdtemp(prefix="xgk")
        self.addCleanup(shutil.rmtree, root, True)
        live = lambda vm: any(s["vm_uuid"] == vm for s in self.registry.sockets.values())  # noqa: E731
        known = KnownState(root, runner=sync_runner, is_live=live, boot_id=lambda: "b")
        known.open()
        self.sink = VtpmSink(self.upstream, KeyedLocks(), known)
        self.vtpms = VtpmContents(self.sink, DirectWriter(self.sink), known,
                                  candidates=lambda: [s["vm_uuid"] for s in
                                                      self.registry.sockets.values()],
                                  clock=self.clock, deadline=3.0)
        self.status = some_status(Swtpm=1)
        self.events: list[dict[str, Any]] = []
        factory = control_factory(self.registry, self.vtpms, lambda: self.status)
        self.locator: ControlLocator = factory.locator  # type: ignore[attr-defined]
        self.locator.log = Logger(observer=self.events.append)
        self.client, self.server, self.pump = iosim.connectedServerAndClient(
            lambda: factory.buildProtocol(None), amp.AMP)

    def call(self, command: type[amp.Command], **kw: Any) -> "Deferred[Any]":
        # AMP hands an error nobody handles yet to unhandledError (and drops
        # the connection), so take the outcome before any answer can arrive.
        outcome: Deferred[Any] = Deferred()
        self.client.callRemote(command, **kw).chainDeferred(outcome)
        self.pump.flush()
        return outcome

    def ok(self, command: type[amp.Command], **kw: Any) -> Any:
        return self.successResultOf(self.call(command, **kw))

    def error(self, command: type[amp.Command], exc: type[Exception], **kw: Any) -> Exception:
        return self.failureResultOf(self.call(command, **kw), exc).value

    def logged(self) -> str:
        return "\n".join(formatEvent(e) for e in self.events)


class RegistryTests(ControlTestCase):
    def test_fake_registry_provides_interface(self) -> None:
        self.assertTrue(verifyObject(ISocketRegistry, self.registry))

    def test_varstore_create(self) -> None:
        self.assertEqual(self.ok(VarstoreCreate, dbg="d1", vm_uuid=VM, gid=107,
                                 path="/run/xen/varstored-root-1/sock"), {})
        self.assertEqual(self.registry.sockets["/run/xen/varstored-root-1/sock"],
                         {"path": "/run/xen/varstored-root-1/sock", "vm_uuid": VM, "gid": 107,
                          "service": Service.VARSTORED})

    def test_vtpm_create(self) -> None:
        self.ok(VtpmCreate, dbg="d1", vm_uuid=VM, gid=108, path="/run/xen/swtpm-1/sock")
        self.assertIs(self.registry.sockets["/run/xen/swtpm-1/sock"]["service"], Service.SWTPM)

    def test_destroy(self) -> None:
        self.ok(VarstoreCreate, dbg="d", vm_uuid=VM, gid=1, path="/a")
        self.ok(VtpmCreate, dbg="d", vm_uuid=VM, gid=1, path="/b")
        self.ok(VarstoreDestroy, dbg="d", gid=1, path="/a")
        self.ok(VtpmDestroy, dbg="d", gid=1, path="/b")
        self.assertEqual(self.registry.sockets, {})

    def test_destroy_unknown_path_succeeds(self) -> None:
        self.ok(VtpmDestroy, dbg="d", gid=1, path="/nowhere")
        self.assertEqual(self.registry.warnings, ["/nowhere"])

    def test_path_in_use_names_the_path(self) -> None:
        self.ok(VarstoreCreate, dbg="d", vm_uuid=VM, gid=1, path="/run/x/sock")
        e = self.error(VtpmCreate, PathInUse, dbg="d", vm_uuid=VM2, gid=1, path="/run/x/sock")
        self.assertIn("/run/x/sock", str(e))
        self.assertEqual(error_code(e), "PATH_IN_USE")
        self.assertEqual(self.registry.sockets["/run/x/sock"]["vm_uuid"], VM)

    def test_path_in_use_without_path_in_message_gets_it(self) -> None:
        self.registry.failure = PathInUse("address already in use")
        e = self.error(VtpmCreate, PathInUse, dbg="d", vm_uuid=VM, gid=1, path="/run/y")
        self.assertIn("/run/y", str(e))
        self.assertIn("address already in use", str(e))

    def test_invalid_vm_uuid(self) -> None:
        for bad in ["not-a-uuid", VM.replace("-", ""), "{" + VM + "}", ""]:
            e = self.error(VarstoreCreate, InvalidUUID, dbg="d", vm_uuid=bad, gid=1, path="/p")
            self.assertIn(repr(bad), str(e))
        self.assertEqual(self.registry.sockets, {})

    def test_upper_case_uuids_are_one_vm(self) -> None:
        """xapi's uuids are lower case: an upper-case one names the same VM
        (it used to become a second identity whose reads failed)."""
        self.ok(VtpmCreate, dbg="d", vm_uuid=VM.upper(), gid=5, path="/run/t.sock")
        self.assertEqual(self.registry.sockets["/run/t.sock"]["vm_uuid"], VM)

    def test_a_gid_out_of_range_is_a_clear_error(self) -> None:
        for gid in (99999999999, 2**32 - 1, -1):
            e = self.error(VarstoreCreate, InvalidGid, dbg="d", vm_uuid=VM, gid=gid,
                           path="/run/v.sock")
            self.assertIn(str(gid), str(e))
        self.assertEqual(self.registry.sockets, {})
        self.assertNotIn("Traceback", self.logged())

    def test_relative_path(self) -> None:
        e = self.error(VtpmCreate, InvalidPath, dbg="d", vm_uuid=VM, gid=1, path="run/sock")
        self.assertIn("run/sock", str(e))
        self.error(VarstoreDestroy, InvalidPath, dbg="d", gid=1, path="")
        self.assertEqual(self.registry.sockets, {})

    def test_unexpected_error_is_reported_and_connection_survives(self) -> None:
        self.registry.failure = PermissionError(1, "Operation not permitted")
        e = self.error(VtpmCreate, ControlError, dbg="d", vm_uuid=VM, gid=1, path="/p")
        self.assertIn("Operation not permitted", str(e))
        self.assertEqual(error_code(e), "INTERNAL_ERROR")
        self.registry.failure = None
        self.ok(VtpmCreate, dbg="d", vm_uuid=VM, gid=1, path="/p")

    def test_upstream_error_from_registry(self) -> None:
        self.registry.failure = TransientUpstreamError(["CONNECTION_REFUSED"])
        e = self.error(VtpmCreate, TransientUpstreamError, dbg="d", vm_uuid=VM, gid=1, path="/p")
        self.assertEqual(e.codes, ["CONNECTION_REFUSED"])  # type: ignore[attr-defined]

    def test_operations_logged_with_dbg(self) -> None:
        self.ok(VtpmCreate, dbg="task-42", vm_uuid=VM, gid=1, path="/p")
        self.assertIn("task-42", self.logged())
        self.assertIn("/p", self.logged())

    def test_list_sockets(self) -> None:
        self.assertEqual(self.ok(ListSockets), {"sockets": []})
        self.ok(VarstoreCreate, dbg="d", vm_uuid=VM, gid=5, path="/a")
        self.ok(VtpmCreate, dbg="d", vm_uuid=VM2, gid=6, path="/b")
        self.assertEqual(self.ok(ListSockets)["sockets"], [
            {"path": "/a", "vm_uuid": VM, "gid": 5, "service": "Varstored"},
            {"path": "/b", "vm_uuid": VM2, "gid": 6, "service": "Swtpm"},
        ])

    def test_list_thousands_of_sockets(self) -> None:
        for i in range(2000):
            self.registry.sockets[f"/run/xen/vm-{i}/sock"] = {
                "path": f"/run/xen/vm-{i}/sock", "vm_uuid": VM, "gid": i,
                "service": Service.SWTPM}
        self.assertEqual(len(self.ok(ListSockets)["sockets"]), 2000)


class StatusTests(ControlTestCase):
    def test_status_is_json(self) -> None:
        answer = self.ok(Status)
        self.assertEqual(json.loads(answer["status"]), to_json(self.status))
        self.assertEqual(from_json(json.loads(answer["status"])), self.status)

    def test_big_status(self) -> None:
        self.status = attrs.evolve(self.status, services={"Swtpm": CacheStatus(
            service="Swtpm", pending={f"vm-{i}": i for i in range(10000)})})
        self.assertEqual(from_json(json.loads(self.ok(Status)["status"])), self.status)

    def test_status_failure(self) -> None:
        def broken() -> dict[str, Any]:
            raise RuntimeError("boom")
        self.locator.status = broken
        self.assertIn("boom", str(self.error(Status, ControlError)))


class ContentsTests(ControlTestCase):
    def test_set_then_get(self) -> None:
        self.ok(VtpmSetContents, dbg="d", vtpm_uuid=self.vtpm, contents="AAAA BBBB CCCC")
        self.assertEqual(self.upstream.vtpms[self.vtpm], "AAAA BBBB CCCC")
        self.assertEqual(self.ok(VtpmGetContents, dbg="d", vtpm_uuid=self.vtpm),
                         {"contents": "AAAA BBBB CCCC"})

    def test_four_mib_both_ways(self) -> None:
        contents = ("QUJD" * MiB) + " " + ("ZGVm" * 10) + " "
        self.ok(VtpmSetContents, dbg="d", vtpm_uuid=self.vtpm, contents=contents)
        self.assertEqual(self.upstream.vtpms[self.vtpm], contents)
        self.upstream.vtpms[self.vtpm] = contents[::-1]
        got = self.ok(VtpmGetContents, dbg="d", vtpm_uuid=self.vtpm)["contents"]
        self.assertEqual(got, contents[::-1])

    def test_contents_never_logged(self) -> None:
        secret = "U2VjcmV0VFBNc3RhdGU" * 10
        self.ok(VtpmSetContents, dbg="d", vtpm_uuid=self.vtpm, contents=secret)
        self.ok(VtpmGetContents, dbg="d", vtpm_uuid=self.vtpm)
        self.assertNotIn(secret, self.logged())
        self.assertNotIn(secret, repr(self.events))
        self.assertIn(str(len(secret)), self.logged())

    def test_invalid_vtpm_uuid(self) -> None:
        self.error(VtpmSetContents, InvalidUUID, dbg="d", vtpm_uuid="x", contents="")
        self.error(VtpmGetContents, InvalidUUID, dbg="d", vtpm_uuid="x")
        self.assertEqual(self.upstream.calls, [])

    def test_unknown_vtpm(self) -> None:
        e = self.error(VtpmGetContents, PermanentUpstreamError, dbg="d", vtpm_uuid=VM2)
        self.assertIsInstance(e, RemotePermanentUpstreamError)
        self.assertEqual(e.codes, ["UUID_INVALID", "VTPM", VM2])  # type: ignore[attr-defined]
        self.assertEqual(error_code(e), "UPSTREAM_ERROR")

    def test_upstream_down(self) -> None:
        self.upstream.down = True
        e = self.error(VtpmSetContents, TransientUpstreamError, dbg="d", vtpm_uuid=self.vtpm,
                       contents="A")
        self.assertEqual(error_code(e), "UPSTREAM_UNAVAILABLE")

    def test_invalid_contents(self) -> None:
        for bad in ("A B", "A B C D", "caf\u00e9"):
            e = self.error(VtpmSetContents, InvalidContents, dbg="d", vtpm_uuid=self.vtpm,
                           contents=bad)
            self.assertEqual(error_code(e), "INVALID_CONTENTS")
        self.assertEqual(self.upstream.count("set_vtpm_contents"), 0)

    def test_set_of_a_served_vm_goes_through_its_writer(self) -> None:
        """Once the vTPM is known to belong to a VM with a socket, a set is
        that VM's write of the three keys (here the no-cache writer)."""
        self.ok(VtpmCreate, dbg="d", vm_uuid=VM, gid=1, path="/b")
        self.ok(VtpmSetContents, dbg="d", vtpm_uuid=self.vtpm, contents="P")
        self.assertEqual(self.upstream.vtpms[self.vtpm], "P")
        # The whole state replaces upstream's: nothing to read first.
        self.assertEqual(self.upstream.count("get_vtpm_contents"), 0)

    def test_set_waits_for_a_domain_read_modify_write(self) -> None:
        """A control write issued while a domain socket's (or the flusher's)
        read-modify-write holds the vTPM lock runs after it, so it wins."""
        self.ok(VtpmCreate, dbg="d", vm_uuid=VM, gid=1, path="/b")
        self.upstream.vtpms[self.vtpm] = "OLD"
        self.upstream.hold = True
        delivered = self.sink.deliver(VM, {1: b"SAVE"})
        self.upstream.release()  # vtpm_for_vm; the RMW now holds the lock, reading
        self.assertTrue(self.sink.locks.locked(self.sink.lock_key(self.vtpm)))
        d = self.call(VtpmSetContents, dbg="d", vtpm_uuid=self.vtpm, contents="NEW")
        self.assertNoResult(d)
        for _ in range(10):
            self.upstream.release()
            self.pump.flush()
        self.successResultOf(delivered)
        self.successResultOf(d)
        writes = [args[1] for name, args in self.upstream.calls if name == "set_vtpm_contents"]
        self.assertEqual(writes, ["OLD SAVE ", "NEW"])
        self.assertEqual(self.upstream.vtpms[self.vtpm], "NEW")

    def test_get_waits_for_the_lock(self) -> None:
        self.ok(VtpmCreate, dbg="d", vm_uuid=VM, gid=1, path="/b")
        self.upstream.vtpms[self.vtpm] = "OLD"
        self.upstream.hold = True
        delivered = self.sink.deliver(VM, {0: b"P"})
        self.upstream.release()
        d = self.call(VtpmGetContents, dbg="d", vtpm_uuid=self.vtpm)
        self.assertNoResult(d)
        for _ in range(10):
            self.upstream.release()
            self.pump.flush()
        self.successResultOf(delivered)
        self.assertEqual(self.successResultOf(d), {"contents": "P"})
        reads = [n for n, _ in self.upstream.calls if n in ("get_vtpm_contents",
                                                             "set_vtpm_contents")]
        self.assertEqual(reads, ["get_vtpm_contents", "set_vtpm_contents", "get_vtpm_contents"])


class EndpointTests(SynchronousTestCase):
    def test_unix_control_socket_is_root_only(self) -> None:
        reactor = MemoryReactor()
        control_endpoint(reactor, "unix:/run/xguard/control.sock").listen(amp.AMP)
        (address, _, _, mode, _), = reactor.unixServers
        self.assertEqual((address, mode), ("/run/xguard/control.sock", 0o600))

    def test_explicit_mode_kept(self) -> None:
        reactor = MemoryReactor()
        control_endpoint(reactor, "unix:/s:mode=660").listen(amp.AMP)
        self.assertEqual(reactor.unixServers[0][3], 0o660)

    def test_tcp_untouched(self) -> None:
        reactor = MemoryReactor()
        control_endpoint(reactor, "tcp:0:interface=127.0.0.1").listen(amp.AMP)
        self.assertEqual(len(reactor.tcpServers), 1)
