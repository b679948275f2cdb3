"""The swtpm socket: the REST calls on the three keys, the status codes swtpm
depends on (never a 4xx for a read it cannot answer yet), per-VM ordering."""

from __future__ import annotations

from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests.fakes import FakeUpstream, PendingWriter, StoreKit
from tests.unit.test_site import Wire, http_request
from xguard.domain.site import MAX_BODY
from xguard.domain.swtpm import SwtpmSocket
from xguard.errors import TransientUpstreamError
from xguard.interfaces import IItemWriter
from xguard.model import TpmKey, TpmState
from xguard.state.direct import DirectWriter

VM = "0b1f0a3c-6a2e-4a55-9a2d-6f1e2d3c4b5a"
OTHER = "9e8d7c6b-5a49-4838-a726-150f0e0d0c0b"
PATHS = [key.path for key in TpmKey]


class SwtpmTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.upstream = FakeUpstream()
        self.vtpm = self.upstream.add_vm(VM)
        self.other_vtpm = self.upstream.add_vm(OTHER)
        self.upstream.vtpms[self.other_vtpm] = "b3RoZXI="
        self.kit = StoreKit(self.upstream)
        self.addCleanup(self.kit.cleanup)
        self.sink = self.kit.vtpm_sink
        self.use(DirectWriter(self.sink))

    def use(self, writer: IItemWriter) -> None:
        self.socket = SwtpmSocket(VM, self.kit.tpm_keys(writer))
        self.treq = StubTreq(self.socket.resource())

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        d = self.treq.request(method, "http://swtpm" + path, data=body)
        self.treq.flush()
        response = self.successResultOf(d)
        return response.code, self.successResultOf(self.treq.content(response))

    def state(self) -> TpmState:
        return TpmState.deserialize(self.upstream.vtpms[self.vtpm])

    def test_pending_writer_is_an_item_writer(self) -> None:
        verifyObject(IItemWriter, PendingWriter())

    def test_get_of_a_key_with_no_state_is_200_empty(self) -> None:
        for path in PATHS:
            self.assertEqual(self.request("GET", path), (200, b""), path)

    def test_put_then_get_each_key(self) -> None:
        for n, key in enumerate(TpmKey):
            content = b"QUJD" * (n + 1)
            self.assertEqual(self.request("PUT", key.path, content), (204, b""))
            self.assertEqual(self.request("GET", key.path), (200, content))
        self.assertEqual(self.state(), TpmState("QUJD", "QUJDQUJD", "QUJDQUJDQUJD"))
        self.assertEqual(self.upstream.vtpms[self.other_vtpm], "b3RoZXI=")

    def test_get_content_type(self) -> None:
        self.request("PUT", PATHS[0], b"QUJD")
        response = self.successResultOf(self.treq.get("http://swtpm" + PATHS[0]))
        self.assertEqual(response.headers.getRawHeaders(b"content-type"),
                         [b"application/octet-stream"])

    def test_delete_empties_the_key(self) -> None:
        for path in PATHS:
            self.request("PUT", path, b"QUJD")
        self.assertEqual(self.request("DELETE", PATHS[1]), (204, b""))
        self.assertEqual(self.request("GET", PATHS[1]), (200, b""))
        self.assertEqual(self.state(), TpmState("QUJD", "", "QUJD"))

    def test_delete_of_an_empty_key_is_204(self) -> None:
        for path in PATHS:
            self.assertEqual(self.request("DELETE", path), (204, b""))

    def test_head(self) -> None:
        for path in PATHS:
            self.assertEqual(self.request("HEAD", path)[0], 404)
            self.request("PUT", path, b"QUJD")
            self.assertEqual(self.request("HEAD", path), (200, b""))

    def test_non_base64_bodies_are_400(self) -> None:
        for body in (b"QUJD\n", b"QUJD\r\n", b" QUJD", b"QU JD", b"QU\tJD", b"QUJ", b"QU!D",
                     b"QUJD=", b"\xff\xfe", b"QQ==QUJD"):
            with self.subTest(body=body):
                self.assertEqual(self.request("PUT", PATHS[0], body)[0], 400)
        self.assertEqual(self.upstream.calls, [])

    def test_empty_put_is_valid_base64(self) -> None:
        self.request("PUT", PATHS[0], b"QUJD")
        self.assertEqual(self.request("PUT", PATHS[0], b""), (204, b""))
        self.assertEqual(self.state().permall, "")

    def test_unknown_paths_are_404(self) -> None:
        for method in ("GET", "PUT", "DELETE", "HEAD", "POST"):
            for path in ("/", "/tpm2-00.other", "/tpm2-00.permall/x", "/tpm2-01.permall"):
                with self.subTest(method=method, path=path):
                    self.assertEqual(self.request(method, path, b"QUJD")[0], 404)
        self.assertEqual(self.upstream.calls, [])

    def test_other_methods_are_405(self) -> None:
        for method in ("POST", "PATCH", "OPTIONS"):
            self.assertEqual(self.request(method, PATHS[0], b"QUJD")[0], 405)

    def test_transient_read_failure_is_503(self) -> None:
        self.upstream.down = True
        for path in PATHS:
            self.assertEqual(self.request("GET", path)[0], 503)
            self.assertEqual(self.request("HEAD", path)[0], 503)

    def test_transient_write_failure_without_cache_is_503(self) -> None:
        self.upstream.fail_next(TransientUpstreamError(["HOST_STILL_BOOTING"]))
        self.assertEqual(self.request("PUT", PATHS[0], b"QUJD")[0], 503)

    def test_permanent_error_is_500(self) -> None:
        vm_without_vtpm = "5d5d5d5d-1111-4222-8333-444455556666"
        self.upstream.add_vm(vm_without_vtpm, vtpm=False)
        socket = SwtpmSocket(vm_without_vtpm, self.kit.tpm)
        treq = StubTreq(socket.resource())
        for method, body in (("GET", None), ("PUT", b"QUJD")):
            response = self.successResultOf(treq.request(method, "http://s" + PATHS[0], data=body))
            self.assertEqual(response.code, 500)
            self.assertIn(b"VM_HAS_NO_VTPM", self.successResultOf(treq.content(response)))

    def test_pending_version_is_read_while_upstream_is_down(self) -> None:
        self.use(PendingWriter())
        self.assertEqual(self.request("PUT", PATHS[2], b"UEVORElORw=="), (204, b""))
        self.upstream.down = True
        self.assertEqual(self.request("GET", PATHS[2]), (200, b"UEVORElORw=="))
        self.assertEqual(self.request("HEAD", PATHS[2])[0], 200)

    def test_requests_are_served_one_at_a_time_in_order(self) -> None:
        self.upstream.hold = True
        put = self.treq.put("http://swtpm" + PATHS[0], data=b"TkVX")
        get = self.treq.get("http://swtpm" + PATHS[0])
        self.treq.flush()
        self.assertEqual(self.upstream.held, 1)
        for _ in range(3):  # vtpm_for_vm, get and set of the write's RMW
            self.assertNoResult(get)
            self.upstream.release()
            self.treq.flush()
        self.assertEqual(self.successResultOf(put).code, 204)
        while self.upstream.held:
            self.upstream.release()
            self.treq.flush()
        self.assertEqual(self.successResultOf(self.treq.content(self.successResultOf(get))),
                         b"TkVX")
        names = [name for name, _ in self.upstream.calls]
        self.assertEqual(names.index("set_vtpm_contents"), 2)
        self.assertEqual(len(names), 5)


class SwtpmWireTests(SynchronousTestCase):
    """What swtpm needs from the HTTP layer, on raw bytes."""

    def setUp(self) -> None:
        self.upstream = FakeUpstream()
        self.vtpm = self.upstream.add_vm(VM)
        kit = StoreKit(self.upstream)
        self.addCleanup(kit.cleanup)
        self.wire = Wire(SwtpmSocket(VM, kit.tpm).resource(), timeout=30)

    def tearDown(self) -> None:
        self.wire.lose()
        self.assertEqual(self.wire.clock.getDelayedCalls(), [])

    def test_keep_alive_session_like_swtpm(self) -> None:
        self.wire.send(http_request(b"GET", PATHS[0].encode()))
        self.wire.send(http_request(b"PUT", PATHS[0].encode(), b"QUJD"))
        self.wire.send(http_request(b"GET", PATHS[0].encode()))
        self.wire.send(http_request(b"DELETE", PATHS[0].encode()))
        responses = self.wire.responses()
        self.assertEqual([(c, b) for c, _, b in responses],
                         [(200, b""), (204, b""), (200, b"QUJD"), (204, b"")])
        self.assertEqual(responses[2][1][b"content-length"], b"4")
        self.assertEqual(responses[0][1][b"content-length"], b"0")
        self.assertFalse(self.wire.closed)

    def test_head_sends_no_body(self) -> None:
        self.wire.send(http_request(b"PUT", PATHS[0].encode(), b"QUJDREVG"))
        self.wire.transport.clear()
        self.wire.send(http_request(b"HEAD", PATHS[0].encode()))
        data = self.wire.transport.value()
        self.assertTrue(data.startswith(b"HTTP/1.1 200 "), data)
        self.assertTrue(data.endswith(b"\r\n\r\n"), data)
        self.assertIn(b"Content-Length: 0\r\n", data)
        self.wire.transport.clear()
        self.wire.send(http_request(b"HEAD", PATHS[1].encode()))
        data = self.wire.transport.value()
        self.assertTrue(data.startswith(b"HTTP/1.1 404 "), data)
        self.assertTrue(data.endswith(b"\r\n\r\n"), data)

    def test_connection_close(self) -> None:
        self.wire.send(http_request(b"GET", PATHS[0].encode(), None, {b"Connection": b"close"}))
        self.assertEqual(self.wire.responses()[0][0], 200)
        self.assertTrue(self.wire.closed)

    def test_oversized_put_is_413(self) -> None:
        self.wire.send(http_request(b"PUT", PATHS[0].encode(), b"A" * (MAX_BODY + 4)))
        self.assertEqual([r[0] for r in self.wire.responses()], [413])
        self.assertEqual(self.upstream.calls, [])

    def test_largest_body_is_accepted(self) -> None:
        self.wire.send(http_request(b"PUT", PATHS[2].encode(), b"A" * MAX_BODY))
        self.assertEqual([r[0] for r in self.wire.responses()], [204])

    def test_client_hanging_up_does_not_cancel_a_write(self) -> None:
        self.upstream.hold = True
        self.wire.send(http_request(b"PUT", PATHS[0].encode(), b"S0VFUA=="))
        self.wire.lose()
        while self.upstream.held:
            self.upstream.release()
        self.assertEqual(TpmState.deserialize(self.upstream.vtpms[self.vtpm]).permall, "S0VFUA==")

    def test_silent_client_is_timed_out(self) -> None:
        self.wire.clock.advance(30)
        self.assertTrue(self.wire.closed)


class HostileRequestTests(SynchronousTestCase):
    """Requests swtpm never sends get a deliberate 2xx or 4xx, never a 500
    (each of these was an unhandled exception)."""

    def setUp(self) -> None:
        self.upstream = FakeUpstream()
        self.vtpm = self.upstream.add_vm(VM)
        self.upstream.vtpms[self.vtpm] = TpmState("UEVSTQ==", "", "").serialize()
        kit = StoreKit(self.upstream)
        self.addCleanup(kit.cleanup)
        self.events: list[dict[str, object]] = []
        self.wire = Wire(SwtpmSocket(VM, kit.tpm).resource(), events=self.events)

    def tearDown(self) -> None:
        self.wire.lose()
        self.assertEqual(self.wire.clock.getDelayedCalls(), [])

    def get(self, raw: bytes) -> tuple[int, bytes]:
        self.wire.reconnect()
        self.wire.send(raw)
        [(code, _, body)] = self.wire.responses()
        return code, body

    def test_without_host(self) -> None:
        for version in (b"HTTP/1.0", b"HTTP/1.1"):
            self.assertEqual(self.get(b"GET /tpm2-00.permall " + version + b"\r\n\r\n"),
                             (200, b"UEVSTQ=="))

    def test_equivalent_targets_name_the_same_key(self) -> None:
        for target in (b"/tpm2-00%2Epermall", b"/tpm2-00%2epermall", b"//tpm2-00.permall",
                       b"http://x/tpm2-00.permall", b"/tpm2-00.permall?x=1"):
            self.assertEqual(self.get(b"GET " + target + b" HTTP/1.1\r\n\r\n"),
                             (200, b"UEVSTQ=="), target)

    def test_malformed_targets_are_4xx(self) -> None:
        for target, code in ((b"xtpm2-00.permall", 400), (b"tpm2-00.permall", 400),
                             (b"/tpm2-00\x80permall", 400), (b"/%ff", 400),
                             (b"/tpm2-00.permall%00", 404), (b"/tpm2-00.permall/", 404),
                             (b"/tpm2-00.permall//", 404), (b"/../tpm2-00.permall", 404)):
            self.assertEqual(self.get(b"GET " + target + b" HTTP/1.1\r\n\r\n")[0], code,
                             target)
        self.assertNotIn("log_failure", repr(self.events))

    def test_large_put_is_checked_in_steps_while_another_vm_is_served(self) -> None:
        other = FakeUpstream()
        other_vtpm = other.add_vm(OTHER)
        other.vtpms[other_vtpm] = TpmState("T1RIRVI=", "", "").serialize()
        other_kit = StoreKit(other)
        self.addCleanup(other_kit.cleanup)
        other_wire = Wire(SwtpmSocket(OTHER, other_kit.tpm).resource(), clock=self.wire.clock)
        self.wire.send(http_request(b"PUT", PATHS[0].encode(), b"QUJD" * (MAX_BODY // 4)),
                       pump=False)
        other_wire.send(http_request(b"GET", PATHS[0].encode()), pump=False)
        # The other VM was answered at once; this one after its steps.
        self.assertEqual([r[:1] for r in other_wire.responses()], [(200,)])
        self.assertEqual(self.wire.responses(), [])
        self.assertEqual(self.wire.pump(), MAX_BODY // (64 * 1024) - 1)
        self.assertEqual([r[0] for r in self.wire.responses()], [204])
        other_wire.lose()


class StrictBase64Property(SynchronousTestCase):
    """The fast check agrees with the grammar of canonical base64."""

    @staticmethod
    def canonical(body: bytes) -> bool:
        import re

        grammar = rb"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?"
        return re.fullmatch(grammar, body) is not None

    def test_agrees_with_the_grammar(self) -> None:
        from hypothesis import given, settings
        from hypothesis import strategies as st

        from xguard.domain.steps import drain
        from xguard.domain.swtpm import HTTPError, iter_check_base64

        @settings(max_examples=500, deadline=None)
        @given(st.binary(max_size=12) | st.text(alphabet="AQUFB+/=\n ", max_size=24).map(
            str.encode), st.sampled_from([4, 8, 64 * 1024]))
        def check(body: bytes, slice_size: int) -> None:
            # Checked in slices as small as one group: the slicing never
            # changes the verdict.
            try:
                drain(iter_check_base64(body, slice_size))
                accepted = True
            except HTTPError:
                accepted = False
            self.assertEqual(accepted, self.canonical(body), body)

        check()
