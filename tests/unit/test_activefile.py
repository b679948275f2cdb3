"""The active-sockets file: tolerant load, atomic save, upstream format."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from xguard.domain import activefile
from xguard.domain.activefile import CORRUPT_SUFFIX, Entry
from xguard.model import Service

VM1 = "6c9d5f3e-8e1a-4a4f-9d63-0a6b4c1f7d21"
VM2 = "0f2a6b1c-3d4e-4f50-8a6b-7c8d9e0f1a2b"


def record(**overrides: object) -> dict[str, object]:
    doc: dict[str, object] = {"vm_uuid": VM1, "path": "/var/run/xen/vtpm1.sock", "gid": 107,
                              "typ": "Swtpm"}
    doc.update(overrides)
    return doc


class ActiveFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="xg")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "active.json")

    def write(self, data: object) -> None:
        with open(self.path, "w") as f:
            f.write(data if isinstance(data, str) else json.dumps(data))

    def test_missing_file_is_empty(self) -> None:
        self.assertEqual(activefile.load(self.path), [])

    def test_upstream_format_loads(self) -> None:
        self.write([record(), record(vm_uuid=VM2, path="/a/b.sock", gid=0, typ="Varstored")])
        self.assertEqual(activefile.load(self.path), [
            Entry(VM1, "/var/run/xen/vtpm1.sock", 107, Service.SWTPM),
            Entry(VM2, "/a/b.sock", 0, Service.VARSTORED),
        ])

    def test_round_trip_and_format(self) -> None:
        entries = [Entry(VM1, "/x/1.sock", 5, Service.SWTPM),
                   Entry(VM2, "/x/2.sock", 6, Service.VARSTORED)]
        activefile.save(self.path, entries)
        self.assertEqual(activefile.load(self.path), entries)
        with open(self.path) as f:
            doc = json.load(f)
        self.assertEqual(doc[1], {"vm_uuid": VM2, "path": "/x/2.sock", "gid": 6,
                                  "typ": "Varstored"})

    def test_bytes_are_json_dumps_of_the_records(self) -> None:
        """Each entry is encoded once and the file joined from the pieces:
        byte for byte what json.dumps of the records gives (also after
        attrs.evolve, and for no entry at all)."""
        import attrs

        entries = [Entry(VM1, "/x/1.sock", 5, Service.SWTPM),
                   attrs.evolve(Entry(VM2, "/x/2.sock", 6, Service.VARSTORED), gid=7)]
        for some in (entries, entries[:1], []):
            self.assertEqual(activefile.dumps(some),
                             json.dumps([e.to_json() for e in some]).encode())

    def test_save_is_atomic_and_leaves_no_temp_file(self) -> None:
        self.write("old")
        activefile.save(self.path, [Entry(VM1, "/x/1.sock", 5, Service.SWTPM)])
        self.assertEqual(sorted(os.listdir(self.dir)), ["active.json"])
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o644)

    def test_save_creates_parent_directory(self) -> None:
        path = os.path.join(self.dir, "run", "nonpersistent", "active.json")
        activefile.save(path, [])
        self.assertEqual(activefile.load(path), [])
        self.assertEqual(os.stat(os.path.dirname(path)).st_mode & 0o777, 0o755)

    def test_save_failure_leaves_old_content(self) -> None:
        entries = [Entry(VM1, "/x/1.sock", 5, Service.SWTPM)]
        activefile.save(self.path, entries)
        os.mkdir(self.path + ".pre")  # the temp file cannot be created
        self.assertRaises(OSError, activefile.save, self.path, [])
        self.assertEqual(activefile.load(self.path), entries)

    def test_unparseable_file_is_empty_and_kept(self) -> None:
        self.write("[{not json")
        with capturedLogs() as events:
            self.assertEqual(activefile.load(self.path), [])
        self.assertTrue(any(e["log_level"].name == "error" for e in events))
        with open(self.path + CORRUPT_SUFFIX) as f:
            self.assertEqual(f.read(), "[{not json")

    def test_not_a_list_is_unparseable(self) -> None:
        self.write({"vm_uuid": VM1})
        self.assertEqual(activefile.load(self.path), [])
        self.assertTrue(os.path.exists(self.path + CORRUPT_SUFFIX))

    def test_invalid_entries_skipped_with_warning(self) -> None:
        bad = [
            "a string",
            {"vm_uuid": VM1},
            record(vm_uuid="not-a-uuid"),
            record(path="relative.sock"),
            record(gid=-1),
            record(gid="107"),
            record(gid=True),
            record(typ="Qemu"),
        ]
        self.write([*bad, record(vm_uuid=VM2)])
        with capturedLogs() as events:
            entries = activefile.load(self.path)
        self.assertEqual([e.vm_uuid for e in entries], [VM2])
        warnings = [e for e in events if e["log_level"].name == "warn"]
        self.assertEqual(len(warnings), len(bad))
        self.assertFalse(os.path.exists(self.path + CORRUPT_SUFFIX))

    def test_entry_validates(self) -> None:
        self.assertRaises(ValueError, Entry, "nope", "/a", 1, Service.SWTPM)
        self.assertRaises(ValueError, Entry, VM1, "a", 1, Service.SWTPM)
        self.assertRaises(ValueError, Entry, VM1, "/a", -1, Service.SWTPM)
        self.assertRaises(TypeError, Entry, VM1, "/a", 1, "Swtpm")
