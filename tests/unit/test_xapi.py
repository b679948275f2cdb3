"""XapiUpstream against a small in-memory xapi (a twisted.web resource
speaking JSON-RPC), driven synchronously through treq's
RequestTraversalAgent; timeouts run on a Clock."""

from __future__ import annotations

import itertools
import json
from typing import Any

from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface.verify import verifyObject

from xguard.errors import NoVtpm, PermanentUpstreamError, TransientUpstreamError
from xguard.interfaces import IUpstream
from xguard.upstream.agent import make_client, make_pool, parse_endpoint
from xguard.upstream.xapi import NoHandleCache, XapiUpstream, xapi_upstream

VM = "3f1b4a3e-8a6f-4c47-9d5c-6c1a7f0f2a11"
VM2 = "0d4a1f9e-1111-4c47-9d5c-6c1a7f0f2a22"
VTPM = "8c2d5e7a-2222-4b1e-8f3a-9a0b1c2d3e44"


class FakeXapi(Resource):
    """Just enough xapi: sessions, VMs, vTPMs, NVRAM, messages, and
    scriptable faults (``script`` entries are consumed one per request)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self._refs = itertools.count(1)
        self.sessions: set[str] = set()
        self.reject_sessions = False
        self.calls: list[tuple[str, list[Any]]] = []
        self.script: list[tuple[Any, ...]] = []  # (kind, arg[, method])
        self.later: list[tuple[Any, ...]] = []
        self.held: list[Request] = []
        self.vms: dict[str, dict[str, Any]] = {}  # ref -> record
        self.vtpms: dict[str, dict[str, Any]] = {}  # ref -> record
        self.messages: list[list[Any]] = []

    def ref(self, kind: str) -> str:
        return f"OpaqueRef:{kind}-{next(self._refs)}"

    def add_vm(self, uuid: str, vtpm_uuid: str | None = None) -> None:
        vtpms = []
        if vtpm_uuid:
            vref = self.ref("vtpm")
            self.vtpms[vref] = {"uuid": vtpm_uuid, "contents": ""}
            vtpms.append(vref)
        self.vms[self.ref("vm")] = {"uuid": uuid, "vtpms": vtpms, "nvram": {}, "sb": "ok"}

    def rename_refs(self) -> None:
        """New references for everything (as after a VM migration)."""
        self.vms = {self.ref("vm"): r for r in self.vms.values()}
        old = self.vtpms
        self.vtpms = {}
        mapping = {}
        for oref, r in old.items():
            mapping[oref] = self.ref("vtpm")
            self.vtpms[mapping[oref]] = r
        for r in self.vms.values():
            r["vtpms"] = [mapping[v] for v in r["vtpms"]]

    def count(self, method: str) -> int:
        return sum(1 for m, _ in self.calls if m == method)

    def render_POST(self, request: Request) -> Any:
        call = json.loads(request.content.read())
        method, params, call_id = call["method"], call["params"], call["id"]
        self.calls.append((method, params))
        step = next((s for s in self.script if len(s) == 2 or s[2] == method), None)
        if step is not None:
            self.script.remove(step)
            kind, arg = step[:2]
            if kind == "http":
                request.setResponseCode(arg)
                return b"oops"
            if kind == "garbage":
                return b"<html>not json"
            if kind == "hang":
                self.held.append(request)
                return NOT_DONE_YET
            if kind == "drop":
                request.channel.transport.loseConnection()
                return NOT_DONE_YET
            if kind == "partial":
                request.setHeader(b"content-length", b"100")
                request.write(b'{"jsonrpc"')
                self.held.append(request)
                return NOT_DONE_YET
            if kind == "error":
                return self._answer(call_id, error=arg)
            if kind == "later":  # answered normally by answer_later()
                self.later.append((request, method, params, call_id))
                return NOT_DONE_YET
        try:
            result = self.dispatch(method, params)
        except XapiError as e:
            return self._answer(call_id, error=e.codes)
        return self._answer(call_id, result=result)

    def answer_later(self) -> None:
        later, self.later = self.later, []
        for request, method, params, call_id in later:
            request.write(self._answer(call_id, result=self.dispatch(method, params)))
            request.finish()

    def _answer(self, call_id: int, *, result: Any = None, error: list[str] | None = None) -> bytes:
        doc: dict[str, Any] = {"jsonrpc": "2.0", "id": call_id}
        if error is None:
            doc["result"] = result
        else:
            doc["error"] = {"code": 1, "message": error[0], "data": error[1:]}
        return json.dumps(doc).encode()

    def dispatch(self, method: str, params: list[Any]) -> Any:
        if method == "session.login_with_password":
            if len(params) != 4:
                raise XapiError(["MESSAGE_PARAMETER_COUNT_MISMATCH", method, "4", str(len(params))])
            s = self.ref("session")
            self.sessions.add(s)
            return s
        if not params or params[0] not in self.sessions or self.reject_sessions:
            raise XapiError(["SESSION_INVALID", str(params[:1])])
        args = params[1:]
        if method == "VM.get_by_uuid":
            for ref, r in self.vms.items():
                if r["uuid"] == args[0]:
                    return ref
            raise XapiError(["UUID_INVALID", "VM", args[0]])
        if method == "VTPM.get_by_uuid":
            for ref, r in self.vtpms.items():
                if r["uuid"] == args[0]:
                    return ref
            raise XapiError(["UUID_INVALID", "VTPM", args[0]])
        if method == "message.create":
            self.messages.append(args)
            return self.ref("message")
        if method.startswith("VM."):
            vm = self._get(self.vms, args[0])
            if method == "VM.get_VTPMs":
                return vm["vtpms"]
            if method == "VM.get_NVRAM":
                return vm["nvram"]
            if method == "VM.get_secureboot_certificates_state":
                return vm["sb"]
            if method == "VM.set_NVRAM_EFI_variables":
                vm["nvram"]["EFI-variables"] = args[1]
                vm["update"] = args[2] if len(args) > 2 else None
                return ""
        if method.startswith("VTPM."):
            vtpm = self._get(self.vtpms, args[0])
            if method == "VTPM.get_uuid":
                return vtpm["uuid"]
            if method == "VTPM.get_contents":
                return vtpm["contents"]
            if method == "VTPM.set_contents":
                vtpm["contents"] = args[1]
                return ""
        raise XapiError(["MESSAGE_METHOD_UNKNOWN", method])

    @staticmethod
    def _get(table: dict[str, Any], ref: str) -> Any:
        if ref not in table:
            raise XapiError(["HANDLE_INVALID", "VM", ref])
        return table[ref]


class XapiError(Exception):
    def __init__(self, codes: list[str]) -> None:
        self.codes = codes


class XapiUpstreamTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.xapi = FakeXapi()
        self.xapi.add_vm(VM, VTPM)
        self.xapi.add_vm(VM2)
        self.agent = RequestTraversalAgent(self.xapi)
        self.clock = Clock()
        self.up = XapiUpstream(self.clock, HTTPClient(self.agent), "http://xapi/jsonrpc",
                               timeout=10)
        self.addCleanup(self.no_call_timers)

    def no_call_timers(self) -> None:
        """No call left a timer behind (reachability's own timer aside)."""
        self.up.reachability.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def failure_codes(self, d: Any, kind: type) -> list[str]:
        return self.failureResultOf(d, kind).value.codes

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IUpstream, self.up))
        self.assertEqual(self.up.status().reachable, None)

    def test_login_once_and_reuse(self) -> None:
        self.assertEqual(self.successResultOf(self.up.get_nvram(VM)), {})
        self.successResultOf(self.up.get_secureboot_certificates_state(VM))
        self.successResultOf(self.up.create_message(VM, "VM_SECURE_BOOT_FAILED", 1, "x"))
        self.assertEqual(self.xapi.count("session.login_with_password"), 1)
        login = self.xapi.calls[0][1]
        self.assertEqual(login, ["root", "", "2.21", "xguard"])
        status = self.up.status()
        self.assertEqual((status.kind, status.reachable), ("xapi", True))

    def test_concurrent_callers_share_one_login(self) -> None:
        self.xapi.script = [("hang", None)]
        d1 = self.up.get_nvram(VM)
        d2 = self.up.get_nvram(VM)
        self.assertNoResult(d1)
        self.assertEqual(self.xapi.count("session.login_with_password"), 1)
        held = self.xapi.held.pop()
        s = self.xapi.ref("session")
        self.xapi.sessions.add(s)
        held.write(json.dumps({"jsonrpc": "2.0", "id": 1, "result": s}).encode())
        held.finish()
        self.agent.flush()
        self.assertEqual(self.successResultOf(d1), {})
        self.assertEqual(self.successResultOf(d2), {})
        self.assertEqual(self.xapi.count("session.login_with_password"), 1)

    def test_relogin_once_on_session_invalid(self) -> None:
        self.successResultOf(self.up.get_nvram(VM))
        self.xapi.sessions.clear()  # xapi restarted
        self.successResultOf(self.up.get_nvram(VM))
        self.assertEqual(self.xapi.count("session.login_with_password"), 2)

    def test_second_session_invalid_surfaces(self) -> None:
        self.xapi.reject_sessions = True
        codes = self.failure_codes(self.up.create_message(VM, "n", 1, "b"), TransientUpstreamError)
        self.assertEqual(codes[0], "SESSION_INVALID")
        self.assertEqual(self.xapi.count("session.login_with_password"), 2)
        self.assertEqual(self.xapi.count("message.create"), 2)

    def test_vm_handle_cached(self) -> None:
        for _ in range(3):
            self.successResultOf(self.up.get_nvram(VM))
        self.assertEqual(self.xapi.count("VM.get_by_uuid"), 1)
        self.up.forget(VM)
        self.successResultOf(self.up.get_nvram(VM))
        self.assertEqual(self.xapi.count("VM.get_by_uuid"), 2)

    def test_vtpm_lookup_uses_only_get_by_uuid_and_get_vtpms(self) -> None:
        # SPEC §4: the vTPM is found through VM.get_by_uuid -> VM.get_VTPMs;
        # an xapi serving only what the upstream daemon calls must suffice.
        ref = self.successResultOf(self.up.vtpm_for_vm(VM))
        self.assertEqual(self.successResultOf(self.up.vtpm_for_vm(VM)), ref)
        self.successResultOf(self.up.set_vtpm_contents(ref, "a b c"))
        self.assertEqual(self.successResultOf(self.up.get_vtpm_contents(ref)), "a b c")
        self.assertEqual(self.xapi.count("VM.get_by_uuid"), 1)
        self.assertEqual(self.xapi.count("VM.get_VTPMs"), 1)
        self.assertEqual(self.xapi.count("VTPM.get_uuid"), 0)
        self.assertEqual(self.xapi.count("VTPM.get_by_uuid"), 0)

    def test_vtpm_by_uuid_gives_the_same_handle(self) -> None:
        # The control channel and the domain sockets lock on this handle.
        ref = self.successResultOf(self.up.vtpm_by_uuid(VTPM))
        self.assertEqual(self.successResultOf(self.up.vtpm_by_uuid(VTPM)), ref)
        self.assertEqual(self.successResultOf(self.up.vtpm_for_vm(VM)), ref)
        self.assertEqual(self.xapi.count("VTPM.get_by_uuid"), 1)

    def test_no_handle_cache_looks_up_every_time(self) -> None:
        """The upstream daemon's design, for the benchmarks' comparison."""
        up = XapiUpstream(self.clock, HTTPClient(self.agent), "http://xapi/jsonrpc",
                          timeout=10, handles=NoHandleCache())
        for _ in range(3):
            self.successResultOf(up.get_nvram(VM))
            self.successResultOf(up.vtpm_for_vm(VM))
            self.successResultOf(up.vtpm_by_uuid(VTPM))
        self.assertEqual(self.xapi.count("VM.get_by_uuid"), 6)
        self.assertEqual(self.xapi.count("VM.get_VTPMs"), 3)
        self.assertEqual(self.xapi.count("VTPM.get_by_uuid"), 3)

    def test_handle_invalid_drops_cache_and_retries_once(self) -> None:
        old = self.successResultOf(self.up.vtpm_for_vm(VM))
        self.successResultOf(self.up.get_nvram(VM))
        self.xapi.rename_refs()
        self.successResultOf(self.up.set_nvram_efi_variables(VM, "v", "unspecified"))
        self.assertEqual(self.xapi.count("VM.get_by_uuid"), 2)
        # A stale vTPM ref fails and is never handed out again.
        codes = self.failure_codes(self.up.set_vtpm_contents(old, "x"), PermanentUpstreamError)
        self.assertEqual(codes[0], "HANDLE_INVALID")
        new = self.successResultOf(self.up.vtpm_for_vm(VM))
        self.assertNotEqual(new, old)
        self.successResultOf(self.up.set_vtpm_contents(new, "x"))
        self.assertEqual(self.successResultOf(self.up.get_vtpm_contents(new)), "x")

    def test_handle_invalid_on_fresh_handle_surfaces(self) -> None:
        # A handle just resolved is not re-resolved: no loop.
        self.xapi.script = [("error", ["HANDLE_INVALID", "VM", "x"], "VM.get_NVRAM")] * 3
        codes = self.failure_codes(self.up.get_nvram(VM2), PermanentUpstreamError)
        self.assertEqual(codes[0], "HANDLE_INVALID")
        self.assertEqual(self.xapi.count("VM.get_NVRAM"), 1)
        self.assertEqual(self.xapi.count("VM.get_by_uuid"), 1)

    def test_handle_invalid_twice_surfaces(self) -> None:
        self.successResultOf(self.up.get_nvram(VM2))
        self.xapi.script = [("error", ["HANDLE_INVALID", "VM", "x"], "VM.get_NVRAM")] * 3
        self.failure_codes(self.up.get_nvram(VM2), PermanentUpstreamError)
        self.assertEqual(self.xapi.count("VM.get_NVRAM"), 3)
        self.assertEqual(self.xapi.count("VM.get_by_uuid"), 2)

    def test_no_vtpm(self) -> None:
        f = self.failureResultOf(self.up.vtpm_for_vm(VM2), NoVtpm)
        self.assertIsInstance(f.value, PermanentUpstreamError)

    def test_update_flag_selects_arity(self) -> None:
        self.successResultOf(self.up.set_nvram_efi_variables(VM, "v1", "unspecified"))
        self.assertEqual(len(self.xapi.calls[-1][1]), 3)
        self.successResultOf(self.up.set_nvram_efi_variables(VM, "v2", "yes"))
        self.assertEqual(self.xapi.calls[-1][1][1:], [self.xapi.calls[-1][1][1], "v2", "yes"])
        self.assertEqual(self.successResultOf(self.up.get_nvram(VM)), {"EFI-variables": "v2"})

    def test_message_create_params(self) -> None:
        ref = self.successResultOf(self.up.create_message(VM, "VM_SECURE_BOOT_FAILED", 3, "b"))
        self.assertTrue(ref.startswith("OpaqueRef:"))
        self.assertEqual(self.xapi.messages, [["VM_SECURE_BOOT_FAILED", 3, "VM", VM, "b"]])

    def test_uuid_invalid_is_permanent(self) -> None:
        other = "11111111-2222-4333-8444-555555555555"
        codes = self.failure_codes(self.up.get_nvram(other), PermanentUpstreamError)
        self.assertEqual(codes, ["UUID_INVALID", "VM", other])
        self.assertEqual(self.up.status().reachable, True)

    def test_host_still_booting_is_transient(self) -> None:
        self.xapi.script = [("error", ["HOST_STILL_BOOTING"])]
        codes = self.failure_codes(self.up.get_nvram(VM), TransientUpstreamError)
        self.assertEqual(codes, ["HOST_STILL_BOOTING"])
        status = self.up.status()
        self.assertEqual((status.reachable, status.last_error), (False, "HOST_STILL_BOOTING"))

    def test_http_500_is_transient(self) -> None:
        self.xapi.script = [("http", 500)]
        codes = self.failure_codes(self.up.get_nvram(VM), TransientUpstreamError)
        self.assertEqual(codes, ["HTTP_ERROR", "500"])

    def test_http_404_is_transient(self) -> None:
        """No proof that the call can never succeed (SPEC §6 as amended: a
        proxy or an xapi being replaced may answer it); only 413 refuses
        the content itself."""
        self.xapi.script = [("http", 404)]
        self.failure_codes(self.up.get_nvram(VM), TransientUpstreamError)
        self.xapi.script = [("http", 413)]
        self.failure_codes(self.up.get_nvram(VM), PermanentUpstreamError)

    def test_garbage_is_transient(self) -> None:
        self.xapi.script = [("garbage", None)]
        codes = self.failure_codes(self.up.get_nvram(VM), TransientUpstreamError)
        self.assertEqual(codes[0], "MALFORMED_RESPONSE")

    def test_dropped_connection_retried_once(self) -> None:
        """A kept-alive connection xapi closed is a stale connection: a call
        that may be repeated is sent again once."""
        self.successResultOf(self.up.get_nvram(VM))
        self.xapi.script = [("drop", None)]
        d = self.up.get_nvram(VM)
        self.agent.flush()
        self.assertEqual(self.successResultOf(d), {})
        self.assertEqual(self.xapi.count("VM.get_NVRAM"), 3)
        self.xapi.script = [("drop", None)] * 2
        d = self.up.get_nvram(VM)
        self.agent.flush()
        self.assertEqual(self.failure_codes(d, TransientUpstreamError)[0], "CONNECTION_LOST")

    def test_message_create_not_repeated(self) -> None:
        self.successResultOf(self.up.get_nvram(VM))
        self.xapi.script = [("drop", None)]
        d = self.up.create_message(VM, "VM_SECURE_BOOT_FAILED", 1, "b")
        self.agent.flush()
        self.assertEqual(self.failure_codes(d, TransientUpstreamError)[0], "CONNECTION_LOST")
        self.assertEqual(self.xapi.count("message.create"), 1)

    def test_timeout_waiting_for_headers(self) -> None:
        self.successResultOf(self.up.get_nvram(VM))
        self.xapi.script = [("hang", None)]
        d = self.up.get_nvram(VM)
        self.clock.advance(9)
        self.assertNoResult(d)
        self.clock.advance(1)
        self.agent.flush()
        codes = self.failure_codes(d, TransientUpstreamError)
        self.assertEqual(codes, ["TIMEOUT", "VM.get_NVRAM"])

    def test_timeout_reading_body(self) -> None:
        self.successResultOf(self.up.get_nvram(VM))
        self.xapi.script = [("partial", None)]
        d = self.up.get_nvram(VM)
        self.assertNoResult(d)
        self.clock.advance(10)
        self.agent.flush()
        self.assertEqual(self.failure_codes(d, TransientUpstreamError)[0], "TIMEOUT")
        # The next call works (a new connection).
        self.assertEqual(self.successResultOf(self.up.get_nvram(VM)), {})


class ConcurrencyTests(SynchronousTestCase):
    def test_calls_beyond_the_limit_wait_within_their_deadline(self) -> None:
        xapi = FakeXapi()
        xapi.add_vm(VM, VTPM)
        agent = RequestTraversalAgent(xapi)
        clock = Clock()
        up = XapiUpstream(clock, HTTPClient(agent), "http://xapi/jsonrpc", timeout=10,
                          max_concurrent=1)
        self.successResultOf(up.get_nvram(VM))
        xapi.script = [("hang", None)]
        first = up.get_nvram(VM)
        clock.advance(5)
        second = up.get_nvram(VM)
        self.assertEqual(xapi.count("VM.get_NVRAM"), 2)  # the second waits
        clock.advance(5)
        agent.flush()
        self.assertEqual(self.failureResultOf(first, TransientUpstreamError).value.codes[0],
                         "TIMEOUT")
        # The freed slot went to the second call, which now completes.
        self.assertEqual(xapi.count("VM.get_NVRAM"), 3)
        self.assertEqual(self.successResultOf(second), {})
        third = up.get_nvram(VM)
        self.assertEqual(self.successResultOf(third), {})
        up.reachability.stop()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_concurrent_lookups_of_one_vm_share_one_call(self) -> None:
        xapi = FakeXapi()
        xapi.add_vm(VM, VTPM)
        agent = RequestTraversalAgent(xapi)
        clock = Clock()
        up = XapiUpstream(clock, HTTPClient(agent), "http://xapi/jsonrpc", timeout=10)
        self.successResultOf(up.get_secureboot_certificates_state(VM))
        up.forget(VM)
        xapi.script = [("later", None, "VM.get_by_uuid")]
        nvram = up.get_nvram(VM)
        vtpm = up.vtpm_for_vm(VM)
        vtpm_again = up.vtpm_for_vm(VM)
        xapi.answer_later()
        agent.flush()
        self.assertEqual(self.successResultOf(nvram), {})
        self.assertEqual(self.successResultOf(vtpm), self.successResultOf(vtpm_again))
        self.assertEqual(xapi.count("VM.get_by_uuid"), 2)  # one before forget, one shared
        self.assertEqual(xapi.count("VM.get_VTPMs"), 1)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_cancelled_queued_call_leaves_the_queue(self) -> None:
        xapi = FakeXapi()
        xapi.add_vm(VM, VTPM)
        agent = RequestTraversalAgent(xapi)
        clock = Clock()
        up = XapiUpstream(clock, HTTPClient(agent), "http://xapi/jsonrpc", timeout=10,
                          max_concurrent=1)
        self.successResultOf(up.get_nvram(VM))
        xapi.script = [("hang", None)]
        first = up.get_nvram(VM)
        second = up.get_nvram(VM)
        second.cancel()
        self.failureResultOf(second, TransientUpstreamError)
        clock.advance(10)
        agent.flush()
        self.failureResultOf(first, TransientUpstreamError)
        self.assertEqual(xapi.count("VM.get_NVRAM"), 2)  # the cancelled one never went
        self.assertEqual(self.successResultOf(up.get_nvram(VM)), {})
        up.reachability.stop()
        self.assertEqual(clock.getDelayedCalls(), [])


class RealAgentTests(SynchronousTestCase):
    """make_client's real Agent over a MemoryReactor: connection failures
    and deadlines on the reactor's clock."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.up = xapi_upstream(self.reactor, "unix:/run/xapi.sock", timeout=5)

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IUpstream, self.up))
        self.assertEqual(self.up.description, "xapi unix:/run/xapi.sock")

    def test_connection_refused_is_transient(self) -> None:
        d = self.up.get_nvram(VM)
        path, factory = self.reactor.unixClients[0][:2]
        self.assertEqual(path, "/run/xapi.sock")
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        codes = self.failureResultOf(d, TransientUpstreamError).value.codes
        self.assertEqual(codes, ["CONNECTION_REFUSED"])
        self.assertEqual(self.up.status().reachable, False)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_connect_timeout(self) -> None:
        d = self.up.get_nvram(VM)
        self.reactor.advance(5)
        codes = self.failureResultOf(d, TransientUpstreamError).value.codes
        self.assertEqual(codes, ["TIMEOUT", "session.login_with_password"])

    def test_close(self) -> None:
        self.successResultOf(self.up.close())


class EndpointTests(SynchronousTestCase):
    def test_parse(self) -> None:
        self.assertEqual(parse_endpoint("unix:/var/lib/xcp/xapi"), ("unix", "/var/lib/xcp/xapi"))
        self.assertEqual(parse_endpoint("http://h:8080"), ("http", "h:8080"))
        self.assertEqual(parse_endpoint("https://[::1]/"), ("https", "[::1]"))

    def test_invalid(self) -> None:
        for bad in ["", "unix:", "unix:rel/path", "ftp://h", "http://", "http://h:99999",
                    "http://u:p@h", "http://h/path", "http://h?q=1", "tcp:h:80", "/path"]:
            with self.assertRaises(ValueError, msg=bad):
                parse_endpoint(bad)

    def test_urls(self) -> None:
        r = MemoryReactorClock()
        self.assertEqual(make_client(r, "unix:/x")[1], "http://localhost/jsonrpc")
        self.assertEqual(make_client(r, "https://h:443", pool=make_pool(r))[1],
                         "https://h:443/jsonrpc")
        with self.assertRaises(ValueError):
            xapi_upstream(r, "bogus", 1)

    def test_pool_keeps_connections_alive(self) -> None:
        pool = make_pool(MemoryReactorClock())
        self.assertTrue(pool.persistent)
        self.assertGreaterEqual(pool.maxPersistentPerHost, 16)


class NoCookiesTests(SynchronousTestCase):
    def test_a_cookie_set_by_the_server_is_never_sent_back(self) -> None:
        from treq.client import HTTPClient
        from treq.testing import RequestTraversalAgent
        from twisted.web.resource import Resource

        from xguard.upstream.agent import NoCookies
        from xguard.upstream.xapi import _Payload  # written at once, as xguard sends

        seen: list[object] = []

        class Rpc(Resource):
            isLeaf = True

            def render_POST(self, request: Any) -> bytes:
                seen.append(request.getHeader(b"cookie"))
                request.addCookie(b"session", b"s1")
                return b"{}"

        agent = RequestTraversalAgent(Rpc())
        client = HTTPClient(agent, cookiejar=NoCookies())
        for _ in range(2):
            d = client.post("http://localhost/jsonrpc", data=_Payload(b"{}"))
            agent.flush()
            self.assertEqual(self.successResultOf(d).code, 200)
        self.assertEqual(seen, [None, None])
        # the stock jar would have sent it back: the check can fail
        stock = HTTPClient(agent)
        for _ in range(2):
            stock.post("http://localhost/jsonrpc", data=_Payload(b"{}"))
            agent.flush()
        self.assertEqual(seen[-1], b"session=s1")
