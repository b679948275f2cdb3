"""The composition root builds without side effects, in the start order
the service needs, and the benchmarks' design variants go through it."""

from __future__ import annotations

import os
import tempfile

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from xguard.cache.cache import WriteBackCache
from xguard.daemon.compose import Design, build_service
from xguard.daemon.config import Config
from xguard.upstream.xapi import NoHandleCache


def config(root: str, **kw: object) -> Config:
    return Config(state_dir=os.path.join(root, "state"),
                  sockets_file=os.path.join(root, "run", "active.json"),
                  control="unix:" + os.path.join(root, "ctl.sock"), **kw)  # type: ignore[arg-type]


class ComposeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = tempfile.mkdtemp(prefix="xgc")
        self.addCleanup(os.rmdir, self.root)

    def test_building_touches_nothing(self) -> None:
        reactor = MemoryReactorClock()
        service = build_service(config(self.root, xapi="unix:/nonexistent"), reactor)
        self.assertEqual(os.listdir(self.root), [])
        self.assertEqual((reactor.unixServers, reactor.unixClients), ([], []))
        self.assertEqual(reactor.getDelayedCalls(), [])
        self.assertFalse(service.ready)

    def test_start_order(self) -> None:
        service = build_service(config(self.root), MemoryReactorClock())
        self.assertEqual([s.name for s in service.stages], [
            "the instance lock", "the I/O threads", "the upstream", "the last known state",
            "the domain connections", "the Swtpm cache", "the Varstored cache",
            "the domain sockets", "what stopped VMs left", "the Swtpm deliveries",
            "the Varstored deliveries", "the control channel", "the memory trimmer",
            "the upstream prober", "readiness"])

    def test_deliveries_wait_for_the_sockets(self) -> None:
        """A recovered write is judged by whether its VM runs here (its
        socket is served): an unknown base is delivered only then, and only
        a VM with no socket has its residence asked. Delivering before the
        sockets of the active file are served again would set aside the
        writes of VMs that run here (the first round comes after the flush
        interval, which a 2,000-socket resume on a busy host can outlast)."""
        names = [s.name for s in build_service(config(self.root, xapi="unix:/x"),
                                               MemoryReactorClock()).stages]
        for service in ("Swtpm", "Varstored"):
            self.assertLess(names.index(f"the {service} cache"), names.index("the domain sockets"))
            self.assertGreater(names.index(f"the {service} deliveries"),
                               names.index("what stopped VMs left"))

    def test_no_cache(self) -> None:
        service = build_service(config(self.root, no_cache=True), MemoryReactorClock())
        names = [s.name for s in service.stages]
        self.assertNotIn("the Swtpm cache", names)

    def test_design_seam(self) -> None:
        """The upstream daemon's design, as the benchmarks build it."""
        reactor = MemoryReactorClock()
        service = build_service(config(self.root, xapi="unix:/x"), reactor,
                                design=Design(flush_concurrency=1, coalesce=False,
                                              cache_handles=False))
        (swtpm,) = [s.stop.__self__ for s in service.stages  # type: ignore[union-attr]
                    if s.name == "the Swtpm cache"]
        self.assertIsInstance(swtpm, WriteBackCache)
        self.assertEqual((swtpm.flusher.semaphore.limit, swtpm.flusher.coalesce), (1, False))
        (xapi,) = [s.stop.__self__ for s in service.stages  # type: ignore[union-attr]
                   if s.name == "the upstream"]
        self.assertIsInstance(xapi._handles, NoHandleCache)
