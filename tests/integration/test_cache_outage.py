"""The durable write-back cache end to end (issue 3): a real daemon, a real
simulator process, real files. xapi goes away, every write is still
acknowledged at once, and when xapi comes back everything is delivered in
order and the cache empties; a cache tree left by the upstream daemon is
recovered as SPEC §6 says. Crashes: ``test_cache_crash.py``.

Sockets are created over the control channel with a tiny blocking AMP
client (:class:`~tests.integration.harness.Control`) rather than
``xguard-ctl``: forty interpreter start-ups per test would dominate the run
time.
"""

from __future__ import annotations

import json
import os
import stat
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.integration.harness import (
    KEYS,
    PROMPT,
    Host,
    cache_files,
    get,
    only_latest_left,
    put,
    round_of,
    rpc,
    set_nvram,
    value,
    vtpm_fields,
)
from xguard.cache.entry import decode
from xguard.testing.daemon import wait_for
from xguard.testing.simclient import SimProcess
from xguard.testing.unixhttp import UnixHTTPConnection, request

pytestmark = pytest.mark.integration


# -- 1. vTPM writes through an outage ------------------------------------------
N_VMS = 20
ROUNDS = 5


def _write_vm_keys(vm: dict[str, str], rounds: range) -> list[tuple[int, float]]:
    """One VM's writes, in order, on one keep-alive connection (as swtpm)."""
    conn = UnixHTTPConnection(vm["tpm"], timeout=30)
    out = []
    try:
        for rnd in rounds:
            for key in range(3):
                started = time.monotonic()
                conn.request("PUT", KEYS[key], body=value(vm["vm_uuid"], key, rnd),
                             headers={"Content-Type": "application/octet-stream"})
                resp = conn.getresponse()
                resp.read()
                out.append((resp.status, time.monotonic() - started))
    finally:
        conn.close()
    return out


@pytest.mark.parametrize(("queue_size", "mode"), [(None, "Engaged"), ("8", "Disengaged")])
def test_vtpm_writes_survive_an_outage(hosts: Callable[..., Host], sim_up: SimProcess,
                                       queue_size: str | None, mode: str) -> None:
    """With the default queue the cache stays Engaged; a queue smaller than
    the 60 pending items overflows into Disengaged (directory scans)."""
    host = hosts(["--queue-size", queue_size] if queue_size else [])
    vms = [host.vm() for _ in range(N_VMS)]
    sim_up.client.set_mode("refuse")

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda vm: _write_vm_keys(vm, range(1, ROUNDS + 1)), vms))
    answers = [r for per_vm in results for r in per_vm]
    assert len(answers) == N_VMS * 3 * ROUNDS
    assert {status for status, _ in answers} == {204}, answers
    slowest = max(latency for _, latency in answers)
    assert slowest < PROMPT, f"slowest PUT took {slowest:.2f}s"

    # On disk, only the latest version of every item, 0600 in 0700 dirs.
    for vm in vms:
        for key in range(3):
            item = os.path.join(host.state_dir, "Swtpm", vm["vm_uuid"], str(key))
            names = only_latest_left(item)
            assert stat.S_IMODE(os.stat(item).st_mode) == 0o700
            path = os.path.join(item, names[0])
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            with open(path, "rb") as f:
                assert decode(f.read()).content == value(vm["vm_uuid"], key, ROUNDS)
            # Reads are served from the cache while xapi is down.
            assert get(vm["tpm"], key) == (200, value(vm["vm_uuid"], key, ROUNDS))
        assert request(vm["tpm"], "HEAD", KEYS[1])[0] == 200

    status = host.status("Swtpm")
    assert status["mode"] == mode, status
    assert status["pending"] == {vm["vm_uuid"]: 3 for vm in vms}, status
    assert status["outage_since"] is not None and status["last_error"], status
    assert status["delivered"] == 0, status
    assert host.status("Varstored")["mode"] == "Direct"

    sim_up.client.set_mode("up")
    host.wait_drained("Swtpm")

    for vm in vms:
        state = sim_up.client.vtpm_state(vm["vtpm_uuid"])
        expected = [value(vm["vm_uuid"], k, ROUNDS).decode() for k in range(3)]
        assert vtpm_fields(state["contents"]) == expected, vm
        history = [[round_of(f) for f in vtpm_fields(h)] for h in state["history"]]
        for key in range(3):
            rounds = [h[key] for h in history]
            assert rounds == sorted(rounds), (vm, key, rounds)
        assert get(vm["tpm"], 0) == (200, value(vm["vm_uuid"], 0, ROUNDS))
    assert cache_files(host.state_dir, "Swtpm") == []
    assert not os.path.exists(os.path.join(host.state_dir, "quarantine", "Swtpm"))
    # The outage ends once upstream answered and has not failed since for
    # a couple of seconds.
    wait_for(lambda: host.status("Swtpm")["outage_since"] is None, timeout=10,
             what="the outage to end")
    status = host.status("Swtpm")
    assert status["quarantined"] == [], status
    assert status["delivered"] == N_VMS * 3, status
    with open(host.daemon.log_file, encoding="utf-8", errors="replace") as f:
        log = f.read()
    # One line when the outage starts, one when it ends: none per retry.
    assert log.count("unreachable (") == 1, log[-3000:]
    assert log.count("answers again after") == 1, log[-3000:]


# -- 2. NVRAM writes through an outage ------------------------------------------
def _write_vm_nvram(vm: dict[str, str], rounds: range) -> list[tuple[str, float]]:
    out = []
    for rnd in rounds:
        update = "yes" if rnd == rounds[-1] else "no"
        answer, latency = set_nvram(vm["var"], value(vm["vm_uuid"], "nv", rnd), update)
        out.append((answer["Status"], latency))
    return out


def test_nvram_writes_survive_an_outage(hosts: Callable[..., Host], sim_up: SimProcess) -> None:
    host = hosts()
    vms = [host.vm() for _ in range(N_VMS)]
    sim_up.client.set_mode("refuse")

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda vm: _write_vm_nvram(vm, range(1, ROUNDS + 1)), vms))
    answers = [r for per_vm in results for r in per_vm]
    assert {s for s, _ in answers} == {"Success"}, answers
    slowest = max(latency for _, latency in answers)
    assert slowest < PROMPT, f"slowest NVRAM write took {slowest:.2f}s"

    for vm in vms:
        last = value(vm["vm_uuid"], "nv", ROUNDS).decode()
        item = os.path.join(host.state_dir, "Varstored", vm["vm_uuid"], "0")
        names = only_latest_left(item)
        with open(os.path.join(item, names[0]), "rb") as f:
            assert json.loads(decode(f.read()).content) == {"value": last, "update": "yes"}
        answer = rpc(vm["var"], "VM.get_NVRAM", "s", "vm")
        assert answer == {"Status": "Success", "Value": {"EFI-variables": last}}
    status = host.status("Varstored")
    assert status["mode"] in ("Engaged", "Disengaged"), status
    assert status["pending"] == {vm["vm_uuid"]: 1 for vm in vms}, status
    assert status["outage_since"] is not None and status["last_error"], status

    sim_up.client.set_mode("up")
    host.wait_drained("Varstored")

    for vm in vms:
        state = sim_up.client.vm_state(vm["vm_uuid"])
        last = value(vm["vm_uuid"], "nv", ROUNDS).decode()
        assert state["nvram"] == {"EFI-variables": last}, vm
        assert state["last_update"] == "yes", vm
        rounds = [round_of(v) for v in state["nvram_history"]]
        assert rounds == sorted(rounds) and rounds[-1] == ROUNDS, (vm, rounds)
    assert cache_files(host.state_dir, "Varstored") == []
    wait_for(lambda: host.status("Varstored")["outage_since"] is None, timeout=10,
             what="the outage to end")
    status = host.status("Varstored")
    assert status["delivered"] == N_VMS and status["last_error"] is None, status


# -- 5. switches: --no-cache and the fault file ----------------------------------
def test_no_cache_fails_writes_while_xapi_is_down(hosts: Callable[..., Host],
                                                 sim_up: SimProcess) -> None:
    host = hosts(["--no-cache"])
    vm = host.vm()
    assert put(vm["tpm"], 0, value(vm["vm_uuid"], 0, 1))[0] == 204
    sim_up.client.set_mode("refuse")
    status, latency = put(vm["tpm"], 0, value(vm["vm_uuid"], 0, 2))
    assert status == 503 and latency < PROMPT
    assert get(vm["tpm"], 0)[0] == 503  # nothing pending: a retryable answer, never 4xx
    answer, _ = set_nvram(vm["var"], value(vm["vm_uuid"], "nv", 1), "yes")
    assert answer["Status"] == "Failure", answer
    assert cache_files(host.state_dir, "Swtpm") == []
    assert cache_files(host.state_dir, "Varstored") == []
    sim_up.client.set_mode("up")
    assert get(vm["tpm"], 0) == (200, value(vm["vm_uuid"], 0, 1))


def test_fault_file_disables_the_cache_while_it_exists(hosts: Callable[..., Host],
                                                      sim_up: SimProcess) -> None:
    host = hosts()
    vm = host.vm()
    sim_up.client.set_mode("refuse")
    with open(host.fault_file, "w"):
        pass
    assert put(vm["tpm"], 1, value(vm["vm_uuid"], 1, 1))[0] == 503
    assert set_nvram(vm["var"], value(vm["vm_uuid"], "nv", 1), "yes")[0]["Status"] == "Failure"
    assert cache_files(host.state_dir, "Swtpm") == []
    assert host.status("Swtpm")["enabled"] is False
    os.unlink(host.fault_file)
    assert put(vm["tpm"], 1, value(vm["vm_uuid"], 1, 2))[0] == 204
    assert set_nvram(vm["var"], value(vm["vm_uuid"], "nv", 2), "yes")[0]["Status"] == "Success"
    assert host.status("Swtpm")["enabled"] is True
    assert len(cache_files(host.state_dir, "Swtpm")) == 1
    sim_up.client.set_mode("up")
    host.wait_drained()
    contents = sim_up.client.vtpm_state(vm["vtpm_uuid"])["contents"]
    assert vtpm_fields(contents)[1] == value(vm["vm_uuid"], 1, 2).decode()
    state = sim_up.client.vm_state(vm["vm_uuid"])
    assert state["nvram"]["EFI-variables"] == value(vm["vm_uuid"], "nv", 2).decode()


# -- 4. recovery of a tree in the upstream daemon's layout -----------------------
def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


class UpstreamTree:
    """A cache tree as the upstream daemon (or a crash) leaves it:

    - ``a``: key 0 with an outdated and a latest version, an invalid file
      name and a ``.pre``; key 1 stamped far in the future; an unknown file
      in the VM directory; NVRAM pending with its update flag;
    - ``b``: an empty item directory (key 1);
    - ``c``: only a ``.pre`` (never acknowledged: must not be delivered).
    """

    def __init__(self, host: Host) -> None:
        self.a, self.b, self.c = (str(uuid.uuid4()) for _ in range(3))
        self.seeded = {vm: "c0 c1 c2" for vm in (self.a, self.b, self.c)}
        now = time.monotonic_ns()
        self.old, self.new, self.future = now - 2 * 10**9, now - 10**9, now + 10**15
        s = os.path.join(host.state_dir, "Swtpm")
        self.paths = {
            "outdated": os.path.join(s, self.a, "0", str(self.old)),
            "latest": os.path.join(s, self.a, "0", str(self.new)),
            "invalid": os.path.join(s, self.a, "0", "garbage"),
            "pre_a": os.path.join(s, self.a, "0", f"{now}.pre"),
            "future": os.path.join(s, self.a, "1", str(self.future)),
            "unknown": os.path.join(s, self.a, "notes.txt"),
            "pre_c": os.path.join(s, self.c, "2", f"{self.new}.pre"),
            "nvram": os.path.join(host.state_dir, "Varstored", self.a, "0", str(self.new)),
        }
        self.empty = os.path.join(s, self.b, "1")
        _write(self.paths["outdated"], value(self.a, 0, 1))
        _write(self.paths["latest"], value(self.a, 0, 2))
        _write(self.paths["invalid"], value(self.a, 0, 9))
        _write(self.paths["pre_a"], value(self.a, 0, 10))
        _write(self.paths["future"], value(self.a, 1, 3))
        _write(self.paths["unknown"], b"not a version")
        _write(self.paths["pre_c"], value(self.c, 2, 7))
        _write(self.paths["nvram"], json.dumps({"value": value(self.a, "nv", 4).decode(),
                                                "update": "yes"}).encode())
        os.makedirs(self.empty, mode=0o700)

    def seed(self, sim: SimProcess) -> dict[str, str]:
        return {vm: sim.client.seed_vm(vm, contents=c)["vtpm_uuid"]
                for vm, c in self.seeded.items()}

    def check_recovered_on_disk(self, log: str) -> None:
        for name in ("outdated", "invalid", "unknown", "future", "pre_a", "pre_c"):
            assert not os.path.exists(self.paths[name]), name
        assert not os.path.exists(os.path.dirname(self.empty)), "empty directories stay"
        assert not os.path.exists(os.path.dirname(self.paths["pre_c"])), "c's tree stays"
        # .pre files (never acknowledged) go with one line counting them.
        assert "removed 2 temporary files" in log, log
        assert self.paths["pre_c"] not in log, log
        assert f"retiming {self.paths['future']}" in log, log


def test_recovery_of_an_upstream_tree_with_xapi_up(hosts: Callable[..., Host],
                                                   sim_up: SimProcess) -> None:
    host = hosts(start=False)
    tree = UpstreamTree(host)
    vtpms = tree.seed(sim_up)
    host.daemon.start()
    host.wait_drained()
    tree.check_recovered_on_disk(host.daemon.log())

    contents = vtpm_fields(sim_up.client.vtpm_state(vtpms[tree.a])["contents"])
    assert contents == [value(tree.a, 0, 2).decode(), value(tree.a, 1, 3).decode(), "c2"]
    # Never acknowledged, never delivered; the empty item had nothing.
    assert sim_up.client.vtpm_state(vtpms[tree.c])["contents"] == "c0 c1 c2"
    assert sim_up.client.vtpm_state(vtpms[tree.b])["contents"] == "c0 c1 c2"
    state = sim_up.client.vm_state(tree.a)
    assert state["nvram"] == {"EFI-variables": value(tree.a, "nv", 4).decode()}
    assert state["last_update"] == "yes"
    # Nothing is left, not even the .pre files.
    assert cache_files(host.state_dir, "Swtpm") == []
    assert cache_files(host.state_dir, "Varstored") == []
    assert host.status("Swtpm")["delivered"] == 2

    # A write after start wins over the recovered (retimed) version.
    vm = host.vm(tree.a, seed=False)
    assert put(vm["tpm"], 1, value(tree.a, 1, 4))[0] == 204
    host.wait_drained()
    contents = vtpm_fields(sim_up.client.vtpm_state(vtpms[tree.a])["contents"])
    assert contents[1] == value(tree.a, 1, 4).decode()


def test_recovery_with_xapi_down_then_crash(hosts: Callable[..., Host],
                                            sim_up: SimProcess) -> None:
    host = hosts(start=False)
    tree = UpstreamTree(host)
    vtpms = tree.seed(sim_up)
    sim_up.client.set_mode("refuse")
    started = time.monotonic()
    host.daemon.start()
    assert time.monotonic() - started < 15, "start-up must not wait for xapi"
    tree.check_recovered_on_disk(host.daemon.log())
    item = os.path.join(host.state_dir, "Swtpm", tree.a, "1")
    (retimed,) = os.listdir(item)
    assert int(retimed) < time.monotonic_ns(), retimed

    vm = host.vm(tree.a, seed=False)
    assert get(vm["tpm"], 0) == (200, value(tree.a, 0, 2))
    assert get(vm["tpm"], 1) == (200, value(tree.a, 1, 3))
    assert get(vm["tpm"], 2)[0] == 503  # nothing pending and xapi down
    nvram = rpc(vm["var"], "VM.get_NVRAM", "s", "vm")
    assert nvram["Value"] == {"EFI-variables": value(tree.a, "nv", 4).decode()}
    status = host.status("Swtpm")
    assert status["mode"] in ("Engaged", "Disengaged")
    assert status["pending"] == {tree.a: 2}, status

    # A newer write of the retimed item, then kill -9: the newer one wins.
    assert put(vm["tpm"], 1, value(tree.a, 1, 4))[0] == 204
    (newest,) = only_latest_left(item)
    assert int(newest) > int(retimed)
    host.daemon.kill()
    host.daemon.start()
    assert get(vm["tpm"], 1) == (200, value(tree.a, 1, 4))
    sim_up.client.set_mode("up")
    host.wait_drained()
    contents = vtpm_fields(sim_up.client.vtpm_state(vtpms[tree.a])["contents"])
    assert contents == [value(tree.a, 0, 2).decode(), value(tree.a, 1, 4).decode(), "c2"]
    history = [round_of(vtpm_fields(h)[1]) for h in
               sim_up.client.vtpm_state(vtpms[tree.a])["history"]]
    assert history == [4], history  # the retimed version never overwrote it
    assert sim_up.client.vtpm_state(vtpms[tree.c])["contents"] == "c0 c1 c2"
