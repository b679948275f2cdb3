"""Shared builders for the cache tests (not a test module)."""

from __future__ import annotations

import itertools
import shutil
import tempfile
import weakref
from typing import Any

from twisted.internet.task import Clock

from tests.fakes import FakeUpstream, sync_runner
from xguard.cache.cache import WriteBackCache
from xguard.state.known import KnownState, ServiceRecords
from xguard.state.sinks import NvramSink, VtpmSink
from xguard.util.locks import KeyedLocks

VM1 = "11111111-1111-4111-8111-111111111111"
VM2 = "22222222-2222-4222-8222-222222222222"
VM3 = "33333333-3333-4333-8333-333333333333"


class Env:
    """A FakeUpstream, a Clock, a monotonic counter and a temp state dir."""

    def __init__(self, *, nvram: bool = False, **kwargs: Any) -> None:
        self.clock = Clock()
        self.upstream = FakeUpstream(self.clock)
        for vm in (VM1, VM2, VM3):
            self.upstream.add_vm(vm)
        self.locks = KeyedLocks()
        self.root = tempfile.mkdtemp(prefix="xgc")
        # Removed with this object, or at exit, if no test calls cleanup().
        self._remove = weakref.finalize(self, shutil.rmtree, self.root, True)
        #: VMs with a socket (the known state keeps copies of these).
        self.live: set[str] = {VM1, VM2, VM3}
        self.boot_id = "boot-1"
        self.known = self.build_known()
        self.sink = (NvramSink if nvram else VtpmSink)(self.upstream, self.locks, self.known)
        self.ticks = itertools.count(1000, 1000)
        self.kwargs = dict(queue_size=4, direct_deadline=3.0, backoff=lambda n: min(2.0 ** n, 30.0),
                           interval=0.5)
        self.kwargs.update(kwargs)
        self.cache = self.build()

    def build_known(self) -> KnownState:
        known = KnownState(self.root, runner=sync_runner, is_live=lambda vm: vm in self.live,
                           boot_id=lambda: self.boot_id)
        known.open()
        return known

    def build(self) -> WriteBackCache:
        kwargs = {"is_live": lambda vm: vm in self.live, **self.kwargs}
        kwargs.setdefault("runner", sync_runner)
        cache = WriteBackCache(self.sink, self.root, clock=self.clock,
                               monotonic_ns=lambda: next(self.ticks),
                               # as the daemon wires it (xguard.daemon.compose)
                               records=ServiceRecords(self.known, self.sink.service.value),
                               **kwargs)
        # As the service wires it: upstream answering again ends a backoff.
        self.upstream.reachability.subscribe(lambda up: up and cache.upstream_answers())
        return cache

    def tpm(self, vm: str) -> str:
        return self.upstream.vtpms[self.upstream.vms[vm]["vtpm"]]

    def settle(self, steps: int = 200) -> None:
        for _ in range(steps):
            if not self.clock.getDelayedCalls():
                return
            last = max(c.getTime() for c in self.clock.getDelayedCalls())
            self.clock.advance(last - self.clock.seconds())

    def cleanup(self) -> None:
        self._remove()
