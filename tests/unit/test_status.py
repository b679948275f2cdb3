"""Status values: one JSON form, read back by xguard-ctl whatever daemon
(older or newer) wrote it."""

from __future__ import annotations

import json

import attrs
from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from xguard.status import (
    DEGRADED,
    FAILED,
    HEALTHY,
    REASONS,
    CacheStatus,
    DaemonStatus,
    Drain,
    SetAside,
    UpstreamStatus,
    from_json,
    to_json,
)

text = st.text(max_size=8)
maybe_time = st.one_of(st.none(), st.floats(0, 2e9))
caches = st.builds(
    CacheStatus, service=text, mode=st.sampled_from(["Direct", "Engaged", "Disengaged"]),
    enabled=st.booleans(), queue_depth=st.integers(0, 512),
    pending=st.dictionaries(text, st.integers(1, 3), max_size=3),
    quarantined=st.lists(st.builds(
        SetAside, id=text, service=text, vm=text,
        keys=st.lists(st.integers(0, 2), max_size=3).map(tuple),
        kind=st.sampled_from(["conflict", "elsewhere", "refused", "damaged"]), reason=text,
        since=maybe_time, held=st.booleans(), complete=st.booleans(), file=text),
        max_size=2).map(tuple),
    stuck=st.dictionaries(text, st.floats(0, 2e9), max_size=2),
    set_aside_total=st.dictionaries(text, st.integers(0, 9), max_size=2),
    last_error=st.one_of(st.none(), text), outage_since=maybe_time,
    delivered=st.integers(0, 10**6), disk_error=st.one_of(st.none(), text),
    drain=st.one_of(st.none(), st.builds(
        Drain, started=st.floats(0, 2e9), delivered=st.integers(0, 10**6),
        left=st.integers(0, 10**6), rate=st.floats(0, 1e6), ended=maybe_time)))
statuses = st.builds(
    DaemonStatus, version=text, ready=st.booleans(), cache_enabled=st.booleans(),
    upstream=st.builds(UpstreamStatus, kind=text, target=text,
                       reachable=st.one_of(st.none(), st.booleans()), down_since=maybe_time,
                       unresponsive_since=maybe_time),
    services=st.dictionaries(st.sampled_from(["Swtpm", "Varstored"]), caches).map(
        lambda d: {k: attrs.evolve(v, service=k) for k, v in d.items()}),
    sockets=st.dictionaries(st.sampled_from(["Swtpm", "Varstored"]), st.integers(0, 2000)),
    requests_waiting=st.dictionaries(st.sampled_from(["Swtpm", "Varstored"]),
                                     st.integers(0, 2000)))


class StatusTests(SynchronousTestCase):
    @given(statuses)
    def test_json_round_trip(self, status: DaemonStatus) -> None:
        doc = json.loads(json.dumps(to_json(status)))
        self.assertEqual(doc, to_json(status))
        self.assertEqual(from_json(doc), status)

    def test_older_or_newer_documents_are_read(self) -> None:
        status = from_json({"upstream": {"kind": "xapi", "target": "t", "future": 1},
                            "services": {"Swtpm": {"mode": "Engaged", "pending": {"vm": 2},
                                                   "quarantined": [{"vm": "v"}],
                                                   "brand_new_field": True}},
                            "sockets": {"Swtpm": 3}})
        swtpm = status.services["Swtpm"]
        self.assertEqual((swtpm.mode, swtpm.pending_items, swtpm.queue_depth), ("Engaged", 2, 0))
        self.assertEqual(swtpm.quarantined[0].vm, "v")
        self.assertEqual(status.upstream.target, "t")
        self.assertEqual(from_json({}).services, {})


VM = "11111111-1111-4111-8111-111111111111"


def aside(kind: str) -> SetAside:
    return SetAside(id="Swtpm/" + VM, service="Swtpm", vm=VM, keys=(0,), kind=kind, reason="r",
                    since=1.0, held=False, complete=False, file="/q")


class HealthTests(SynchronousTestCase):
    """The verdict and its reasons (doc/operations.md, "Health"), computed
    in one place from the rest of the document."""

    def status(self, *, ready: bool = True, cache_enabled: bool = True,
               reachable: bool | None = True, **swtpm: object) -> DaemonStatus:
        return DaemonStatus(
            version="1", ready=ready, cache_enabled=cache_enabled,
            upstream=UpstreamStatus(kind="xapi", target="t", reachable=reachable,
                                    last_error=None if reachable is not False else "REFUSED"),
            services={"Swtpm": CacheStatus(service="Swtpm", **swtpm),  # type: ignore[arg-type]
                      "Varstored": CacheStatus(service="Varstored")},
            sockets={})

    def verdict(self, status: DaemonStatus) -> tuple[str, list[str]]:
        return status.health.verdict, [r.code for r in status.health.reasons]

    def test_healthy(self) -> None:
        self.assertEqual(self.verdict(self.status()), (HEALTHY, []))
        # Before any call, nothing is known against upstream.
        self.assertEqual(self.verdict(self.status(reachable=None)), (HEALTHY, []))
        # A backlog being delivered is normal work.
        self.assertEqual(self.verdict(self.status(mode="Engaged", pending={VM: 3})),
                         (HEALTHY, []))

    def test_degraded(self) -> None:
        outage = self.status(reachable=False, mode="Engaged", pending={VM: 2})
        self.assertEqual(self.verdict(outage), (DEGRADED, ["upstream_unreachable"]))
        self.assertEqual(outage.health.reasons[0].text,
                         "upstream unreachable (REFUSED): 2 writes cached")
        hung = DaemonStatus(version="1", ready=True, cache_enabled=True, sockets={},
                            services={}, upstream=UpstreamStatus(
                                kind="xapi", target="t", reachable=True,
                                unresponsive_since=5.0))
        self.assertEqual(self.verdict(hung), (DEGRADED, ["upstream_unresponsive"]))
        aside_ = self.status(quarantined=(aside("conflict"), aside("damaged"), aside("conflict")))
        self.assertEqual(self.verdict(aside_), (DEGRADED, ["set_aside"]))
        self.assertEqual(aside_.health.reasons[0].text,
                         "Swtpm: 3 writes set aside (conflict 2, damaged 1): see xguard-ctl "
                         "set-aside")
        stuck = self.status(stuck={VM: 1.0})
        self.assertEqual(self.verdict(stuck), (DEGRADED, ["stuck"]))
        self.assertIn("1 VM have failed", stuck.health.reasons[0].text)
        fault = self.status(cache_enabled=False, enabled=False)
        self.assertEqual(self.verdict(fault), (DEGRADED, ["cache_disabled"]))
        self.assertIn("fault switch file", fault.health.reasons[0].text)
        no_cache = self.status(cache_enabled=False, cache="off", enabled=False)
        self.assertEqual(no_cache.health.reasons[0].text, "the cache is off (--no-cache)")
        # The disk refused the last cache write, but the cache needs no disk now.
        disk = self.status(disk_error="No space left on device")
        self.assertEqual(self.verdict(disk), (DEGRADED, ["disk_error"]))
        self.assertEqual(disk.health.reasons[0].text,
                         "Swtpm cache: the disk refused the last cache write (No space left on "
                         "device): writes would fail in an outage")

    def test_failed(self) -> None:
        self.assertEqual(self.verdict(self.status(ready=False)), (FAILED, ["not_ready"]))
        disk = self.status(reachable=False, mode="Engaged", pending={VM: 1},
                           disk_error="No space left on device")
        self.assertEqual(self.verdict(disk), (FAILED, ["upstream_unreachable", "disk_error"]))
        self.assertEqual(disk.health.reasons[1].text,
                         "Swtpm cache: the disk refuses writes (No space left on device)")
        off = self.status(reachable=False, cache_enabled=False, enabled=False)
        self.assertEqual(self.verdict(off),
                         (FAILED, ["writes_fail", "upstream_unreachable", "cache_disabled"]))
        self.assertEqual(off.health.reasons[1].text, "upstream unreachable (REFUSED)")

    def test_every_reason_has_its_severity(self) -> None:
        self.assertEqual(set(REASONS.values()), {DEGRADED, FAILED})

    def test_in_the_document_and_recomputed_by_readers(self) -> None:
        status = self.status(stuck={VM: 1.0})
        doc = to_json(status)
        self.assertEqual(doc["health"]["verdict"], DEGRADED)
        self.assertEqual(doc["health"]["reasons"][0]["code"], "stuck")
        # A reader computes it from the document: a forged verdict is ignored.
        doc["health"] = {"verdict": HEALTHY, "reasons": []}
        self.assertEqual(from_json(doc).health, status.health)
        # evolve() recomputes it too.
        self.assertEqual(attrs.evolve(status, ready=False).health.verdict, FAILED)

    def test_drain_read_back(self) -> None:
        doc = to_json(self.status(drain=Drain(started=1.0, delivered=5, left=3, rate=2.5)))
        self.assertEqual(doc["services"]["Swtpm"]["drain"],
                         {"started": 1.0, "delivered": 5, "left": 3, "rate": 2.5, "ended": None})
        self.assertEqual(from_json(doc).services["Swtpm"].drain,
                         Drain(started=1.0, delivered=5, left=3, rate=2.5))
        doc["services"]["Swtpm"]["drain"] = "garbage"
        self.assertIsNone(from_json(doc).services["Swtpm"].drain)
