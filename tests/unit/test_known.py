"""The last known state: copies kept only for live VMs, dropped once
upstream answered a call made after a VM stopped (facts, not beliefs),
kept across a reboot during an outage, never trusted after a host crash,
never left stale, never served when they fail their check."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from typing import Any

from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from tests.fakes import sync_runner
from xguard.model import TpmState
from xguard.state.known import KNOWN, MAX_COPY_BYTES, KnownState

VM = "11111111-1111-4111-8111-111111111111"
VM2 = "22222222-2222-4222-8222-222222222222"


class KnownTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = tempfile.mkdtemp(prefix="xgk")
        self.addCleanup(shutil.rmtree, self.root, True)
        self.live = {VM}
        self.boot = "boot-a"
        self.events: list[dict[str, Any]] = []
        self.known = self.open()

    def open(self) -> KnownState:
        known = KnownState(self.root, runner=sync_runner, is_live=lambda vm: vm in self.live,
                           boot_id=lambda: self.boot)
        known.log = Logger(observer=self.events.append)
        self.successResultOf(known.open())
        return known

    def logged(self) -> str:
        return "\n".join(formatEvent(e) for e in self.events)

    def tpm(self, known: KnownState | None = None, vm: str = VM) -> TpmState | None:
        return self.successResultOf((known or self.known).tpm(vm))

    def test_copies_of_a_live_vm(self) -> None:
        k = self.known
        self.successResultOf(k.record_tpm(VM, TpmState("p", "s", "v")))
        self.successResultOf(k.record_nvram(VM, {"EFI-variables": "e", "x": "y"}))
        self.successResultOf(k.record_sb_state(VM, "update_on_boot"))
        self.assertEqual(self.tpm(), TpmState("p", "s", "v"))
        self.assertEqual(self.successResultOf(k.nvram(VM)), {"EFI-variables": "e", "x": "y"})
        self.assertEqual(self.successResultOf(k.sb_state(VM)), "update_on_boot")
        self.successResultOf(k.record_nvram_key(VM, "EFI-variables", "e2"))
        self.assertEqual(self.successResultOf(k.nvram(VM)), {"EFI-variables": "e2", "x": "y"})
        vm_dir = os.path.join(self.root, KNOWN, VM)
        self.assertEqual(stat.S_IMODE(os.stat(vm_dir).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(vm_dir, "vtpm")).st_mode), 0o600)

    def test_close_makes_new_directories_durable(self) -> None:
        """Copies and the VM directories made for them are written without
        fsync; a clean stop syncs the files, their directories and the
        directory holding the VMs' directories, before saying "clean"."""
        from xguard.state import known as known_module

        synced: list[str] = []
        self.patch(known_module, "fsync_dir", synced.append)
        self.successResultOf(self.known.record_tpm(VM, TpmState("p", "s", "v")))
        self.successResultOf(self.known.close())
        base = os.path.join(self.root, KNOWN)
        self.assertEqual(sorted(synced), sorted([base, os.path.join(base, VM)]))
        with open(os.path.join(base, ".boot")) as f:
            self.assertEqual(f.read(), "clean\n")

    def test_nothing_kept_for_a_vm_without_socket(self) -> None:
        self.successResultOf(self.known.record_tpm(VM2, TpmState("p")))
        self.assertIsNone(self.tpm(vm=VM2))
        self.assertEqual(self.known.kept(), [])

    def test_dropped_once_upstream_answers_a_call_made_after_the_stop(self) -> None:
        self.successResultOf(self.known.record_tpm(VM, TpmState("p")))
        self.live.clear()
        self.known.vm_gone(VM, after=7)
        self.known.upstream_answered(7, lambda vm: False)  # a call started before the stop
        self.assertEqual(self.tpm(), TpmState("p"))
        self.known.upstream_answered(8, lambda vm: False)
        self.assertIsNone(self.tpm())
        self.assertFalse(os.path.exists(os.path.join(self.root, KNOWN, VM)))

    def test_kept_without_an_answer_for_the_reboot(self) -> None:
        """The destroy and create of a reboot while upstream gives no
        answer (whatever xguard believed about it): the copy stays, and
        an answer once the VM is back changes nothing."""
        self.successResultOf(self.known.record_tpm(VM, TpmState("p")))
        self.live.clear()
        self.known.vm_gone(VM, after=3)
        self.assertEqual(self.tpm(), TpmState("p"))
        # Still updated while kept (the flusher delivers its pending writes).
        self.successResultOf(self.known.record_tpm(VM, TpmState("p2")))
        self.live.add(VM)  # the reboot's create
        self.known.upstream_answered(9, lambda vm: False)
        self.assertEqual(self.tpm(), TpmState("p2"))
        self.live.clear()  # it stops later: the earlier destroy counts no more
        self.known.upstream_answered(10, lambda vm: False)
        self.assertEqual(self.tpm(), TpmState("p2"))

    def test_kept_while_writes_wait_for_delivery(self) -> None:
        self.live.add(VM2)
        for vm in (VM, VM2):
            self.successResultOf(self.known.record_tpm(vm, TpmState("p")))
        self.live.clear()
        for vm in (VM, VM2):
            self.known.vm_gone(vm, after=1)
        pending = {VM2}
        self.known.upstream_answered(2, lambda vm: vm in pending)
        self.assertEqual(self.known.kept(), [VM2])
        pending.clear()
        self.known.upstream_answered(3, lambda vm: vm in pending)
        self.assertEqual(self.known.kept(), [])

    def test_vms_without_a_socket_after_a_restart_are_stopped_ones(self) -> None:
        self.live.add(VM2)
        for vm in (VM, VM2):
            self.successResultOf(self.known.record_tpm(vm, TpmState("p")))
        again = self.open()
        self.live.discard(VM2)  # its socket did not come back
        again.unserved_at_start(after=0)
        again.upstream_answered(1, lambda vm: False)
        self.assertEqual(again.kept(), [VM])

    def test_kept_across_a_restart_in_the_same_boot(self) -> None:
        """kill -9: the page cache survives, so do unsynced copies."""
        self.successResultOf(self.known.record_tpm(VM, TpmState("p", "s", "v")))
        again = self.open()
        self.assertEqual(self.tpm(again), TpmState("p", "s", "v"))

    def test_dropped_after_a_host_crash(self) -> None:
        self.successResultOf(self.known.record_tpm(VM, TpmState("p")))
        self.boot = "boot-b"  # no clean stop, and the host rebooted
        again = self.open()
        self.assertIsNone(self.tpm(again))
        self.assertEqual(again.kept(), [])
        self.assertIn("1 VMs' copies dropped", self.logged())

    def test_clean_stop_then_reboot_keeps(self) -> None:
        self.successResultOf(self.known.record_tpm(VM, TpmState("p")))
        self.successResultOf(self.known.close())
        self.boot = "boot-b"
        again = self.open()
        self.assertEqual(self.tpm(again), TpmState("p"))
        # A later crash in this boot is judged against this boot's marker.
        self.successResultOf(again.record_tpm(VM, TpmState("p2")))
        self.boot = "boot-c"
        self.assertIsNone(self.tpm(self.open()))

    def test_a_copy_that_cannot_be_written_is_removed(self) -> None:
        self.successResultOf(self.known.record_tpm(VM, TpmState("p")))
        self.successResultOf(self.known.record_tpm(VM, TpmState("x" * (MAX_COPY_BYTES + 1))))
        self.assertIsNone(self.tpm())  # never the stale "p"
        self.assertIn("cannot keep the vtpm copy", self.logged())
        self.assertNotIn("xxxx", self.logged())
        self.successResultOf(self.known.record_tpm(VM, TpmState("q")))
        self.assertEqual(self.tpm(), TpmState("q"))
        self.assertIn("written again", self.logged())

    def test_which_vm_a_vtpm_belongs_to_survives_a_restart(self) -> None:
        self.successResultOf(self.known.record_vtpm_handle(VM, "OpaqueRef:t"))
        self.assertIsNone(self.known.vm_of_vtpm("vtpm-uuid"))
        self.successResultOf(self.known.record_vtpm_uuid("vtpm-uuid", "OpaqueRef:t"))
        self.assertEqual(self.known.vm_of_vtpm("vtpm-uuid"), VM)
        again = self.open()
        self.assertEqual(again.vm_of_vtpm("vtpm-uuid"), VM)
        self.assertEqual(again.vtpm_of_vm(VM), "OpaqueRef:t")
        self.live.clear()
        again.vm_gone(VM, after=0)
        again.upstream_answered(1, lambda vm: False)
        self.assertIsNone(again.vm_of_vtpm("vtpm-uuid"))

    def test_a_torn_copy_reads_as_none(self) -> None:
        """A kill in the middle of an in-place write: never half a copy."""
        self.successResultOf(self.known.record_tpm(VM, TpmState("p" * 100, "s", "v")))
        path = os.path.join(self.root, KNOWN, VM, "vtpm")
        with open(path, "r+b") as f:
            f.seek(60)
            f.write(b"NEWNEWNEW")  # the start of a newer content, the rest old
        again = self.open()
        self.assertIsNone(self.tpm(again))
        # Moved aside (never served) and reported; the rest carries on.
        self.assertFalse(os.path.exists(path))
        self.assertTrue(os.path.exists(os.path.join(self.root, "quarantine", KNOWN, VM, "vtpm")))
        self.assertIn(f"the vtpm copy of VM {VM} is damaged (checksum mismatch)",
                      self.logged())
        self.assertEqual(again.damaged, 1)
        self.successResultOf(again.record_tpm(VM, TpmState("q")))
        self.assertEqual(self.tpm(again), TpmState("q"))

    def test_a_full_disk_drops_copies_for_vm_writes(self) -> None:
        """Pending writes come first: copies of VMs without a socket go
        first, then the largest; a VM's vTPM handle stays."""
        self.live.add(VM2)
        self.successResultOf(self.known.record_tpm(VM, TpmState("p" * 100)))
        self.successResultOf(self.known.record_tpm(VM2, TpmState("p" * 5000)))
        self.successResultOf(self.known.record_vtpm_handle(VM2, "OpaqueRef:t2"))
        self.live.discard(VM)  # stopped: its copy is kept (no answer yet)
        freed = self.successResultOf(self.known.make_room(10))
        self.assertGreater(freed, 100)
        self.assertIsNone(self.tpm())
        self.assertEqual(self.tpm(vm=VM2), TpmState("p" * 5000))  # enough was freed
        self.assertGreater(self.successResultOf(self.known.make_room(1000)), 5000)
        self.assertIsNone(self.tpm(vm=VM2))
        self.assertEqual(self.known.vtpm_of_vm(VM2), "OpaqueRef:t2")
        self.assertEqual(self.successResultOf(self.known.make_room(1)), 0)  # nothing left
        self.assertIn("disk full: dropped the last known state", self.logged())
        self.successResultOf(self.known.record_tpm(VM2, TpmState("q")))  # written again
        self.assertEqual(self.tpm(vm=VM2), TpmState("q"))

    def test_copies_of_the_previous_format_are_read(self) -> None:
        import zlib

        data = b"p s v"
        vm_dir = os.path.join(self.root, KNOWN, VM)
        os.makedirs(vm_dir, exist_ok=True)
        with open(os.path.join(vm_dir, "vtpm"), "wb") as f:
            f.write(b"xguard-copy-2 %d %08x\n%s" % (len(data), zlib.crc32(data), data))
        self.assertEqual(self.tpm(self.open()), TpmState("p", "s", "v"))

    def test_leftovers_are_cleaned_at_open(self) -> None:
        self.successResultOf(self.known.record_tpm(VM, TpmState("p")))
        base = os.path.join(self.root, KNOWN)
        with open(os.path.join(base, VM, "vtpm.tmp"), "w") as f:
            f.write("half")
        os.mkdir(os.path.join(base, "not-a-vm"))
        self.open()
        self.assertEqual(sorted(os.listdir(base)), [".boot", VM])
        self.assertEqual(os.listdir(os.path.join(base, VM)), ["vtpm"])

    def test_unchanged_copies_are_not_rewritten(self) -> None:
        self.successResultOf(self.known.record_tpm(VM, TpmState("p")))
        path = os.path.join(self.root, KNOWN, VM, "vtpm")
        os.utime(path, (1, 1))
        self.successResultOf(self.known.record_tpm(VM, TpmState("p")))
        self.assertEqual(os.stat(path).st_mtime, 1)


class SentTests(SynchronousTestCase):
    setUp = KnownTests.setUp
    open = KnownTests.open

    def test_what_is_in_flight_survives_a_restart_and_is_checked(self) -> None:
        self.assertTrue(self.known.record_sent(VM, "Swtpm", {0: ["d1", "d2"], 2: []}))
        self.assertEqual(self.known.sent(VM, "Swtpm"), {0: frozenset({"d1", "d2"})})
        self.assertEqual(self.known.sent(VM, "Varstored"), {})
        again = self.open()  # a kill: the page cache kept the file
        self.assertEqual(again.sent(VM, "Swtpm"), {0: frozenset({"d1", "d2"})})
        self.assertTrue(again.record_sent(VM, "Swtpm", {}))
        self.assertEqual(again.sent(VM, "Swtpm"), {})
        path = os.path.join(self.root, KNOWN, VM, "sent-Swtpm")
        with open(path, "wb") as f:
            f.write(b"xguard copy 1 99 0\n{}")  # torn
        self.assertEqual(self.open().sent(VM, "Swtpm"), {})
        self.assertFalse(os.path.exists(path))  # moved aside, reported

    def test_a_stopped_vm_s_record_survives_a_kill_without_keeping_copies(self) -> None:
        """Pending writes of a VM with no socket here (a host crash, then
        its cache is delivered) are sent too: what is in flight must
        survive a kill, or the next process takes its predecessor's
        delivery for another writer's. No copy is kept for it for that."""
        self.live.clear()
        self.assertTrue(self.known.record_sent(VM2, "Swtpm", {1: ["d1"]}))
        self.assertEqual(self.known.sent(VM2, "Swtpm"), {1: frozenset({"d1"})})
        self.assertFalse(self.successResultOf(self.known.record_tpm(VM2, TpmState("p"))))
        again = self.open()
        self.assertEqual(again.sent(VM2, "Swtpm"), {1: frozenset({"d1"})})
        self.assertIsNone(self.successResultOf(again.tpm(VM2)))
        self.assertTrue(again.record_sent(VM2, "Swtpm", {}))
        self.assertEqual(again.sent(VM2, "Swtpm"), {})

    def test_a_life_s_end_survives_a_kill_with_or_without_copies(self) -> None:
        """When a VM's life here ended, while its writes are pending: read
        back by the next process of the boot, per service; a torn record
        reads as none (moved aside); after a host crash, nothing."""
        self.live.clear()
        self.assertIsNone(self.known.ended(VM2, "Swtpm"))
        self.assertTrue(self.known.record_ended(VM2, "Swtpm", 123456789))
        self.assertFalse(self.successResultOf(self.known.record_tpm(VM2, TpmState("p"))))
        again = self.open()
        self.assertEqual(again.ended(VM2, "Swtpm"), 123456789)
        self.assertIsNone(again.ended(VM2, "Varstored"))
        path = os.path.join(self.root, KNOWN, VM2, "ended-Swtpm")
        with open(path, "wb") as f:
            f.write(b"xguard copy 1 99 0\n{}")  # torn
        self.assertIsNone(self.open().ended(VM2, "Swtpm"))
        self.assertFalse(os.path.exists(path))
        self.assertTrue(again.record_ended(VM2, "Swtpm", 5))
        self.boot = "boot-b"  # a host crash: not trusted
        self.assertIsNone(self.open().ended(VM2, "Swtpm"))
