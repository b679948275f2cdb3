"""Checked bytes: a sealed file round-trips, and any damage is recognised."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from xguard.util.checked import Damaged, is_sealed, seal, unseal


class CheckedTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        raw = seal("entry", 3, b"payload\nwith newline")
        self.assertTrue(is_sealed(raw))
        self.assertEqual(unseal(raw, "entry"), (3, b"payload\nwith newline"))
        self.assertEqual(unseal(seal("copy", 1, b""), "copy"), (1, b""))

    def test_damage_is_named(self) -> None:
        raw = seal("entry", 1, b"0123456789")
        cases = {
            b"": "empty file",
            raw[:-1]: "bytes where the header says",
            raw + b"x": "bytes where the header says",
            raw[:-1] + b"X": "checksum mismatch",
            raw.split(b"\n")[0]: "no header line",
            b"AAECAwQ=": "no header line",
            b"plain text\nwith a newline": "not a checked xguard file",
        }
        for damaged, why in cases.items():
            with self.assertRaises(Damaged, msg=damaged) as cm:
                unseal(damaged, "entry")
            self.assertIn(why, str(cm.exception))

    def test_a_file_of_another_kind_does_not_pass(self) -> None:
        with self.assertRaises(Damaged) as cm:
            unseal(seal("copy", 1, b"x"), "entry")
        self.assertIn("a copy file, not a entry file", str(cm.exception))

    @given(st.binary(max_size=200), st.integers(min_value=0, max_value=199),
           st.integers(min_value=1, max_value=255))
    def test_any_flipped_or_cut_byte_is_caught(self, payload: bytes, at: int,
                                               flip: int) -> None:
        raw = seal("entry", 1, payload)
        at %= len(raw)
        flipped = raw[:at] + bytes([raw[at] ^ flip]) + raw[at + 1:]
        for damaged in (flipped, raw[:at]):
            try:
                version, got = unseal(damaged, "entry")
            except Damaged:
                continue
            # A flip inside the header's version field is the one change
            # that still parses; the payload itself can never change.
            self.assertEqual(got, payload)
            self.assertNotEqual(version, 1)
