"""Admission with the real daemon (xguard.domain.admission): a service's
sockets share a few places in the apps, and what waits on a hung xapi
must not keep the other VMs out. ``--active-requests 1`` makes the gate
as narrow as it gets, so any coupling would show."""

from __future__ import annotations

import threading
import time
import xmlrpc.client
from collections.abc import Callable

import pytest

from tests.integration.harness import XML, Host, set_nvram
from xguard.testing.unixhttp import request

pytestmark = pytest.mark.integration


def test_a_hung_read_does_not_hold_other_vms_back(hosts: Callable[..., Host]) -> None:
    """VM A asks for its NVRAM while xapi hangs: it waits for xapi (until
    the prober gives up on it, 5 s). VM B's write on the same service is
    acknowledged meanwhile (made durable on disk past the 1 s direct
    deadline), half a second after A's read stopped counting: a gate that
    kept A's place would hold B for A's 5 s."""
    host = hosts(["--active-requests", "1", "--direct-deadline", "1"])
    a, b = host.vm(), host.vm()
    host.sim.client.set_mode("hang")  # type: ignore[union-attr]
    answer: list[tuple[float, int]] = []
    started = time.monotonic()

    def read_a() -> None:
        body = xmlrpc.client.dumps(("s", "vm"), "VM.get_NVRAM").encode()
        status, _, _ = request(a["var"], "POST", "/", body, XML, timeout=60)
        answer.append((time.monotonic() - started, status))

    reader = threading.Thread(target=read_a)
    reader.start()
    try:
        time.sleep(0.5)  # A's read is in the apps, waiting for xapi
        result, took = set_nvram(b["var"], b"B" * 64, "")
        assert result["Status"] == "Success", result
        assert took < 4.0, f"B's write waited {took:.1f}s behind A's read"
        assert answer == [], "A's read was answered: nothing held the gate"
    finally:
        host.sim.client.set_mode("up")  # type: ignore[union-attr]
        reader.join(30)
    assert [status for _, status in answer] == [200]


def test_many_connections_of_one_vm_do_not_keep_another_out(hosts: Callable[..., Host]) -> None:
    """One VM's eight connections each asking at once (while xapi is slow)
    wait for one another: the other VM's request goes in at the next
    turn, not after all of them."""
    host = hosts(["--active-requests", "1"])
    a, b = host.vm(), host.vm()
    host.sim.client.set_delay(0.2)  # type: ignore[union-attr]
    body = xmlrpc.client.dumps(("s", "vm"), "VM.get_NVRAM").encode()
    done: list[float] = []
    started = time.monotonic()

    def flood() -> None:
        status, _, _ = request(a["var"], "POST", "/", body, XML, timeout=60)
        assert status == 200
        done.append(time.monotonic() - started)

    threads = [threading.Thread(target=flood) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.1)
        status, _, _ = request(b["var"], "POST", "/", body, XML, timeout=60)
        b_took = time.monotonic() - started
        assert status == 200
        for t in threads:
            t.join(60)
    finally:
        host.sim.client.set_delay(0)  # type: ignore[union-attr]
    assert len(done) == 8
    # B went in after at most A's one request in the apps: long before A's
    # eighth answer (8 x 0.2 s of xapi's time, one after the other).
    assert b_took < sorted(done)[-3], (b_took, sorted(done))
