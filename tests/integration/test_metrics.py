"""The metrics of a real daemon, scraped as Prometheus would and parsed
with prometheus_client's parser: during an outage, after it, and while
xapi hangs."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import Host, put, value
from xguard.testing.daemon import wait_for
from xguard.testing.simclient import SimProcess
from xguard.testing.unixhttp import request

pytestmark = pytest.mark.integration


def scrape(host: Host) -> dict[str, float]:
    """Every sample as ``name{label=value,…}`` -> value."""
    path = os.path.join(host.root, "m.sock")
    status, headers, body = request(path, "GET", "/metrics", None, {"Connection": "close"})
    assert status == 200, (status, body)
    assert headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}"] = s.value
    return samples


def test_scraped_during_and_after_an_outage(hosts: Callable[..., Host],
                                            sim_up: SimProcess) -> None:
    host = hosts(start=False)
    host.daemon.extra += ["--metrics", "unix:" + os.path.join(host.root, "m.sock")]
    host.daemon.start()
    vm = host.vm()
    assert put(vm["tpm"], 0, value(vm["vm_uuid"], 0, 1))[0] == 204
    m = scrape(host)
    assert m["xguard_upstream_up{}"] == 1
    assert m["xguard_domain_sockets{service=Swtpm}"] == 1
    assert m["xguard_cache_mode{mode=Direct,service=Swtpm}"] == 1
    assert m["xguard_domain_requests_total{code=204,service=Swtpm}"] == 1
    assert request(vm["tpm"], "GET", "/nothing", None, {"Connection": "close"})[0] == 404
    assert request(vm["tpm"], "PUT", "/tpm2-00.permall", b"not base64!",
                   {"Connection": "close"})[0] == 400
    m = scrape(host)
    assert m["xguard_domain_requests_total{code=404,service=Swtpm}"] == 1
    assert m["xguard_domain_requests_total{code=400,service=Swtpm}"] == 1
    assert m["xguard_upstream_calls_total{method=VTPM.set_contents,outcome=ok}"] >= 1

    sim_up.client.set_mode("refuse")
    for rnd in (2, 3):
        assert put(vm["tpm"], rnd - 1, value(vm["vm_uuid"], rnd - 1, rnd))[0] == 204
    m = scrape(host)
    assert m["xguard_upstream_up{}"] == 0
    assert m["xguard_upstream_outage_start_time_seconds{}"] > 0
    assert m["xguard_cache_mode{mode=Engaged,service=Swtpm}"] == 1
    assert m["xguard_cache_pending_items{service=Swtpm}"] == 2
    assert m["xguard_cache_pending_bytes{service=Swtpm}"] > 0
    assert m["xguard_cache_oldest_pending_age_seconds{service=Swtpm}"] >= 0
    assert any(k.startswith("xguard_upstream_calls_total{method=") and "outcome=transient" in k
               for k in m)
    assert vm["vm_uuid"] not in "".join(m)

    sim_up.client.set_mode("up")
    host.wait_drained()
    wait_for(lambda: scrape(host)["xguard_upstream_up{}"] == 1, timeout=15,
             what="the outage's end in the metrics")
    m = scrape(host)
    assert m["xguard_cache_pending_items{service=Swtpm}"] == 0
    assert m["xguard_cache_delivered_total{service=Swtpm}"] == 2
    assert m["xguard_upstream_outage_start_time_seconds{}"] == 0


def test_hung_xapi_is_reported_unresponsive(hosts: Callable[..., Host],
                                            sim_up: SimProcess) -> None:
    host = hosts(start=False)
    host.daemon.extra += ["--metrics", "unix:" + os.path.join(host.root, "m.sock"),
                          "--unresponsive-after", "1"]
    host.daemon.start()
    vm = host.vm()
    sim_up.client.set_mode("hang")
    status, latency = put(vm["tpm"], 0, value(vm["vm_uuid"], 0, 1))
    assert status == 204  # past the direct deadline: made durable, acknowledged
    doc: dict[str, Any] = {}

    def unresponsive() -> bool:
        doc.update(host.control.status())
        return doc["upstream"]["unresponsive_since"] is not None

    wait_for(unresponsive, timeout=10, what="upstream reported unresponsive")
    assert scrape(host)["xguard_upstream_unresponsive{}"] == 1
    assert scrape(host)["xguard_upstream_calls_in_flight{}"] >= 1
    sim_up.client.set_mode("up")
    host.wait_drained()
    wait_for(lambda: scrape(host)["xguard_upstream_unresponsive{}"] == 0, timeout=15,
             what="the hang's end")
    with open(host.daemon.log_file, encoding="utf-8") as f:
        log = f.read()
    assert log.count("unresponsive: a call has waited") == 1, log[-2000:]
