"""Integration fixtures: a real xapi simulator process and a real daemon."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator

import pytest

from tests.integration.harness import Host, finish_all
from xguard.testing.daemon import Daemon
from xguard.testing.simclient import SimProcess

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    root = tempfile.mkdtemp(prefix="xs")
    proc = SimProcess(os.path.join(root, "xapi"), os.path.join(root, "admin"),
                      log_file=os.path.join(root, "sim.log"))
    proc.start()
    yield proc
    proc.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon(sim: SimProcess) -> Iterator[Daemon]:
    d = Daemon(xapi="unix:" + sim.socket)
    d.start()
    yield d
    try:
        assert d.stop() == 0, d.log()
    finally:
        d.cleanup()


class VmSockets:
    """One VM seeded in the simulator with both sockets created."""

    def __init__(self, daemon: Daemon, sim: SimProcess | None, gid: int = 0) -> None:
        self.vm_uuid = str(uuid.uuid4())
        self.vtpm_uuid = None
        if sim is not None:
            ids = sim.client.seed_vm(self.vm_uuid)
            self.vtpm_uuid = ids["vtpm_uuid"]
            self.vm_ref = ids["vm_ref"]
        short = self.vm_uuid[:8]
        self.tpm = os.path.join(daemon.root, f"{short}.tpm")
        self.var = os.path.join(daemon.root, f"{short}.var")
        daemon.ctl("vtpm_create", "t", self.vm_uuid, str(gid), self.tpm)
        daemon.ctl("varstore_create", "t", self.vm_uuid, str(gid), self.var)


@pytest.fixture
def make_vm(daemon: Daemon, sim: SimProcess):  # type: ignore[no-untyped-def]
    return lambda gid=0: VmSockets(daemon, sim, gid)


@pytest.fixture
def sim_up(sim: SimProcess) -> Iterator[SimProcess]:
    """The module's simulator, up before and after the test."""
    sim.client.set_mode("up")
    sim.client.reset()
    yield sim
    sim.client.set_mode("up")


@pytest.fixture
def hosts(sim_up: SimProcess) -> Iterator[Callable[..., Host]]:
    """Makes daemons; each is stopped (exit 0 checked) and removed after."""
    made: list[Host] = []

    def make(extra: list[str] | None = None, start: bool = True) -> Host:
        host = Host(sim_up, extra)
        made.append(host)
        if start:
            host.daemon.start()
        return host

    yield make
    finish_all(made)
