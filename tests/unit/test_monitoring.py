"""contrib/'s monitoring files name only what xguard exports: every PromQL
expression of the alert rules (contrib/prometheus-alerts.yml) and of the
Grafana dashboard (contrib/grafana-dashboard.json) names metrics a real
``Metrics`` exposition has (with their histogram and counter suffixes), or
Prometheus' own ``up``. A renamed metric fails here, not on an operator's
silent dashboard."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from typing import Any

import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from xguard.daemon.metrics import Metrics
from xguard.status import CacheStatus, DaemonStatus, UpstreamStatus

CONTRIB = os.path.join(os.path.dirname(__file__), "..", "..", "contrib")
ALERTS = os.path.join(CONTRIB, "prometheus-alerts.yml")
DASHBOARD = os.path.join(CONTRIB, "grafana-dashboard.json")
#: What Prometheus itself makes for every target.
PROMETHEUS_OWN = {"up"}

_KEYWORDS = {"and", "or", "unless", "bool", "by", "without", "on", "ignoring", "group_left",
             "group_right", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not its functions,
    labels, keywords, durations, numbers or Grafana variables)."""
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)        # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)       # ranges, subqueries
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ",
                  text)                           # grouping labels
    text = re.sub(r"\boffset\s+-?\w+", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)      # Grafana variables
    text = re.sub(r"(?<![\w:])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*(?![A-Za-z0-9_:])(?!\s*\()", text):
        name = match.group(0)
        if name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def exported() -> set[str]:
    """Every sample name a daemon's ``/metrics`` can show: a Metrics
    instance with every labelled family populated and upstream known."""
    status = DaemonStatus(
        version="1", ready=True, cache_enabled=True,
        upstream=UpstreamStatus(kind="xapi", target="t", reachable=False, down_since=1.0),
        services={"Swtpm": CacheStatus(service="Swtpm")}, sockets={"Swtpm": 1},
        requests_waiting={"Swtpm": 0})
    metrics = Metrics(lambda: status, Clock())
    metrics.upstream_call("VTPM.set_contents", "ok", 0.01)
    metrics.domain_request("Swtpm", 204, 0.01)
    text = generate_latest(metrics.registry).decode()
    return {sample.name for family in text_string_to_metric_families(text)
            for sample in family.samples}


def alert_expressions() -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every rule, and of every query its annotations make."""
    with open(ALERTS, encoding="utf-8") as f:
        rules = yaml.safe_load(f)
    for group in rules["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule.get("record")
            yield name, rule["expr"]
            for text in rule.get("annotations", {}).values():
                for query in re.findall(r'query\s+"((?:\\.|[^"\\])*)"', text):
                    yield f"{name} (annotation)", query.replace('\\"', '"')


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row's


def dashboard_expressions(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r}", target["expr"]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if variable["type"] == "query" and isinstance(query, str):
            values = re.fullmatch(r"label_values\((.*),\s*\w+\)", query.strip())
            yield f"variable {variable['name']}", values.group(1) if values else query


class ExtractionTests(SynchronousTestCase):
    """The check is only as good as the names it finds."""

    def test_metric_names(self) -> None:
        self.assertEqual(metric_names(
            'histogram_quantile(0.99, sum by (service, le) (rate('
            'xguard_domain_request_duration_seconds_bucket{instance=~"$instance"}'
            '[$__rate_interval])))'), {"xguard_domain_request_duration_seconds_bucket"})
        self.assertEqual(metric_names(
            'xguard_upstream_up == 0 and (time() - xguard_upstream_outage_start_time_seconds)'
            ' > 600'), {"xguard_upstream_up", "xguard_upstream_outage_start_time_seconds"})
        self.assertEqual(metric_names('absent(up{job="xguard"})'), {"up"})
        self.assertEqual(metric_names(
            'max by (instance) (2 * a{verdict="failed"} + ignoring(verdict) b offset 5m) '
            '> 1e3'), {"a", "b"})
        self.assertEqual(metric_names('sum(x{l="sum(y)"}) by (instance) unless z'), {"x", "z"})

    def test_exported_names_include_suffixes(self) -> None:
        names = exported()
        for name in ("xguard_domain_request_duration_seconds_bucket",
                     "xguard_domain_request_duration_seconds_count",
                     "xguard_upstream_calls_total", "xguard_upstream_up", "xguard_health",
                     "xguard_cache_mode"):
            self.assertIn(name, names)


class ContribTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.exported = exported() | PROMETHEUS_OWN
        with open(DASHBOARD, encoding="utf-8") as f:
            self.dashboard = json.load(f)

    def check(self, expressions: Iterator[tuple[str, str]]) -> set[str]:
        seen: set[str] = set()
        count = 0
        for where, expr in expressions:
            names = metric_names(expr)
            self.assertTrue(names, f"{where}: no metric in {expr!r}")
            unknown = names - self.exported
            self.assertFalse(unknown, f"{where}: {sorted(unknown)} not exported by xguard "
                                      f"({expr!r})")
            seen |= names
            count += 1
        self.assertGreater(count, 0)
        return seen

    def test_alert_rules_name_exported_metrics(self) -> None:
        seen = self.check(alert_expressions())
        # xguard down or absent, not ready, cache disabled (issue 18, item 5).
        self.assertLessEqual({"up", "xguard_ready", "xguard_cache_enabled"}, seen)

    def test_alert_rules_are_complete(self) -> None:
        with open(ALERTS, encoding="utf-8") as f:
            rules = yaml.safe_load(f)["groups"][0]["rules"]
        names = [rule["alert"] for rule in rules]
        self.assertEqual(len(names), len(set(names)))
        for rule in rules:
            self.assertIn(rule["labels"]["severity"], ("warning", "critical"), rule["alert"])
            self.assertTrue(rule["annotations"]["summary"], rule["alert"])
        self.assertLessEqual({"XguardDown", "XguardAbsent", "XguardNotReady",
                              "XguardCacheDisabled"}, set(names))

    def test_dashboard_names_exported_metrics(self) -> None:
        seen = self.check(dashboard_expressions(self.dashboard))
        # What the issue asks it to show: health, latency, the process.
        for name in ("xguard_health", "xguard_health_reasons",
                     "xguard_domain_request_duration_seconds_bucket",
                     "process_resident_memory_bytes", "process_open_fds", "process_max_fds",
                     "xguard_cache_set_aside_items", "xguard_cache_stuck_vms"):
            self.assertIn(name, seen)

    def test_dashboard_shape(self) -> None:
        """What Grafana needs to import it anywhere: unique panel ids, a
        place on the grid, queries through the data source variable."""
        ids = [panel["id"] for panel in panels(self.dashboard)]
        self.assertEqual(len(ids), len(set(ids)))
        variables = {v["name"] for v in self.dashboard["templating"]["list"]}
        self.assertLessEqual({"datasource", "instance"}, variables)
        for panel in panels(self.dashboard):
            self.assertLessEqual({"x", "y", "w", "h"}, set(panel["gridPos"]), panel["title"])
            if panel["type"] == "row":
                continue
            self.assertTrue(panel["targets"], panel["title"])
            self.assertEqual(panel["datasource"]["uid"], "${datasource}", panel["title"])
            for target in panel["targets"]:
                self.assertIn('instance=~"$instance"', target["expr"], panel["title"])
