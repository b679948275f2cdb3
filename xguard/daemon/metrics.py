# -*- test-case-name: tests.unit.test_metrics -*-
"""Prometheus metrics (``--metrics ENDPOINT``, text exposition at
``/metrics``), with prometheus_client.

Most values are read from the Status values at scrape time (one source of
truth with ``xguard-ctl status``, its health verdict included); what Status
does not keep — every upstream call's outcome and duration, every domain
request's status code and latency — is counted as it happens, and the
process's own figures (memory, open files against their limit) come from
prometheus_client's ``ProcessCollector`` (``process_*``, read from /proc at
scrape time). Labels are the service (``Swtpm``/``Varstored``), the
upstream method and outcome, the HTTP status code, the health verdict and
reason: never a VM, so the number of series does not grow with the host,
and no VM content ever appears. Every metric is listed in
doc/operations.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import Site

from ..interfaces import IServerReactor
from ..status import REASONS, VERDICTS, DaemonStatus
from ..util.durable import makedirs
from ..util.unixsock import remove_stale
from .config import unix_endpoint_path

__all__ = ["Metrics", "MetricsListener", "MODES"]

MODES = ("Direct", "Engaged", "Disengaged")
#: Why a write is set aside (xguard.cache.aside), one series each.
SET_ASIDE_KINDS = ("conflict", "elsewhere", "unverified", "refused", "damaged")

#: Upstream call durations: a local xapi answers in milliseconds; the
#: direct deadline is seconds; --xapi-timeout is minutes.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0, 60.0, 120.0)


class Metrics:
    """The daemon's metrics in their own registry (nothing global).

    :param status: the Status values, read at every scrape.
    :param clock: for ages ("seconds since").
    """

    def __init__(self, status: Callable[[], DaemonStatus], clock: IReactorTime) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._status = status
        self._clock = clock
        self.upstream_calls = Counter(
            "xguard_upstream_calls", "Upstream calls, by method and outcome "
            "(ok, transient: retried later, permanent: refused by upstream).",
            ["method", "outcome"], registry=self.registry)
        self.upstream_call_duration = Histogram(
            "xguard_upstream_call_duration_seconds", "How long upstream calls took, by method.",
            ["method"], buckets=_BUCKETS, registry=self.registry)
        self.domain_requests = Counter(
            "xguard_domain_requests", "Requests answered on domain sockets, by service and "
            "HTTP status code.", ["service", "code"], registry=self.registry)
        self.domain_request_duration = Histogram(
            "xguard_domain_request_duration_seconds", "How long domain requests took, from "
            "their arrival in full to their answer's last byte, by service.", ["service"],
            buckets=_BUCKETS, registry=self.registry)
        self.registry.register(_StatusCollector(self))
        # process_*: resident memory, open file descriptors and their limit,
        # CPU time, start time (Linux /proc; nothing elsewhere).
        ProcessCollector(registry=self.registry)
        self._children: dict[Any, Any] = {}

    def upstream_call(self, method: str, outcome: str, seconds: float) -> None:
        """A CallMonitor observer (on every upstream call: the labelled
        children are looked up once)."""
        counter = self._children.get((method, outcome))
        if counter is None:
            counter = self._children[(method, outcome)] = self.upstream_calls.labels(
                method, outcome)
        counter.inc()
        histogram = self._children.get(method)
        if histogram is None:
            histogram = self._children[method] = self.upstream_call_duration.labels(method)
        histogram.observe(seconds)

    def domain_request(self, service: str, code: int, seconds: float | None = None) -> None:
        """A domain request was answered (on every request: the labelled
        children are looked up once). ``seconds``: its latency (None for a
        refusal of a request never received in full: counted, not timed)."""
        counter = self._children.get((service, code))
        if counter is None:
            counter = self._children[(service, code)] = self.domain_requests.labels(
                service, str(code))
        counter.inc()
        if seconds is not None:
            histogram = self._children.get(service)
            if histogram is None:
                histogram = self._children[service] = self.domain_request_duration.labels(
                    service)
            histogram.observe(seconds)

    def resource(self) -> Resource:
        """``/metrics`` (everything else: 404)."""
        root = Resource()
        root.putChild(b"metrics", _Exposition(self.registry))
        return root


class _Exposition(Resource):
    """The text exposition, rendered on the reactor thread: the values it
    reads belong to it (prometheus_client's own Twisted resource renders in
    a thread through WSGI, on the global reactor)."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted's, untyped
        self._registry = registry

    def render_GET(self, request: IRequest) -> bytes:
        body = generate_latest(self._registry)
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return body


class _StatusCollector(Collector):
    """Gauges and counters read from the Status values at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def describe(self) -> Iterator[Metric]:
        return iter(())  # computed at scrape time

    def collect(self) -> Iterator[Metric]:
        status = self._m._status()
        now = self._m._clock.seconds()
        info = GaugeMetricFamily("xguard_build_info", "xguard's version (always 1).",
                                 labels=["version"])
        info.add_metric([status.version], 1)
        yield info
        yield _gauge("xguard_ready", "1 once every socket listens again after a start.",
                     int(status.ready))
        yield _gauge("xguard_known_state_vms",
                     "VMs whose last known state is kept (for reads during an outage).",
                     status.known_state_vms)
        health = GaugeMetricFamily("xguard_health", "1 for the daemon's health verdict "
                                   "(healthy, degraded, failed; xguard-ctl status).",
                                   labels=["verdict"])
        for verdict in VERDICTS:
            health.add_metric([verdict], int(status.health.verdict == verdict))
        yield health
        reasons = GaugeMetricFamily("xguard_health_reasons", "Why the daemon is not healthy: "
                                    "how many reasons of each kind hold now.",
                                    labels=["reason"])
        for code in REASONS:
            reasons.add_metric([code], sum(1 for r in status.health.reasons if r.code == code))
        yield reasons

        up = status.upstream
        if up.reachable is not None:  # absent until a call answered or failed
            yield _gauge("xguard_upstream_up", "1 while upstream answers, 0 during an outage "
                         "(absent until a call answered or failed).", int(up.reachable))
        yield _gauge("xguard_upstream_outage_start_time_seconds",
                     "When the current upstream outage started (0: none).", up.down_since or 0)
        yield _gauge("xguard_upstream_unresponsive",
                     "1 while a call has waited longer than the unresponsive threshold.",
                     int(up.unresponsive_since is not None))
        yield _gauge("xguard_upstream_calls_in_flight", "Upstream calls waiting for an answer.",
                     up.inflight)
        yield _gauge("xguard_upstream_oldest_call_in_flight_age_seconds",
                     "How long the oldest call in flight has waited (0: none).",
                     0 if up.oldest_inflight_since is None else now - up.oldest_inflight_since)

        sockets = GaugeMetricFamily("xguard_domain_sockets", "Domain sockets served.",
                                    labels=["service"])
        for service, n in sorted(status.sockets.items()):
            sockets.add_metric([service], n)
        yield sockets
        waiting = GaugeMetricFamily("xguard_domain_requests_waiting", "Requests received and "
                                    "waiting for their service's admission (--active-requests).",
                                    labels=["service"])
        for service, n in sorted(status.requests_waiting.items()):
            waiting.add_metric([service], n)
        yield waiting

        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "mode": GaugeMetricFamily("xguard_cache_mode", "The cache's mode (1 for the "
                                      "current one).", labels=["service", "mode"]),
            "enabled": GaugeMetricFamily("xguard_cache_enabled", "0 with --no-cache or while "
                                         "the fault switch file exists.", labels=["service"]),
            "queue": GaugeMetricFamily("xguard_cache_queue_depth", "Names queued for the "
                                       "flusher.", labels=["service"]),
            "pending": GaugeMetricFamily("xguard_cache_pending_items", "Writes on disk not yet "
                                         "delivered upstream.", labels=["service"]),
            "bytes": GaugeMetricFamily("xguard_cache_pending_bytes", "Size of the writes not "
                                       "yet delivered.", labels=["service"]),
            "age": GaugeMetricFamily("xguard_cache_oldest_pending_age_seconds", "Age of the "
                                     "oldest write not yet delivered (0: none).",
                                     labels=["service"]),
            "quarantined": GaugeMetricFamily("xguard_cache_quarantined_items", "Writes set "
                                             "aside, waiting for the operator (xguard-ctl "
                                             "set-aside).", labels=["service"]),
            "aside": GaugeMetricFamily("xguard_cache_set_aside_items", "Writes set aside now, "
                                       "by why: conflict (another writer), elsewhere (the VM "
                                       "runs on another host), unverified, refused, damaged.",
                                       labels=["service", "kind"]),
            "aside_total": CounterMetricFamily("xguard_cache_set_aside", "Writes set aside "
                                               "since the start, by why.",
                                               labels=["service", "kind"]),
            "stuck": GaugeMetricFamily("xguard_cache_stuck_vms", "VMs whose cached writes have "
                                       "failed for longer than --stuck-after.",
                                       labels=["service"]),
            "disk": GaugeMetricFamily("xguard_cache_disk_error", "1 while the disk refuses "
                                      "cache writes (they fail, and clients retry).",
                                      labels=["service"]),
            "delivered": CounterMetricFamily("xguard_cache_delivered", "Cached writes "
                                             "delivered upstream.", labels=["service"]),
            "fallbacks": CounterMetricFamily("xguard_cache_direct_deadline_fallbacks",
                                             "Direct writes upstream did not answer within "
                                             "--direct-deadline (made durable locally).",
                                             labels=["service"]),
        }
        for name, svc in sorted(status.services.items()):
            for mode in MODES:
                families["mode"].add_metric([name, mode], int(svc.mode == mode))
            families["enabled"].add_metric([name], int(svc.cache == "on" and svc.enabled))
            families["queue"].add_metric([name], svc.queue_depth)
            families["pending"].add_metric([name], svc.pending_items)
            families["bytes"].add_metric([name], svc.pending_bytes)
            families["age"].add_metric([name], 0 if svc.oldest_pending_since is None
                                       else max(0.0, now - svc.oldest_pending_since))
            families["quarantined"].add_metric([name], len(svc.quarantined))
            for kind in SET_ASIDE_KINDS:
                families["aside"].add_metric(
                    [name, kind], sum(1 for item in svc.quarantined if item.kind == kind))
                families["aside_total"].add_metric([name, kind],
                                                   svc.set_aside_total.get(kind, 0))
            families["stuck"].add_metric([name], len(svc.stuck))
            families["disk"].add_metric([name], int(svc.disk_error is not None))
            families["delivered"].add_metric([name], svc.delivered)
            families["fallbacks"].add_metric([name], svc.deadline_fallbacks)
        yield from families.values()


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


class MetricsListener:
    """Serves ``/metrics`` on ``--metrics`` (a quiet Site: no access log)."""

    def __init__(self, reactor: IServerReactor, description: str, metrics: Metrics) -> None:
        self._reactor = reactor
        self.description = description
        self._site = Site(metrics.resource())
        self._site.noisy = False
        self._site.log = lambda request: None  # type: ignore[method-assign]
        self._port: IListeningPort | None = None

    def listen(self) -> "Deferred[None]":
        async def run() -> None:
            path = unix_endpoint_path(self.description)
            if path is not None:
                makedirs(os.path.dirname(path), 0o755)
                remove_stale(path, "metrics socket")
            self._port = await serverFromString(self._reactor, self.description).listen(
                self._site)
        return ensureDeferred(run())

    def stop(self) -> "Deferred[None]":
        port, self._port = self._port, None
        if port is None:
            return succeed(None)
        stopped = port.stopListening()
        return stopped if stopped is not None else succeed(None)
