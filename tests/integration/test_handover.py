"""Restarts no VM notices (issue 12): the real daemon restarted under load
through systemd's fd store (a fake systemd: a datagram socket receiving
FDSTORE=1 with SCM_RIGHTS, starting the next process with LISTEN_FDS) and
through its own re-exec (SIGHUP, ``xguard-ctl restart``), while clients
hammer several VMs' sockets the way varstored (a connection per request,
no retry) and swtpm (one kept-alive connection) do.

Every test asserts: no connection refused, no request failed, and every
acknowledged write delivered (the simulator ends with the last version
each client had acknowledged). The pre-handover daemon refused every
connection made while it restarted.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from tests.integration.harness import Host, vtpm_fields
from xguard.testing.fakesystemd import FakeSystemd
from xguard.testing.restartload import Load, Stats, nvram_value, totals, tpm_value
from xguard.testing.simclient import SimProcess

pytestmark = pytest.mark.integration

VMS = 3


@pytest.fixture
def unit(hosts: Callable[..., Host]) -> Iterator[Callable[..., tuple[Host, FakeSystemd]]]:
    """A daemon run by a fake systemd (``fdstore_max=0``: a unit without
    the store, where only a re-exec keeps the sockets)."""
    managers: list[FakeSystemd] = []

    def make(**kwargs: int) -> tuple[Host, FakeSystemd]:
        host = hosts(start=False)
        sd = FakeSystemd(host.daemon, **kwargs)
        managers.append(sd)
        sd.start()
        return host, sd

    yield make
    for sd in managers:
        sd.close()


def hammer(host: Host, n: int = VMS) -> tuple[list[dict[str, str]], Load]:
    vms = [host.vm() for _ in range(n)]
    targets = ([("swtpm", vm["tpm"], vm["vm_uuid"]) for vm in vms]
               + [("varstored", vm["var"], vm["vm_uuid"]) for vm in vms])
    load = Load(targets).start()
    load.wait_requests(20)
    return vms, load


def finish(host: Host, vms: list[dict[str, str]], load: Load) -> list[Stats]:
    """Stop the load; check nothing refused or failed, then that upstream
    ends with every client's last acknowledged version."""
    load.wait_requests(20)  # the load flows again after the last restart
    stats = load.stop()
    summary = totals(stats)
    assert (summary["refused"], summary["failed"]) == (0, 0), (summary, host.daemon.log())
    host.wait_drained()
    sim = host.sim
    assert sim is not None
    by_vm = {(s.kind, s.vm): s for s in stats}
    for vm in vms:
        tpm, var = by_vm["swtpm", vm["vm_uuid"]], by_vm["varstored", vm["vm_uuid"]]
        assert tpm.acked and var.acked, (tpm, var)  # every client got through
        permall = vtpm_fields(sim.client.vtpm_state(vm["vtpm_uuid"])["contents"])[0]
        assert permall == tpm_value(vm["vm_uuid"], tpm.acked).decode()
        nvram = sim.client.vm_state(vm["vm_uuid"])["nvram"]
        assert nvram["EFI-variables"] == nvram_value(vm["vm_uuid"], var.acked)
    return stats


def test_fd_store_restarts_under_load(unit: Callable[..., tuple[Host, FakeSystemd]]) -> None:
    host, sd = unit()
    vms, load = hammer(host)
    sd.sync()
    # Every socket (both per VM, and the control socket) is in the store.
    assert len(sd.names()) == 2 * VMS + 1
    pid = host.daemon.proc.pid  # type: ignore[union-attr]
    for _ in range(2):
        load.wait_requests(20)
        sd.restart()
    assert host.daemon.proc.pid != pid  # type: ignore[union-attr]
    assert "resumed 6 domain sockets (3 Swtpm, 3 Varstored), skipped 0; 6 handed over" \
        in host.daemon.log()
    finish(host, vms, load)
    assert len(sd.names()) == 2 * VMS + 1  # nothing stored twice


def test_reexec_on_sighup_under_load(unit: Callable[..., tuple[Host, FakeSystemd]]) -> None:
    """A unit without the fd store: ``systemctl reload`` (SIGHUP) makes
    xguard re-execute itself with its sockets; same pid, RELOADING=1 then
    READY=1."""
    host, sd = unit(fdstore_max=0)
    vms, load = hammer(host)
    pid = host.daemon.proc.pid  # type: ignore[union-attr]
    for _ in range(2):
        load.wait_requests(20)
        sd.reload()
    assert host.daemon.proc.pid == pid and host.daemon.proc.poll() is None  # type: ignore
    assert sd.names() == []
    log = host.daemon.log()
    assert "restarting in place (SIGHUP)" in log
    assert "skipped 0; 6 handed over" in log
    finish(host, vms, load)


def test_xguard_ctl_restart_under_load(unit: Callable[..., tuple[Host, FakeSystemd]]) -> None:
    host, sd = unit(fdstore_max=0)
    vms, load = hammer(host)
    pid = host.daemon.proc.pid  # type: ignore[union-attr]
    since = len(sd.states)
    result = host.daemon.ctl("restart", "upgrade")
    assert result.stdout == b"xguard restarted in place and is ready\n"
    sd.wait_state("READY", pid, since, 30)
    assert host.daemon.proc.poll() is None  # type: ignore[union-attr]
    assert "upgrade: restart" in host.daemon.log()
    finish(host, vms, load)


def test_varstored_sees_no_failure_across_20_restarts(
        unit: Callable[..., tuple[Host, FakeSystemd]]) -> None:
    """The issue's acceptance check: a real varstored-style client (a new
    connection per request, no retry) across 20 consecutive restarts,
    alternating systemd's fd store and the re-exec."""
    host, sd = unit()
    vm = host.vm()
    load = Load([("varstored", vm["var"], vm["vm_uuid"])]).start()
    for i in range(20):
        load.wait_requests(3)
        if i % 2:
            sd.reload()
        else:
            sd.restart()
    load.wait_requests(3)
    [stats] = load.stop()
    assert (stats.refused, stats.failed, stats.errors) == (0, 0, [])
    host.wait_drained()
    nvram = host.sim.client.vm_state(vm["vm_uuid"])["nvram"]  # type: ignore[union-attr]
    assert nvram["EFI-variables"] == nvram_value(vm["vm_uuid"], stats.acked)


def test_handover_disagreeing_with_the_active_file(
        unit: Callable[..., tuple[Host, FakeSystemd]], sim_up: SimProcess) -> None:
    """The file is the truth: a socket removed during the restart listens
    afresh, stale and foreign descriptors in the store are closed and
    dropped from it, one log line each."""
    host, sd = unit()
    vms = [host.vm() for _ in range(2)]
    sd.stop()
    os.unlink(vms[0]["tpm"])  # destroyed behind xguard's back meanwhile
    # A stale descriptor (a pipe) and a foreign listening socket, named
    # as if xguard had stored them.
    r, w = os.pipe()
    os.close(w)
    foreign = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    foreign.bind(os.path.join(host.root, "foreign.sock"))
    foreign.listen(1)
    with sd._cond:
        sd.store += [("xgd-1-2-0123456789abcdef", r), ("other", os.dup(foreign.fileno()))]
    foreign.close()
    sd.start()
    log = host.daemon.log()
    assert "handed over: 7 listening sockets (1 refused)" in log
    assert f", {vms[0]['tpm']}): its socket file is gone" in log
    assert "not adopting handed-over socket xgd-1-2-0123456789abcdef (fd " in log
    assert ", no path): not a socket" in log
    assert "foreign.sock): not in the active sockets file" in log
    assert "resumed 4 domain sockets (2 Swtpm, 2 Varstored), skipped 0; 3 handed over" in log
    sd.sync()
    assert len(sd.names()) == 5  # 4 domain sockets (one new) and the control socket
    assert "other" not in sd.names()
    load = Load([("swtpm", vm["tpm"], vm["vm_uuid"]) for vm in vms]
                + [("varstored", vm["var"], vm["vm_uuid"]) for vm in vms]).start()
    finish(host, vms, load)


def test_restart_without_handover_refused_connections(
        unit: Callable[..., tuple[Host, FakeSystemd]]) -> None:
    """What the tests above would see without the handover: a unit without
    the fd store, restarted, refuses connections while it starts (so the
    clients and their checks can fail)."""
    host, sd = unit(fdstore_max=0)
    vm = host.vm()
    load = Load([("varstored", vm["var"], vm["vm_uuid"])]).start()
    load.wait_requests(3)
    sd.stop()
    time.sleep(0.3)
    sd.start()
    load.wait_requests(3)
    [stats] = load.stop()
    assert stats.refused > 0
