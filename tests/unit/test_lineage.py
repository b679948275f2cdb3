"""The base a cached write records, and what a delivery is checked against."""

from __future__ import annotations

from twisted.internet.defer import succeed
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from xguard.cache.lineage import Lineage, union, upstream_value
from xguard.model import NvramWrite, Service, digest

VM = "11111111-1111-4111-8111-111111111111"


class LineageTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.seen: dict[str, dict[int, str] | None] = {VM: {0: digest("p"), 1: digest("s")}}
        self.lineage = Lineage(Service.SWTPM, lambda vm: succeed(self.seen.get(vm)),
                               monotonic_ns=lambda: 0)

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
        lineage = Lineage(Service.VARSTORED, lambda vm: succeed(None), monotonic_ns=lambda: 0)
        lineage.sending(VM, {0: record})
        lineage.sending(VM, {0: b"not a record"})  # never deliverable: nothing to accept
        self.assertEqual(lineage.in_flight(VM), {0: {digest("VkFS")}})

    def test_union(self) -> None:
        self.assertEqual(union([]), {})
        self.assertEqual(union([{0: frozenset("a")}, {0: frozenset("b"), 1: frozenset("c")}]),
                         {0: {"a", "b"}, 1: {"c"}})


class Records:
    """The records a lineage keeps across a kill, in memory."""

    def __init__(self) -> None:
        self.sent: dict[str, dict[int, set[str]]] = {}
        self.ends: dict[str, int] = {}
        self.writable = True

    def load(self, vm: str) -> dict[int, set[str]]:
        return {k: set(v) for k, v in self.sent.get(vm, {}).items()}

    def save(self, vm: str, sent: object) -> None:
        self.sent[vm] = {k: set(v) for k, v in sent.items()}  # type: ignore[attr-defined]

    def ended(self, vm: str) -> int | None:
        return self.ends.get(vm)

    def save_ended(self, vm: str, at: int) -> bool:
        if self.writable:
            self.ends[vm] = at
        return self.writable


class SentRecordsTests(SynchronousTestCase):
    """What is in flight survives a kill: the next process still counts the
    values its predecessor sent as its own."""

    def setUp(self) -> None:
        self.store = Records()
        self.records = self.store.sent

    def lineage(self) -> Lineage:
        return Lineage(Service.SWTPM, lambda vm: succeed({0: digest("p")}), self.store,
                       monotonic_ns=lambda: 0)

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


class LivesTests(SynchronousTestCase):
    """A version written before its VM's life here ended is not of the VM's
    life now, in this process and in the next one."""

    def setUp(self) -> None:
        self.now = 100
        self.store = Records()

    def lineage(self) -> Lineage:
        return Lineage(Service.SWTPM, lambda vm: succeed(None), self.store,
                       monotonic_ns=lambda: self.now)

    def test_a_version_before_the_end_is_of_an_ended_life(self) -> None:
        lineage = self.lineage()
        self.assertTrue(lineage.continuous(VM, 50))  # no end known
        self.now = 200
        lineage.vm_gone(VM, pending=True)
        self.assertFalse(lineage.continuous(VM, 50))
        self.assertTrue(lineage.continuous(VM, 201))

    def test_the_end_is_recorded_while_writes_of_it_are_pending(self) -> None:
        self.now = 200
        self.lineage().vm_gone(VM, pending=True)
        self.now = 300  # the VM started again, and the daemon was killed
        after_a_kill = self.lineage()
        self.assertFalse(after_a_kill.continuous(VM, 150))
        self.assertTrue(after_a_kill.continuous(VM, 250))

    def test_not_recorded_when_nothing_is_pending(self) -> None:
        self.now = 200
        self.lineage().vm_gone(VM, pending=False)
        self.assertEqual(self.store.ends, {})

    def test_a_write_cached_after_the_end_records_it(self) -> None:
        """A Direct write stamped before the VM stopped, cached past its
        deadline after: the end that makes it of an ended life is
        recorded once it is on disk; later writes record nothing."""
        lineage = self.lineage()
        self.now = 200
        lineage.vm_gone(VM, pending=False)
        lineage.written(VM, 250)
        self.assertEqual(self.store.ends, {})
        lineage.written(VM, 150)
        self.assertEqual(self.store.ends, {VM: 200})
        self.assertFalse(self.lineage().continuous(VM, 150))

    def test_an_end_on_another_boot_s_clock_is_ignored(self) -> None:
        """A record later than now was taken on another boot's clock: that
        reboot ended every life (the start says so for each VM whose
        writes are pending), and the record says nothing about this boot's."""
        self.store.ends[VM] = 10**12
        self.assertTrue(self.lineage().continuous(VM, 50))

    def test_an_end_that_cannot_be_recorded_is_logged_and_kept_in_memory(self) -> None:
        self.store.writable = False
        lineage = self.lineage()
        self.now = 200
        with capturedLogs() as events:
            lineage.vm_gone(VM, pending=True)
        self.assertFalse(lineage.continuous(VM, 150))
        [event] = events
        self.assertEqual(event["log_level"], LogLevel.error)
        self.assertIn("cannot record that VM", formatEvent(event))
