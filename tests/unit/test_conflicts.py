"""Acknowledged means final (SPEC §6): only proof sets a write aside, other
writers' state is never overwritten, a vTPM's keys are never mixed, and a
write set aside is never silently undone."""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from tests.unit.cachehelpers import VM1, VM2, Env
from xguard.errors import PermanentUpstreamError, ResolutionRefused, TransientUpstreamError
from xguard.model import NvramWrite, Residence


class Base(SynchronousTestCase):
    nvram = False

    def setUp(self) -> None:
        self.env = Env(nvram=self.nvram)
        self.addCleanup(self.env.cleanup)
        self.up = self.env.upstream
        self.events: list[dict[str, Any]] = []
        self.cache = self.start(self.env.cache)

    def start(self, cache: Any) -> Any:
        for part in (cache.deliveries, cache.versions):
            part.log = Logger(observer=self.events.append)
        self.successResultOf(cache.recover())
        cache.start()
        self.addCleanup(lambda: self.successResultOf(cache.stop()))
        return cache

    def restart(self, *, live: set[str] | None = None) -> Any:
        """The daemon restarts (kill -9) over the same directory."""
        self.successResultOf(self.cache.stop())
        self.up.new_client()
        if live is not None:
            self.env.live = live
        self.env.known = self.env.build_known()
        self.env.sink.known = self.env.known
        self.cache = self.start(self.env.build())
        return self.cache

    def logged(self) -> str:
        return "\n".join(formatEvent(e) for e in self.events)

    def vtpm(self, vm: str = VM1) -> str:
        return self.up.vms[vm]["vtpm"]  # type: ignore[no-any-return]

    def seen(self, vm: str = VM1, contents: str = "p s v") -> None:
        """Upstream holds ``contents`` and xguard saw it (a read)."""
        self.up.vtpms[self.vtpm(vm)] = contents
        self.successResultOf(self.env.sink.read_contents(vm))

    def aside(self) -> list[Any]:
        return list(self.cache.status().quarantined)


class TransientTests(Base):
    def test_an_internal_error_never_loses_an_acknowledged_write(self) -> None:
        """Defect 1: INTERNAL_ERROR once (a database hiccup) after an outage
        used to quarantine v2, so the guest read v1 again and xapi kept v1."""
        self.seen(contents="v1 s v")
        self.up.down = True
        self.successResultOf(self.cache.write(VM1, 0, b"v2"))
        self.up.down = False
        self.up.fail_next(TransientUpstreamError(["INTERNAL_ERROR", "db"]), n=3)
        self.assertEqual(self.successResultOf(self.cache.pending(VM1, 0)), b"v2")
        self.env.settle()
        self.assertEqual(self.env.tpm(VM1), "v2 s v")
        self.assertEqual(self.aside(), [])

    def test_a_direct_write_meeting_a_transient_error_is_cached(self) -> None:
        self.seen(contents="v1 s v")
        self.up.fail_next(TransientUpstreamError(["INTERNAL_ERROR"]))
        self.successResultOf(self.cache.write(VM1, 0, b"v2"))  # acknowledged
        self.assertEqual(self.cache.status().mode, "Engaged")
        self.env.settle()
        self.assertEqual(self.env.tpm(VM1), "v2 s v")

    def test_writes_failing_for_long_raise_one_alert(self) -> None:
        self.cache.deliveries.stuck_after = 60.0
        self.seen()
        self.up.down = True
        self.successResultOf(self.cache.write(VM1, 0, b"v2"))
        for _ in range(400):
            self.env.clock.advance(1.0)
        self.assertEqual(list(self.cache.status().stuck), [VM1])
        self.assertEqual(self.logged().count("have failed for"), 1)
        self.up.down = False
        self.env.settle()
        self.assertEqual(self.cache.status().stuck, {})
        self.assertEqual(self.logged().count("went through after failing"), 1)

    def test_proof_sets_aside(self) -> None:
        """The VM is gone (UUID_INVALID after a fresh lookup)."""
        self.seen()
        self.up.down = True
        self.successResultOf(self.cache.write(VM1, 0, b"v2"))
        self.up.down = False
        del self.up.vms[VM1]
        self.env.settle()
        (item,) = self.aside()
        self.assertEqual((item.kind, item.vm), ("refused", VM1))
        self.assertIn("UUID_INVALID", item.reason)


class OtherWriterTests(Base):
    def test_another_writer_s_state_stays_and_ours_is_set_aside_whole(self) -> None:
        """Defect 2: another host wrote since our base; delivering our
        permall would mix two TPM lineages."""
        self.seen(contents="p s v")
        self.up.down = True
        self.successResultOf(self.cache.write(VM1, 0, b"p2"))
        self.up.vtpms[self.vtpm()] = "p3 s3 v3"  # HA: another host's writes
        self.up.down = False
        self.env.settle()
        self.assertEqual(self.env.tpm(VM1), "p3 s3 v3")  # untouched
        self.assertEqual(self.up.count("set_vtpm_contents"), 0)
        (item,) = self.aside()
        self.assertEqual((item.kind, item.keys, item.complete), ("conflict", (0, 1, 2), True))
        self.assertEqual(self.successResultOf(self.cache.set_aside_values(item.id)),
                         {0: b"p2", 1: b"s", 2: b"v"})
        self.assertIn("set aside, not delivered", self.logged())
        self.assertEqual(self.cache.status().pending, {})

    def test_a_delivery_that_already_landed_is_no_conflict(self) -> None:
        """A crash between a delivery and the deletion of its file."""
        self.seen(contents="p s v")
        self.up.down = True
        self.successResultOf(self.cache.write(VM1, 0, b"p2"))
        self.up.vtpms[self.vtpm()] = "p2 s v"  # it reached upstream before the crash
        self.restart(live={VM1})
        self.up.down = False
        self.env.settle()
        self.assertEqual(self.aside(), [])
        self.assertEqual(self.env.tpm(VM1), "p2 s v")
        self.assertEqual(self.up.count("set_vtpm_contents"), 0)

    def test_a_crash_midway_through_the_deletions_is_no_conflict(self) -> None:
        """A round delivered all three keys together, the VM had nothing
        else pending (what was in flight is forgotten), and the daemon was
        killed while the round deleted the files: only key 2's is left,
        with the base of its chain. Upstream holds our key 2 already, and
        keys 0 and 1 of that same delivery, which that base predates: done,
        not a conflict (seen in the kill -9 integration test)."""
        import os
        import shutil

        self.seen(contents="p s v")
        self.up.down = True
        for key, value in enumerate((b"p2", b"s2", b"v2")):
            self.successResultOf(self.cache.write(VM1, key, value))
        key2 = os.path.join(self.env.root, "Swtpm", VM1, "2")
        (name,) = os.listdir(key2)
        kept = os.path.join(self.env.root, "kept")
        shutil.copy(os.path.join(key2, name), kept)
        self.up.down = False
        self.env.settle()
        self.assertEqual(self.env.tpm(VM1), "p2 s2 v2")
        os.makedirs(key2)
        os.rename(kept, os.path.join(key2, name))  # its deletion never happened
        self.restart(live={VM1})
        self.env.settle()
        self.assertEqual(self.aside(), [])
        self.assertEqual(self.env.tpm(VM1), "p2 s2 v2")
        self.assertEqual(self.cache.status().pending, {})

    def test_a_kill_during_a_round_s_deletions_keeps_what_was_sent(self) -> None:
        """The daemon dies while a round deletes the files it delivered
        (two of three are gone): the next process must still count that
        delivery as its own when a new write of the VM goes out over it."""
        from twisted.internet.defer import Deferred

        self.seen(contents="p s v")
        self.up.down = True
        for key, value in enumerate((b"p2", b"s2", b"v2")):
            self.successResultOf(self.cache.write(VM1, key, value))
        versions = self.cache.versions
        run = versions.runner

        def killed_midway(f: Any, *args: Any, **kwargs: Any) -> Any:
            if f == versions.files.delete_many:
                versions.files.delete_many(args[0][:2])
                return Deferred()  # the rest never happens: the process dies
            return run(f, *args, **kwargs)

        versions.runner = killed_midway
        self.up.down = False
        self.env.settle()
        self.assertEqual(self.env.tpm(VM1), "p2 s2 v2")
        self.restart(live={VM1})
        self.successResultOf(self.cache.write(VM1, 1, b"s3"))  # cached: v2's file is back
        self.env.settle()
        self.assertEqual(self.aside(), [])
        self.assertEqual(self.env.tpm(VM1), "p2 s3 v2")
        self.assertEqual(self.cache.status().pending, {})

    def test_a_host_crash_during_a_round_s_deletions_is_no_conflict(self) -> None:
        """The host crashes while a round deletes the files it delivered:
        one file is back, and no record says what was sent (a host crash
        drops them). A write of the VM, started here again, built on that
        file must not take the round's other values for another writer's:
        the newest file is the one left (each VM's oldest go first), and
        its base holds the values written before it in its chain."""
        from twisted.internet.defer import Deferred

        self.seen(contents="p s v")
        self.up.down = True
        for key, value in ((1, b"s2"), (0, b"p2")):  # s2 first, p2 the newest
            self.successResultOf(self.cache.write(VM1, key, value))
        versions = self.cache.versions
        run = versions.runner

        def crashed_midway(f: Any, *args: Any, **kwargs: Any) -> Any:
            if f == versions.files.delete_many:
                versions.files.delete_many(args[0][:-1])
                return Deferred()  # the host went down
            return run(f, *args, **kwargs)

        versions.runner = crashed_midway
        self.up.down = False
        self.env.clock.advance(0.5)
        self.assertEqual(self.env.tpm(VM1), "p2 s2 v")
        self.env.boot_id += "+"  # another boot: the records of what was sent are dropped
        self.restart(live={VM1})  # started here again after the reboot
        self.successResultOf(self.cache.write(VM1, 2, b"v3"))  # cached: a file is back
        self.env.settle()
        self.assertEqual(self.aside(), [])
        self.assertEqual(self.env.tpm(VM1), "p2 s2 v3")
        self.assertEqual(self.cache.status().pending, {})

    def test_a_long_chain_records_a_bounded_base(self) -> None:
        """swtpm rewrites one key back to back through an outage: each file
        records its chain's base and the values still pending, not every
        value the chain ever had (its header would grow with the outage)."""
        from xguard.cache.entry import decode
        from xguard.model import digest

        self.seen(contents="p s v")
        self.up.down = True
        for n in range(50):
            self.successResultOf(self.cache.write(VM1, 0, b"p%d" % n))
        versions = self.cache.versions
        (version,) = [v for v in versions.sizes]
        accept = decode(versions.files.read(version)).accept
        assert accept is not None
        # The chain's base ("p", and "p0", sent by the Direct attempt that
        # met the outage), the previous write's value, its own.
        self.assertEqual(accept[0], {digest(v) for v in ("p", "p0", "p48", "p49")})
        self.up.down = False
        self.env.settle()
        self.assertEqual(self.env.tpm(VM1), "p49 s v")

    def test_a_failed_deletion_keeps_the_base(self) -> None:
        """A round's deletion fails (EIO): its versions are pending again
        with the base their files record, not an unknown one (a later write
        would have carried it on, and after the VM stopped, been set aside
        as unverified)."""
        self.seen(contents="p s v")
        self.up.down = True
        self.successResultOf(self.cache.write(VM1, 0, b"p2"))
        files = self.cache.versions.files
        delete_many = files.delete_many
        files.delete_many = lambda versions: (_ for _ in ()).throw(  # type: ignore[method-assign]
            OSError(5, "Input/output error"))
        self.up.down = False
        self.env.clock.advance(0.5)
        self.flushLoggedErrors(OSError)
        self.assertEqual(self.cache.status().pending, {VM1: 1})
        self.assertNotIn(None, self.cache.versions.accepts_of(VM1))
        files.delete_many = delete_many  # type: ignore[method-assign]
        self.env.settle()
        self.assertEqual(self.cache.status().pending, {})

    def test_a_stopped_vm_s_records_outlive_its_delivered_files(self) -> None:
        """A stopped VM's lineage records (what was sent, when its life
        ended) go once upstream answers after the stop and nothing of it is
        left — not while its delivered files are still being deleted: a
        kill then brings them back, and the records must be there to judge
        them. Another VM's call answered in the same round must not drop
        them."""
        import os

        self.up.reachability.subscribe_answered_call(
            lambda ticket: self.env.known.upstream_answered(ticket, self.cache.has_pending))
        self.seen(VM1)
        self.seen(VM2)
        self.up.down = True
        for vm in (VM1, VM2):
            self.successResultOf(self.cache.write(vm, 0, b"p2"))
        self.env.live.discard(VM1)  # VM1 stops (as compose's vm_gone)
        self.env.known.vm_gone(VM1, after=self.up.reachability.last_ticket)
        self.successResultOf(self.cache.vm_gone(VM1))
        ended = os.path.join(self.env.root, "known", VM1, "ended-Swtpm")
        self.assertTrue(os.path.exists(ended))
        at_deletion: list[bool] = []
        files = self.cache.versions.files
        delete_many = files.delete_many

        def deleting(versions: list[Any]) -> None:
            at_deletion.append(os.path.exists(ended))
            delete_many(versions)

        files.delete_many = deleting  # type: ignore[method-assign]
        self.up.down = False
        self.env.settle()
        self.assertEqual(at_deletion, [True])
        self.assertEqual(self.env.tpm(VM1), "p2 s v")

    def test_a_stop_while_the_deletions_run_ends_the_life_for_good(self) -> None:
        """A write of unknown base is delivered; its VM stops while the
        round still deletes its file, another host writes, the VM starts
        here again, and a kill leaves the file on disk: the stop recorded
        the end of the VM's life (its file was not gone), so the next
        process does not deliver the write over the other host's state."""
        from twisted.internet.defer import Deferred

        self.up.down = True
        self.successResultOf(self.cache.write(VM1, 0, b"p2"))  # never seen: base unknown
        versions = self.cache.versions
        run = versions.runner

        def slow_deletions(f: Any, *args: Any, **kwargs: Any) -> Any:
            if f == versions.files.delete_many:
                return Deferred()  # still running when the kill comes
            return run(f, *args, **kwargs)

        versions.runner = slow_deletions
        self.up.down = False
        self.env.clock.advance(0.5)
        self.assertEqual(self.env.tpm(VM1).split()[0], "p2")
        self.env.live.discard(VM1)  # the VM stops
        self.successResultOf(self.cache.vm_gone(VM1))
        self.up.vtpms[self.vtpm(VM1)] = "x y z"  # another host
        self.env.live.add(VM1)  # back here
        self.restart(live={VM1})
        self.env.settle()
        self.assertEqual(self.env.tpm(VM1), "x y z")
        (item,) = self.aside()
        self.assertEqual(item.kind, "unverified")

    def test_after_a_restart_a_vm_running_elsewhere_is_left_alone(self) -> None:
        self.seen(contents="p s v")
        self.up.down = True
        self.successResultOf(self.cache.write(VM1, 0, b"p2"))
        self.restart(live=set())  # the host crashed: /run is gone, no socket comes back
        self.up.residence[VM1] = Residence("Running", "host-b", here=False)
        self.up.down = False
        self.env.settle()
        self.assertEqual(self.env.tpm(VM1), "p s v")  # untouched, although still the base
        (item,) = self.aside()
        self.assertEqual(item.kind, "elsewhere")
        self.assertIn("host-b", item.reason)
        self.assertFalse(item.held)

    def test_a_plain_crash_still_delivers(self) -> None:
        self.seen(contents="p s v")
        self.up.down = True
        self.successResultOf(self.cache.write(VM1, 0, b"p2"))
        self.restart(live=set())
        self.up.down = False
        self.env.settle()
        self.assertEqual(self.env.tpm(VM1), "p2 s v")
        self.assertEqual(self.aside(), [])

    def test_a_write_during_a_delivery_is_not_a_conflict(self) -> None:
        """A write made while its VM's delivery is in flight records what
        that delivery sends: upstream may hold it afterwards."""
        self.seen(contents="p s v")
        self.up.down = True
        self.successResultOf(self.cache.write(VM1, 0, b"p2"))
        self.up.down = False
        self.up.hold = True
        self.env.clock.advance(1.0)  # a round starts; its calls are held
        self.successResultOf(self.cache.write(VM1, 1, b"s2"))
        self.up.hold = False
        self.up.release()
        self.env.settle()
        self.assertEqual(self.aside(), [])
        self.assertEqual(self.env.tpm(VM1), "p2 s2 v")

    def test_a_late_direct_write_is_not_a_conflict(self) -> None:
        """A Direct write past its deadline goes to disk; when the abandoned
        call lands later, a write made meanwhile still delivers."""
        self.seen(contents="p s v")
        self.up.hold = True
        d = self.cache.write(VM1, 0, b"p2")
        self.env.clock.advance(3.0)  # the deadline: on disk, acknowledged
        self.successResultOf(d)
        self.successResultOf(self.cache.write(VM1, 1, b"s2"))
        self.up.hold = False
        self.up.release()
        self.env.settle()
        self.assertEqual(self.aside(), [])
        self.assertEqual(self.env.tpm(VM1), "p2 s2 v")

    def test_files_of_earlier_formats_deliver_as_before(self) -> None:
        import os

        self.seen(contents="p s v")
        d = os.path.join(self.env.root, "Swtpm", VM2, "0")
        os.makedirs(d)
        with open(os.path.join(d, "5"), "wb") as f:
            f.write(b"cDI=")  # the upstream daemon's file: the key as received
        self.restart(live=set())
        self.env.settle()
        self.assertEqual(self.env.tpm(VM2), "cDI=")
        self.assertIn("did not record their base", self.logged())

    def test_own_writes_of_unknown_base_are_not_called_earlier_formats(self) -> None:
        """Writes xguard made before it ever saw its VM's state record an
        unknown base: after a restart they are delivered only if the VM is
        served here again, and the log says so (not that another daemon
        made them, nor that they go unchecked)."""
        self.up.down = True  # the VM's state was never read
        self.successResultOf(self.cache.write(VM1, 0, b"p2"))
        self.restart()
        self.up.down = False
        self.env.settle()
        self.assertEqual(self.env.tpm(VM1).split(" ")[0], "p2")
        logged = self.logged()
        self.assertNotIn("did not record their base", logged)
        self.assertIn("1 VMs' pending writes were made before xguard saw their VM's state",
                      logged)


class HeldTests(Base):
    def conflict(self) -> Any:
        self.seen(contents="p s v")
        self.up.down = True
        self.successResultOf(self.cache.write(VM1, 0, b"p2"))
        self.up.vtpms[self.vtpm()] = "p3 s3 v3"  # an operator's or a split brain's
        self.up.down = False
        self.env.settle()
        (item,) = self.aside()
        return item

    def test_the_vm_keeps_reading_what_it_was_acknowledged(self) -> None:
        item = self.conflict()
        self.assertTrue(item.held)
        for key, value in ((0, b"p2"), (1, b"s"), (2, b"v")):
            self.assertEqual(self.successResultOf(self.cache.pending(VM1, key)), value)

    def test_its_new_writes_join_it_never_upstream(self) -> None:
        self.conflict()
        self.successResultOf(self.cache.write(VM1, 1, b"s4"))
        self.env.settle()
        self.assertEqual(self.env.tpm(VM1), "p3 s3 v3")
        self.assertEqual(self.successResultOf(self.cache.pending(VM1, 1)), b"s4")
        (item,) = self.aside()
        self.assertEqual(self.successResultOf(self.cache.set_aside_values(item.id)),
                         {0: b"p2", 1: b"s4", 2: b"v"})

    def test_push_ours(self) -> None:
        item = self.conflict()
        self.successResultOf(self.cache.write(VM1, 2, b"v4"))  # pending when pushed
        self.successResultOf(self.cache.resolve(item.id, "push"))
        self.assertEqual(self.env.tpm(VM1), "p2 s v4")
        self.assertEqual(self.aside(), [])
        self.env.settle()
        self.successResultOf(self.cache.write(VM1, 1, b"s5"))  # delivered as usual now
        self.env.settle()
        self.assertEqual(self.env.tpm(VM1), "p2 s5 v4")
        self.assertEqual(self.aside(), [])

    def test_keep_is_refused_while_the_vm_runs_here(self) -> None:
        item = self.conflict()
        f = self.failureResultOf(self.cache.resolve(item.id, "keep"), ResolutionRefused)
        self.assertIn("runs here", str(f.value))
        self.env.live.discard(VM1)
        self.successResultOf(self.cache.vm_gone(VM1))
        (item,) = self.aside()
        self.assertFalse(item.held)
        self.assertIsNone(self.successResultOf(self.cache.pending(VM1, 1)))
        self.successResultOf(self.cache.resolve(item.id, "keep"))
        self.assertEqual(self.aside(), [])
        self.assertEqual(self.env.tpm(VM1), "p3 s3 v3")

    def test_held_only_while_its_vm_came_back_after_a_restart(self) -> None:
        self.conflict()
        self.restart(live=set())  # the host crashed: its sockets did not come back
        self.successResultOf(self.cache.sockets_resumed())
        self.env.live.add(VM1)  # started here again later: it reads upstream's
        (item,) = self.aside()
        self.assertFalse(item.held)
        self.assertIsNone(self.successResultOf(self.cache.pending(VM1, 0)))

    def test_an_incomplete_vtpm_cannot_be_pushed(self) -> None:
        self.up.down = True
        self.successResultOf(self.cache.write(VM2, 0, b"p2"))  # its state never seen
        self.up.vtpms[self.vtpm(VM2)] = "p3 s3 v3"
        self.restart(live=set())
        self.up.residence[VM2] = Residence("Running", "host-b", here=False)
        self.up.down = False
        self.env.settle()
        (item,) = self.aside()
        self.assertFalse(item.complete)
        f = self.failureResultOf(self.cache.resolve(item.id, "push"), ResolutionRefused)
        self.assertIn("would mix two states", str(f.value))
        self.successResultOf(self.cache.resolve(item.id, "exported"))
        self.assertEqual(self.aside(), [])


class NvramTests(Base):
    nvram = True

    def test_another_writer_s_nvram_stays(self) -> None:
        self.up.vms[VM1]["nvram"] = {"EFI-variables": "N1"}
        self.successResultOf(self.env.sink.read(VM1))
        self.up.down = True
        self.successResultOf(self.cache.write(VM1, 0, NvramWrite("N2", "yes").encode()))
        self.up.vms[VM1]["nvram"] = {"EFI-variables": "N3"}
        self.up.down = False
        self.env.settle()
        self.assertEqual(self.up.vms[VM1]["nvram"], {"EFI-variables": "N3"})
        (item,) = self.aside()
        self.assertEqual((item.kind, item.keys, item.complete), ("conflict", (0,), True))

    def test_no_other_writer_delivers(self) -> None:
        self.up.vms[VM1]["nvram"] = {"EFI-variables": "N1"}
        self.successResultOf(self.env.sink.read(VM1))
        self.up.down = True
        self.successResultOf(self.cache.write(VM1, 0, NvramWrite("N2", "yes").encode()))
        self.up.down = False
        self.env.settle()
        self.assertEqual(self.up.vms[VM1]["nvram"], {"EFI-variables": "N2"})
        self.assertEqual(self.up.vms[VM1]["update"], "yes")

    def test_refused_content_sets_aside(self) -> None:
        self.up.vms[VM1]["nvram"] = {}
        self.successResultOf(self.env.sink.read(VM1))
        self.up.down = True
        self.successResultOf(self.cache.write(VM1, 0, NvramWrite("N2").encode()))
        self.up.down = False
        self.up.fail_next(PermanentUpstreamError(["INVALID_VALUE", "EFI-variables"]), n=2)
        self.env.settle()
        (item,) = self.aside()
        self.assertEqual(item.kind, "refused")


class GateRunner:
    """Runs blocking work inline, except a write's files while ``hold`` is
    set: those wait until :meth:`release` (a write on its way to disk)."""

    def __init__(self) -> None:
        self.hold = False
        self.held: list[tuple[Any, Any, Any, Any]] = []

    def __call__(self, f: Any, *args: Any, **kwargs: Any) -> Any:
        from twisted.internet.defer import Deferred

        from tests.fakes import sync_runner

        if self.hold and getattr(f, "__name__", "") == "write_all":
            d: Deferred[Any] = Deferred()
            self.held.append((d, f, args, kwargs))
            return d
        return sync_runner(f, *args, **kwargs)

    def release(self) -> None:
        from tests.fakes import sync_runner

        self.hold = False
        held, self.held = self.held, []
        for d, f, args, kwargs in held:
            sync_runner(f, *args, **kwargs).chainDeferred(d)


class OwnWritesTests(Base):
    """xguard's own deliveries are never taken for another writer's."""

    def test_a_delivery_that_succeeds_while_a_write_goes_to_disk(self) -> None:
        """The race the kill -9 test found: v3's base is taken (the chain's:
        p2 s2 v, and p3, sent once) before the flusher sends the chain
        p3 s3; that delivery succeeds while v3 is still on its way to disk.
        Forgetting then what it sent made upstream's s3 another writer's."""
        gate = GateRunner()
        self.successResultOf(self.cache.stop())
        self.cache = self.start(self._with(gate))
        self.seen(contents="p s v")
        self.up.down = True
        self.successResultOf(self.cache.write(VM1, 0, b"p2"))
        self.successResultOf(self.cache.write(VM1, 1, b"s2"))
        self.up.down = False
        self.env.settle()
        self.assertEqual(self.env.tpm(VM1), "p2 s2 v")
        self.up.down = True
        self.successResultOf(self.cache.write(VM1, 0, b"p3"))
        self.successResultOf(self.cache.write(VM1, 1, b"s3"))  # never sent before the chain
        self.up.down = False
        gate.hold = True
        acknowledged = self.cache.write(VM1, 2, b"v3")
        self.assertNoResult(acknowledged)  # on its way to disk
        self.env.settle()  # the flusher delivers the chain meanwhile
        self.assertEqual(self.env.tpm(VM1), "p3 s3 v")
        gate.release()
        self.successResultOf(acknowledged)
        self.env.settle()
        self.assertEqual(self.env.tpm(VM1), "p3 s3 v3")
        self.assertEqual(self.aside(), [])

    def _with(self, runner: Any) -> Any:
        self.env.kwargs["runner"] = runner
        return self.env.build()
