"""doc/operations.md's runbooks, followed step by step against the real
daemon: a full disk, a downgrade with writes pending, a backup restored,
one VM's log lines."""

from __future__ import annotations

import base64
import errno
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from tests.integration.harness import Host, get, put, vtpm_fields
from xguard.testing.daemon import wait_for
from xguard.testing.simclient import SimProcess

pytestmark = pytest.mark.integration


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


def contents(sim: SimProcess, vm: dict[str, str]) -> list[str]:
    return vtpm_fields(sim.client.vtpm_state(vm["vtpm_uuid"])["contents"])


@pytest.fixture
def small_disk() -> Iterator[Callable[[str, int], None]]:
    """Mounts a small tmpfs where asked (skips where this host cannot)."""
    mounted: list[str] = []

    def mount(path: str, size: int) -> None:
        os.makedirs(path, exist_ok=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                                capture_output=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
        mounted.append(path)

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", path], check=False)


def fill(directory: str) -> str:
    """A file filling ``directory``'s filesystem (deleted to free it)."""
    path = os.path.join(directory, "filler")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return path


def test_the_disk_is_full(hosts: Callable[..., Host], sim_up: SimProcess,
                          small_disk: Callable[[str, int], None]) -> None:
    host = hosts(start=False)
    small_disk(host.state_dir, 4 * 1024 * 1024)
    host.daemon.start()
    vm = host.vm(contents=f"{b64('p1').decode()} {b64('s1').decode()} {b64('v1').decode()}")
    assert get(vm["tpm"], 0) == (200, b64("p1"))  # seen: a last known copy is kept
    sim_up.client.set_mode("refuse")
    filler = fill(host.state_dir)
    # Step 1: what the disk refuses is not acknowledged (the copy was
    # dropped first, and still it did not fit).
    assert put(vm["tpm"], 0, b64("p2" * 40000))[0] == 503
    status = host.control.status()["services"]["Swtpm"]
    assert status["disk_error"] == os.strerror(errno.ENOSPC)
    assert "disk full: dropped the last known state" in host.daemon.log()
    # Step 2: free space elsewhere on the filesystem; step 3: it goes on alone.
    os.unlink(filler)
    assert put(vm["tpm"], 0, b64("p3"))[0] == 204
    assert host.control.status()["services"]["Swtpm"]["disk_error"] is None
    assert "the disk takes writes again" in host.daemon.log()
    sim_up.client.set_mode("up")
    host.wait_drained()
    assert contents(sim_up, vm)[0] == b64("p3").decode()


def test_downgrade_with_writes_pending(hosts: Callable[..., Host],
                                      sim_up: SimProcess) -> None:
    host = hosts()
    vm = host.vm(contents=f"{b64('p1').decode()} {b64('s1').decode()} {b64('v1').decode()}")
    assert get(vm["tpm"], 0)[0] == 200
    sim_up.client.set_mode("refuse")
    assert put(vm["tpm"], 1, b64("s2"))[0] == 204
    # Step 2: stop, convert.
    host.daemon.stop()
    convert = [sys.executable, "-c", "from xguard.daemon.convert import main; main()",
               "--state-dir", host.state_dir]
    result = subprocess.run(convert, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("1 pending writes converted")
    item = os.path.join(host.state_dir, "Swtpm", vm["vm_uuid"], "1")
    (name,) = os.listdir(item)
    with open(os.path.join(item, name), "rb") as f:
        assert f.read() == b64("s2")  # what xapi-guard and older xguards read
    # An older daemon (here: this one, which reads both formats) delivers it.
    host.daemon.start()
    refused = subprocess.run(convert, capture_output=True, text=True)
    assert refused.returncode == 1 and "another xguard is running" in refused.stderr
    sim_up.client.set_mode("up")
    host.wait_drained()
    assert contents(sim_up, vm)[1] == b64("s2").decode()


def test_backup_and_restore(hosts: Callable[..., Host], sim_up: SimProcess) -> None:
    host = hosts()
    vm = host.vm(contents=f"{b64('p1').decode()} {b64('s1').decode()} {b64('v1').decode()}")
    assert get(vm["tpm"], 0)[0] == 200
    sim_up.client.set_mode("refuse")
    assert put(vm["tpm"], 0, b64("p2"))[0] == 204  # pending in the backup
    # Step 1: back up with xguard stopped.
    host.daemon.stop()
    backup = os.path.join(host.root, "backup")
    shutil.copytree(host.state_dir, backup)
    host.daemon.start()
    sim_up.client.set_mode("up")
    host.wait_drained()
    assert put(vm["tpm"], 0, b64("p3"))[0] == 204  # xapi moves past the backup
    assert contents(sim_up, vm)[0] == b64("p3").decode()
    # Step 2: restore with xguard stopped, without known/.
    host.daemon.stop()
    shutil.rmtree(host.state_dir)
    shutil.copytree(backup, host.state_dir)
    shutil.rmtree(os.path.join(host.state_dir, "known"))
    host.daemon.start()
    # Step 3: the restored pending write never goes over the newer state.
    (item,) = wait_for(lambda: host.control.status()["services"]["Swtpm"]["quarantined"],
                       what="the restored write set aside")
    assert item["kind"] == "conflict"
    assert contents(sim_up, vm)[0] == b64("p3").decode()
    # The VM still runs here: it reads what it was last acknowledged.
    assert get(vm["tpm"], 0) == (200, b64("p2"))


def test_backup_of_the_embedded_store_while_it_runs(hosts: Callable[..., Host]) -> None:
    host = Host(None)
    try:
        host.daemon.start()
        vm = host.vm()
        assert put(vm["tpm"], 0, b64("p1"))[0] == 204
        store = os.path.join(host.state_dir, "local-store.sqlite")
        backup = os.path.join(host.root, "local-store.backup.sqlite")
        # sqlite3 STORE ".backup BACKUP", through Python's binding of the same API.
        with sqlite3.connect(store) as source, sqlite3.connect(backup) as target:
            source.backup(target)
        assert put(vm["tpm"], 0, b64("p2"))[0] == 204
        host.daemon.stop()
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(store + suffix):
                os.unlink(store + suffix)
        shutil.copy(backup, store)
        host.daemon.start()
        assert get(vm["tpm"], 0) == (200, b64("p1"))  # the store is the state: rolled back
    finally:
        host.finish()


def test_the_logs_of_one_vm(hosts: Callable[..., Host], sim_up: SimProcess) -> None:
    host = hosts(["--log-level", "debug"])
    vm = host.vm(contents=f"{b64('p1').decode()} {b64('s1').decode()} {b64('v1').decode()}")
    other = host.vm()
    assert put(vm["tpm"], 0, b64("p2"))[0] == 204
    assert put(other["tpm"], 0, b64("q2"))[0] == 204
    with open(host.daemon.log_file, encoding="utf-8") as f:
        log = f.read()
    lines = [line for line in log.splitlines() if vm["vm_uuid"] in line]
    assert any("create" in line for line in lines), lines
    assert any("PUT /tpm2-00.permall -> 204" in line for line in lines), lines
    assert not any(other["vm_uuid"] in line for line in lines)
    assert b64("p2").decode() not in log  # never the content
