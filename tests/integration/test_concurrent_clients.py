"""Many VMs at once, driven the way a host drives them: each VM's swtpm on
its own kept-alive connection, the orchestrator over AMP, all in flight
together on one reactor. pytest-twisted runs these tests inside the reactor
(``@pytest_twisted.ensureDeferred``), so the clients are Twisted's own (treq over an
Agent with a persistent pool per VM, an AMP protocol) and truly
concurrent, unlike the blocking helpers of the other modules.

Checked under that concurrency, through an outage in the middle: every VM
reads back its own latest write, never another VM's nor an older one; the
orchestrator's VtpmGetContents agrees; and xapi ends with each VM's latest
write once the cache has drained."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.task import deferLater
from twisted.protocols.amp import AMP
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from tests.integration.harness import Host, vtpm_fields
from xguard.control.commands import Status, VtpmCreate, VtpmGetContents

pytestmark = pytest.mark.integration

VMS = 16
ROUNDS = 6
OUTAGE = range(2, 4)  # rounds written while xapi refuses connections


@implementer(IAgentEndpointFactory)
class _OneSocket:
    """Every request of this Agent goes to one VM's swtpm socket."""

    def __init__(self, reactor: Any, path: str) -> None:
        self.endpoint = UNIXClientEndpoint(reactor, path)

    def endpointForURI(self, uri: Any) -> UNIXClientEndpoint:
        return self.endpoint


def _permall(vm: str, rnd: int) -> bytes:
    return base64.b64encode(f"{vm}:{rnd}".encode())


class Swtpm:
    """One VM's swtpm: requests in order on one kept-alive connection (a
    treq client over an Agent whose pool keeps one connection)."""

    def __init__(self, reactor: Any, path: str) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 1
        self.http = HTTPClient(Agent.usingEndpointFactory(reactor, _OneSocket(reactor, path),
                                                          pool=self.pool))

    async def request(self, method: str, body: bytes | None = None) -> tuple[int, bytes]:
        response = await self.http.request(method, "http://localhost/tpm2-00.permall",
                                           data=body)
        return response.code, await response.content()


async def _until(reactor: Any, check: Callable[[], Any], what: str,
                 timeout: float = 60.0) -> None:
    for _ in range(int(timeout / 0.2)):
        if await check():
            return
        await deferLater(reactor, 0.2, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


@pytest_twisted.ensureDeferred
async def test_many_vms_at_once_through_an_outage(hosts: Callable[..., Host]) -> None:
    from twisted.internet import reactor

    host = hosts()
    sim = host.sim
    assert sim is not None
    amp = await connectProtocol(UNIXClientEndpoint(reactor, host.daemon.control), AMP())
    vms = [sim.client.seed_vm() for _ in range(VMS)]
    for vm in vms:
        vm["tpm"] = f"{host.root}/{vm['vm_uuid'][:8]}.t"
    await gatherResults([amp.callRemote(VtpmCreate, dbg="t", vm_uuid=vm["vm_uuid"], gid=0,
                                        path=vm["tpm"]) for vm in vms])
    clients = {vm["vm_uuid"]: Swtpm(reactor, vm["tpm"]) for vm in vms}

    async def one_vm(vm: dict[str, Any], rnd: int) -> None:
        client = clients[vm["vm_uuid"]]
        code, _ = await client.request("PUT", _permall(vm["vm_uuid"], rnd))
        assert code == 204, (vm["vm_uuid"], rnd, code)
        code, body = await client.request("GET")  # at once, on the same connection
        assert (code, body) == (200, _permall(vm["vm_uuid"], rnd))

    try:
        for rnd in range(1, ROUNDS + 1):
            sim.client.set_mode("refuse" if rnd in OUTAGE else "up")
            await gatherResults([ensureDeferred(one_vm(vm, rnd)) for vm in vms],
                                consumeErrors=True)
            # The orchestrator reads every vTPM while the VMs write the next round.
            contents = await gatherResults([
                amp.callRemote(VtpmGetContents, dbg="t", vtpm_uuid=vm["vtpm_uuid"])
                for vm in vms])
            for vm, answer in zip(vms, contents):
                assert vtpm_fields(answer["contents"])[0] == _permall(vm["vm_uuid"],
                                                                      rnd).decode()
            if rnd in OUTAGE:  # the outage is real: these writes wait in the cache
                swtpm = json.loads((await amp.callRemote(Status))["status"])["services"]["Swtpm"]
                assert swtpm["mode"] != "Direct" and swtpm["pending"], swtpm
        sim.client.set_mode("up")

        async def drained() -> bool:
            doc = json.loads((await amp.callRemote(Status))["status"])["services"]["Swtpm"]
            return doc["mode"] == "Direct" and not doc["pending"]

        await _until(reactor, drained, "the Swtpm cache to drain")
        for vm in vms:
            stored = sim.client.vtpm_state(vm["vtpm_uuid"])["contents"]
            assert vtpm_fields(stored)[0] == _permall(vm["vm_uuid"], ROUNDS).decode()
    finally:
        sim.client.set_mode("up")
        await gatherResults([c.pool.closeCachedConnections() for c in clients.values()])
        amp.transport.loseConnection()
