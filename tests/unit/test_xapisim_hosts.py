"""The simulator's other hosts: where a VM runs (power state, resident
host), another host writing through the peer socket whatever the faults,
and one method failing for its next N calls."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from xguard.testing._simstate import Dispatcher, SimState, XapiError
from xguard.testing.simclient import SimAdminError, SimProcess
from xguard.testing.xapisim import Simulator

VM = "6a1f1e3c-3d0a-4a8e-9d3c-2b1e7f0c9a11"


def _rpc(method: str, params: list[Any]) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "method": method, "params": params,
                       "id": 1}).encode()


class ResidenceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.state = SimState()
        self.ids = self.state.seed_vm(VM)
        self.d = Dispatcher(self.state)
        self.session = self.d.call("session.login_with_password", ["root", ""])

    def test_a_seeded_vm_is_halted_nowhere(self) -> None:
        ref = self.ids["vm_ref"]
        self.assertEqual(self.d.call("VM.get_power_state", [self.session, ref]), "Halted")
        self.assertEqual(self.d.call("VM.get_resident_on", [self.session, ref]),
                         "OpaqueRef:NULL")

    def test_running_on_a_named_host(self) -> None:
        self.state.seed_vm(VM, power_state="Running", resident_on="host-b")
        ref = self.ids["vm_ref"]
        self.assertEqual(self.d.call("VM.get_power_state", [self.session, ref]), "Running")
        host = self.d.call("VM.get_resident_on", [self.session, ref])
        self.assertEqual(self.d.call("host.get_name_label", [self.session, host]), "host-b")
        this = self.d.call("session.get_this_host", [self.session, self.session])
        self.assertEqual(self.d.call("host.get_name_label", [self.session, this]), "host-a")
        self.assertNotEqual(this, host)
        self.assertEqual(self.d.call("VM.get_record", [self.session, ref])["power_state"],
                         "Running")
        with self.assertRaises(XapiError) as cm:
            self.d.call("host.get_name_label", [self.session, "OpaqueRef:nope"])
        self.assertEqual(cm.exception.codes[0], "HANDLE_INVALID")
        again = SimState.from_json(json.loads(json.dumps(self.state.to_json())))
        self.assertEqual((again.vm_state(VM)["power_state"], again.vm_state(VM)["resident_on"]),
                         ("Running", "host-b"))

    def test_bad_seeds_are_refused(self) -> None:
        with self.assertRaises(ValueError):
            self.state.seed_vm(VM, power_state="Dancing")


class PeerAndFaultTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.sim = Simulator(self.clock)
        self.ids = self.sim.state.seed_vm(VM, contents="a")
        self.api = StubTreq(self.sim.api_site().resource)
        self.peer = StubTreq(self.sim.peer_site().resource)

    def call(self, stub: StubTreq, method: str, params: list[Any]) -> Any:
        d = stub.post("http://x/jsonrpc", data=_rpc(method, params))
        stub.flush()
        response = self.successResultOf(d)
        return json.loads(self.successResultOf(response.content()))

    def test_another_host_is_served_whatever_the_faults(self) -> None:
        self.sim.fail_next(5, ["HOST_STILL_BOOTING"])
        self.sim.fail_method("VTPM.set_contents", ["INTERNAL_ERROR"])
        self.sim.http_500_n = 3
        session = self.call(self.peer, "session.login_with_password", ["root", ""])["result"]
        answer = self.call(self.peer, "VTPM.set_contents",
                           [session, self.ids["vtpm_ref"], "peer"])
        self.assertEqual(answer["result"], "")
        self.assertEqual(self.sim.state.vtpm_state(self.ids["vtpm_uuid"])["contents"], "peer")
        self.assertEqual(self.sim.counters, {})  # xguard's own traffic only
        self.assertEqual(self.sim.peer_counters["VTPM.set_contents"], 1)

    def test_a_method_failing_for_its_next_n_calls(self) -> None:
        session = self.call(self.api, "session.login_with_password", ["root", ""])["result"]
        self.sim.fail_method("VTPM.set_contents", ["INTERNAL_ERROR", "db"], n=2)
        params = [session, self.ids["vtpm_ref"], "b"]
        for _ in range(2):
            error = self.call(self.api, "VTPM.set_contents", params)["error"]
            self.assertEqual(error["message"], "INTERNAL_ERROR")
        self.assertEqual(self.call(self.api, "VTPM.set_contents", params)["result"], "")
        self.assertEqual(self.sim.status()["fail_methods"], {})


class PeerProcessTests(SynchronousTestCase):
    """The peer socket of a real simulator process, with xapi refusing."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="xg")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.sim = SimProcess(os.path.join(self.dir, "xapi"), os.path.join(self.dir, "admin"),
                              peer_socket=os.path.join(self.dir, "peer"))
        self.addCleanup(self.sim.stop)
        self.sim.start()

    def test_another_host_writes_while_this_host_s_xapi_refuses(self) -> None:
        ids = self.sim.client.seed_vm(contents="p s v", nvram={"EFI-variables": "N1"},
                                      power_state="Running", resident_on="host-b")
        self.sim.client.set_mode("refuse")
        assert self.sim.peer is not None
        self.sim.peer.set_vtpm_contents(ids["vm_uuid"], "p3 s3 v3")
        self.sim.peer.set_efi_variables(ids["vm_uuid"], "N3")
        state = self.sim.client.vm_state(ids["vm_uuid"])
        self.assertEqual(state["vtpms"][0]["contents"], "p3 s3 v3")
        self.assertEqual(state["nvram"], {"EFI-variables": "N3"})
        self.assertEqual((state["power_state"], state["resident_on"]), ("Running", "host-b"))
        with self.assertRaises(SimAdminError) as cm:
            self.sim.peer.set_vtpm_contents("00000000-0000-4000-8000-000000000000", "x")
        self.assertIn("UUID_INVALID", str(cm.exception))
