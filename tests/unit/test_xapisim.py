"""The xapi simulator: dispatcher and codecs synchronously, the web layer
through StubTreq with a Clock, and the real process driven by the XenAPI
SDK over a UNIX socket (wire compatibility with the official client)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import tempfile
import xmlrpc.client
from typing import Any

import XenAPI
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from xguard.testing._simstate import JSONRPC, XMLRPC, Call, Dispatcher, SimState, XapiError
from xguard.testing.simclient import SimAdminError, SimClient, SimProcess
from xguard.testing.unixhttp import UnixHTTPConnection, UnixTransport, request
from xguard.testing.xapisim import Simulator, load_state

VM = "0bd1d5c6-3e9c-4a5e-9a3a-3c3c1b1b2b2b"
VTPM = "7f1d9c2e-5a4b-4c3d-8e9f-0a1b2c3d4e5f"


def _dispatcher() -> tuple[Dispatcher, str, dict[str, Any]]:
    state = SimState()
    ids = state.seed_vm(VM, vtpm_uuid=VTPM, contents="p s v", nvram={"EFI-variables": "AA"})
    d = Dispatcher(state)
    return d, d.call("session.login_with_password", ["root", "", "1.0", "t"]), ids


class DispatcherTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.d, self.s, self.ids = _dispatcher()

    def assertXapiError(self, codes: list[Any], method: str, params: list[Any]) -> None:
        e = self.assertRaises(XapiError, self.d.call, method, params)
        self.assertEqual(e.codes, [str(c) for c in codes])

    def test_login_logout(self) -> None:
        self.assertTrue(self.s.startswith("OpaqueRef:"))
        self.assertEqual(self.d.call("session.logout", [self.s]), "")
        self.assertXapiError(["SESSION_INVALID", self.s], "VM.get_by_uuid", [self.s, VM])
        # version and originator are optional, as in xapi.
        self.assertTrue(self.d.call("session.login_with_password", ["root", ""]))

    def test_protocol_errors(self) -> None:
        self.assertXapiError(["MESSAGE_METHOD_UNKNOWN", "VM.destroy"], "VM.destroy", [self.s])
        self.assertXapiError(["MESSAGE_PARAMETER_COUNT_MISMATCH", "VM.get_NVRAM", 2, 1],
                             "VM.get_NVRAM", [self.s])
        self.assertXapiError(["MESSAGE_PARAMETER_COUNT_MISMATCH",
                              "VM.set_NVRAM_EFI_variables", 4, 5],
                             "VM.set_NVRAM_EFI_variables", [self.s, "a", "b", "c", "d"])
        self.assertXapiError(["SESSION_INVALID", "OpaqueRef:nope"], "VM.get_NVRAM",
                             ["OpaqueRef:nope", self.ids["vm_ref"]])
        self.assertXapiError(["UUID_INVALID", "VM", "x"], "VM.get_by_uuid", [self.s, "x"])
        self.assertXapiError(["UUID_INVALID", "VTPM", "x"], "VTPM.get_by_uuid", [self.s, "x"])
        self.assertXapiError(["HANDLE_INVALID", "VM", "OpaqueRef:x"], "VM.get_NVRAM",
                             [self.s, "OpaqueRef:x"])
        self.assertXapiError(["HANDLE_INVALID", "VTPM", self.ids["vm_ref"]],
                             "VTPM.get_contents", [self.s, self.ids["vm_ref"]])
        self.assertXapiError(["FIELD_TYPE_ERROR", "value"], "VM.set_NVRAM_EFI_variables",
                             [self.s, self.ids["vm_ref"], 5])

    def test_vm_calls(self) -> None:
        ref = self.d.call("VM.get_by_uuid", [self.s, VM])
        self.assertEqual(ref, self.ids["vm_ref"])
        self.assertEqual(self.d.call("VM.get_uuid", [self.s, ref]), VM)
        self.assertEqual(self.d.call("VM.get_NVRAM", [self.s, ref]), {"EFI-variables": "AA"})
        self.assertEqual(self.d.call("VM.get_secureboot_certificates_state", [self.s, ref]), "ok")
        record = self.d.call("VM.get_record", [self.s, ref])
        self.assertEqual((record["uuid"], record["VTPMs"]), (VM, [self.ids["vtpm_ref"]]))
        self.assertEqual(self.d.call("VM.get_all", [self.s]), [ref])

    def test_set_nvram_records_update_flag(self) -> None:
        ref = self.ids["vm_ref"]
        self.d.call("VM.set_NVRAM_EFI_variables", [self.s, ref, "BB", "yes"])
        self.assertEqual(self.d.state.vm_state(VM)["last_update"], "yes")
        self.d.call("VM.set_NVRAM_EFI_variables", [self.s, ref, "CC"])
        state = self.d.state.vm_state(VM)
        self.assertEqual((state["nvram"], state["last_update"], state["nvram_history"]),
                         ({"EFI-variables": "CC"}, None, ["BB", "CC"]))

    def test_first_boot_nvram_is_empty_map(self) -> None:
        ids = self.d.state.seed_vm(vtpm=False)
        self.assertEqual(self.d.call("VM.get_NVRAM", [self.s, ids["vm_ref"]]), {})
        self.assertEqual(self.d.call("VM.get_VTPMs", [self.s, ids["vm_ref"]]), [])

    def test_vtpm_calls(self) -> None:
        t = self.d.call("VTPM.get_by_uuid", [self.s, VTPM])
        self.assertEqual(self.d.call("VM.get_VTPMs", [self.s, self.ids["vm_ref"]]), [t])
        self.assertEqual(self.d.call("VTPM.get_VM", [self.s, t]), self.ids["vm_ref"])
        self.assertEqual(self.d.call("VTPM.get_uuid", [self.s, t]), VTPM)
        self.assertEqual(self.d.call("VTPM.get_contents", [self.s, t]), "p s v")
        self.d.call("VTPM.set_contents", [self.s, t, "q s v"])
        self.assertEqual(self.d.call("VTPM.get_contents", [self.s, t]), "q s v")
        self.assertEqual(self.d.state.vtpm_state(VTPM)["writes"], 1)

    def test_messages(self) -> None:
        m = self.d.call("message.create", [self.s, "VM_SECURE_BOOT_FAILED", "3", "VM", VM, "b"])
        records = self.d.call("message.get_all_records", [self.s])
        self.assertEqual(records[m]["priority"], 3)
        self.assertEqual((records[m]["name"], records[m]["obj_uuid"]),
                         ("VM_SECURE_BOOT_FAILED", VM))
        self.assertEqual([x["ref"] for x in self.d.state.vm_state(VM)["messages"]], [m])
        self.assertXapiError(["UUID_INVALID", "VM", "x"], "message.create",
                             [self.s, "N", 1, "VM", "x", "b"])
        self.assertXapiError(["FIELD_TYPE_ERROR", "priority"], "message.create",
                             [self.s, "N", "high", "VM", VM, "b"])


class StateTests(SynchronousTestCase):
    def test_seed_upserts(self) -> None:
        state = SimState()
        changes: list[int] = []
        state.on_change = lambda: changes.append(1)
        first = state.seed_vm(VM, vtpm=False)
        self.assertIsNone(first["vtpm_uuid"])
        again = state.seed_vm(VM, contents="x", sb_state="update_on_boot")
        self.assertEqual(again["vm_ref"], first["vm_ref"])
        self.assertEqual(state.vtpm_state(again["vtpm_uuid"])["contents"], "x")
        self.assertEqual(state.vm_state(VM)["sb_state"], "update_on_boot")
        self.assertEqual(len(changes), 2)
        self.assertRaises(ValueError, state.seed_vm, VM, sb_state="bad")

    def test_json_round_trip_keeps_refs(self) -> None:
        d, s, ids = _dispatcher()
        d.call("message.create", [s, "N", 1, "VM", VM, "b"])
        copy = SimState.from_json(json.loads(json.dumps(d.state.to_json())))
        self.assertEqual(copy.vm_state(VM), d.state.vm_state(VM) | {"nvram_history": []})
        self.assertEqual(copy.sessions, {})  # a restarted xapi forgets sessions


class CodecTests(SynchronousTestCase):
    def test_xmlrpc_failure_is_exact(self) -> None:
        body = XMLRPC.failure(Call("m", []), ["HANDLE_INVALID", "VM", "a<b"])
        self.assertEqual(body, (
            b'<?xml version="1.0"?><methodResponse><params><param><value><struct>'
            b"<member><name>Status</name><value>Failure</value></member>"
            b"<member><name>ErrorDescription</name><value><array><data>"
            b"<value>HANDLE_INVALID</value><value>VM</value><value>a&lt;b</value>"
            b"</data></array></value></member></struct></value></param></params>"
            b"</methodResponse>"))

    def test_xmlrpc_success_parses_with_the_sdk(self) -> None:
        value = {"EFI-variables": "AA", "n": 5, "l": ["x"], "void": ""}
        (decoded,), _ = xmlrpc.client.loads(XMLRPC.success(Call("m", []), value))
        self.assertEqual(list(decoded), ["Status", "Value"])
        self.assertEqual(XenAPI.XenAPI._parse_result(decoded), value | {"n": "5"})
        (failed,), _ = xmlrpc.client.loads(XMLRPC.failure(Call("m", []), ["X", "y"]))
        e = self.assertRaises(XenAPI.Failure, XenAPI.XenAPI._parse_result, failed)
        self.assertEqual(e.details, ["X", "y"])

    def test_xmlrpc_decodes_sdk_requests(self) -> None:
        body = xmlrpc.client.dumps(("s", "r", 7), "message.create", allow_none=True)
        self.assertEqual(XMLRPC.decode(body.encode()), Call("message.create", ["s", "r", 7]))
        self.assertRaises(ValueError, XMLRPC.decode, b"<methodCall><oops")

    def test_jsonrpc(self) -> None:
        call = JSONRPC.decode(b'{"jsonrpc":"2.0","method":"m","params":["s"],"id":3}')
        self.assertEqual(call, Call("m", ["s"], 3, True))
        self.assertEqual(json.loads(JSONRPC.success(call, {"a": "b"})),
                         {"jsonrpc": "2.0", "result": {"a": "b"}, "id": 3})
        self.assertEqual(json.loads(JSONRPC.failure(call, ["SESSION_INVALID", "s"])),
                         {"jsonrpc": "2.0", "id": 3, "error": {
                             "code": 1, "message": "SESSION_INVALID", "data": ["s"]}})
        v1 = JSONRPC.decode(b'{"method":"m","params":[],"id":"x"}')
        self.assertEqual(json.loads(JSONRPC.failure(v1, ["E"])),
                         {"result": None, "error": ["E"], "id": "x"})
        self.assertRaises(ValueError, JSONRPC.decode, b'{"method":"m","params":{}}')


def _rpc(method: str, params: list[Any], id: int = 1) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": id}).encode()


class WebTests(SynchronousTestCase):
    """The request path and the admin API, in memory, timed by a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.sim = Simulator(self.clock)
        self.ids = self.sim.state.seed_vm(VM, vtpm_uuid=VTPM, contents="a")
        self.api = StubTreq(self.sim.api_site().resource)
        self.admin = StubTreq(self.sim.admin_site().resource)
        self.session = self.call("session.login_with_password", ["root", ""])["result"]
        self.addCleanup(lambda: self.assertEqual(self.clock.getDelayedCalls(), []))

    def post(self, body: bytes, path: str = "/jsonrpc") -> Any:
        return self.api.post("http://x" + path, data=body)

    def answer(self, d: Any) -> tuple[int, bytes]:
        self.api.flush()
        response = self.successResultOf(d)
        return response.code, self.successResultOf(response.content())

    def call(self, method: str, params: list[Any]) -> Any:
        code, body = self.answer(self.post(_rpc(method, params)))
        self.assertEqual(code, 200)
        return json.loads(body)

    def admin_call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        d = self.admin.request(method, "http://x" + path,
                               data=json.dumps(body).encode() if body is not None else None)
        self.admin.flush()
        response = self.successResultOf(d)
        return response.code, json.loads(self.successResultOf(response.content()))

    def test_xmlrpc_at_root_and_rpc2(self) -> None:
        body = xmlrpc.client.dumps((self.session, VM), "VM.get_by_uuid").encode()
        for path in ("/", "/RPC2"):
            code, answer = self.answer(self.post(body, path))
            (result,), _ = xmlrpc.client.loads(answer)
            self.assertEqual(result, {"Status": "Success", "Value": self.ids["vm_ref"]})

    def test_bad_requests(self) -> None:
        self.assertEqual(self.answer(self.post(b"{", "/jsonrpc"))[0], 400)
        self.assertEqual(self.answer(self.post(b"x", "/other"))[0], 404)
        response = self.successResultOf(self.api.get("http://x/jsonrpc"))
        self.assertEqual(response.code, 405)

    def test_fail_next_then_recovers(self) -> None:
        self.admin_call("POST", "/fail_next", {"n": 2, "codes": ["HOST_STILL_BOOTING"]})
        for _ in range(2):
            self.assertEqual(self.call("VM.get_by_uuid", [self.session, VM])["error"],
                             {"code": 1, "message": "HOST_STILL_BOOTING", "data": []})
        self.assertEqual(self.call("VM.get_by_uuid", [self.session, VM])["result"],
                         self.ids["vm_ref"])

    def test_fail_method_fails_only_that_method_until_cleared(self) -> None:
        t = self.ids["vtpm_ref"]
        self.admin_call("POST", "/fail_method",
                        {"method": "VTPM.set_contents", "codes": ["HOST_STILL_BOOTING"]})
        for _ in range(3):
            self.assertEqual(self.call("VTPM.set_contents", [self.session, t, "x"])["error"],
                             {"code": 1, "message": "HOST_STILL_BOOTING", "data": []})
        self.assertIn("result", self.call("VTPM.get_contents", [self.session, t]))
        self.assertNotEqual(self.call("VTPM.get_contents", [self.session, t])["result"], "x")
        self.admin_call("POST", "/fail_method", {"method": "VTPM.set_contents", "clear": True})
        self.assertEqual(self.call("VTPM.set_contents", [self.session, t, "x"])["result"], "")
        self.assertEqual(self.call("VTPM.get_contents", [self.session, t])["result"], "x")

    def test_http_500_next(self) -> None:
        self.admin_call("POST", "/http_500_next", {"n": 1})
        self.assertEqual(self.answer(self.post(_rpc("VM.get_all", [self.session])))[0], 500)
        self.assertEqual(self.answer(self.post(_rpc("VM.get_all", [self.session])))[0], 200)

    def test_delay(self) -> None:
        self.admin_call("POST", "/delay", {"seconds": 2.5})
        d = self.post(_rpc("VM.get_all", [self.session]))
        self.api.flush()
        self.assertNoResult(d)
        self.clock.advance(2.5)
        self.assertEqual(json.loads(self.answer(d)[1])["result"], [self.ids["vm_ref"]])

    def test_hang_parks_calls_until_up(self) -> None:
        t = self.ids["vtpm_ref"]
        self.admin_call("POST", "/mode", {"mode": "hang"})
        d = self.post(_rpc("VTPM.set_contents", [self.session, t, "late"]))
        self.api.flush()
        self.assertNoResult(d)
        self.assertEqual(self.sim.state.vtpm_state(VTPM)["contents"], "a")
        self.assertEqual(self.admin_call("GET", "/status")[1]["parked"], 1)
        self.admin_call("POST", "/mode", {"mode": "up"})
        self.assertEqual(json.loads(self.answer(d)[1])["result"], "")
        self.assertEqual(self.sim.state.vtpm_state(VTPM)["contents"], "late")

    def test_counters(self) -> None:
        self.call("VM.get_all", [self.session])
        self.call("VM.nope", [self.session])
        self.assertEqual(self.admin_call("GET", "/counters")[1],
                         {"session.login_with_password": 1, "VM.get_all": 1, "VM.nope": 1})
        self.assertEqual(self.admin_call("POST", "/counters/reset", {})[1]["VM.get_all"], 1)
        self.assertEqual(self.admin_call("GET", "/counters")[1], {})

    def test_admin_seed_and_read_back(self) -> None:
        code, ids = self.admin_call("POST", "/vms", {"nvram": {"EFI-variables": "Z"},
                                                     "sb_state": "update_available"})
        self.assertEqual(code, 200)
        code, state = self.admin_call("GET", "/vms/" + ids["vm_uuid"])
        self.assertEqual((state["nvram"], state["sb_state"], state["vtpms"][0]["uuid"]),
                         ({"EFI-variables": "Z"}, "update_available", ids["vtpm_uuid"]))
        self.assertEqual(self.admin_call("GET", "/vms/nope")[0], 404)
        self.assertEqual(self.admin_call("POST", "/vms", {"colour": "red"})[0], 400)
        self.assertEqual(self.admin_call("POST", "/mode", {"mode": "sideways"})[0], 400)
        self.assertEqual(self.admin_call("POST", "/sessions/expire", {})[1], {"expired": 1})
        self.assertEqual(self.call("VM.get_all", [self.session])["error"]["message"],
                         "SESSION_INVALID")

    def test_state_file_written_on_change(self) -> None:
        d = tempfile.mkdtemp(prefix="xg")
        self.addCleanup(shutil.rmtree, d)
        path = os.path.join(d, "state.json")
        sim = Simulator(self.clock, state_file=path)
        ids = sim.state.seed_vm(VM, contents="one")
        self.assertEqual(load_state(path).vtpm_state(ids["vtpm_uuid"])["contents"], "one")


class ProcessTests(SynchronousTestCase):
    """A simulator process for each test (trial has no setUpClass), driven
    by the real XenAPI SDK and raw sockets."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="xg")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.sim = SimProcess(os.path.join(self.dir, "xapi"), os.path.join(self.dir, "admin"),
                              log_file=os.path.join(self.dir, "log"))
        self.addCleanup(self.sim.stop)
        self.sim.start()
        self.client = self.sim.client
        self.client.set_mode("up")
        self.client.reset()
        self.ids = self.client.seed_vm(contents="p s v", nvram={"EFI-variables": "AA"})

    def session(self, timeout: float | None = 5.0) -> Any:
        s = XenAPI.Session("http://localhost/", transport=UnixTransport(self.sim.socket, timeout))
        s.xenapi.login_with_password("root", "", "1.0", "xguard-tests")
        self.addCleanup(s("close"))  # not s.close: that would be an RPC call
        return s

    def test_xenapi_sdk(self) -> None:
        x = self.session().xenapi
        vm = x.VM.get_by_uuid(self.ids["vm_uuid"])
        self.assertEqual(x.VM.get_NVRAM(vm), {"EFI-variables": "AA"})
        self.assertEqual(x.VM.set_NVRAM_EFI_variables(vm, "BB", "no"), "")
        vtpm = x.VM.get_VTPMs(vm)[0]
        self.assertEqual(x.VTPM.get_contents(vtpm), "p s v")
        x.VTPM.set_contents(vtpm, "q s v")
        x.message.create("VM_SECURE_BOOT_FAILED", 5, "VM", self.ids["vm_uuid"], "body")
        state = self.client.vm_state(self.ids["vm_uuid"])
        self.assertEqual((state["nvram"], state["last_update"], state["vtpms"][0]["contents"]),
                         ({"EFI-variables": "BB"}, "no", "q s v"))
        self.assertEqual(state["messages"][0]["priority"], 5)
        e = self.assertRaises(XenAPI.Failure, x.VTPM.get_by_uuid, "nope")
        self.assertEqual(e.details, ["UUID_INVALID", "VTPM", "nope"])
        # The SDK logs in again by itself when its session expires.
        self.client.expire_sessions()
        self.assertEqual(x.VM.get_uuid(vm), self.ids["vm_uuid"])
        self.assertEqual(self.client.counters()["session.login_with_password"], 2)

    def test_jsonrpc_over_socket(self) -> None:
        status, headers, body = request(self.sim.socket, "POST", "/jsonrpc",
                                        _rpc("session.login_with_password", ["root", ""], 9))
        self.assertEqual((status, headers["content-type"]), (200, "application/json"))
        session = json.loads(body)["result"]
        _, _, body = request(self.sim.socket, "POST", "/jsonrpc",
                             _rpc("VM.get_by_uuid", [session, "bad"], 10))
        self.assertEqual(json.loads(body), {"jsonrpc": "2.0", "id": 10, "error": {
            "code": 1, "message": "UUID_INVALID", "data": ["VM", "bad"]}})

    def test_refuse_makes_connect_fail(self) -> None:
        x = self.session().xenapi
        self.client.set_mode("refuse")
        self.assertRaises(ConnectionRefusedError, request, self.sim.socket, "POST", "/", b"")
        self.assertRaises(OSError, x.VM.get_by_uuid, self.ids["vm_uuid"])
        self.client.set_mode("up")
        self.assertEqual(x.VM.get_by_uuid(self.ids["vm_uuid"]), self.ids["vm_ref"])

    def test_host_still_booting_then_recovery(self) -> None:
        x = self.session().xenapi
        self.client.fail_next(2)
        for _ in range(2):
            e = self.assertRaises(XenAPI.Failure, x.VM.get_by_uuid, self.ids["vm_uuid"])
            self.assertEqual(e.details, ["HOST_STILL_BOOTING"])
        self.assertEqual(x.VM.get_by_uuid(self.ids["vm_uuid"]), self.ids["vm_ref"])
        self.client.http_500_next(1)
        self.assertRaises(xmlrpc.client.ProtocolError, x.VM.get_by_uuid, self.ids["vm_uuid"])

    def test_hang_times_out_client(self) -> None:
        x = self.session(timeout=0.3).xenapi
        self.client.set_mode("hang")
        self.assertRaises(TimeoutError, x.VM.get_by_uuid, self.ids["vm_uuid"])
        self.assertEqual(self.client.status()["parked"], 1)

    def test_keepalive_and_counters(self) -> None:
        transport = UnixTransport(self.sim.socket)
        proxy = xmlrpc.client.ServerProxy("http://localhost/", transport=transport)
        session = proxy.session.login_with_password("root", "")["Value"]
        conn = transport._connection[1]
        for _ in range(20):
            self.assertEqual(proxy.VM.get_by_uuid(session, self.ids["vm_uuid"])["Status"],
                             "Success")
        self.assertIs(transport._connection[1], conn)
        transport.close()
        self.assertEqual(self.client.reset_counters()["VM.get_by_uuid"], 20)
        self.assertEqual(self.client.counters(), {})

    def test_admin_errors(self) -> None:
        e = self.assertRaises(SimAdminError, self.client.vm_state, "nope")
        self.assertEqual(e.status, 404)
        conn = UnixHTTPConnection(self.sim.socket, timeout=5)
        conn.request("GET", "/")
        self.assertEqual(conn.getresponse().status, http.client.METHOD_NOT_ALLOWED)
        conn.close()


class RestartTests(SynchronousTestCase):
    def test_state_survives_kill(self) -> None:
        d = tempfile.mkdtemp(prefix="xg")
        self.addCleanup(shutil.rmtree, d, True)
        sim = SimProcess(os.path.join(d, "xapi"), os.path.join(d, "admin"),
                         state_file=os.path.join(d, "state.json"))
        self.addCleanup(sim.stop)
        ids = sim.start().client.seed_vm(VM, vtpm_uuid=VTPM)
        s = XenAPI.Session("http://localhost/", transport=UnixTransport(sim.socket, 5))
        s.xenapi.login_with_password("root", "")
        s.xenapi.VTPM.set_contents(ids["vtpm_ref"], "kept")
        s("close")()
        sim.kill()
        with socket.socket(socket.AF_UNIX) as probe:
            self.assertRaises(OSError, probe.connect, sim.socket)
        state = sim.start().client.vm_state(VM)
        self.assertEqual((state["ref"], state["vtpms"][0]["contents"]), (ids["vm_ref"], "kept"))
        self.assertEqual(SimClient(sim.admin_socket).vms(), [VM])
        self.assertEqual(sim.stop(), 0)
        self.assertFalse(os.path.exists(sim.socket))
