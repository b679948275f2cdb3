# -*- test-case-name: tests.unit.test_local -*-
"""The embedded local store: VM state in one SQLite database, for hosts
without xapi.

Every SQLite call is blocking, so each operation runs as one function
through the injected ``runner`` (a one-thread pool in production, inline in
tests); one thread also means one connection and no locking between
operations. Writes are durable before they are acknowledged: WAL journal
with ``synchronous=FULL``, one ``BEGIN IMMEDIATE`` transaction each.

The schema is package data (``schema/local-vN.sql``); ``PRAGMA
user_version`` records the version, and ``local-upgrade-to-vN.sql`` scripts
bring older databases forward, in order, in one transaction.
"""

from __future__ import annotations

import json
import os
import sqlite3
import uuid as _uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import resources
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from xguard.errors import PermanentUpstreamError, TransientUpstreamError
from xguard.interfaces import IUpstream
from xguard.model import Residence
from xguard.status import UpstreamStatus
from xguard.upstream.reachability import Reachability
from xguard.util.threads import Runner

__all__ = ["LocalStore", "SCHEMA_VERSION", "SECUREBOOT_STATES"]

#: The schema version this code writes; local-v{SCHEMA_VERSION}.sql exists.
SCHEMA_VERSION = 1

SECUREBOOT_STATES = frozenset({"ok", "update_available", "update_on_boot"})


def _script(name: str) -> str:
    return (resources.files("xguard.upstream") / "schema" / name).read_text("utf-8")


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction; the write lock is taken up front so two
    writers never deadlock upgrading a read lock."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def open_database(path: str) -> tuple[sqlite3.Connection, int]:
    """Open (creating 0600 when missing) and migrate the database; returns
    the connection and the schema version found on disk (0 when new)."""
    if not os.path.exists(path):
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        found = conn.execute("PRAGMA user_version").fetchone()[0]
        upgrade(conn, found)
    except BaseException:
        conn.close()
        raise
    return conn, found


def upgrade(
    conn: sqlite3.Connection, found: int, target: int = SCHEMA_VERSION,
    load: Callable[[str], str] = _script,
) -> None:
    """Bring a database at version ``found`` to ``target``, atomically:
    a new one from ``local-v{target}.sql``, an older one through every
    ``local-upgrade-to-vN.sql`` after it (``load`` reads a script)."""
    if found > target:
        raise RuntimeError(f"local store schema v{found} is newer than this xguard (v{target})")
    if found == target:
        return
    if found == 0:
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if tables:
            raise RuntimeError("not an xguard local store (tables without a schema version)")
        steps = [load(f"local-v{target}.sql")]
    else:
        steps = [load(f"local-upgrade-to-v{v}.sql") for v in range(found + 1, target + 1)]
    # executescript() commits first, so the transaction is part of the script.
    try:
        conn.executescript("BEGIN IMMEDIATE;\n" + "\n".join(steps)
                           + f"\nPRAGMA user_version = {int(target)};\nCOMMIT;")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


@implementer(IUpstream)
class LocalStore:
    """IUpstream on an SQLite database (SPEC §5): records are created on
    first use, so a host with no xapi simply works."""

    log = Logger()

    def __init__(
        self,
        path: str,
        runner: Runner,
        *,
        clock: IReactorTime,
        new_uuid: Callable[[], str] = lambda: str(_uuid.uuid4()),
    ) -> None:
        self.path = path
        self.description = f"local store {path}"
        self.reachability = Reachability(clock, self.description)
        self._runner = runner
        self._new_uuid = new_uuid
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self._calls = 0
        self._last_error: str | None = None

    # -- running work on the store's thread ---------------------------------
    def _db(self) -> sqlite3.Connection:
        if self._closed:
            raise TransientUpstreamError(["LOCAL_STORE_CLOSED", self.path])
        if self._conn is None:
            self._conn, found = open_database(self.path)
            self.log.info("Opened local store {path} (schema v{version}, was v{found})",
                           path=self.path, version=SCHEMA_VERSION, found=found)
        return self._conn

    def _run(self, work: Callable[..., Any], *args: Any, write: bool = False) -> Deferred[Any]:
        self._calls += 1
        ticket = self.reachability.call_started()

        def job() -> Any:
            try:
                conn = self._db()
                if not write:
                    return work(conn, *args)
                with _transaction(conn):
                    return work(conn, *args)
            except sqlite3.Error as e:
                # Disk full, I/O error, locked, even a damaged database: none
                # proves the write can never succeed (an operator may repair
                # it), so cached writes stay pending and are retried.
                raise TransientUpstreamError(["LOCAL_STORE_ERROR", str(e)]) from e

        def answered(result: Any) -> Any:
            self.reachability.answered(ticket)
            return result

        def note(failure: Any) -> Any:
            self._last_error = " ".join(getattr(failure.value, "codes", [repr(failure.value)]))
            if failure.check(TransientUpstreamError):
                self.reachability.failed(self._last_error)
            else:
                self.reachability.answered(ticket)
            return failure

        return self._runner(job).addCallbacks(answered, note)

    def open(self) -> Deferred[None]:
        """Open and migrate now (service start-up), rather than on first use,
        so a broken database shows at once."""
        return self._run(lambda conn: None)

    # -- IUpstream -----------------------------------------------------------
    def ensure_vm(self, vm_uuid: str) -> Deferred[None]:
        return self._run(_insert_vm, vm_uuid, write=True)

    def vtpm_for_vm(self, vm_uuid: str) -> Deferred[str]:
        """Every vTPM read and write starts here: a plain read once the
        vTPM exists; the write transaction only on first use."""
        def find(conn: sqlite3.Connection) -> str | None:
            return _first_vtpm(conn, vm_uuid)

        def found(vtpm: str | None) -> Deferred[str] | str:
            return vtpm if vtpm is not None else self._run(create, write=True)

        def create(conn: sqlite3.Connection) -> str:
            _insert_vm(conn, vm_uuid)
            existing = _first_vtpm(conn, vm_uuid)  # another caller may have won
            if existing is not None:
                return existing
            vtpm_uuid = self._new_uuid()
            conn.execute("INSERT INTO vtpm (uuid, vm_uuid) VALUES (?, ?)", (vtpm_uuid, vm_uuid))
            self.log.info("Created vTPM {vtpm_uuid} for VM {vm_uuid}",
                           vtpm_uuid=vtpm_uuid, vm_uuid=vm_uuid)
            return vtpm_uuid
        return self._run(find).addCallback(found)

    def vtpm_by_uuid(self, vtpm_uuid: str) -> Deferred[str]:
        """The local store's vTPM handles are their uuids."""
        def check(conn: sqlite3.Connection) -> str:
            row = conn.execute("SELECT 1 FROM vtpm WHERE uuid = ?", (vtpm_uuid,)).fetchone()
            if row is None:
                raise PermanentUpstreamError(["UUID_INVALID", "VTPM", vtpm_uuid])
            return vtpm_uuid
        return self._run(check)

    def get_vtpm_contents(self, vtpm_uuid: str) -> Deferred[str]:
        def work(conn: sqlite3.Connection) -> str:
            row = conn.execute("SELECT contents FROM vtpm WHERE uuid = ?", (vtpm_uuid,)).fetchone()
            if row is None:
                raise PermanentUpstreamError(["UUID_INVALID", "VTPM", vtpm_uuid])
            return str(row[0])
        return self._run(work)

    def set_vtpm_contents(self, vtpm_uuid: str, contents: str) -> Deferred[None]:
        def work(conn: sqlite3.Connection) -> None:
            cur = conn.execute("UPDATE vtpm SET contents = ? WHERE uuid = ?", (contents, vtpm_uuid))
            if cur.rowcount == 0:
                raise PermanentUpstreamError(["UUID_INVALID", "VTPM", vtpm_uuid])
        return self._run(work, write=True)

    def get_nvram(self, vm_uuid: str) -> Deferred[dict[str, str]]:
        """An unknown VM reads as a first boot ({}); the record is created by
        its first write."""
        def work(conn: sqlite3.Connection) -> dict[str, str]:
            row = conn.execute("SELECT nvram FROM vm WHERE uuid = ?", (vm_uuid,)).fetchone()
            return {} if row is None else dict(json.loads(row[0]))
        return self._run(work)

    def set_nvram_efi_variables(self, vm_uuid: str, value: str, update: str) -> Deferred[None]:
        def work(conn: sqlite3.Connection) -> None:
            _insert_vm(conn, vm_uuid)
            (raw,) = conn.execute("SELECT nvram FROM vm WHERE uuid = ?", (vm_uuid,)).fetchone()
            nvram = json.loads(raw)
            nvram["EFI-variables"] = value
            conn.execute("UPDATE vm SET nvram = ?, nvram_update = ? WHERE uuid = ?",
                         (json.dumps(nvram, sort_keys=True), update, vm_uuid))
        return self._run(work, write=True)

    def get_secureboot_certificates_state(self, vm_uuid: str) -> Deferred[str]:
        def work(conn: sqlite3.Connection) -> str:
            row = conn.execute("SELECT secureboot_state FROM vm WHERE uuid = ?",
                               (vm_uuid,)).fetchone()
            return "ok" if row is None else str(row[0])
        return self._run(work)

    def create_message(self, vm_uuid: str, name: str, priority: int, body: str) -> Deferred[str]:
        def work(conn: sqlite3.Connection) -> str:
            _insert_vm(conn, vm_uuid)
            ref = "OpaqueRef:" + self._new_uuid()
            conn.execute("INSERT INTO message (ref, name, priority, class, obj_uuid, body)"
                         " VALUES (?, ?, ?, 'VM', ?, ?)", (ref, name, int(priority), vm_uuid, body))
            return ref
        return self._run(work, write=True)

    def confirm(self, vm_uuid: str) -> Deferred[None]:
        """The embedded store always answers."""
        return self._run(lambda conn: None)

    def vm_residence(self, vm_uuid: str) -> Deferred[Residence | None]:
        """One host, no HA or migration: a VM never runs elsewhere."""
        return succeed(None)

    def forget(self, vm_uuid: str) -> None:
        """Nothing is cached: every call reads the database."""

    def probe(self) -> Deferred[None]:
        """The database answers (its file system is back)."""
        return self._run(lambda conn: conn.execute("SELECT 1").fetchone()).addCallback(
            lambda _: None)

    def status(self) -> UpstreamStatus:
        r = self.reachability
        return UpstreamStatus(kind="local", target=self.path,
                              reachable=r.reachable is not False, down_since=r.down_since,
                              last_error=r.last_error, calls=self._calls)

    def close(self) -> Deferred[None]:
        self.reachability.stop()

        def work() -> None:
            conn, self._conn, self._closed = self._conn, None, True
            if conn is not None:
                conn.close()

        result: Deferred[None] = self._runner(work)
        return result

    # -- administration (tests, xguard-ctl) ----------------------------------
    def vm_record(self, vm_uuid: str) -> Deferred[dict[str, Any] | None]:
        """Everything kept about one VM, or None; includes contents, so it is
        for tests and the operator, never for logs."""
        def work(conn: sqlite3.Connection) -> dict[str, Any] | None:
            row = conn.execute("SELECT nvram, nvram_update, secureboot_state FROM vm"
                               " WHERE uuid = ?", (vm_uuid,)).fetchone()
            if row is None:
                return None
            vtpms = conn.execute("SELECT uuid, contents FROM vtpm WHERE vm_uuid = ?"
                                 " ORDER BY rowid", (vm_uuid,)).fetchall()
            return {"uuid": vm_uuid, "nvram": json.loads(row[0]), "nvram_update": row[1],
                    "secureboot_state": row[2],
                    "vtpms": [{"uuid": u, "contents": c} for u, c in vtpms]}
        return self._run(work)

    def vm_uuids(self) -> Deferred[list[str]]:
        return self._run(lambda conn: [r[0] for r in conn.execute(
            "SELECT uuid FROM vm ORDER BY uuid")])

    def set_secureboot_certificates_state(self, vm_uuid: str, state: str) -> Deferred[None]:
        if state not in SECUREBOOT_STATES:
            raise ValueError(f"secure-boot state must be one of {sorted(SECUREBOOT_STATES)}")

        def work(conn: sqlite3.Connection) -> None:
            _insert_vm(conn, vm_uuid)
            conn.execute("UPDATE vm SET secureboot_state = ? WHERE uuid = ?", (state, vm_uuid))
        return self._run(work, write=True)

    def messages(self, obj_uuid: str | None = None) -> Deferred[list[dict[str, Any]]]:
        """Stored messages, oldest first (all, or about one object)."""
        def work(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            sql = "SELECT ref, name, priority, class, obj_uuid, body FROM message"
            args: tuple[str, ...] = ()
            if obj_uuid is not None:
                sql, args = sql + " WHERE obj_uuid = ?", (obj_uuid,)
            keys = ("ref", "name", "priority", "class", "obj_uuid", "body")
            return [dict(zip(keys, row)) for row in conn.execute(sql + " ORDER BY id", args)]
        return self._run(work)


def _first_vtpm(conn: sqlite3.Connection, vm_uuid: str) -> str | None:
    row = conn.execute("SELECT uuid FROM vtpm WHERE vm_uuid = ? ORDER BY rowid LIMIT 1",
                       (vm_uuid,)).fetchone()
    return None if row is None else str(row[0])


def _insert_vm(conn: sqlite3.Connection, vm_uuid: str) -> None:
    conn.execute("INSERT OR IGNORE INTO vm (uuid) VALUES (?)", (vm_uuid,))
