"""Status values: one JSON form, read back by xguard-ctl whatever daemon
(older or newer) wrote it."""

from __future__ import annotations

import json

import attrs
from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from xguard.status import (
    CacheStatus,
    DaemonStatus,
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
    delivered=st.integers(0, 10**6), disk_error=st.one_of(st.none(), text))
statuses = st.builds(
    DaemonStatus, version=text, ready=st.booleans(), cache_enabled=st.booleans(),
    upstream=st.builds(UpstreamStatus, kind=text, target=text,
                       reachable=st.one_of(st.none(), st.booleans()), down_since=maybe_time),
    services=st.dictionaries(st.sampled_from(["Swtpm", "Varstored"]), caches).map(
        lambda d: {k: attrs.evolve(v, service=k) for k, v in d.items()}),
    sockets=st.dictionaries(st.sampled_from(["Swtpm", "Varstored"]), st.integers(0, 2000)))


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
