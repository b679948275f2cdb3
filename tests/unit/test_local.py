"""The SQLite local store, run inline through tests.fakes.sync_runner."""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import tempfile
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests.fakes import sync_runner
from xguard.errors import PermanentUpstreamError, TransientUpstreamError
from xguard.interfaces import IUpstream
from xguard.upstream.local import (
    SCHEMA_VERSION,
    LocalStore,
    open_database,
    upgrade,
)

VM = "3f1b4a3e-8a6f-4c47-9d5c-6c1a7f0f2a11"
VM2 = "0d4a1f9e-1111-4c47-9d5c-6c1a7f0f2a22"


class LocalStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="xgl")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "local-store.sqlite")
        self.store = self.open()

    def open(self) -> LocalStore:
        store = LocalStore(self.path, sync_runner, clock=Clock())
        self.addCleanup(store.close)
        return store

    def result(self, d: Any) -> Any:
        return self.successResultOf(d)

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IUpstream, self.store))
        status = self.store.status()
        self.assertEqual((status.kind, status.target, status.reachable),
                         ("local", self.path, True))

    def test_schema_version_and_durability_settings(self) -> None:
        self.result(self.store.open())
        conn = sqlite3.connect(self.path)
        self.addCleanup(conn.close)
        self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], SCHEMA_VERSION)
        self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        self.assertTrue({"vm", "vtpm", "message"} <= tables)
        self.assertEqual(self.store._conn.execute("PRAGMA synchronous").fetchone()[0], 2)  # FULL
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_ensure_vm_creates_record(self) -> None:
        self.assertIsNone(self.result(self.store.vm_record(VM)))
        self.result(self.store.ensure_vm(VM))
        self.result(self.store.ensure_vm(VM))
        record = self.result(self.store.vm_record(VM))
        self.assertEqual(record, {"uuid": VM, "nvram": {}, "nvram_update": "unspecified",
                                  "secureboot_state": "ok", "vtpms": []})
        self.assertEqual(self.result(self.store.vm_uuids()), [VM])

    def test_vtpm_created_on_first_use(self) -> None:
        vtpm = self.result(self.store.vtpm_for_vm(VM))  # unknown VM: created too
        self.assertEqual(self.result(self.store.vtpm_for_vm(VM)), vtpm)
        self.assertNotEqual(self.result(self.store.vtpm_for_vm(VM2)), vtpm)
        self.assertEqual(self.result(self.store.get_vtpm_contents(vtpm)), "")
        self.result(self.store.set_vtpm_contents(vtpm, "a b c"))
        self.assertEqual(self.result(self.store.get_vtpm_contents(vtpm)), "a b c")
        self.assertEqual(self.result(self.store.vm_record(VM))["vtpms"],
                         [{"uuid": vtpm, "contents": "a b c"}])

    def test_unknown_vtpm(self) -> None:
        other = "11111111-2222-4333-8444-555555555555"
        for d in (self.store.get_vtpm_contents(other), self.store.set_vtpm_contents(other, "x")):
            f = self.failureResultOf(d, PermanentUpstreamError)
            self.assertEqual(f.value.codes, ["UUID_INVALID", "VTPM", other])
        # An API error proves the store answers: no outage, no outage error.
        self.assertEqual((self.store.status().reachable, self.store.status().last_error),
                         (True, None))

    def test_nvram(self) -> None:
        self.assertEqual(self.result(self.store.get_nvram(VM)), {})  # first boot
        self.result(self.store.set_nvram_efi_variables(VM, "djE=", "yes"))
        self.assertEqual(self.result(self.store.get_nvram(VM)), {"EFI-variables": "djE="})
        self.assertEqual(self.result(self.store.vm_record(VM))["nvram_update"], "yes")
        self.result(self.store.set_nvram_efi_variables(VM, "djI=", "unspecified"))
        record = self.result(self.store.vm_record(VM))
        self.assertEqual((record["nvram"], record["nvram_update"]),
                         ({"EFI-variables": "djI="}, "unspecified"))

    def test_secureboot_state(self) -> None:
        self.assertEqual(self.result(self.store.get_secureboot_certificates_state(VM)), "ok")
        self.result(self.store.set_secureboot_certificates_state(VM, "update_on_boot"))
        self.assertEqual(self.result(self.store.get_secureboot_certificates_state(VM)),
                         "update_on_boot")
        self.assertRaises(ValueError, self.store.set_secureboot_certificates_state, VM, "bad")

    def test_messages(self) -> None:
        ref = self.result(self.store.create_message(VM, "VM_SECURE_BOOT_FAILED", 3, "body"))
        self.assertTrue(ref.startswith("OpaqueRef:"))
        self.result(self.store.create_message(VM2, "OTHER", 1, "b2"))
        self.assertEqual(self.result(self.store.messages(VM)), [
            {"ref": ref, "name": "VM_SECURE_BOOT_FAILED", "priority": 3, "class": "VM",
             "obj_uuid": VM, "body": "body"}])
        self.assertEqual(len(self.result(self.store.messages())), 2)

    def test_durable_across_reopen(self) -> None:
        vtpm = self.result(self.store.vtpm_for_vm(VM))
        self.result(self.store.set_vtpm_contents(vtpm, "p s v"))
        self.result(self.store.set_nvram_efi_variables(VM, "nv", "no"))
        self.result(self.store.create_message(VM, "VM_SECURE_BOOT_FAILED", 1, "m"))
        self.result(self.store.close())
        again = self.open()
        self.assertEqual(self.result(again.vtpm_for_vm(VM)), vtpm)
        self.assertEqual(self.result(again.get_vtpm_contents(vtpm)), "p s v")
        self.assertEqual(self.result(again.get_nvram(VM)), {"EFI-variables": "nv"})
        self.assertEqual(len(self.result(again.messages(VM))), 1)

    def test_failed_write_rolls_back(self) -> None:
        def boom(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO vm (uuid) VALUES (?)", (VM,))
            raise PermanentUpstreamError(["X"])
        self.failureResultOf(self.store._run(boom, write=True), PermanentUpstreamError)
        self.assertIsNone(self.result(self.store.vm_record(VM)))

    def test_close(self) -> None:
        store = LocalStore(self.path, sync_runner, clock=Clock())
        self.result(store.ensure_vm(VM))
        self.result(store.close())
        f = self.failureResultOf(store.ensure_vm(VM), TransientUpstreamError)
        self.assertEqual(f.value.codes[0], "LOCAL_STORE_CLOSED")
        self.result(store.close())  # twice is fine

    def test_newer_schema_refused(self) -> None:
        self.result(self.store.close())
        conn = sqlite3.connect(self.path)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        conn.close()
        self.assertRaises(RuntimeError, open_database, self.path)

    def test_foreign_database_refused(self) -> None:
        path = os.path.join(self.dir, "other.sqlite")
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE t (x)")
        conn.close()
        self.assertRaises(RuntimeError, open_database, path)


class UpgradeTests(SynchronousTestCase):
    """The upgrader chain, with scripts of a pretend version 2."""

    scripts = {
        "local-v2.sql": "CREATE TABLE a (x); CREATE TABLE b (y);",
        "local-upgrade-to-v2.sql": "CREATE TABLE b (y);",
        "local-v1.sql": "CREATE TABLE a (x);",
    }

    def conn(self) -> sqlite3.Connection:
        conn = sqlite3.connect(":memory:", isolation_level=None)
        self.addCleanup(conn.close)
        return conn

    def tables(self, conn: sqlite3.Connection) -> set[str]:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}

    def test_fresh_uses_newest_schema(self) -> None:
        conn = self.conn()
        upgrade(conn, 0, 2, self.scripts.__getitem__)
        self.assertEqual(self.tables(conn), {"a", "b"})
        self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], 2)

    def test_older_is_upgraded(self) -> None:
        conn = self.conn()
        upgrade(conn, 0, 1, self.scripts.__getitem__)
        upgrade(conn, 1, 2, self.scripts.__getitem__)
        self.assertEqual(self.tables(conn), {"a", "b"})
        self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], 2)

    def test_failed_upgrade_changes_nothing(self) -> None:
        conn = self.conn()
        upgrade(conn, 0, 1, self.scripts.__getitem__)

        def bad(name: str) -> str:
            return "CREATE TABLE b (y); CREATE TABLE a (x);"

        self.assertRaises(sqlite3.Error, upgrade, conn, 1, 2, bad)
        self.assertFalse(conn.in_transaction)
        self.assertEqual(self.tables(conn), {"a"})
        self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], 1)
