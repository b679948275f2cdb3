"""The Prometheus exposition: every documented metric, parsed back with
prometheus_client's own parser; no VM in any label; and the hung-upstream
watch behind ``xguard_upstream_unresponsive``."""

from __future__ import annotations

import os
from typing import Any

import attrs
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from xguard.daemon.metrics import Metrics
from xguard.status import CacheStatus, DaemonStatus, SetAside, UpstreamStatus
from xguard.upstream.calls import CallMonitor

VM = "11111111-1111-4111-8111-111111111111"
DOC = os.path.join(os.path.dirname(__file__), "..", "..", "doc", "operations.md")


def parse(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(families: dict[str, Any], name: str, **labels: str) -> float:
    for family in families.values():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no sample {name} {labels}")


class MetricsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.status = DaemonStatus(
            version="1.2", ready=True, cache_enabled=True,
            upstream=UpstreamStatus(kind="xapi", target="xapi unix:/x", reachable=False,
                                    down_since=940.0, inflight=2, oldest_inflight_since=990.0,
                                    unresponsive_since=990.0),
            services={"Swtpm": CacheStatus(
                service="Swtpm", mode="Engaged", queue_depth=3, pending={VM: 3},
                pending_bytes=4096, oldest_pending_since=900.0, delivered=7,
                quarantined=(SetAside(id="Swtpm/" + VM, service="Swtpm", vm=VM, keys=(0,),
                                      kind="conflict", reason="R", since=950.0, held=False,
                                      complete=False, file="/q"),),
                deadline_fallbacks=2, disk_error="No space left on device",
                stuck={VM: 900.0}, set_aside_total={"conflict": 4})},
            sockets={"Swtpm": 4, "Varstored": 4}, requests_waiting={"Swtpm": 0, "Varstored": 9})
        self.metrics = Metrics(lambda: self.status, self.clock)

    def scrape(self) -> str:
        from prometheus_client import generate_latest
        return generate_latest(self.metrics.registry).decode()

    def test_status_values(self) -> None:
        text = self.scrape()
        m = parse(text)
        self.assertEqual(value(m, "xguard_build_info", version="1.2"), 1)
        self.assertEqual(value(m, "xguard_upstream_up"), 0)
        self.assertEqual(value(m, "xguard_upstream_outage_start_time_seconds"), 940)
        self.assertEqual(value(m, "xguard_upstream_unresponsive"), 1)
        self.assertEqual(value(m, "xguard_upstream_oldest_call_in_flight_age_seconds"), 10)
        self.assertEqual(value(m, "xguard_cache_mode", service="Swtpm", mode="Engaged"), 1)
        self.assertEqual(value(m, "xguard_cache_mode", service="Swtpm", mode="Direct"), 0)
        self.assertEqual(value(m, "xguard_cache_pending_items", service="Swtpm"), 3)
        self.assertEqual(value(m, "xguard_cache_pending_bytes", service="Swtpm"), 4096)
        self.assertEqual(value(m, "xguard_cache_oldest_pending_age_seconds", service="Swtpm"),
                         100)
        self.assertEqual(value(m, "xguard_cache_quarantined_items", service="Swtpm"), 1)
        self.assertEqual(value(m, "xguard_cache_set_aside_items", service="Swtpm",
                               kind="conflict"), 1)
        self.assertEqual(value(m, "xguard_cache_set_aside_items", service="Swtpm",
                               kind="damaged"), 0)
        self.assertEqual(value(m, "xguard_cache_set_aside_total", service="Swtpm",
                               kind="conflict"), 4)
        self.assertEqual(value(m, "xguard_cache_stuck_vms", service="Swtpm"), 1)
        self.assertEqual(value(m, "xguard_cache_delivered_total", service="Swtpm"), 7)
        self.assertEqual(value(m, "xguard_cache_direct_deadline_fallbacks_total",
                               service="Swtpm"), 2)
        self.assertEqual(value(m, "xguard_cache_disk_error", service="Swtpm"), 1)
        self.assertEqual(value(m, "xguard_domain_sockets", service="Varstored"), 4)
        self.assertEqual(value(m, "xguard_domain_requests_waiting", service="Varstored"), 9)
        self.assertNotIn(VM, text)  # no per-VM label, ever
        # The health verdict: failed (the disk refuses writes during the outage).
        self.assertEqual(value(m, "xguard_health", verdict="failed"), 1)
        self.assertEqual(value(m, "xguard_health", verdict="healthy"), 0)
        self.assertEqual(value(m, "xguard_health_reasons", reason="disk_error"), 1)
        self.assertEqual(value(m, "xguard_health_reasons", reason="set_aside"), 1)
        self.assertEqual(value(m, "xguard_health_reasons", reason="not_ready"), 0)

    def test_healthy(self) -> None:
        self.status = attrs.evolve(self.status, upstream=UpstreamStatus(
            kind="xapi", target="t", reachable=True), services={})
        m = parse(self.scrape())
        self.assertEqual(value(m, "xguard_health", verdict="healthy"), 1)
        self.assertEqual(value(m, "xguard_health", verdict="degraded"), 0)
        self.assertEqual(value(m, "xguard_upstream_up"), 1)

    def test_upstream_up_is_absent_before_any_call(self) -> None:
        """Before any call xguard does not know: it does not claim "up"."""
        self.status = attrs.evolve(self.status, upstream=UpstreamStatus(kind="xapi", target="t"))
        m = parse(self.scrape())
        self.assertNotIn("xguard_upstream_up", m)
        self.assertEqual(value(m, "xguard_upstream_unresponsive"), 0)

    def test_process_metrics(self) -> None:
        """RSS and open files against their limit (Linux /proc)."""
        if not os.path.isdir("/proc/self/fd"):
            self.skipTest("no /proc")
        m = parse(self.scrape())
        self.assertGreater(value(m, "process_resident_memory_bytes"), 0)
        self.assertGreater(value(m, "process_open_fds"), 0)
        self.assertGreaterEqual(value(m, "process_max_fds"), value(m, "process_open_fds"))

    def test_counted_events(self) -> None:
        self.metrics.upstream_call("VTPM.set_contents", "ok", 0.004)
        self.metrics.upstream_call("VTPM.set_contents", "transient", 3.0)
        self.metrics.domain_request("Swtpm", 204, 0.003)
        self.metrics.domain_request("Swtpm", 204, 0.2)
        self.metrics.domain_request("Swtpm", 413)  # a refusal: counted, not timed
        m = parse(self.scrape())
        self.assertEqual(value(m, "xguard_upstream_calls_total", method="VTPM.set_contents",
                               outcome="transient"), 1)
        self.assertEqual(value(m, "xguard_upstream_call_duration_seconds_count",
                               method="VTPM.set_contents"), 2)
        self.assertEqual(value(m, "xguard_domain_requests_total", service="Swtpm", code="204"), 2)
        self.assertEqual(value(m, "xguard_domain_requests_total", service="Swtpm", code="413"), 1)
        self.assertEqual(value(m, "xguard_domain_request_duration_seconds_count",
                               service="Swtpm"), 2)
        self.assertAlmostEqual(value(m, "xguard_domain_request_duration_seconds_sum",
                                     service="Swtpm"), 0.203)
        self.assertEqual(value(m, "xguard_domain_request_duration_seconds_bucket",
                               service="Swtpm", le="0.005"), 1)

    def test_every_metric_is_documented(self) -> None:
        self.metrics.upstream_call("m", "ok", 0.1)
        self.metrics.domain_request("Swtpm", 200, 0.1)
        with open(DOC, encoding="utf-8") as f:
            doc = f.read()
        for name in parse(self.scrape()):
            if name.endswith("_created"):
                continue  # prometheus_client's standard companions of counters
            self.assertIn(f"`{name}", doc, f"{name} is not in doc/operations.md")


class CallMonitorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.events: list[dict[str, Any]] = []
        self.monitor = CallMonitor(self.clock, "xapi", unresponsive_after=5)
        self.monitor.log = Logger(observer=self.events.append)
        self.seen: list[tuple[str, str, float]] = []
        self.monitor.subscribe(lambda *a: self.seen.append(a))

    def test_quick_calls_leave_no_timer(self) -> None:
        for _ in range(3):
            self.monitor.finished(self.monitor.started("VM.get_NVRAM"), "ok")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.seen), 3)

    def test_hung_call_logged_once_then_cleared(self) -> None:
        hung = self.monitor.started("VTPM.get_contents")
        self.clock.advance(3)
        quick = self.monitor.started("VM.get_NVRAM")
        self.monitor.finished(quick, "ok")
        self.assertIsNone(self.monitor.unresponsive_since)
        self.clock.advance(2)
        self.assertEqual(self.monitor.unresponsive_since, 0)
        for _ in range(10):
            self.monitor.finished(self.monitor.started("VM.get_NVRAM"), "ok")
            self.clock.advance(10)
        self.assertEqual(len(self.events), 1)  # logged once
        self.monitor.finished(hung, "transient")  # timed out at last
        self.assertIsNone(self.monitor.unresponsive_since)
        self.assertEqual(len(self.events), 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.seen[-1][:2], ("VTPM.get_contents", "transient"))
