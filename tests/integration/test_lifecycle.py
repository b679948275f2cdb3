"""A VM's whole lifecycle through an xapi restart (issue 7, SPEC §3 and §6
"Order across the VM's lifecycle", "Reads during an outage"): the real
daemon, the simulator as xapi, the calls xenopsd, varstored (and its
tools) and swtpm make.

xenopsd starts a vTPM with vtpm_create then vtpm_get_contents (and
vtpm_set_contents to manufacture or restore it), and handles a guest reboot
alone (destroy and create of both sockets), so all of it can happen while
xapi restarts and while the cache holds the VM's writes.
"""

from __future__ import annotations

import base64
import os
import signal
from collections.abc import Callable
from typing import Any

import pytest
import XenAPI

from tests.integration.harness import (
    Control,
    Host,
    get,
    put,
    rpc,
    vtpm_fields,
)
from xguard.testing.daemon import wait_for
from xguard.testing.simclient import SimProcess
from xguard.testing.unixhttp import UnixTransport, request

pytestmark = pytest.mark.integration


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# -- the orchestrator's calls ---------------------------------------------------
def _joined(answer: dict[bytes, bytes], name: str) -> str:
    pieces, n = [answer[name.encode()]], 1
    while f"{name}.{n}".encode() in answer:
        pieces.append(answer[f"{name}.{n}".encode()])
        n += 1
    return b"".join(pieces).decode()


def get_contents(c: Control, vtpm: str) -> str:
    return _joined(c.call("VtpmGetContents", dbg="xenopsd", vtpm_uuid=vtpm), "contents")


def set_contents(c: Control, vtpm: str, contents: str) -> None:
    c.call("VtpmSetContents", dbg="xenopsd", vtpm_uuid=vtpm, contents=contents)


def control_error(c: Control, command: str, **args: object) -> str:
    """The error code of a command that must fail."""
    try:
        c.call(command, **args)
    except AssertionError as e:
        return str(e)
    raise AssertionError(f"{command} succeeded")


def destroy_sockets(c: Control, vm: dict[str, str]) -> None:
    c.call("VtpmDestroy", dbg="xenopsd", gid=0, path=vm["tpm"])
    c.call("VarstoreDestroy", dbg="xenopsd", gid=0, path=vm["var"])


def create_sockets(c: Control, vm: dict[str, str]) -> None:
    c.vtpm_create(vm["vm_uuid"], vm["tpm"])
    c.varstore_create(vm["vm_uuid"], vm["var"])


# -- the guest's helpers' reads ---------------------------------------------------
def boot_reads(vm: dict[str, str]) -> dict[str, Any]:
    """Every read varstored and swtpm make when a VM (re)starts."""
    session = rpc(vm["var"], "session.login_with_password", "root", "", "1.0", "varstored")
    ref = rpc(vm["var"], "VM.get_by_uuid", session["Value"], vm["vm_uuid"])["Value"]
    out = {
        "nvram": rpc(vm["var"], "VM.get_NVRAM", session["Value"], ref),
        "sb": rpc(vm["var"], "VM.get_secureboot_certificates_state", session["Value"], ref),
        "head": request(vm["tpm"], "HEAD", "/tpm2-00.permall", None,
                        {"Connection": "close"})[0],
        "keys": [get(vm["tpm"], key) for key in range(3)],
    }
    rpc(vm["var"], "session.logout", session["Value"])
    return out


def start_vm(host: Host, sim: SimProcess, contents: str, nvram: str) -> dict[str, str]:
    """A VM seeded in xapi, started as xenopsd starts one: sockets, then
    vtpm_get_contents; varstored and swtpm then read their state."""
    vm = host.vm(contents=contents)
    sim.client.seed_vm(vm["vm_uuid"], nvram={"EFI-variables": nvram},
                       sb_state="update_available")
    assert get_contents(host.control, vm["vtpm_uuid"]) == contents
    reads = boot_reads(vm)
    assert reads["nvram"]["Value"] == {"EFI-variables": nvram}
    return vm


def upstream_contents(sim: SimProcess, vm: dict[str, str]) -> str:
    return sim.client.vtpm_state(vm["vtpm_uuid"])["contents"]  # type: ignore[no-any-return]


# -- defect 1: the orchestrator's write is never rolled back ------------------------
def test_set_contents_right_after_xapi_returns_wins(hosts: Callable[..., Host],
                                                    sim_up: SimProcess) -> None:
    host = hosts()
    p1, s1, v1, p3 = b64("p1"), b64("s1"), b64("v1"), b64("p3")
    vm = start_vm(host, sim_up, f"{p1} {s1} {v1}", b64("nv"))
    sim_up.client.set_mode("refuse")
    assert put(vm["tpm"], 0, p3.encode())[0] == 204  # cached
    # xapi is back but refuses writes: the cache cannot drain yet.
    sim_up.client.fail_method("VTPM.set_contents")
    sim_up.client.set_mode("up")
    # Defect 2: the pending permall overlays upstream's (never the older).
    assert get_contents(host.control, vm["vtpm_uuid"]) == f"{p3} {s1} {v1}"
    new = " ".join(b64(f"new-{k}") for k in range(3))
    set_contents(host.control, vm["vtpm_uuid"], new)  # xenopsd stops the vTPM
    assert get_contents(host.control, vm["vtpm_uuid"]) == new
    assert get(vm["tpm"], 0) == (200, b64("new-0").encode())
    sim_up.client.fail_method("VTPM.set_contents", None)
    host.wait_drained()
    assert upstream_contents(sim_up, vm) == new
    history = sim_up.client.vtpm_state(vm["vtpm_uuid"])["history"]
    assert all(p3 not in h for h in history[history.index(new):]), history
    assert all(p3 not in h for h in history), "the superseded permall is never delivered"


# -- defect 2: the orchestrator's read during the outage --------------------------
def test_get_contents_during_an_outage(hosts: Callable[..., Host],
                                       sim_up: SimProcess) -> None:
    host = hosts()
    base = f"{b64('p')} {b64('s')} {b64('v')}"
    vm = start_vm(host, sim_up, base, b64("nv"))
    sim_up.client.set_mode("refuse")
    assert get_contents(host.control, vm["vtpm_uuid"]) == base  # the last known state
    assert put(vm["tpm"], 2, b64("v2").encode())[0] == 204
    assert get_contents(host.control, vm["vtpm_uuid"]) == f"{b64('p')} {b64('s')} {b64('v2')}"
    sim_up.client.set_mode("up")
    host.wait_drained()
    assert upstream_contents(sim_up, vm) == f"{b64('p')} {b64('s')} {b64('v2')}"


def test_set_contents_during_an_outage_is_cached_read_back_and_delivered_in_order(
        hosts: Callable[..., Host], sim_up: SimProcess) -> None:
    host = hosts()
    vm = start_vm(host, sim_up, f"{b64('p')} {b64('s')} {b64('v')}", b64("nv"))
    sim_up.client.set_mode("refuse")
    assert put(vm["tpm"], 0, b64("older").encode())[0] == 204
    whole = f"{b64('A')} {b64('B')} {b64('C')}"
    set_contents(host.control, vm["vtpm_uuid"], whole)  # acknowledged at once
    assert put(vm["tpm"], 2, b64("after").encode())[0] == 204
    assert [get(vm["tpm"], k)[1] for k in range(3)] == [
        b64("A").encode(), b64("B").encode(), b64("after").encode()]
    expected = f"{b64('A')} {b64('B')} {b64('after')}"
    assert get_contents(host.control, vm["vtpm_uuid"]) == expected
    sim_up.client.set_mode("up")
    host.wait_drained()
    assert upstream_contents(sim_up, vm) == expected
    history = sim_up.client.vtpm_state(vm["vtpm_uuid"])["history"]
    assert not any(b64("older") in h for h in history), history


# -- defect 3: reads while xapi restarts ------------------------------------------
def test_reads_during_an_outage_serve_the_last_known_state(hosts: Callable[..., Host],
                                                           sim_up: SimProcess) -> None:
    host = hosts()
    vm = start_vm(host, sim_up, f"{b64('p')} {b64('s')} {b64('v')}", b64("nv1"))
    answer = rpc(vm["var"], "VM.set_NVRAM_EFI_variables", "s", "vm", b64("nv2"))
    assert answer["Status"] == "Success"  # delivered (xapi is up)
    sim_up.client.set_mode("refuse")
    reads = boot_reads(vm)
    assert reads["nvram"] == {"Status": "Success", "Value": {"EFI-variables": b64("nv2")}}
    assert reads["sb"] == {"Status": "Success", "Value": "update_available"}
    assert reads["head"] == 200
    assert reads["keys"] == [(200, b64(k).encode()) for k in "psv"]


def test_varstore_tools_read_modify_write_during_an_outage(hosts: Callable[..., Host],
                                                           sim_up: SimProcess) -> None:
    """varstore-set: login, VM.get_by_uuid, VM.get_NVRAM, modify,
    VM.set_NVRAM_EFI_variables, logout — through the XenAPI SDK on one
    kept-alive connection."""
    host = hosts()
    vm = start_vm(host, sim_up, b64("p"), b64("vars-1"))
    sim_up.client.set_mode("refuse")
    session = XenAPI.Session("http://localhost/", transport=UnixTransport(vm["var"]))
    session.xenapi.login_with_password("root", "", "1.0", "varstore-set")
    try:
        ref = session.xenapi.VM.get_by_uuid(vm["vm_uuid"])
        nvram = session.xenapi.VM.get_NVRAM(ref)
        assert nvram == {"EFI-variables": b64("vars-1")}
        session.xenapi.VM.set_NVRAM_EFI_variables(ref, b64("vars-2"))
        assert session.xenapi.VM.get_NVRAM(ref) == {"EFI-variables": b64("vars-2")}
    finally:
        session.xenapi.session.logout()
        session("close")()
    sim_up.client.set_mode("up")
    host.wait_drained()
    assert sim_up.client.vm_state(vm["vm_uuid"])["nvram"] == {"EFI-variables": b64("vars-2")}


# -- a reboot while xapi restarts, as xenopsd drives it -----------------------------
def test_guest_reboot_during_an_outage(hosts: Callable[..., Host], sim_up: SimProcess) -> None:
    host = hosts()
    contents = f"{b64('p')} {b64('s')} {b64('v')}"
    vm = start_vm(host, sim_up, contents, b64("nv"))
    sim_up.client.set_mode("refuse")
    assert put(vm["tpm"], 1, b64("saved").encode())[0] == 204
    # The guest reboots: xenopsd stops swtpm and varstored, destroys their
    # sockets, creates them again and starts both, reading the vTPM first.
    destroy_sockets(host.control, vm)
    create_sockets(host.control, vm)
    expected = f"{b64('p')} {b64('saved')} {b64('v')}"
    assert get_contents(host.control, vm["vtpm_uuid"]) == expected
    reads = boot_reads(vm)
    assert reads["nvram"]["Value"] == {"EFI-variables": b64("nv")}
    assert reads["sb"]["Value"] == "update_available"
    assert reads["keys"] == [(200, f.encode()) for f in expected.split(" ")]
    assert put(vm["tpm"], 0, b64("booted").encode())[0] == 204
    sim_up.client.set_mode("up")
    host.wait_drained()
    assert upstream_contents(sim_up, vm) == f"{b64('booted')} {b64('saved')} {b64('v')}"


def test_stop_while_xapi_answers_drops_the_copy(hosts: Callable[..., Host],
                                                sim_up: SimProcess) -> None:
    """A VM stopped while xapi answers may be changed in xapi (reverted,
    started elsewhere): its copy is never served afterwards."""
    host = hosts()
    vm = start_vm(host, sim_up, b64("p"), b64("nv"))
    destroy_sockets(host.control, vm)
    kept = os.path.join(host.state_dir, "known", vm["vm_uuid"])
    # The copies go once xapi answers a call made after the destroy (the
    # daemon makes one at once): a fact, so wait for it, not a belief.
    wait_for(lambda: not os.path.isdir(kept), timeout=10, what="the copies to be dropped")
    create_sockets(host.control, vm)
    sim_up.client.set_mode("refuse")
    assert rpc(vm["var"], "VM.get_NVRAM", "s", "vm")["Status"] == "Failure"
    assert get(vm["tpm"], 0)[0] == 503
    assert "UPSTREAM_UNAVAILABLE" in control_error(
        host.control, "VtpmGetContents", dbg="x", vtpm_uuid=vm["vtpm_uuid"])
    # Only the vTPM's handle was learnt again at the create; no copy is left.
    assert set(os.listdir(kept) if os.path.isdir(kept) else []) <= {"handle"}


# -- kill -9 at any point keeps all of it ---------------------------------------
def test_kill_9_keeps_the_known_state_and_the_orchestrators_writes(
        hosts: Callable[..., Host], sim_up: SimProcess) -> None:
    host = hosts()
    vm = start_vm(host, sim_up, f"{b64('p')} {b64('s')} {b64('v')}", b64("nv"))
    sim_up.client.set_mode("refuse")
    whole = f"{b64('A')} {b64('B')} {b64('C')}"
    set_contents(host.control, vm["vtpm_uuid"], whole)
    host.daemon.stop(signal.SIGKILL)
    host.daemon.start()  # xapi still away: start-up does not wait for it
    assert get_contents(host.control, vm["vtpm_uuid"]) == whole
    reads = boot_reads(vm)
    assert reads["nvram"]["Value"] == {"EFI-variables": b64("nv")}
    assert reads["keys"] == [(200, f.encode()) for f in whole.split(" ")]
    host.daemon.stop(signal.SIGKILL)
    host.daemon.start()
    sim_up.client.set_mode("up")
    host.wait_drained()
    assert upstream_contents(sim_up, vm) == whole
    assert vtpm_fields(upstream_contents(sim_up, vm)) == whole.split(" ")


def test_invalid_contents_are_refused_clearly(hosts: Callable[..., Host],
                                              sim_up: SimProcess) -> None:
    host = hosts()
    vm = start_vm(host, sim_up, b64("p"), b64("nv"))
    error = control_error(host.control, "VtpmSetContents", dbg="x", vtpm_uuid=vm["vtpm_uuid"],
                          contents="a b")
    assert "INVALID_CONTENTS" in error
    assert upstream_contents(sim_up, vm) == b64("p")

