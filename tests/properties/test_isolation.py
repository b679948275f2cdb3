"""Property: whatever a client sends on one VM's sockets — any method, any
parameters, other VMs' uuids and handles — only that VM's records are read
or written upstream, and other VMs' state is unchanged (SPEC §1.1)."""

from __future__ import annotations

import copy
import xmlrpc.client
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase

from tests.fakes import FakeUpstream, StoreKit
from xguard.domain.swtpm import SwtpmSocket
from xguard.domain.varstored import VarstoredSocket
from xguard.model import TpmKey

OWN = "0b1f0a3c-6a2e-4a55-9a2d-6f1e2d3c4b5a"
OTHERS = ["9e8d7c6b-5a49-4838-a726-150f0e0d0c0b", "12345678-1234-4234-8234-123456789abc"]

METHODS = [
    "session.login_with_password", "session.logout", "VM.get_by_uuid", "VM.get_NVRAM",
    "VM.set_NVRAM_EFI_variables", "VM.set_NVRAM_EFI_variables_v2",
    "VM.get_secureboot_certificates_state", "message.create", "VM.destroy", "VTPM.set_contents",
    "VM.set_NVRAM", "session.get_all",
]
# Values a hostile client would try: other VMs' uuids, their refs, our own.
hostile = st.sampled_from(OTHERS + [OWN, "OpaqueRef:other", "OpaqueRef:xguard-vm", "yes", ""])
param = st.one_of(hostile, st.text(max_size=12), st.integers(-3, 3))


def build() -> tuple[FakeUpstream, dict[str, str], StoreKit, StubTreq, StubTreq]:
    upstream = FakeUpstream()
    vtpms = {vm: upstream.add_vm(vm, nvram={"EFI-variables": f"vars-{vm[:4]}"}) or ""
             for vm in [OWN, *OTHERS]}
    for vm, vtpm in vtpms.items():
        upstream.vtpms[vtpm] = f"p-{vm[:4]} s-{vm[:4]} v-{vm[:4]}"
    # Every VM is live: copies of any VM could be kept, so only isolation
    # keeps the others' out.
    kit = StoreKit(upstream)
    varstored = VarstoredSocket(OWN, kit.nvram)
    swtpm = SwtpmSocket(OWN, kit.tpm)
    return upstream, vtpms, kit, StubTreq(varstored.resource()), StubTreq(swtpm.resource())


def others_state(upstream: FakeUpstream, vtpms: dict[str, str]) -> Any:
    return copy.deepcopy([(upstream.vms[vm], upstream.vtpms[vtpms[vm]]) for vm in OTHERS])


def send(treq: StubTreq, method: str, url: str, body: bytes) -> None:
    d = treq.request(method, url, data=body)
    treq.flush()
    d.addCallback(treq.content)
    treq.flush()


class IsolationTests(SynchronousTestCase):
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.tuples(st.sampled_from(METHODS), st.lists(param, max_size=7)),
                    min_size=1, max_size=8),
           st.lists(st.tuples(st.sampled_from(["GET", "PUT", "DELETE", "HEAD"]),
                              st.sampled_from([k.path for k in TpmKey] + ["/../" + OTHERS[0]]),
                              st.sampled_from([b"", b"QUFB", b"T1RIRVI="])), max_size=6))
    def test_a_socket_only_touches_its_own_vm(self, calls: list[tuple[str, list[Any]]],
                                              rest: list[tuple[str, str, bytes]]) -> None:
        upstream, vtpms, kit, varstored, swtpm = build()
        before = others_state(upstream, vtpms)
        try:
            _exercise(upstream, vtpms, kit, varstored, swtpm, before, calls, rest)
        finally:
            kit.cleanup()


def _exercise(upstream: FakeUpstream, vtpms: dict[str, str], kit: StoreKit,
              varstored: StubTreq, swtpm: StubTreq, before: Any,
              calls: list[tuple[str, list[Any]]], rest: list[tuple[str, str, bytes]]) -> None:
    for method, params in calls:
        body = xmlrpc.client.dumps(tuple(params), method, allow_none=True).encode()
        send(varstored, "POST", "http://varstored/", body)
    for method, path, body in rest:
        send(swtpm, method, "http://swtpm" + path, body)
    for name, args in upstream.calls:
        if name in ("get_vtpm_contents", "set_vtpm_contents"):
            assert args[0] == vtpms[OWN], (name, args)
        else:
            assert args[0] == OWN, (name, args)
    assert others_state(upstream, vtpms) == before
    for vm, name, _priority, _body in upstream.messages:
        assert (vm, name) == (OWN, "VM_SECURE_BOOT_FAILED")
    assert set(kit.known.kept()) <= {OWN}  # the last known state of no other VM
