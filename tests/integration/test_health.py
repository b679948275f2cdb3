"""``xguard-ctl status`` and its exit status in each health state, on a real
daemon and simulator (issue 18, item 5): healthy (0), degraded during an
outage (3), failed when writes fail (4), no answer (1); the metrics say
the same, and a backlog's summary reaches the log and the status (item 7)."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import Host, put, value
from xguard.testing.daemon import wait_for
from xguard.testing.simclient import SimProcess
from xguard.testing.unixhttp import request

pytestmark = pytest.mark.integration


def status(host: Host) -> tuple[int, list[str]]:
    """``xguard-ctl status``: its exit status and its lines."""
    result = host.daemon.ctl("status", check=False)
    return result.returncode, result.stdout.decode().splitlines()


def scrape(host: Host) -> dict[str, float]:
    path = os.path.join(host.root, "m.sock")
    code, _, body = request(path, "GET", "/metrics", None, {"Connection": "close"})
    assert code == 200
    return {f"{s.name}{{{','.join(f'{k}={v}' for k, v in sorted(s.labels.items()))}}}": s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples}


def test_status_in_each_health_state(hosts: Callable[..., Host], sim_up: SimProcess) -> None:
    host = hosts(start=False)
    host.daemon.extra += ["--metrics", "unix:" + os.path.join(host.root, "m.sock")]
    host.daemon.start()

    # Healthy, before any upstream call: xguard does not claim upstream is up.
    code, lines = status(host)
    assert (code, lines[0]) == (0, "health: healthy"), lines
    m = scrape(host)
    assert "xguard_upstream_up{}" not in m
    assert m["xguard_health{verdict=healthy}"] == 1
    assert m["process_open_fds{}"] > 0 and m["process_max_fds{}"] >= m["process_open_fds{}"]

    vm = host.vm()
    assert put(vm["tpm"], 0, value(vm["vm_uuid"], 0, 1))[0] == 204
    m = scrape(host)
    assert m["xguard_upstream_up{}"] == 1
    assert m["xguard_domain_request_duration_seconds_count{service=Swtpm}"] == 1
    assert status(host)[0] == 0

    # Degraded: xapi is down, the writes are cached.
    sim_up.client.set_mode("refuse")
    for key in (0, 1):
        assert put(vm["tpm"], key, value(vm["vm_uuid"], key, 2))[0] == 204
    code, lines = status(host)
    assert code == 3, lines
    assert lines[0].startswith("health: degraded: upstream unreachable ("), lines
    assert lines[0].endswith("): 2 writes cached"), lines
    assert host.daemon.ctl("status", "--quiet", check=False).returncode == 3
    assert scrape(host)["xguard_health_reasons{reason=upstream_unreachable}"] == 1

    # Failed: the cache switched off (the fault file) while xapi is down.
    open(host.fault_file, "w").close()
    code, lines = status(host)
    assert code == 4, lines
    assert lines[0].startswith("health: failed: upstream unreachable and the cache off: VM "
                               "writes fail; "), lines
    assert put(vm["tpm"], 2, value(vm["vm_uuid"], 2, 2))[0] == 503  # as it says
    assert scrape(host)["xguard_health{verdict=failed}"] == 1

    # Healthy again once xapi is back and the backlog delivered.
    os.unlink(host.fault_file)
    sim_up.client.set_mode("up")
    host.wait_drained()
    wait_for(lambda: status(host)[0] == 0, timeout=15, what="healthy again")
    code, lines = status(host)
    assert lines[0] == "health: healthy", lines
    assert any(line.startswith("Swtpm last backlog: 2 items delivered in ") for line in lines), \
        "\n".join(lines)
    with open(host.daemon.log_file, encoding="utf-8") as f:
        assert "Swtpm cache: backlog delivered: 2 items in " in f.read()

    # No answer: the daemon is gone.
    assert host.daemon.stop() == 0
    result = host.daemon.ctl("status", check=False)
    assert result.returncode == 1
    assert b"cannot reach xguard" in result.stderr
