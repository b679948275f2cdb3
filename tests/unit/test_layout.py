from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from xguard.cache.layout import (
    Invalid,
    Item,
    Latest,
    Outdated,
    Pending,
    Version,
    classify,
    parse_key,
    parse_timestamp,
    quarantine_path,
    version_path,
)
from xguard.model import Service

VM = "11111111-1111-4111-8111-111111111111"


class LayoutTests(SynchronousTestCase):
    def test_paths(self) -> None:
        v = Version(Item(VM, 2), 123)
        self.assertEqual(version_path("/s", Service.SWTPM, v), f"/s/Swtpm/{VM}/2/123")
        self.assertEqual(quarantine_path("/s", Service.VARSTORED, v),
                         f"/s/quarantine/Varstored/{VM}/2/123")

    def test_parse(self) -> None:
        self.assertEqual(parse_timestamp("42"), 42)
        for bad in ("", "042", "-1", "1.5", "x", "١٢"):
            self.assertIsNone(parse_timestamp(bad))
        self.assertEqual(parse_key(Service.SWTPM, "2"), 2)
        self.assertIsNone(parse_key(Service.VARSTORED, "1"))

    def test_classify_numeric_order(self) -> None:
        got = classify(["9", "10", "junk", "11.pre"])
        self.assertIn(Latest("10", 10), got)
        self.assertIn(Outdated("9", 9), got)
        self.assertIn(Invalid("junk"), got)
        self.assertIn(Pending("11.pre"), got)

    @given(st.integers(min_value=0, max_value=2**64))
    def test_roundtrip(self, ts: int) -> None:
        path = version_path("/r", Service.SWTPM, Version(Item(VM, 0), ts))
        self.assertEqual(parse_timestamp(path.rsplit("/", 1)[1]), ts)

    @given(st.lists(st.integers(min_value=0, max_value=10**12), min_size=1, unique=True))
    def test_exactly_one_latest(self, stamps: list[int]) -> None:
        got = classify([str(s) for s in stamps])
        latest = [e for e in got if isinstance(e, Latest)]
        self.assertEqual([e.ts for e in latest], [max(stamps)])
