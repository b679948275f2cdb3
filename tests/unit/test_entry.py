"""Version files: xguard's checked format, and the earlier formats still read."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from xguard.cache.entry import Damaged, Entry, decode, encode
from xguard.model import NvramWrite, digest

digests = st.frozensets(st.text("0123456789abcdef", min_size=32, max_size=32), max_size=3)
accepts = st.none() | st.dictionaries(st.integers(0, 2), digests, max_size=3)


class EntryTests(SynchronousTestCase):
    @given(st.binary(max_size=300), accepts)
    def test_round_trip(self, content: bytes, accept: dict[int, frozenset[str]] | None) -> None:
        self.assertEqual(decode(encode(Entry(content, accept))), Entry(content, accept))

    def test_earlier_formats_are_read_with_an_unknown_base(self) -> None:
        """The upstream daemon's files hold the key exactly as received;
        xguard's earlier NVRAM files its JSON record."""
        self.assertEqual(decode(b"AAECAwQ="), Entry(b"AAECAwQ=", legacy=True))
        record = NvramWrite("VkFMVUU=", "yes").encode()
        self.assertEqual(decode(record), Entry(record, legacy=True))

    def test_a_zero_length_file_is_damaged(self) -> None:
        with self.assertRaises(Damaged):
            decode(b"")

    def test_torn_files_are_damaged(self) -> None:
        raw = encode(Entry(b"AAECAwQ=", {0: frozenset({digest("x")})}))
        for cut in range(1, len(raw)):
            with self.assertRaises(Damaged, msg=cut):
                decode(raw[:cut])
