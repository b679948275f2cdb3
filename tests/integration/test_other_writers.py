"""Acknowledged means final, at the edges (issue 17, SPEC §6 "Only proof …
sets it aside", "Other writers", "Facts, not beliefs", "Checked bytes"):
the real daemon, the simulator as xapi, and another host writing through
the simulator's peer socket as HA or a migration would.

Each of the four defects the issue reproduced is a regression test here:
a transient error lost an acknowledged write; a crashed host's stale cache
overwrote (and mixed) another host's newer state; a belief about xapi's
reachability decided what a rebooting VM could read; bytes on disk were
delivered unchecked.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.integration.harness import (
    Host,
    finish_all,
    get,
    put,
    rpc,
    set_nvram,
    vtpm_fields,
)
from tests.integration.test_lifecycle import (
    boot_reads,
    create_sockets,
    destroy_sockets,
    get_contents,
)
from xguard.testing.daemon import wait_for
from xguard.testing.simclient import SimProcess

pytestmark = pytest.mark.integration


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture(scope="module")
def peer_sim() -> Iterator[SimProcess]:
    """A simulator whose peer socket is another host of the pool."""
    root = tempfile.mkdtemp(prefix="xp")
    proc = SimProcess(os.path.join(root, "xapi"), os.path.join(root, "admin"),
                      log_file=os.path.join(root, "sim.log"),
                      peer_socket=os.path.join(root, "peer"))
    proc.start()
    yield proc
    proc.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def hosts(peer_sim: SimProcess) -> Iterator[Callable[..., Host]]:
    peer_sim.client.set_mode("up")
    peer_sim.client.reset()
    made: list[Host] = []

    def make(extra: list[str] | None = None) -> Host:
        host = Host(peer_sim, extra)
        made.append(host)
        host.daemon.start()
        return host

    yield make
    peer_sim.client.set_mode("up")
    finish_all(made)


def running_vm(host: Host, sim: SimProcess, contents: str, nvram: str) -> dict[str, str]:
    """A VM started here: seeded, its sockets created, its state read by
    xenopsd, varstored and swtpm (so xguard has seen it upstream)."""
    vm = host.vm(contents=contents)
    sim.client.seed_vm(vm["vm_uuid"], nvram={"EFI-variables": nvram},
                       power_state="Running", resident_on="host-a")
    assert get_contents(host.control, vm["vtpm_uuid"]) == contents
    assert boot_reads(vm)["nvram"]["Value"] == {"EFI-variables": nvram}
    return vm


def upstream(sim: SimProcess, vm: dict[str, str]) -> tuple[str, str]:
    state = sim.client.vm_state(vm["vm_uuid"])
    return state["vtpms"][0]["contents"], state["nvram"].get("EFI-variables", "")


def set_aside(host: Host) -> list[dict[str, Any]]:
    doc = host.control.status()["services"]
    return [item for svc in doc.values() for item in svc["quarantined"]]


def host_crash(host: Host) -> None:
    """kill -9, and /run is lost with the reboot (the active-sockets file)."""
    host.daemon.kill()
    os.unlink(host.daemon.sockets_file)


def cached(host: Host) -> int:
    return sum(sum(svc["pending"].values()) for svc in host.control.status()["services"].values())


# -- defect 1: only proof sets a write aside ---------------------------------------
def test_a_transient_error_never_loses_an_acknowledged_write(
        hosts: Callable[..., Host], peer_sim: SimProcess) -> None:
    host = hosts()
    vm = running_vm(host, peer_sim, f"{b64('v1')} {b64('s1')} {b64('o1')}", b64("n1"))
    peer_sim.client.set_mode("refuse")
    assert put(vm["tpm"], 0, b64("v2").encode())[0] == 204  # cached
    # xapi comes back with a database hiccup on the first delivery.
    peer_sim.client.fail_method("VTPM.set_contents", ["INTERNAL_ERROR", "db locked"], n=1)
    peer_sim.client.set_mode("up")
    assert get(vm["tpm"], 0) == (200, b64("v2").encode())
    host.wait_drained()
    assert get(vm["tpm"], 0) == (200, b64("v2").encode())
    assert vtpm_fields(upstream(peer_sim, vm)[0])[0] == b64("v2")
    assert set_aside(host) == []


def test_a_direct_write_meeting_a_transient_error_is_cached_and_acknowledged(
        hosts: Callable[..., Host], peer_sim: SimProcess) -> None:
    host = hosts()
    vm = running_vm(host, peer_sim, f"{b64('v1')} {b64('s1')} {b64('o1')}", b64("n1"))
    peer_sim.client.fail_method("VTPM.set_contents", ["INTERNAL_ERROR"], n=1)
    peer_sim.client.fail_method("VM.set_NVRAM_EFI_variables", ["INTERNAL_ERROR"], n=1)
    assert put(vm["tpm"], 0, b64("v2").encode())[0] == 204
    answer, _ = set_nvram(vm["var"], b64("n2").encode(), "no")
    assert answer["Status"] == "Success", answer
    host.wait_drained()
    assert upstream(peer_sim, vm) == (f"{b64('v2')} {b64('s1')} {b64('o1')}", b64("n2"))


# -- defect 2: a crashed host's stale cache never overwrites another host's state ---
def test_ha_restart_elsewhere_sets_aside_the_triple_and_nvram(
        hosts: Callable[..., Host], peer_sim: SimProcess) -> None:
    host = hosts()
    vm = running_vm(host, peer_sim, f"{b64('v1')} {b64('s1')} {b64('o1')}", b64("n1"))
    peer_sim.client.set_mode("refuse")
    assert put(vm["tpm"], 0, b64("v2").encode())[0] == 204
    assert set_nvram(vm["var"], b64("n2").encode(), "no")[0]["Status"] == "Success"
    host_crash(host)
    # HA restarts the VM on host B, which writes a new lineage.
    peer_sim.client.seed_vm(vm["vm_uuid"], power_state="Running", resident_on="host-b")
    assert peer_sim.peer is not None
    theirs = f"{b64('v3')} {b64('s3')} {b64('o3')}"
    peer_sim.peer.set_vtpm_contents(vm["vm_uuid"], theirs)
    peer_sim.peer.set_efi_variables(vm["vm_uuid"], b64("n3"))
    peer_sim.client.set_mode("up")
    host.daemon.start()
    items = wait_for(lambda: len(set_aside(host)) == 2 and set_aside(host),
                     what="both writes set aside")
    assert upstream(peer_sim, vm) == (theirs, b64("n3"))  # untouched, never mixed
    kinds = {(i["service"], i["kind"], tuple(i["keys"])) for i in items}
    assert kinds == {("Swtpm", "elsewhere", (0, 1, 2)), ("Varstored", "elsewhere", (0,))}
    assert all("host-b" in i["reason"] for i in items)
    listed = host.daemon.ctl("set-aside").stdout.decode()
    assert f"Swtpm/{vm['vm_uuid']}" in listed and "host-b" in listed
    host.wait_drained()
    assert upstream(peer_sim, vm) == (theirs, b64("n3"))


def test_a_plain_crash_still_delivers_everything(hosts: Callable[..., Host],
                                                 peer_sim: SimProcess) -> None:
    host = hosts()
    vm = running_vm(host, peer_sim, f"{b64('v1')} {b64('s1')} {b64('o1')}", b64("n1"))
    peer_sim.client.set_mode("refuse")
    for key, value in enumerate(("v2", "s2", "o2")):
        assert put(vm["tpm"], key, b64(value).encode())[0] == 204
    assert set_nvram(vm["var"], b64("n2").encode(), "yes")[0]["Status"] == "Success"
    host_crash(host)
    peer_sim.client.seed_vm(vm["vm_uuid"], power_state="Halted", resident_on="")
    peer_sim.client.set_mode("up")
    host.daemon.start()
    host.wait_drained()
    assert upstream(peer_sim, vm) == (f"{b64('v2')} {b64('s2')} {b64('o2')}", b64("n2"))
    assert set_aside(host) == []


def test_a_migrated_vm_s_stale_writes_are_set_aside(hosts: Callable[..., Host],
                                                    peer_sim: SimProcess) -> None:
    """The source still holds pending writes when the VM has moved and the
    destination wrote: no restart, the base alone tells."""
    host = hosts()
    vm = running_vm(host, peer_sim, f"{b64('v1')} {b64('s1')} {b64('o1')}", b64("n1"))
    peer_sim.client.set_mode("refuse")
    assert put(vm["tpm"], 1, b64("s2").encode())[0] == 204
    destroy_sockets(host.control, vm)  # migrated away
    assert peer_sim.peer is not None
    theirs = f"{b64('v3')} {b64('s3')} {b64('o3')}"
    peer_sim.peer.set_vtpm_contents(vm["vm_uuid"], theirs)
    peer_sim.client.set_mode("up")
    (item,) = wait_for(lambda: set_aside(host), what="the write set aside")
    assert (item["kind"], item["keys"], item["held"]) == ("conflict", [0, 1, 2], False)
    assert upstream(peer_sim, vm)[0] == theirs


def test_a_write_of_unknown_base_stays_of_the_life_that_ended(
        hosts: Callable[..., Host], peer_sim: SimProcess) -> None:
    """xguard never saw the VM's state (xapi refused from the start), so
    its write's base is unknown: deliverable only while the VM runs here
    without a break. The VM stops, HA has another host write, the VM starts
    here again, and the daemon is killed: the next process must not take
    the new life for the one the write was made in."""
    host = hosts()
    peer_sim.client.set_mode("refuse")
    vm = host.vm(contents=f"{b64('v1')} {b64('s1')} {b64('o1')}")
    assert put(vm["tpm"], 0, b64("v2").encode())[0] == 204  # cached, base unknown
    assert set_nvram(vm["var"], b64("n2").encode(), "no")[0]["Status"] == "Success"
    destroy_sockets(host.control, vm)
    assert peer_sim.peer is not None
    theirs = f"{b64('v3')} {b64('s3')} {b64('o3')}"
    peer_sim.peer.set_vtpm_contents(vm["vm_uuid"], theirs)
    peer_sim.peer.set_efi_variables(vm["vm_uuid"], b64("n3"))
    create_sockets(host.control, vm)  # back here
    host.daemon.kill()
    host.daemon.start()
    peer_sim.client.set_mode("up")
    items = wait_for(lambda: len(set_aside(host)) == 2 and set_aside(host),
                     what="both writes set aside")
    assert {(i["service"], i["kind"]) for i in items} == {("Swtpm", "unverified"),
                                                         ("Varstored", "unverified")}
    host.wait_drained()
    assert upstream(peer_sim, vm) == (theirs, b64("n3"))  # never mixed with the old lineage


def test_a_crash_between_delivery_and_deletion_is_no_conflict(
        hosts: Callable[..., Host], peer_sim: SimProcess) -> None:
    host = hosts()
    vm = running_vm(host, peer_sim, f"{b64('v1')} {b64('s1')} {b64('o1')}", b64("n1"))
    peer_sim.client.set_mode("refuse")
    assert put(vm["tpm"], 0, b64("v2").encode())[0] == 204
    host.daemon.kill()
    # The delivery had reached xapi when the daemon died, its file not deleted.
    peer_sim.client.seed_vm(vm["vm_uuid"], contents=f"{b64('v2')} {b64('s1')} {b64('o1')}")
    peer_sim.client.set_mode("up")
    host.daemon.start()
    host.wait_drained()
    assert set_aside(host) == []
    assert upstream(peer_sim, vm)[0] == f"{b64('v2')} {b64('s1')} {b64('o1')}"


# -- resolving what is set aside, with each choice -------------------------------
def conflict(host: Host, sim: SimProcess) -> tuple[dict[str, str], str]:
    vm = running_vm(host, sim, f"{b64('v1')} {b64('s1')} {b64('o1')}", b64("n1"))
    sim.client.set_mode("refuse")
    assert put(vm["tpm"], 0, b64("v2").encode())[0] == 204
    destroy_sockets(host.control, vm)
    assert sim.peer is not None
    sim.peer.set_vtpm_contents(vm["vm_uuid"], f"{b64('v3')} {b64('s3')} {b64('o3')}")
    sim.client.set_mode("up")
    wait_for(lambda: set_aside(host), what="the write set aside")
    return vm, f"Swtpm/{vm['vm_uuid']}"


def test_resolve_push_ours(hosts: Callable[..., Host], peer_sim: SimProcess) -> None:
    host = hosts()
    vm, item = conflict(host, peer_sim)
    out = host.daemon.ctl("resolve", item, "push").stdout.decode()
    assert "pushed" in out
    assert upstream(peer_sim, vm)[0] == f"{b64('v2')} {b64('s1')} {b64('o1')}"
    assert set_aside(host) == []
    assert f"set-aside write {item} resolved: ours pushed" in host.daemon.log()


def test_resolve_keep_upstream_s(hosts: Callable[..., Host], peer_sim: SimProcess) -> None:
    host = hosts()
    vm, item = conflict(host, peer_sim)
    host.daemon.ctl("resolve", item, "keep")
    assert upstream(peer_sim, vm)[0] == f"{b64('v3')} {b64('s3')} {b64('o3')}"
    assert set_aside(host) == []
    assert "upstream's kept, ours dropped" in host.daemon.log()


def test_resolve_export(hosts: Callable[..., Host], peer_sim: SimProcess) -> None:
    host = hosts()
    vm, item = conflict(host, peer_sim)
    path = os.path.join(host.root, "export.json")
    host.daemon.ctl("resolve", item, "export", path)
    with open(path) as f:
        doc = json.load(f)
    assert doc["contents"] == f"{b64('v2')} {b64('s1')} {b64('o1')}"
    assert upstream(peer_sim, vm)[0] == f"{b64('v3')} {b64('s3')} {b64('o3')}"
    assert set_aside(host) == []
    refused = host.daemon.ctl("resolve", item, "keep", check=False)
    assert refused.returncode == 1 and b"NOT_SET_ASIDE" in refused.stderr


# -- defect 3: facts, not beliefs, decide what a rebooting VM reads -------------------
def test_a_reboot_before_xguard_noticed_the_outage(hosts: Callable[..., Host],
                                                   peer_sim: SimProcess) -> None:
    host = hosts()
    contents = f"{b64('v1')} {b64('s1')} {b64('o1')}"
    vm = running_vm(host, peer_sim, contents, b64("n1"))
    peer_sim.client.set_mode("refuse")  # no call has failed yet
    destroy_sockets(host.control, vm)
    create_sockets(host.control, vm)
    reads = boot_reads(vm)
    assert reads["nvram"]["Value"] == {"EFI-variables": b64("n1")}
    assert [r[1].decode() for r in reads["keys"]] == vtpm_fields(contents)
    assert get_contents(host.control, vm["vtpm_uuid"]) == contents


def test_a_stop_just_after_xapi_returns_drops_the_copy(hosts: Callable[..., Host],
                                                       peer_sim: SimProcess) -> None:
    """xapi answered after the VM stopped: an operator may revert it now,
    so the pre-stop state is never served again during a later outage."""
    host = hosts()
    vm = running_vm(host, peer_sim, f"{b64('v1')} {b64('s1')} {b64('o1')}", b64("n1"))
    peer_sim.client.set_mode("refuse")
    assert get(vm["tpm"], 0)[0] == 200  # served from the copy: xguard knows it is down
    peer_sim.client.set_mode("up")
    destroy_sockets(host.control, vm)  # within the second after xapi's return
    time.sleep(1.5)
    peer_sim.client.seed_vm(vm["vm_uuid"], contents=f"{b64('r1')} {b64('r2')} {b64('r3')}",
                            nvram={"EFI-variables": b64("reverted")})  # a revert
    peer_sim.client.set_mode("refuse")
    create_sockets(host.control, vm)
    assert get(vm["tpm"], 0)[0] == 503  # no stale answer: swtpm retries
    answer = rpc(vm["var"], "VM.get_NVRAM", "s", "vm")
    assert answer["Status"] == "Failure", answer
    peer_sim.client.set_mode("up")
    assert get(vm["tpm"], 0) == (200, b64("r1").encode())


# -- defect 4: bytes on disk are checked ------------------------------------------------
def test_torn_and_zero_length_files_are_never_delivered(hosts: Callable[..., Host],
                                                        peer_sim: SimProcess) -> None:
    host = hosts()
    a = running_vm(host, peer_sim, f"{b64('a1')} {b64('a2')} {b64('a3')}", b64("na"))
    b = running_vm(host, peer_sim, f"{b64('b1')} {b64('b2')} {b64('b3')}", b64("nb"))
    c = running_vm(host, peer_sim, f"{b64('c1')} {b64('c2')} {b64('c3')}", b64("nc"))
    peer_sim.client.set_mode("refuse")
    for vm, value in ((a, "a9"), (b, "b9"), (c, "c9")):
        assert put(vm["tpm"], 0, b64(value).encode())[0] == 204
    host.daemon.stop()
    item = os.path.join(host.state_dir, "Swtpm", a["vm_uuid"], "0")
    (name,) = os.listdir(item)
    with open(os.path.join(item, name), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(item, name)) - 3)  # torn
    item = os.path.join(host.state_dir, "Swtpm", b["vm_uuid"], "0")
    (name,) = os.listdir(item)
    open(os.path.join(item, name), "wb").close()  # a lying disk: zero bytes
    peer_sim.client.set_mode("up")
    host.daemon.start()
    host.wait_drained()
    assert upstream(peer_sim, a)[0] == f"{b64('a1')} {b64('a2')} {b64('a3')}"
    assert upstream(peer_sim, b)[0] == f"{b64('b1')} {b64('b2')} {b64('b3')}"
    assert upstream(peer_sim, c)[0] == f"{b64('c9')} {b64('c2')} {b64('c3')}"  # the rest
    damaged = sorted((i["vm"], i["kind"]) for i in set_aside(host))
    assert damaged == sorted([(a["vm_uuid"], "damaged"), (b["vm_uuid"], "damaged")])
    assert "is damaged" in host.daemon.log()


def test_files_of_earlier_formats_are_still_delivered(hosts: Callable[..., Host],
                                                      peer_sim: SimProcess) -> None:
    host = hosts()
    vm = running_vm(host, peer_sim, f"{b64('v1')} {b64('s1')} {b64('o1')}", b64("n1"))
    host.daemon.stop()
    # The upstream daemon's layout: the key exactly as received.
    swtpm = os.path.join(host.state_dir, "Swtpm", vm["vm_uuid"], "1")
    os.makedirs(swtpm)
    with open(os.path.join(swtpm, "1000"), "wb") as f:
        f.write(b64("s-upstream-daemon").encode())
    # xguard's previous format for NVRAM: its JSON record.
    varstored = os.path.join(host.state_dir, "Varstored", vm["vm_uuid"], "0")
    os.makedirs(varstored)
    with open(os.path.join(varstored, "1000"), "w") as f:
        json.dump({"value": b64("n-previous"), "update": "no"}, f)
    host.daemon.start()
    host.wait_drained()
    assert upstream(peer_sim, vm) == (f"{b64('v1')} {b64('s-upstream-daemon')} {b64('o1')}",
                                      b64("n-previous"))
    assert "did not record their base" in host.daemon.log()
