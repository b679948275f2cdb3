"""The base a cached write records, and what a delivery is checked against."""

from __future__ import annotations

from twisted.internet.defer import succeed
from twisted.trial.unittest import SynchronousTestCase

from xguard.cache.lineage import Lineage, union, upstream_value
from xguard.model import NvramWrite, Service, digest

VM = "11111111-1111-4111-8111-111111111111"


class LineageTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.seen: dict[str, dict[int, str] | None] = {VM: {0: digest("p"), 1: digest("s")}}
        self.lineage = Lineage(Service.SWTPM, lambda vm: succeed(self.seen.get(vm)))

    def base(self, pending: list) -> object:  # type: ignore[type-arg]
        return self.successResultOf(self.lineage.base_for(VM, pending))

    def test_a_chain_starts_from_what_upstream_last_showed(self) -> None:
        self.assertEqual(self.base([]), {0: {digest("p")}, 1: {digest("s")}})

    def test_later_writes_share_the_chain_s_base(self) -> None:
        """Upstream showed something else meanwhile (a read): the chain's
        writes are still based on what it held when the chain started."""
        first = {0: frozenset({digest("p")})}
        self.seen[VM] = {0: digest("foreign")}
        self.assertEqual(self.base([first]), first)

    def test_unknown_when_never_seen_or_a_file_did_not_record_it(self) -> None:
        self.seen[VM] = None
        self.assertIsNone(self.base([]))
        self.assertIsNone(self.base([None, {0: frozenset({digest("p")})}]))

    def test_values_sent_with_no_outcome_yet_are_accepted_until_settled(self) -> None:
        self.lineage.sending(VM, {0: b"p2"})
        self.assertEqual(self.base([])[0], {digest("p"), digest("p2")})  # type: ignore[index]
        self.assertEqual(self.lineage.for_delivery(VM, [{0: frozenset({digest("p")})}]),
                         {0: {digest("p"), digest("p2")}})
        self.lineage.settled(VM)
        self.assertEqual(self.lineage.in_flight(VM), {})

    def test_nvram_values_are_the_efi_variables(self) -> None:
        record = NvramWrite("VkFS", "yes").encode()
        self.assertEqual(upstream_value(Service.VARSTORED, record), b"VkFS")
        lineage = Lineage(Service.VARSTORED, lambda vm: succeed(None))
        lineage.sending(VM, {0: record})
        lineage.sending(VM, {0: b"not a record"})  # never deliverable: nothing to accept
        self.assertEqual(lineage.in_flight(VM), {0: {digest("VkFS")}})

    def test_union(self) -> None:
        self.assertEqual(union([]), {})
        self.assertEqual(union([{0: frozenset("a")}, {0: frozenset("b"), 1: frozenset("c")}]),
                         {0: {"a", "b"}, 1: {"c"}})


class SentRecordsTests(SynchronousTestCase):
    """What is in flight survives a kill: the next process still counts the
    values its predecessor sent as its own."""

    def setUp(self) -> None:
        self.records: dict[str, dict[int, set[str]]] = {}

        class Records:
            def load(_, vm: str) -> dict[int, set[str]]:
                return {k: set(v) for k, v in self.records.get(vm, {}).items()}

            def save(_, vm: str, sent: object) -> None:
                self.records[vm] = {k: set(v) for k, v in sent.items()}  # type: ignore[attr-defined]

        self.store = Records()

    def lineage(self) -> Lineage:
        return Lineage(Service.SWTPM, lambda vm: succeed({0: digest("p")}), self.store)

    def test_recorded_before_sending_and_loaded_by_the_next_process(self) -> None:
        self.lineage().sending(VM, {0: b"p2"})
        self.assertEqual(self.records[VM], {0: {digest("p2")}})
        after_a_kill = self.lineage()
        self.assertEqual(after_a_kill.in_flight(VM), {0: frozenset({digest("p2")})})
        self.assertEqual(self.successResultOf(after_a_kill.base_for(VM, [])),
                         {0: {digest("p"), digest("p2")}})

    def test_settled_clears_the_record(self) -> None:
        lineage = self.lineage()
        lineage.sending(VM, {0: b"p2"})
        lineage.settled(VM)
        self.assertEqual(self.records[VM], {})
        self.assertEqual(self.lineage().in_flight(VM), {})
