from __future__ import annotations

import errno
import os
import stat
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger, LogLevel
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests.unit.cachehelpers import VM1, VM2, Env
from xguard.cache import files as files_module
from xguard.cache.files import VersionFiles
from xguard.cache.layout import Item, Version, item_dir
from xguard.errors import CacheUnavailable, PermanentUpstreamError, TransientUpstreamError
from xguard.interfaces import IItemWriter, IStatusSource
from xguard.model import NvramWrite


def files(root: str, top: str = "Swtpm") -> list[str]:
    base = os.path.join(root, top)
    return sorted(os.path.relpath(os.path.join(d, f), base)
                  for d, _, fs in os.walk(base) for f in fs)


class CacheTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.env = Env()
        self.addCleanup(self.env.cleanup)
        self.cache = self.env.cache
        self.successResultOf(self.cache.recover())
        self.cache.start()
        self.addCleanup(self.check_stopped)

    def check_stopped(self) -> None:
        self.successResultOf(self.cache.stop())
        self.assertEqual(self.env.clock.getDelayedCalls(), [])


class DirectTests(CacheTestCase):
    def test_interfaces(self) -> None:
        verifyObject(IItemWriter, self.cache)
        verifyObject(IStatusSource, self.cache)

    def test_direct_write_does_not_touch_disk(self) -> None:
        self.successResultOf(self.cache.write(VM1, 0, b"a"))
        self.assertEqual(self.env.tpm(VM1), "a")
        self.assertEqual(files(self.env.root), [])
        self.assertEqual(self.cache.status().mode, "Direct")
        self.assertEqual(self.env.clock.getDelayedCalls(), [])  # no polling while idle

    def test_permanent_error_reaches_client(self) -> None:
        self.env.upstream.fail_next(PermanentUpstreamError(["HANDLE_INVALID"]))
        self.failureResultOf(self.cache.write(VM1, 0, b"a"), PermanentUpstreamError)
        self.assertEqual(self.cache.status().mode, "Direct")

    def test_transient_error_engages(self) -> None:
        self.env.upstream.down = True
        self.successResultOf(self.cache.write(VM1, 0, b"a"))
        (name,) = files(self.env.root)
        path = os.path.join(self.env.root, "Swtpm", name)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode), 0o700)
        st = self.cache.status()
        self.assertEqual((st.mode, st.queue_depth, st.pending), ("Engaged", 1, {VM1: 1}))
        self.assertEqual(self.successResultOf(self.cache.pending(VM1, 0)), b"a")
        self.env.upstream.down = False
        self.env.settle()
        self.assertEqual(self.env.tpm(VM1), "a")
        self.assertEqual(files(self.env.root), [])
        self.assertEqual(self.cache.status().mode, "Direct")

    def test_deadline_falls_back_and_late_answer_never_wins(self) -> None:
        up = self.env.upstream
        up.hold = True
        first = self.cache.write(VM1, 0, b"old")
        self.assertNoResult(first)
        self.env.clock.advance(3.0)
        self.successResultOf(first)  # durable on disk, acknowledged
        self.assertEqual(self.cache.status().mode, "Engaged")
        self.successResultOf(self.cache.write(VM1, 0, b"new"))  # Engaged: disk
        up.hold = False
        up.release()
        self.env.settle()
        self.assertEqual(self.env.tpm(VM1), "new")
        self.assertEqual(files(self.env.root), [])

    def test_queued_direct_attempt_supersedes_abandoned_one(self) -> None:
        up = self.env.upstream
        up.hold = True
        self.cache.write(VM1, 0, b"old")
        self.env.clock.advance(1.0)
        second = self.cache.write(VM1, 0, b"new")  # still Direct: waits for VM1's lock
        self.env.clock.advance(2.0)  # the first attempt's deadline
        self.assertNoResult(second)
        up.hold = False
        up.release()
        self.successResultOf(second)
        self.env.settle()
        self.assertEqual(self.env.tpm(VM1), "new")
        self.assertEqual(files(self.env.root), [])

    def test_other_vm_not_blocked_by_hung_vm(self) -> None:
        up = self.env.upstream
        up.hold = True
        self.cache.write(VM1, 0, b"a")
        d2 = self.cache.write(VM2, 0, b"b")
        self.assertEqual(up.held, 2)  # both in flight: no service lock across upstream
        up.hold = False
        up.release()
        self.successResultOf(d2)
        self.env.settle()

    def test_stop_persists_in_flight(self) -> None:
        self.env.upstream.hold = True
        d = self.cache.write(VM1, 0, b"a")
        self.successResultOf(self.cache.stop())
        self.successResultOf(d)
        self.assertEqual(len(files(self.env.root)), 1)
        self.assertEqual(self.env.clock.getDelayedCalls(), [])


class ModeTests(CacheTestCase):
    def test_queue_full_disengaged_scan_direct(self) -> None:
        self.env.upstream.down = True
        for i in range(6):  # queue_size=4
            self.successResultOf(self.cache.write(VM1 if i % 2 else VM2, i % 3, b"v%d" % i))
        self.assertEqual(self.cache.status().mode, "Disengaged")
        self.env.upstream.down = False
        self.env.settle()
        self.assertEqual(self.cache.status().mode, "Direct")
        self.assertEqual(files(self.env.root), [])
        self.assertEqual(self.env.tpm(VM1), "v3 v1 v5")
        self.assertEqual(self.env.tpm(VM2), "v0 v4 v2")

    def test_write_many_supersedes_every_key(self) -> None:
        self.env.upstream.down = True
        self.successResultOf(self.cache.write(VM1, 1, b"old"))
        self.successResultOf(self.cache.write_many(VM1, {0: b"P", 1: b"S", 2: b"V"}))
        self.assertEqual(len(files(self.env.root)), 3)
        self.assertEqual(self.successResultOf(self.cache.pending(VM1, 1)), b"S")
        self.env.upstream.down = False
        self.env.settle()
        self.assertEqual(self.env.tpm(VM1), "P S V")
        self.assertNotIn("old", " ".join(a[1] for n, a in self.env.upstream.calls
                                          if n == "set_vtpm_contents"))

    def test_engaged_writes_replace_older_versions(self) -> None:
        self.env.upstream.down = True
        for v in (b"1", b"2", b"3"):
            self.successResultOf(self.cache.write(VM1, 0, v))
        self.assertEqual(len(files(self.env.root)), 1)
        self.assertEqual(self.successResultOf(self.cache.pending(VM1, 0)), b"3")

    def test_permanent_failure_quarantines(self) -> None:
        self.env.upstream.down = True
        unknown = "44444444-4444-4444-8444-444444444444"
        self.successResultOf(self.cache.write(unknown, 0, b"x"))
        self.successResultOf(self.cache.write(VM1, 0, b"y"))
        self.env.upstream.down = False
        self.env.settle()
        st = self.cache.status()
        self.assertEqual(st.mode, "Direct")
        (q,) = st.quarantined
        self.assertEqual((q.vm, q.keys, q.kind), (unknown, (0,), "refused"))
        self.assertIn("UUID_INVALID", q.reason)
        self.assertEqual(self.successResultOf(self.cache.set_aside_values(q.id)), {0: b"x"})
        self.assertEqual(self.env.tpm(VM1), "y")
        restarted = self.env.build()
        self.successResultOf(restarted.recover())
        self.addCleanup(lambda: self.successResultOf(restarted.stop()))
        self.assertEqual(len(restarted.status().quarantined), 1)  # survives restarts

    def test_disabled_fails_like_direct_writer(self) -> None:
        enabled = [True]
        env = Env(enabled=lambda: enabled[0])
        self.addCleanup(env.cleanup)
        self.successResultOf(env.cache.recover())
        env.cache.start()
        env.upstream.down = True
        self.successResultOf(env.cache.write(VM1, 0, b"cached"))
        enabled[0] = False
        self.failureResultOf(env.cache.write(VM1, 1, b"x"), TransientUpstreamError)
        env.upstream.down = False
        self.successResultOf(env.cache.write(VM1, 0, b"newer"))
        env.settle()  # the older pending version was dropped, never delivered
        self.assertEqual(env.tpm(VM1), "newer")
        self.successResultOf(env.cache.stop())


class FullDisk(VersionFiles):
    """A disk that refuses writes while ``full`` (after ``room`` more)."""

    full = False
    room = 0

    def write(self, version: Version, content: bytes) -> None:
        if self.full:
            if self.room <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.room -= 1
        super().write(version, content)


class DiskErrorTests(CacheTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.disk = self.cache.versions.files = FullDisk(self.env.root, self.cache.service)
        self.events: list[dict[str, Any]] = []
        self.cache.versions.log = Logger(observer=self.events.append)

    def test_pending_writes_come_first_on_a_full_disk(self) -> None:
        """Issue 18: on a full disk, what is only a cache (the last known
        state) goes before a VM's write is refused."""
        asked: list[int] = []

        def make_room(needed: int) -> Deferred[int]:
            asked.append(needed)
            self.disk.full = False  # the copies dropped freed enough
            return succeed(70_000)

        self.cache.versions.make_room = make_room
        self.env.upstream.down = True
        self.disk.full = True
        self.successResultOf(self.cache.write(VM1, 0, b"x" * 70_000))
        self.assertEqual(len(asked), 1)
        self.assertGreaterEqual(asked[0], 70_000)
        self.assertEqual(self.cache.status().disk_error, None)
        self.disk.full = True
        asked.clear()
        self.cache.versions.make_room = lambda needed: asked.append(needed) or succeed(0)
        self.failureResultOf(self.cache.write(VM1, 0, b"y"), CacheUnavailable)  # nothing left
        self.assertEqual(len(asked), 1)

    def errors(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["log_level"] == LogLevel.error]

    def test_disk_full_refuses_writes_503_logged_once(self) -> None:
        self.env.upstream.down = True
        self.successResultOf(self.cache.write(VM1, 0, b"ok"))
        self.disk.full = True
        for i in range(3):
            f = self.failureResultOf(self.cache.write(VM1, 0, b"x%d" % i), CacheUnavailable)
            self.assertIsInstance(f.value, TransientUpstreamError)  # swtpm: 503, retried
        self.assertEqual(len(self.errors()), 1)  # one line per episode, not per write
        st = self.cache.status()
        self.assertEqual(st.disk_error, os.strerror(errno.ENOSPC))
        self.assertIsNotNone(st.disk_error_since)
        # Nothing refused was acknowledged, so nothing of it is pending.
        self.assertEqual(self.successResultOf(self.cache.pending(VM1, 0)), b"ok")
        self.disk.full = False
        self.successResultOf(self.cache.write(VM1, 0, b"later"))
        self.assertIsNone(self.cache.status().disk_error)
        self.assertTrue(any("takes writes again" in e["log_format"] for e in self.events))
        self.env.upstream.down = False
        self.env.settle()
        self.assertEqual(self.env.tpm(VM1), "later")

    def test_a_batch_is_all_or_nothing(self) -> None:
        self.env.upstream.down = True
        self.successResultOf(self.cache.write_many(VM1, {0: b"p1", 1: b"s1", 2: b"v1"}))
        self.disk.full, self.disk.room = True, 1
        self.failureResultOf(self.cache.write_many(VM1, {0: b"p2", 1: b"s2", 2: b"v2"}),
                             CacheUnavailable)
        for key, value in enumerate((b"p1", b"s1", b"v1")):
            self.assertEqual(self.successResultOf(self.cache.pending(VM1, key)), value)
        self.assertEqual(len(files(self.env.root)), 3)

    def test_deadline_fallback_on_a_full_disk_is_not_acknowledged(self) -> None:
        self.disk.full = True
        self.env.upstream.hold = True
        d = self.cache.write(VM1, 0, b"x")
        self.env.clock.advance(3.0)
        self.failureResultOf(d, CacheUnavailable)
        self.env.upstream.hold = False
        self.env.upstream.release()


class DeliveredDeletionTests(CacheTestCase):
    """A round's deliveries are deleted together, durably, before the next
    round (and before the mode goes Direct)."""

    def test_one_batch_per_round_and_the_tree_is_pruned(self) -> None:
        batches: list[int] = []
        store = self.cache.versions.files
        delete_many = store.delete_many

        def counting(versions: list[Version]) -> None:
            batches.append(len(versions))
            delete_many(versions)

        store.delete_many = counting  # type: ignore[method-assign]
        self.env.upstream.down = True
        for vm in (VM1, VM2):
            for key in (0, 1, 2):
                self.successResultOf(self.cache.write(vm, key, b"v"))
        self.env.upstream.down = False
        self.env.settle()
        self.assertEqual(batches, [6])
        self.assertEqual(os.listdir(os.path.join(self.env.root, "Swtpm")), [])

    def test_a_round_syncs_each_directory_left_once(self) -> None:
        """Every VM's directory goes with its last key: what records those
        removals (and every file's in them) is the service directory, synced
        once, not once per VM (a 1000-VM drain made 1000 fsyncs of it)."""
        synced: list[str] = []
        self.patch(files_module, "fsync_dir", synced.append)
        self.env.upstream.down = True
        vms = [VM1, VM2, "00000000-0000-4000-8000-000000000003"]
        for vm in vms:
            for key in (0, 1, 2):
                self.successResultOf(self.cache.write(vm, key, b"v"))
        synced.clear()  # the writes' own syncs
        self.env.upstream.down = False
        self.env.settle()
        self.assertEqual(files(self.env.root), [])
        self.assertEqual(synced, [os.path.join(self.env.root, "Swtpm")])

    def test_a_directory_still_standing_is_synced_itself(self) -> None:
        """A VM directory that keeps an entry records the removal of the
        delivered versions in it: it is the one synced."""
        synced: list[str] = []
        self.patch(files_module, "fsync_dir", synced.append)
        self.env.upstream.down = True
        for key in (0, 1):
            self.successResultOf(self.cache.write(VM1, key, b"v"))
        store = self.cache.versions.files
        vm_dir = os.path.dirname(item_dir(self.env.root, store.service, Item(VM1, 0)))
        delete_many = store.delete_many

        def write_first(versions: list[Version]) -> None:
            os.mkdir(os.path.join(vm_dir, "other"))  # what keeps it standing
            synced.clear()
            delete_many(versions)

        store.delete_many = write_first  # type: ignore[method-assign]
        self.env.upstream.down = False
        self.env.settle()
        self.assertEqual(synced, [vm_dir])

    def test_a_failed_deletion_keeps_the_items_pending(self) -> None:
        self.env.upstream.down = True
        self.successResultOf(self.cache.write(VM1, 0, b"v"))
        store = self.cache.versions.files
        delete_many = store.delete_many
        store.delete_many = lambda versions: (_ for _ in ()).throw(  # type: ignore[method-assign]
            OSError(5, "Input/output error"))
        self.env.upstream.down = False
        self.env.clock.advance(0.5)
        self.assertEqual(self.cache.status().pending, {VM1: 1})  # delivered, file still there
        self.flushLoggedErrors(OSError)
        store.delete_many = delete_many  # type: ignore[method-assign]
        self.env.settle()
        self.assertEqual(self.cache.status().pending, {})
        self.assertEqual(files(self.env.root), [])


class SupersededDeletionTests(CacheTestCase):
    """While cached, each write supersedes the previous version of its item:
    the older file goes without an fsync of its own (the newer one, in the
    same directory, is durable), and a crash that brings it back changes
    nothing (recovery keeps the newest)."""

    def test_superseded_file_goes_unsynced(self) -> None:
        self.env.upstream.down = True
        self.successResultOf(self.cache.write(VM1, 0, b"v1"))
        synced: list[str] = []
        real = files_module.sync_removal
        self.patch(files_module, "sync_removal",
                   lambda d, root: (synced.append(d), real(d, root)))
        self.successResultOf(self.cache.write(VM1, 0, b"v2"))
        self.assertEqual(len(files(self.env.root)), 1)  # v1 is gone
        self.assertEqual(synced, [])
        self.assertEqual(self.successResultOf(self.cache.pending(VM1, 0)), b"v2")

    def test_a_resurrected_older_version_is_discarded_by_recovery(self) -> None:
        self.env.upstream.down = True
        self.successResultOf(self.cache.write(VM1, 0, b"v1"))
        (name,) = files(self.env.root)
        old = os.path.join(self.env.root, "Swtpm", name)
        with open(old, "rb") as f:
            content = f.read()
        self.successResultOf(self.cache.write(VM1, 0, b"v2"))
        with open(old, "wb") as f:  # the unlink did not survive a crash
            f.write(content)
        restarted = self.env.build()
        self.successResultOf(restarted.recover())
        self.addCleanup(lambda: self.successResultOf(restarted.stop()))
        self.assertEqual(self.successResultOf(restarted.pending(VM1, 0)), b"v2")
        self.assertEqual(len(files(self.env.root)), 1)


class RecoveryTests(SynchronousTestCase):
    def test_upstream_tree_is_delivered_on_first_start(self) -> None:
        env = Env()
        self.addCleanup(env.cleanup)
        d = os.path.join(env.root, "Swtpm", VM1, "0")
        os.makedirs(d)
        for ts, data in ((5, b"old"), (10**15, b"future")):
            with open(os.path.join(d, str(ts)), "wb") as f:
                f.write(data)
        self.successResultOf(env.cache.recover())
        self.assertEqual(env.cache.status().mode, "Engaged")
        self.assertEqual(self.successResultOf(env.cache.pending(VM1, 0)), b"future")
        self.successResultOf(env.cache.write(VM1, 0, b"after"))  # newer than the retimed one
        env.cache.start()
        env.settle()
        self.assertEqual(env.tpm(VM1), "after")
        self.assertEqual(files(env.root), [])
        self.successResultOf(env.cache.stop())
        self.assertEqual(env.clock.getDelayedCalls(), [])

    def test_nothing_is_delivered_before_the_cache_starts(self) -> None:
        """Recovery runs before anything listens, deliveries only once the
        daemon starts the cache (after the sockets are served again: a
        recovered write is judged by whether its VM runs here)."""
        env = Env()
        self.addCleanup(env.cleanup)
        env.upstream.down = True
        self.successResultOf(env.cache.recover())
        env.cache.start()
        self.successResultOf(env.cache.write(VM1, 0, b"cached"))
        self.successResultOf(env.cache.stop())
        env.upstream.down = False
        env.upstream.calls.clear()
        restarted = env.build()
        self.successResultOf(restarted.recover())
        self.assertEqual(restarted.status().mode, "Engaged")
        env.settle()
        self.assertEqual(env.upstream.calls, [])  # not even a read: still not started
        self.assertEqual(env.tpm(VM1), "")
        restarted.start()
        env.settle()
        self.assertEqual(env.tpm(VM1).split(" ")[0], "cached")
        self.successResultOf(restarted.stop())

    def test_unacknowledged_pre_files_are_removed_with_one_line(self) -> None:
        env = Env()
        self.addCleanup(env.cleanup)
        events: list[dict[str, Any]] = []
        env.cache.versions.log = Logger(observer=events.append)
        for key in (0, 1, 2):
            d = os.path.join(env.root, "Swtpm", VM1, str(key))
            os.makedirs(d)
            with open(os.path.join(d, f"{key + 1}.pre"), "wb") as f:
                f.write(b"never acknowledged")
        self.successResultOf(env.cache.recover())
        self.assertEqual(files(env.root), [])
        self.assertEqual(env.cache.status().mode, "Direct")
        (line,) = [e for e in events if "temporary" in e["log_format"]]
        self.assertEqual(line["n"], 3)
        self.assertEqual(line["log_level"], LogLevel.info)

    def test_too_many_pending_starts_disengaged(self) -> None:
        env = Env(queue_size=1)
        self.addCleanup(env.cleanup)
        for key in (0, 1):
            os.makedirs(os.path.join(env.root, "Swtpm", VM1, str(key)))
            with open(os.path.join(env.root, "Swtpm", VM1, str(key), "7"), "wb") as f:
                f.write(b"k%d" % key)
        self.successResultOf(env.cache.recover())
        self.assertEqual(env.cache.status().mode, "Disengaged")
        env.cache.start()
        env.settle()
        self.assertEqual(env.tpm(VM1), "k0 k1 ")
        self.assertEqual(env.cache.status().mode, "Direct")
        self.successResultOf(env.cache.stop())


class NvramTests(SynchronousTestCase):
    def test_nvram_cached_with_update_flag(self) -> None:
        env = Env(nvram=True)
        self.addCleanup(env.cleanup)
        self.successResultOf(env.cache.recover())
        env.cache.start()
        env.upstream.down = True
        self.successResultOf(env.cache.write(VM1, 0, NvramWrite("AAAA", "yes").encode()))
        self.assertEqual(files(env.root, "Varstored"), [f"{VM1}/0/2000"])
        env.upstream.down = False
        env.settle()
        self.assertEqual(env.upstream.vms[VM1]["nvram"]["EFI-variables"], "AAAA")
        self.assertEqual(env.upstream.vms[VM1]["update"], "yes")
        self.successResultOf(env.cache.stop())


class SyncRemovalTests(SynchronousTestCase):
    """A concurrent prune may remove the directory whose entry we just
    unlinked before we fsync it (the likely cause of one HTTP 500 on a
    Direct write in the kill -9 test, once in ~15 runs): the nearest
    surviving ancestor is synced instead."""

    def test_pruned_directory_syncs_an_ancestor(self) -> None:
        import os
        import tempfile

        from xguard.cache.files import sync_removal

        root = tempfile.mkdtemp(prefix="xgs")
        item = os.path.join(root, "Swtpm", "vm", "0")
        os.makedirs(item)
        sync_removal(item, root)  # the directory is there: synced
        os.rmdir(item)
        os.rmdir(os.path.dirname(item))
        sync_removal(item, root)  # pruned meanwhile: Swtpm/ is synced
        os.rmdir(os.path.join(root, "Swtpm"))
        os.rmdir(root)
        self.assertRaises(FileNotFoundError, sync_removal, item, root)
