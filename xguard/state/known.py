# -*- test-case-name: tests.unit.test_known -*-
"""The last state xguard saw upstream hold, per VM (SPEC §6, "Reads during
an outage").

A VM that reboots while xapi restarts reads its whole state again, and
varstored does not retry: a read that fails is a failed guest operation.
So every time upstream answers a read, or takes a delivery, the state it
then holds is copied here; a read that upstream cannot answer is served
from the pending version, else from this copy.

Layout, beside the cache's service trees::

    STATE_DIR/known/<vm-uuid>/vtpm     the vTPM contents string (3 keys)
    STATE_DIR/known/<vm-uuid>/nvram    the NVRAM map, JSON
    STATE_DIR/known/<vm-uuid>/sb       the secure-boot certificates state
    STATE_DIR/known/<vm-uuid>/handle   {"ref": vTPM handle, "uuid": vTPM uuid}
    STATE_DIR/known/<vm-uuid>/sent-Swtpm, sent-Varstored
                                       digests of values sent upstream whose
                                       outcome is not known yet (see below)
    STATE_DIR/known/<vm-uuid>/ended-Swtpm, ended-Varstored
                                       when the VM's last life here ended,
                                       while writes of it are pending
    STATE_DIR/known/.boot              "clean", or "dirty <boot id>"

When a copy may be served (the staleness argument is in doc/cache.md):

- A copy is only kept for a *live* VM (one with a socket) or one kept
  across a reboot; it is written before the write that changed upstream is
  acknowledged, under the same lock as the upstream call, so it is never
  older than an acknowledged write, and two copies never land out of order.
- It is dropped once upstream answered a call made after the VM's last
  socket went (the VM stopped, and xapi may now change its state): a fact,
  not the belief that upstream is up. Without such an answer it is kept
  across a destroy and create (a reboot while upstream is down).
- Copies are written without fsync, in place, each with its length and
  CRC-32: a killed daemon loses nothing (the page cache survives it), and
  a write torn by a kill fails its checksum and reads as no copy. (Replacing
  the file by a rename would cost ~0.4 ms on ext4, which flushes data
  renamed over an existing file.) A host crash may lose copies. The ``.boot`` marker says
  "dirty <boot id>" while unsynced copies may exist; a start in another
  boot finds that and drops every copy (they may be older than upstream). A
  clean stop syncs them and writes "clean".
- Anything that cannot be recorded (disk full, a value over
  :data:`MAX_COPY_BYTES`) removes the older copy rather than leave it stale.

The ``sent-*`` records say what a write in flight may have left upstream
holding (:mod:`xguard.cache.lineage`): written before the call goes out,
emptied once upstream's answer is recorded, so that a daemon killed in
between does not take its own last write, which upstream may hold, for
another writer's (a false conflict after every kill -9 during Direct
writes). Like the copies they survive a kill, not a host crash (then every
copy is dropped, as above, and writes start with an unknown base).

The ``ended-*`` records say when the VM last lost its last socket here
(``CLOCK_MONOTONIC`` ns), written when writes of the life that ended are
pending: a write whose base is unknown is delivered only if its VM has run
here without a break since (:mod:`xguard.cache.lineage`), and a daemon
killed after the VM started here again must not take the new life for the
old one. They too survive a kill, which is all they need: a host crash
loses /run and with it the active sockets, so every VM's life ends at the
next start anyway.

Opening and closing (a directory listing, fsyncs) run through the injected
runner. The copies themselves are small files read and written without
fsync, on the reactor thread: a thread hop would cost more than the I/O
(tens of microseconds in the page cache), and being synchronous, one
copy's operations never interleave. No content is ever logged.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.logger import Logger

from ..model import TpmState, is_valid_uuid
from ..util.checked import Damaged, digest, seal, unseal
from ..util.durable import atomic_write, fsync_dir, makedirs, safe_unlink
from ..util.threads import Runner

__all__ = ["KnownState", "ServiceRecords", "KNOWN", "MAX_COPY_BYTES", "read_boot_id"]

KNOWN = "known"
MARKER = ".boot"
#: A copy larger than this is not kept (xapi's largest values, a vTPM's
#: contents or an NVRAM map, are a few hundred KiB).
MAX_COPY_BYTES = 4 * 1024 * 1024
_NAMES = ("vtpm", "nvram", "sb", "handle", "sent-Swtpm", "sent-Varstored",
          "ended-Swtpm", "ended-Varstored")
#: Records of what a cache's lineage needs across a kill, not across a
#: host crash: written for a VM with or without copies, never synced.
_LINEAGE = ("sent-", "ended-")


def read_boot_id() -> str:
    """The kernel's id of this boot (a new one after every reboot)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


class KnownState:
    """Per VM copies of upstream's state, and which VM each vTPM is.

    :param root: the state directory (copies go below ``root/known``).
    :param runner: runs blocking file work (a thread pool; inline in tests).
    :param is_live: whether a VM has a domain socket now.
    :param boot_id: this boot's id (see :func:`read_boot_id`).
    """

    log = Logger()

    def __init__(self, root: str, *, runner: Runner, is_live: Callable[[str], bool],
                 boot_id: Callable[[], str] = read_boot_id) -> None:
        self.base = os.path.join(root, KNOWN)
        #: Where damaged copies are moved.
        self.quarantine = os.path.join(root, "quarantine", KNOWN)
        #: Copies found damaged since the start.
        self.damaged = 0
        self._runner = runner
        self._is_live = is_live
        self._boot_id = boot_id
        self._kept: set[str] = set()          # VMs with a directory here
        self._digests: dict[tuple[str, str], bytes] = {}
        self._vtpm_ref: dict[str, str] = {}   # vm -> vTPM handle
        self._ref_vm: dict[str, str] = {}     # vTPM handle -> vm
        self._uuid_ref: dict[str, str] = {}   # vTPM uuid -> handle
        self._dirty: set[str] = set()         # files written since the last sync
        #: VMs neither live nor kept whose lineage records (what is in
        #: flight, when their life ended) are written all the same (see
        #: record_sent).
        self._sent_only: set[str] = set()
        self._failing = False
        #: VMs without sockets, and the last call ticket before they lost them.
        self._gone: dict[str, int] = {}

    # -- start / stop --------------------------------------------------------
    def open(self) -> "Deferred[None]":
        """Load what is kept; drop every copy if the host crashed since they
        were written (see the module docstring). Before anything listens."""
        return ensureDeferred(self._open())

    async def _open(self) -> None:
        boot = self._boot_id()
        dropped, kept = await self._runner(self._load, boot)
        if dropped:
            self.log.warn("last known state: {n} VMs' copies dropped: the host restarted "
                          "without a clean stop of xguard, so they may be older than upstream",
                          n=dropped)
        await self._runner(atomic_write, os.path.join(self.base, MARKER),
                           f"dirty {boot}\n".encode(), mode=0o600)
        for vm, handle in kept.items():
            self._kept.add(vm)
            ref, uuid = handle.get("ref"), handle.get("uuid")
            if isinstance(ref, str):
                self._vtpm_ref[vm] = ref
                self._ref_vm[ref] = vm
                if isinstance(uuid, str):
                    self._uuid_ref[uuid] = ref
        if kept:
            self.log.info("last known state of {n} VMs loaded", n=len(kept))

    def _load(self, boot: str) -> tuple[int, dict[str, dict[str, Any]]]:
        makedirs(self.base, 0o700)
        try:
            with open(os.path.join(self.base, MARKER), encoding="ascii") as f:
                marker = f.read().strip()
        except (OSError, ValueError):
            marker = "clean"
        trusted = marker in ("clean", f"dirty {boot}")
        dropped = 0
        kept: dict[str, dict[str, Any]] = {}
        for name in sorted(os.listdir(self.base)):
            path = os.path.join(self.base, name)
            if name == MARKER or name == MARKER + ".pre":
                continue
            if not is_valid_uuid(name) or not os.path.isdir(path) or not trusted:
                _remove(path)
                dropped += is_valid_uuid(name)
                continue
            for entry in os.listdir(path):
                if entry not in _NAMES:
                    safe_unlink(os.path.join(path, entry))  # not ours
            handle = self._read_file(name, "handle")
            kept[name] = _parse_json(handle) or {}
        return dropped, kept

    def close(self) -> "Deferred[None]":
        """Sync every copy written since the start, then mark them clean."""
        return ensureDeferred(self._close())

    async def _close(self) -> None:
        dirty, self._dirty = self._dirty, set()
        await self._runner(self._sync, sorted(dirty))

    def _sync(self, paths: list[str]) -> None:
        dirs = set()
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            dirs.add(os.path.dirname(path))
        if dirs:
            dirs.add(self.base)  # the entries of VM directories made since
        for d in sorted(dirs):
            if os.path.isdir(d):
                fsync_dir(d)
        atomic_write(os.path.join(self.base, MARKER), b"clean\n", mode=0o600)

    # -- which VMs are kept ----------------------------------------------------
    def is_live(self, vm: str) -> bool:
        """Whether ``vm`` has a domain socket here now."""
        return self._is_live(vm)

    def kept(self) -> list[str]:
        """VMs with copies (live or kept across a reboot)."""
        return sorted(self._kept)

    def vm_gone(self, vm: str, after: int) -> None:
        """The VM's last socket was destroyed, after the call with ticket
        ``after`` started. Its copies are dropped once upstream answers a
        later call (see :meth:`upstream_answered`): a fact that upstream
        was there after the VM stopped, and may change its state now. Until
        then they are kept: it may be a reboot while upstream is down."""
        if vm in self._kept:
            self._gone[vm] = after

    def unserved_at_start(self, after: int) -> None:
        """The sockets of the active file are served again: copies of VMs
        that came back without one are dropped like a stopped VM's."""
        for vm in self._kept:
            if not self._is_live(vm):
                self._gone.setdefault(vm, after)

    def upstream_answered(self, ticket: int, has_pending: Callable[[str], bool]) -> None:
        """Upstream answered the call with ``ticket``: drop the copies of
        VMs that lost their last socket before that call started and have
        none now, and no write waiting for delivery (their pending writes
        are of the lineage the copy is)."""
        dropped = []
        for vm, after in list(self._gone.items()):
            if ticket <= after:
                continue
            if self._is_live(vm):
                del self._gone[vm]  # back (a reboot): the copy stays
            elif not has_pending(vm):
                del self._gone[vm]
                self.drop(vm)
                dropped.append(vm)
        if dropped:
            self.log.info("last known state of {n} stopped VMs dropped: upstream answered "
                          "after their sockets went", n=len(dropped))

    def make_room(self, needed: int) -> "Deferred[int]":
        """The disk is full and a VM's write needs ``needed`` bytes: pending
        writes come first, and copies are a read cache. Drop copies —
        of VMs without a socket first, then the largest — until at least
        that much is freed (a VM's handle, which names its vTPM, stays).
        Fires with the bytes freed (0: nothing left to drop)."""
        return self._runner(self._make_room, needed).addCallback(self._made_room)

    def _make_room(self, needed: int) -> tuple[int, list[str]]:
        sizes: list[tuple[bool, int, str]] = []
        for vm in self._kept:
            total = 0
            for name in ("vtpm", "nvram", "sb"):
                try:
                    total += os.stat(os.path.join(self.base, vm, name)).st_size
                except OSError:
                    pass
            if total:
                sizes.append((self._is_live(vm), -total, vm))
        freed, shed = 0, []
        for _live, negative, vm in sorted(sizes):
            if freed >= needed:
                break
            for name in ("vtpm", "nvram", "sb"):
                safe_unlink(os.path.join(self.base, vm, name))
            freed -= negative
            shed.append(vm)
        return freed, shed

    def _made_room(self, result: tuple[int, list[str]]) -> int:
        freed, shed = result
        for vm in shed:
            for name in ("vtpm", "nvram", "sb"):
                self._digests.pop((vm, name), None)
        if shed:
            self.log.warn("disk full: dropped the last known state of {n} VMs ({size} bytes) to "
                          "make room for VM writes; their reads fail during an outage until "
                          "upstream answers", n=len(shed), size=freed)
        return freed

    def drop(self, vm: str) -> "Deferred[None]":
        """Forget everything about ``vm``."""
        self._forget_vm(vm)
        if vm in self._kept:
            self._kept.discard(vm)
            _remove(os.path.join(self.base, vm))
        return succeed(None)

    def _forget_vm(self, vm: str) -> None:
        for key in [k for k in self._digests if k[0] == vm]:
            del self._digests[key]
        ref = self._vtpm_ref.pop(vm, None)
        if ref is not None and self._ref_vm.get(ref) == vm:
            del self._ref_vm[ref]

    # -- copies ------------------------------------------------------------------
    def record_tpm(self, vm: str, state: TpmState) -> "Deferred[bool]":
        """Upstream now holds ``state`` for ``vm``'s vTPM. True when the
        copy now holds it (False: not kept for this VM, or not writable)."""
        return self._record(vm, "vtpm", state.serialize().encode("ascii"))

    def tpm(self, vm: str) -> "Deferred[TpmState | None]":
        def parse(data: bytes | None) -> TpmState | None:
            if data is None:
                return None
            try:
                return TpmState.deserialize(data.decode("ascii"))
            except ValueError:
                return None
        return self._read(vm, "vtpm").addCallback(parse)

    def record_nvram(self, vm: str, nvram: Mapping[str, str]) -> "Deferred[bool]":
        """Upstream's whole NVRAM map for ``vm``."""
        return self._record(vm, "nvram", _json(dict(nvram)))

    def record_nvram_key(self, vm: str, key: str, value: str) -> "Deferred[bool]":
        """Upstream took one NVRAM key (a write of EFI-variables): update the
        copy's map (or start one holding just that key)."""
        nvram = _parse_map(self._read_file(vm, "nvram")) or {}
        nvram[key] = value
        return succeed(self._write(vm, "nvram", _json(nvram)))

    def nvram(self, vm: str) -> "Deferred[dict[str, str] | None]":
        return self._read(vm, "nvram").addCallback(_parse_map)

    def record_sb_state(self, vm: str, state: str) -> "Deferred[bool]":
        return self._record(vm, "sb", state.encode("utf-8"))

    def sb_state(self, vm: str) -> "Deferred[str | None]":
        return self._read(vm, "sb").addCallback(
            lambda data: None if data is None else data.decode("utf-8", "replace"))

    # -- values sent without an answer yet ---------------------------------------
    def sent(self, vm: str, service: str) -> dict[int, frozenset[str]]:
        """Digests, per key, of the values of ``service`` (``Swtpm``,
        ``Varstored``) sent upstream for ``vm`` whose outcome is not
        recorded: by this process, or by one killed before the answer. An
        unreadable or damaged record reads as none (and is moved aside)."""
        if vm not in self._kept and vm not in self._sent_only:
            return {}
        doc = _parse_json(self._read_file(vm, "sent-" + service))
        if not isinstance(doc, dict):
            return {}
        out: dict[int, frozenset[str]] = {}
        for key, digests in doc.items():
            if isinstance(key, str) and key.isdigit() and isinstance(digests, list):
                out[int(key)] = frozenset(d for d in digests if isinstance(d, str))
        return out

    def record_sent(self, vm: str, service: str,
                    sent: Mapping[int, Iterable[str]]) -> bool:
        """Say durably enough to survive a kill (no fsync: see the module
        doc) what may be in flight for ``vm``'s ``service``; an empty
        ``sent`` says nothing is. False when it could not be written."""
        doc = {str(key): sorted(digests) for key, digests in sorted(sent.items()) if digests}
        return self._write_lineage(vm, "sent-" + service, doc)

    def ended(self, vm: str, service: str) -> int | None:
        """When ``vm``'s last life here ended (``CLOCK_MONOTONIC`` ns), as
        recorded for ``service``'s pending writes; None: not recorded
        (or unreadable: moved aside)."""
        if vm not in self._kept and vm not in self._sent_only:
            return None
        doc = _parse_json(self._read_file(vm, "ended-" + service))
        at = doc.get("at") if isinstance(doc, dict) else None
        return at if isinstance(at, int) and not isinstance(at, bool) else None

    def record_ended(self, vm: str, service: str, at: int) -> bool:
        """Say durably enough to survive a kill that ``vm``'s life here
        ended at ``at`` while writes of ``service`` were pending."""
        return self._write_lineage(vm, "ended-" + service, {"at": at})

    def _write_lineage(self, vm: str, name: str, doc: dict[str, Any]) -> bool:
        keep = self._is_live(vm) or vm in self._kept
        if not keep:
            # A VM with no socket and no copies here still has its pending
            # writes delivered (after a host crash, say): what its lineage
            # needs must survive a kill as well. Recorded without keeping
            # copies for it; a later start finds its directory and treats it
            # as a stopped VM's (dropped once upstream answers, nothing pending).
            if not doc and vm not in self._sent_only:
                return True  # nothing to say, nothing recorded
            self._sent_only.add(vm)
        return self._write(vm, name, _json(doc), keep=keep)

    # -- which VM a vTPM belongs to ------------------------------------------------
    def vtpm_of_vm(self, vm: str) -> str | None:
        """The handle of ``vm``'s vTPM, if seen."""
        return self._vtpm_ref.get(vm)

    def vm_of_vtpm(self, vtpm_uuid: str) -> str | None:
        """The VM whose vTPM has this uuid, if both were seen."""
        ref = self._uuid_ref.get(vtpm_uuid)
        return None if ref is None else self._ref_vm.get(ref)

    def vm_of_handle(self, ref: str) -> str | None:
        return self._ref_vm.get(ref)

    def record_vtpm_handle(self, vm: str, ref: str) -> "Deferred[Any]":
        """``vm``'s vTPM has handle ``ref`` (upstream said so)."""
        if self._vtpm_ref.get(vm) == ref:
            return succeed(None)
        old = self._vtpm_ref.get(vm)
        if old is not None and self._ref_vm.get(old) == vm:
            del self._ref_vm[old]
        self._vtpm_ref[vm] = ref
        self._ref_vm[ref] = vm
        return self._save_handle(vm)

    def record_vtpm_uuid(self, vtpm_uuid: str, ref: str) -> "Deferred[Any]":
        """The vTPM ``vtpm_uuid`` has handle ``ref`` (upstream said so)."""
        if self._uuid_ref.get(vtpm_uuid) == ref:
            return succeed(None)
        self._uuid_ref[vtpm_uuid] = ref
        vm = self._ref_vm.get(ref)
        if vm is None:
            return succeed(None)
        return self._save_handle(vm)

    def _save_handle(self, vm: str) -> "Deferred[bool]":
        ref = self._vtpm_ref.get(vm)
        uuids = [u for u, r in self._uuid_ref.items() if r == ref]
        doc = {"ref": ref, "uuid": uuids[0] if uuids else None}
        return self._record(vm, "handle", _json(doc))

    # -- files ---------------------------------------------------------------------
    def _record(self, vm: str, name: str, data: bytes) -> "Deferred[bool]":
        return succeed(self._write(vm, name, data))

    def _write(self, vm: str, name: str, data: bytes, *, keep: bool = True) -> bool:
        """True when the copy holds ``data``. Never raises: a copy that
        cannot be written is removed instead (a stale one must not be
        served). ``keep`` False: the file is written whatever the VM is,
        and it does not make the VM's copies kept."""
        if keep and not (self._is_live(vm) or vm in self._kept):
            return False  # a stopped VM: nothing to keep
        checksum = digest(data)  # compared here, and written in the file's header
        if self._digests.get((vm, name)) == checksum:
            return True
        path = os.path.join(self.base, vm, name)
        try:
            if len(data) > MAX_COPY_BYTES:
                raise ValueError(f"over {MAX_COPY_BYTES} bytes")
            _write_file(path, data, checksum)
        except Exception as e:
            self._digests.pop((vm, name), None)
            self._discard(vm, name, path, e)
            return False
        if keep:
            self._kept.add(vm)
        self._digests[(vm, name)] = checksum
        if not name.startswith(_LINEAGE):
            # A lineage record is not synced at a clean stop: a sent record
            # lost or older after a power cut only makes a later check
            # stricter (fewer values taken as ours: a conflict reported,
            # never an overwrite), an ended one is not needed then (no
            # socket survives it), and a restart under load would pay an
            # fsync per writing VM for it.
            self._dirty.add(path)
        if self._failing:
            self._failing = False
            self.log.info("last known state: copies are written again")
        return True

    def _discard(self, vm: str, name: str, path: str, error: Exception) -> None:
        if not self._failing:
            self._failing = True
            self.log.error("last known state: cannot keep the {name} copy of VM {vm} ({error});"
                           " it is removed, and such reads fail during an outage",
                           name=name, vm=vm, error=str(error))
        try:
            safe_unlink(path)
        except Exception:
            self.log.failure("last known state: cannot remove {path}", path=path)

    def _read(self, vm: str, name: str) -> "Deferred[bytes | None]":
        return succeed(self._read_file(vm, name) if vm in self._kept else None)

    def _read_file(self, vm: str, name: str) -> bytes | None:
        """A copy's content; None when there is none, or when it fails its
        check (then it is moved aside, and the failure logged: a copy torn
        by a kill mid-write, a disk that lied)."""
        path = os.path.join(self.base, vm, name)
        try:
            return _unsealed(_read_whole(path))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except Damaged as e:
            self._digests.pop((vm, name), None)
            self._set_aside(vm, name, path, str(e))
            return None

    def _set_aside(self, vm: str, name: str, path: str, why: str) -> None:
        aside = os.path.join(self.quarantine, vm, name)
        try:
            makedirs(os.path.dirname(aside), 0o700)
            os.replace(path, aside)
        except OSError:
            safe_unlink(path)
            aside = "(removed)"
        self.damaged += 1
        self.log.error("last known state: the {name} copy of VM {vm} is damaged ({why}); it is "
                       "never served, and is set aside as {aside}", name=name, vm=vm, why=why,
                       aside=aside)


class ServiceRecords:
    """One service's lineage records: values in flight and ended lives, as
    a cache's lineage keeps them (:class:`xguard.cache.lineage.LineageRecords`)."""

    def __init__(self, known: KnownState, service: str) -> None:
        self.known = known
        self.service = service

    def load(self, vm: str) -> dict[int, frozenset[str]]:
        return self.known.sent(vm, self.service)

    def save(self, vm: str, sent: Mapping[int, Iterable[str]]) -> bool:
        return self.known.record_sent(vm, self.service, sent)

    def ended(self, vm: str) -> int | None:
        return self.known.ended(vm, self.service)

    def save_ended(self, vm: str, at: int) -> bool:
        return self.known.record_ended(vm, self.service, at)


#: Copies are checked files (xguard.util.checked) of this kind.
_KIND = "copy"
_VERSION = 1
#: The previous format (still read): this header, the content's length and
#: CRC-32, a newline, the content.
_MAGIC_2 = b"xguard-copy-2 "


def _seal(data: bytes, checksum: bytes | None = None) -> bytes:
    return seal(_KIND, _VERSION, data, checksum=checksum)


def _unsealed(raw: bytes) -> bytes:
    """The content of a copy file.

    :raises Damaged: it fails its check (torn, truncated, foreign).
    """
    if raw.startswith(_MAGIC_2):
        head, sep, data = raw.partition(b"\n")
        if not sep or head != b"%s%d %08x" % (_MAGIC_2, len(data), zlib.crc32(data)):
            raise Damaged("fails its length or CRC-32")
        return data
    return unseal(raw, _KIND)[1]


def _write_file(path: str, data: bytes, checksum: bytes | None = None) -> None:
    """Overwrite ``path`` in place with ``data`` and its checksum (no
    fsync, no rename: see the module doc). The VM's directory is made when
    missing, without an fsync either: :meth:`KnownState.close` syncs it."""
    sealed = _seal(data, checksum)
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except FileNotFoundError:
        directory = os.path.dirname(path)
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
        os.chmod(directory, 0o700)  # whatever the umask
        fd = os.open(path, flags, 0o600)
    try:
        view, offset = memoryview(sealed), 0
        while offset < len(sealed):
            offset += os.pwrite(fd, view[offset:], offset)
        os.ftruncate(fd, len(sealed))
    finally:
        os.close(fd)


def _read_whole(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks: list[bytes] = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        safe_unlink(path)


def _json(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _parse_json(data: bytes | None) -> Any:
    try:
        return None if data is None else json.loads(data.decode("utf-8"))
    except ValueError:
        return None


def _parse_map(data: bytes | None) -> dict[str, str] | None:
    if data is None:
        return None
    try:
        doc = json.loads(data.decode("utf-8"))
    except ValueError:
        return None
    if not isinstance(doc, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in doc.items()):
        return None
    return doc
