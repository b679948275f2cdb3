"""The varstored socket: every varstored call replayed from the wire
samples, isolation to the socket's VM, refusals, ordering, and the HTTP
details real varstored relies on (Content-Length, Connection: close)."""

from __future__ import annotations

import glob
import os
import xmlrpc.client
from typing import Any

from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase

from tests.fakes import FakeUpstream, StoreKit
from tests.unit.test_site import TurnClock, Wire, http_request
from tests.unit.test_xmlrpc import BILLION_LAUGHS, WIRE, XXE, call, sample
from xguard.domain.site import MAX_BODY
from xguard.domain.varstored import MESSAGE_NAME, SESSION_HANDLE, VM_HANDLE, VarstoredSocket
from xguard.errors import PermanentUpstreamError, TransientUpstreamError

VM = "0b1f0a3c-6a2e-4a55-9a2d-6f1e2d3c4b5a"
OTHER = "9e8d7c6b-5a49-4838-a726-150f0e0d0c0b"


def rpc(method: str, *params: Any) -> bytes:
    """A request as the Python SDK writes it (typed values)."""
    return xmlrpc.client.dumps(params, method, allow_none=True).encode()


def decode(body: bytes) -> dict[str, Any]:
    ((answer,), _) = xmlrpc.client.loads(body, use_builtin_types=True)
    return answer


class VarstoredTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.upstream = FakeUpstream()
        self.upstream.add_vm(VM)
        self.upstream.add_vm(OTHER, nvram={"EFI-variables": "other-vars"})
        kit = StoreKit(self.upstream)
        self.addCleanup(kit.cleanup)
        self.socket = VarstoredSocket(VM, kit.nvram)
        self.treq = StubTreq(self.socket.resource())

    def post(self, body: bytes, path: str = "/", method: str = "POST") -> tuple[int, bytes]:
        d = self.treq.request(method, "http://varstored" + path, data=body)
        self.treq.flush()
        response = self.successResultOf(d)
        content = self.successResultOf(self.treq.content(response))
        return response.code, content

    def call(self, body: bytes) -> dict[str, Any]:
        code, content = self.post(body)
        self.assertEqual(code, 200)
        return decode(content)

    def vm_calls(self) -> set[str]:
        """The VMs upstream was asked about."""
        return {args[0] for _, args in self.upstream.calls}

    # -- replay of the wire samples -----------------------------------------

    def test_every_sample_request_answers_like_the_sample(self) -> None:
        self.upstream.vms[VM]["nvram"] = {"EFI-variables": "vars"}
        files = sorted(glob.glob(os.path.join(WIRE, "requests", "*")))
        self.assertEqual(len(files), 8)
        for path in files:
            method = os.path.basename(path).rsplit(".request.", 1)[0]
            with self.subTest(method=method):
                with open(path, "rb") as f:
                    code, content = self.post(f.read())
                self.assertEqual(code, 200)
                expected = sample("responses", method + ".response.0")
                # Same shape: Status first and Success, Value second, same type.
                self.assertTrue(content.startswith(
                    b'<?xml version="1.0"?><methodResponse><params><param><value><struct>'
                    b"<member><name>Status</name><value>Success</value></member>"
                    b"<member><name>Value</name>"), content)
                answer, reference = decode(content), decode(expected)
                self.assertEqual(list(answer), ["Status", "Value"])
                self.assertEqual(type(answer["Value"]), type(reference["Value"]))
        self.assertEqual(self.vm_calls(), {VM})

    def test_login_logout_get_by_uuid_stay_local(self) -> None:
        self.assertEqual(self.call(rpc("session.login_with_password", "root", "", "1.0", "v"))
                         ["Value"], SESSION_HANDLE)
        self.assertEqual(self.call(rpc("session.logout", SESSION_HANDLE))["Value"], None)
        self.assertEqual(self.call(rpc("VM.get_by_uuid", "s", OTHER))["Value"], VM_HANDLE)
        self.assertEqual(self.upstream.calls, [])

    def test_get_nvram(self) -> None:
        self.upstream.vms[VM]["nvram"] = {"EFI-variables": "abc", "other": "x"}
        self.assertEqual(self.call(rpc("VM.get_NVRAM", "s", VM_HANDLE)),
                         {"Status": "Success", "Value": {"EFI-variables": "abc", "other": "x"}})

    def test_get_nvram_of_a_new_vm_is_an_empty_struct(self) -> None:
        code, content = self.post(sample("requests", "VM.get_NVRAM.request.0"))
        self.assertIn(b"<member><name>Value</name><value><struct></struct></value></member>",
                      content)

    def test_set_nvram(self) -> None:
        answer = self.call(rpc("VM.set_NVRAM_EFI_variables", "s", VM_HANDLE, "new-vars"))
        self.assertEqual(answer, {"Status": "Success", "Value": None})
        self.assertEqual(self.upstream.vms[VM]["nvram"], {"EFI-variables": "new-vars"})
        self.assertEqual(self.upstream.vms[VM]["update"], "unspecified")

    def test_set_nvram_v2_forwards_update(self) -> None:
        for sent, forwarded in (("yes", "yes"), ("no", "no"), ("maybe", "unspecified")):
            self.call(rpc("VM.set_NVRAM_EFI_variables_v2", "s", VM_HANDLE, "v-" + sent, sent))
            self.assertEqual(self.upstream.calls[-1],
                             ("set_nvram_efi_variables", (VM, "v-" + sent, forwarded)))

    def test_secureboot_state(self) -> None:
        self.upstream.vms[VM]["sb"] = "update_available"
        self.assertEqual(self.call(rpc("VM.get_secureboot_certificates_state", "s", "x"))["Value"],
                         "update_available")

    def test_message_create_pins_name_class_and_vm(self) -> None:
        for priority, expected in (("0", 0), (5, 5), (" 3 ", 3)):
            answer = self.call(rpc("message.create", "s", "EVIL_NAME", priority, "Host", OTHER,
                                   "body"))
            self.assertEqual(answer, {"Status": "Success", "Value": None})
            self.assertEqual(self.upstream.messages[-1], (VM, MESSAGE_NAME, expected, "body"))

    # -- isolation -----------------------------------------------------------

    def test_other_vm_handles_only_touch_own_vm(self) -> None:
        for handle in (OTHER, "OpaqueRef:other", ""):
            self.call(rpc("VM.get_NVRAM", "s", handle))
            self.call(rpc("VM.set_NVRAM_EFI_variables", "s", handle, "mine"))
            self.call(rpc("VM.set_NVRAM_EFI_variables_v2", "s", handle, "mine2", "yes"))
            self.call(rpc("VM.get_secureboot_certificates_state", "s", handle))
            self.call(rpc("message.create", "s", "n", 1, "VM", handle, "b"))
        self.assertEqual(self.vm_calls(), {VM})
        self.assertEqual(self.upstream.vms[OTHER]["nvram"], {"EFI-variables": "other-vars"})
        self.assertEqual(self.upstream.vms[VM]["nvram"], {"EFI-variables": "mine2"})

    # -- refusals ------------------------------------------------------------

    def test_unknown_method(self) -> None:
        for method in ("VM.destroy", "VM.get_all_records", "system.listMethods"):
            self.assertEqual(self.call(rpc(method, "s")),
                             {"Status": "Failure",
                              "ErrorDescription": ["MESSAGE_METHOD_UNKNOWN", method]})
        self.assertEqual(self.upstream.calls, [])

    def test_wrong_arity(self) -> None:
        self.assertEqual(self.call(rpc("VM.get_NVRAM", "s"))["ErrorDescription"],
                         ["MESSAGE_PARAMETER_COUNT_MISMATCH", "VM.get_NVRAM", "2", "1"])
        self.assertEqual(
            self.call(rpc("VM.set_NVRAM_EFI_variables", "s", "v", "x", "y"))["ErrorDescription"],
            ["MESSAGE_PARAMETER_COUNT_MISMATCH", "VM.set_NVRAM_EFI_variables", "3", "4"])
        self.assertEqual(self.upstream.calls, [])

    def test_wrong_types(self) -> None:
        cases = [
            (rpc("VM.set_NVRAM_EFI_variables", "s", "v", 5), "value"),
            (rpc("VM.set_NVRAM_EFI_variables", "s", "v", ["x"]), "value"),
            (rpc("VM.get_NVRAM", None, "v"), "session"),
            (rpc("message.create", "s", "n", "high", "VM", "u", "b"), "priority"),
            (rpc("message.create", "s", "n", True, "VM", "u", "b"), "priority"),
            (rpc("message.create", "s", "n", 1.0, "VM", "u", "b"), "priority"),
        ]
        for body, field in cases:
            with self.subTest(field=field):
                self.assertEqual(self.call(body), {"Status": "Failure",
                                                   "ErrorDescription": ["FIELD_TYPE_ERROR", field]})
        self.assertEqual(self.upstream.calls, [])

    def test_undecodable_bodies_are_400(self) -> None:
        for body in (b"", b"<methodCall>", b"not xml", BILLION_LAUGHS, XXE,
                     call("VM.get_NVRAM", "<value><int>x</int></value>")):
            with self.subTest(body=body[:30]):
                code, content = self.post(body)
                self.assertEqual(code, 400)
                self.assertNotIn(b"root:", content)
        self.assertEqual(self.upstream.calls, [])

    def test_methods_other_than_post_are_405(self) -> None:
        for method in ("GET", "PUT", "DELETE", "HEAD"):
            code, _ = self.post(b"", method=method)
            self.assertEqual(code, 405, method)

    def test_any_path(self) -> None:
        for path in ("/", "/RPC2", "/a/b"):
            code, content = self.post(rpc("session.logout", "s"), path=path)
            self.assertEqual((code, decode(content)["Status"]), (200, "Success"))

    # -- upstream errors -----------------------------------------------------

    def test_transient_upstream_error_is_a_failure_with_its_codes(self) -> None:
        self.upstream.fail_next(TransientUpstreamError(["HOST_STILL_BOOTING"]))
        self.assertEqual(self.call(rpc("VM.get_NVRAM", "s", "v")),
                         {"Status": "Failure", "ErrorDescription": ["HOST_STILL_BOOTING"]})

    def test_permanent_upstream_error_is_a_failure_with_its_codes(self) -> None:
        self.upstream.fail_next(PermanentUpstreamError(["HANDLE_INVALID", "VM", "x"]))
        self.assertEqual(self.call(rpc("VM.get_secureboot_certificates_state", "s", "v")),
                         {"Status": "Failure", "ErrorDescription": ["HANDLE_INVALID", "VM", "x"]})

    def test_write_fails_without_cache_when_upstream_is_down(self) -> None:
        self.upstream.down = True
        answer = self.call(rpc("VM.set_NVRAM_EFI_variables", "s", "v", "x"))
        self.assertEqual(answer["Status"], "Failure")
        self.assertEqual(answer["ErrorDescription"], ["CONNECTION_REFUSED"])

    def test_unexpected_error_is_an_internal_failure(self) -> None:
        self.upstream.vms[VM]["nvram"] = {1: "x"}  # a struct name must be a string
        answer = self.call(rpc("VM.get_NVRAM", "s", "v"))
        self.assertEqual(answer["ErrorDescription"], ["INTERNAL_ERROR", "xguard"])
        self.flushLoggedErrors()

    # -- ordering ------------------------------------------------------------

    def test_calls_are_served_one_at_a_time_in_order(self) -> None:
        self.upstream.hold = True
        first = self.treq.post("http://v/", data=rpc("VM.set_NVRAM_EFI_variables", "s", "v", "1"))
        second = self.treq.post("http://v/", data=rpc("VM.get_NVRAM", "s", "v"))
        self.treq.flush()
        self.assertNoResult(first)
        self.assertNoResult(second)
        self.assertEqual(self.upstream.held, 1)  # the read waits for the write
        self.upstream.release()
        self.treq.flush()
        self.successResultOf(first)
        self.assertEqual(self.upstream.held, 1)
        self.upstream.release()
        self.treq.flush()
        response = self.successResultOf(second)
        answer = decode(self.successResultOf(self.treq.content(response)))
        self.assertEqual(answer["Value"], {"EFI-variables": "1"})
        self.assertEqual([name for name, _ in self.upstream.calls],
                         ["set_nvram_efi_variables", "get_nvram"])


class VarstoredWireTests(SynchronousTestCase):
    """What the real varstored needs from the HTTP layer."""

    def setUp(self) -> None:
        self.upstream = FakeUpstream()
        self.upstream.add_vm(VM)
        kit = StoreKit(self.upstream)
        self.addCleanup(kit.cleanup)
        socket = VarstoredSocket(VM, kit.nvram)
        self.wire = Wire(socket.resource(), timeout=30)

    def tearDown(self) -> None:
        self.wire.lose()
        self.assertEqual(self.wire.clock.getDelayedCalls(), [])

    def test_connection_close_closes_after_the_answer(self) -> None:
        self.wire.send(http_request(b"POST", b"/", sample("requests", "VM.get_NVRAM.request.0"),
                                    {b"Connection": b"close", b"Content-Type": b"text/xml"}))
        [(code, headers, body)] = self.wire.responses()
        self.assertEqual(code, 200)
        self.assertEqual(headers[b"content-length"], b"%d" % len(body))
        self.assertNotIn(b"transfer-encoding", headers)
        self.assertEqual(decode(body)["Value"], {})
        self.assertTrue(self.wire.closed)

    def test_keep_alive_serves_many_calls(self) -> None:
        for name in ("session.login_with_password", "VM.get_by_uuid", "VM.get_NVRAM",
                     "VM.set_NVRAM_EFI_variables", "session.logout"):
            self.wire.send(http_request(b"POST", b"/", sample("requests", name + ".request.0")))
        answers = self.wire.responses()
        self.assertEqual([decode(b)["Status"] for _, _, b in answers], ["Success"] * 5)
        self.assertFalse(self.wire.closed)

    def test_oversized_body_is_413(self) -> None:
        body = call("VM.set_NVRAM_EFI_variables", "<value>s</value>", "<value>v</value>",
                    "<value>" + "A" * MAX_BODY + "</value>")
        self.wire.send(http_request(b"POST", b"/", body))
        self.assertEqual([r[0] for r in self.wire.responses()], [413])
        self.assertEqual(self.upstream.calls, [])

    def test_405_has_a_length_and_allow(self) -> None:
        self.wire.send(http_request(b"GET", b"/"))
        [(code, headers, body)] = self.wire.responses()
        self.assertEqual((code, headers[b"allow"]), (405, b"POST"))
        self.assertEqual(headers[b"content-length"], b"%d" % len(body))


def nvram_call(value: str) -> bytes:
    return call("VM.set_NVRAM_EFI_variables", "<value>s</value>", "<value>v</value>",
                "<value>" + value + "</value>")


class HostileRequestTests(SynchronousTestCase):
    """Requests varstored never sends get a deliberate answer (each of these
    was an unhandled exception), and one VM's large bodies are parsed in
    its own queue, in steps, while other VMs are served."""

    def setUp(self) -> None:
        self.clock = TurnClock()
        self.upstream = FakeUpstream()
        self.upstream.add_vm(VM)
        self.upstream.add_vm(OTHER, nvram={"EFI-variables": "other-vars"})
        self.events: list[dict[str, object]] = []
        self.wire = self.connect(VM)

    def connect(self, vm: str) -> Wire:
        kit = StoreKit(self.upstream)
        self.addCleanup(kit.cleanup)
        socket = VarstoredSocket(vm, kit.nvram)
        return Wire(socket.resource(), clock=self.clock, events=self.events)

    def tearDown(self) -> None:
        self.wire.lose()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertNotIn("log_failure", repr(self.events))

    def test_without_host(self) -> None:
        body = sample("requests", "VM.get_NVRAM.request.0")
        for version in (b"HTTP/1.0", b"HTTP/1.1"):
            self.wire.reconnect()
            self.wire.send(b"POST / %s\r\nContent-Length: %d\r\n\r\n%s"
                           % (version, len(body), body))
            [(code, _, answer)] = self.wire.responses()
            self.assertEqual((code, decode(answer)["Status"]), (200, "Success"))

    def test_int_too_long_for_python_is_400(self) -> None:
        body = call("message.create", *["<value>x</value>"] * 2,
                    "<value><int>" + "9" * 4301 + "</int></value>", *["<value>x</value>"] * 3)
        self.wire.send(http_request(b"POST", b"/", body))
        self.assertEqual([r[0] for r in self.wire.responses()], [400])
        self.assertEqual(self.upstream.calls, [])

    def test_deep_nesting_is_refused_in_the_first_step(self) -> None:
        # The body: 684 KiB, 100,000 nested elements (~130 ms to
        # parse whole on the reactor before the depth limit applied).
        n = 100_000 // 3
        body = call("VM.get_NVRAM", "<value><array><data>" * n)
        self.assertGreater(len(body), 600_000)
        self.wire.send(http_request(b"POST", b"/", body), pump=False)
        self.assertEqual([r[0] for r in self.wire.responses()], [400])
        self.assertLessEqual(self.wire.pump(), 1)  # the next read turn, no parse step
        # Refused for its depth while reading, not after reading it all.
        self.assertEqual([e["why"] for e in self.events], ["elements nested too deeply"])

    def test_another_vm_is_served_while_a_large_body_is_parsed(self) -> None:
        other = self.connect(OTHER)
        self.wire.send(http_request(b"POST", b"/", nvram_call("A" * (MAX_BODY - 300))),
                       pump=False)
        other.send(http_request(b"POST", b"/", sample("requests", "VM.get_NVRAM.request.0")),
                   pump=False)
        self.assertEqual(decode(other.responses()[0][2])["Value"],
                         {"EFI-variables": "other-vars"})
        self.assertEqual(self.wire.responses(), [])
        self.assertGreaterEqual(self.wire.pump(), 60)
        self.assertEqual(decode(self.wire.responses()[0][2])["Status"], "Success")
        other.lose()

    def test_one_vm_from_many_connections_competes_with_itself(self) -> None:
        # Two connections of the same VM: their bodies are parsed one after
        # the other (in the VM's queue), not side by side.
        second = Wire.another(self.wire)
        body = http_request(b"POST", b"/", nvram_call("B" * (MAX_BODY - 300)))
        self.wire.send(body, pump=False)
        second.send(body, pump=False)
        one_body_steps = (len(body) // (16 * 1024))
        self.assertGreaterEqual(self.wire.pump(), 2 * one_body_steps - 2)
        self.assertEqual(len(self.wire.responses()) + len(second.responses()), 2)
        second.lose()

    def test_large_answer_is_encoded_in_steps(self) -> None:
        self.upstream.vms[VM]["nvram"] = {"EFI-variables": "<&>" * 300_000}
        self.wire.send(http_request(b"POST", b"/", sample("requests", "VM.get_NVRAM.request.0")),
                       pump=False)
        self.assertEqual(self.wire.responses(), [])
        sizes = []
        while any(call.getTime() <= self.clock.seconds()
                  for call in self.clock.getDelayedCalls()):
            self.clock.advance(0)
            sizes.append(len(self.wire.transport.value()))
        self.assertGreater(len(sizes), 40)
        # Written in pieces of about 64 KiB, one per reactor iteration.
        growth = [b - a for a, b in zip(sizes, sizes[1:]) if b > a]
        self.assertGreater(len(growth), 20)
        self.assertLess(max(growth), 200_000)
        [(code, _, answer)] = self.wire.responses()
        self.assertEqual(decode(answer)["Value"], {"EFI-variables": "<&>" * 300_000})

    def test_refusals_are_logged_rate_limited_without_content(self) -> None:
        for n in range(40):
            self.wire.send(http_request(b"POST", b"/", b"<SECRET-NVRAM-%d/>" % n))
        self.assertEqual(len(self.events), 5)
        self.clock.advance(60)
        self.assertEqual([e["count"] for e in self.events if "count" in e], [35])
        self.assertNotIn("SECRET", repr(self.events))


class HandlerTableTests(SynchronousTestCase):
    def test_every_checked_call_has_its_handler(self) -> None:
        from xguard.domain import varstored

        self.assertEqual(set(varstored._HANDLERS), set(varstored._SIGNATURES))
        for name in varstored._HANDLERS.values():
            self.assertTrue(callable(getattr(varstored.VarstoredSocket, name)))
