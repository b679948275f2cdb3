# -*- test-case-name: tests.unit.test_sinks -*-
"""How each service's items reach upstream: the only code that talks to
upstream about a VM's state.

Swtpm items are the three vTPM keys; xapi stores them in one string, so a
delivery is a read-modify-write of that string under the vTPM's lock, which
every other upstream call about that vTPM takes too (the orchestrator's, for
VMs xguard serves or not). Varstored has one item, the NVRAM's
EFI-variables with its ``update`` flag.

Sinks are where the last known state is recorded: every answer upstream
gives, and every delivery it takes, is copied to
:class:`~xguard.state.known.KnownState` *under the same lock* as the
upstream call, so copies land in upstream's order and before the write is
acknowledged.

They are also where a cached write meets what upstream holds now (SPEC §6,
"Other writers"): a delivery with a checked :class:`~xguard.model.Base`
reads upstream first and writes only if upstream still holds a state of
xguard's lineage — else upstream's value stays and the outcome says why,
for the cache to set ours aside. Writes made before this process started
are also set aside while their VM runs on another host.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TypeVar

from twisted.internet.defer import Deferred, ensureDeferred, fail
from zope.interface import implementer

from ..errors import PermanentUpstreamError, TransientUpstreamError, UpstreamError
from ..interfaces import INvramSink, IUpstream, IVtpmSink
from ..model import (
    DIRECT,
    NVRAM_EFI_VARIABLES,
    Accept,
    Base,
    NvramWrite,
    Outcome,
    Service,
    TpmKey,
    TpmState,
    digest,
)
from ..util.locks import KeyedLocks
from .known import KnownState

__all__ = ["VtpmSink", "NvramSink", "parse_state"]

T = TypeVar("T")


@implementer(IVtpmSink)
class VtpmSink:
    """Delivers vTPM keys with one serialized read-modify-write per vTPM.

    The read is skipped when it can add nothing:

    - a delivery that sets all three keys (the orchestrator's whole state,
      or a coalesced round of the flusher): nothing of upstream's string
      survives it;
    - a vTPM *confirmed* in this process: its last known copy holds exactly
      what upstream holds, because this sink read it or wrote it, under the
      vTPM's lock, and every write of a running VM's vTPM goes through this
      sink (doc/cache.md gives the argument). Only a VM that runs here is
      confirmed (a stopped VM's vTPM is another host's to change, even
      while its cached writes are still delivered from here). A write
      whose outcome is unknown (an error, a timeout) unconfirms it, and so
      does a copy that could not be recorded; the next delivery reads
      again.
    """

    service = Service.SWTPM

    def __init__(self, upstream: IUpstream, locks: KeyedLocks, known: KnownState) -> None:
        self.upstream = upstream
        self.locks = locks
        self.known = known
        #: vTPM handles whose copy is exactly upstream's (see the class doc).
        self.confirmed: set[str] = set()

    def lock_key(self, vtpm: str) -> tuple[str, str]:
        """The lock every read-modify-write of the vTPM handle ``vtpm`` takes."""
        return ("vtpm", vtpm)

    def deliver(self, vm_uuid: str, items: Mapping[int, bytes],
                base: Base = DIRECT) -> "Deferred[Outcome]":
        try:
            changes = {TpmKey(k): _ascii(v) for k, v in items.items()}
        except PermanentUpstreamError:
            return fail()

        async def update(vtpm: str) -> Outcome:
            if base.check:
                return await self._checked(vm_uuid, vtpm, changes, base)
            state = await self._current(vm_uuid, vtpm, changes)
            await self._write(vm_uuid, vtpm, state)
            return DELIVERED

        return ensureDeferred(self._locked(vm_uuid, update))

    async def _write(self, vm_uuid: str, vtpm: str, state: TpmState) -> None:
        self.confirmed.discard(vtpm)  # until upstream says it took it
        await self.upstream.set_vtpm_contents(vtpm, state.serialize())
        if await self.known.record_tpm(vm_uuid, state):
            self._confirm(vm_uuid, vtpm)

    def _confirm(self, vm_uuid: str, vtpm: str) -> None:
        """The copy just recorded is upstream's state: trusted for the next
        write only while the VM runs here. A stopped VM's vTPM is another
        host's to change (a delivery of its cached writes after it stopped
        must not confirm it: when the VM comes back, that copy may be
        another host's lineage behind)."""
        if self.known.is_live(vm_uuid):
            self.confirmed.add(vtpm)

    async def _checked(self, vm_uuid: str, vtpm: str, changes: Mapping[TpmKey, str],
                       base: Base) -> Outcome:
        """A cached write: delivered only over a state of xguard's lineage.

        A write set aside keeps our whole state when it is known (``_ours``,
        from the copy of what upstream last showed, read before upstream's
        answer replaces it); a delivery never needs that copy, so it is
        read only for a write set aside."""
        async def ours() -> dict[int, bytes]:
            return _ours(await self.known.tpm(vm_uuid), changes, base.accept)

        elsewhere = await _elsewhere(self.upstream, self.known, vm_uuid, base)
        if elsewhere is not None:
            return Outcome("elsewhere", elsewhere, await ours())
        contents = await self.upstream.get_vtpm_contents(vtpm)
        try:
            now = TpmState.deserialize(contents)
        except ValueError:
            self.confirmed.discard(vtpm)
            return Outcome("conflict", "upstream holds vTPM contents that are not xapi's "
                           "format", await ours())
        state = now.update(changes)
        # Upstream holds our values already when state == now: a crash
        # between a delivery and the deletion of its files, which may have
        # left only some of that delivery's keys on disk, with a base older
        # than the others it delivered. Nothing is written, so nothing can
        # be overwritten, whoever wrote the keys this write does not hold.
        reason = None if state == now else self._set_aside_why(vm_uuid, now, changes, base)
        aside = None if reason is None else Outcome(*reason, await ours())
        # What upstream showed is the copy from here on (after ``ours``
        # read the one it replaces).
        if await self.known.record_tpm(vm_uuid, now):
            self._confirm(vm_uuid, vtpm)
        if state == now:
            return ALREADY
        if aside is not None:
            return aside
        await self._write(vm_uuid, vtpm, state)
        return DELIVERED

    def _set_aside_why(self, vm_uuid: str, now: TpmState, changes: Mapping[TpmKey, str],
                       base: Base) -> tuple[str, str] | None:
        """The kind and reason for setting aside a change of upstream's
        ``now``, or None: deliver it."""
        why = _unverified(self.known, vm_uuid, base)
        if why is not None:
            return "unverified", why
        if base.accept is None:
            return None
        foreign = [key.name.lower() for key in TpmKey
                   if now.get(key) != changes.get(key)
                   and digest(now.get(key)) not in base.accept.get(key, ())]
        if not foreign:
            return None
        return "conflict", ("upstream's " + ", ".join(foreign) + " changed since this "
                            "write's base (another writer)")

    def last_seen(self, vm_uuid: str) -> "Deferred[Mapping[int, str] | None]":
        return self.known.tpm(vm_uuid).addCallback(
            lambda copy: None if copy is None else {key: digest(copy.get(key))
                                                    for key in TpmKey})

    async def _current(self, vm_uuid: str, vtpm: str,
                       changes: Mapping[TpmKey, str]) -> TpmState:
        """The state to write: ``changes`` over what upstream holds."""
        if len(changes) == len(TpmKey):
            return _updated(vm_uuid, "", changes)
        if vtpm in self.confirmed:
            copy = await self.known.tpm(vm_uuid)
            if copy is not None:
                return copy.update(changes)
        return _updated(vm_uuid, await self.upstream.get_vtpm_contents(vtpm), changes)

    def read_contents(self, vm_uuid: str) -> "Deferred[str]":
        """The vTPM's whole contents string as upstream has it, read under
        its lock (never half of a concurrent update) and copied."""
        async def get(vtpm: str) -> str:
            contents = await self.upstream.get_vtpm_contents(vtpm)
            try:
                state = TpmState.deserialize(contents)
            except ValueError:
                self.confirmed.discard(vtpm)
                return contents  # not ours to judge here; readers of keys refuse it
            if await self.known.record_tpm(vm_uuid, state):
                self._confirm(vm_uuid, vtpm)
            else:
                self.confirmed.discard(vtpm)
            return contents

        return ensureDeferred(self._locked(vm_uuid, get))

    def read(self, vm_uuid: str, key: TpmKey) -> "Deferred[bytes]":
        """One key as upstream has it."""
        return self.read_contents(vm_uuid).addCallback(
            lambda contents: parse_state(vm_uuid, contents).get(key).encode("ascii"))

    async def _locked(self, vm_uuid: str, f: Callable[[str], Awaitable[T]]) -> T:
        """``f(handle)`` under the lock of the VM's vTPM. A handle upstream
        no longer knows (HANDLE_INVALID: the vTPM was re-created) is never
        handed out again (IUpstream.vtpm_for_vm), so it is looked up once
        more, and the new handle locked."""
        for attempt in (1, 2):
            vtpm = await self.upstream.vtpm_for_vm(vm_uuid)
            await self.known.record_vtpm_handle(vm_uuid, vtpm)
            try:
                return await self.locks.run(self.lock_key(vtpm), functools.partial(f, vtpm))
            except PermanentUpstreamError as e:
                self.confirmed.discard(vtpm)
                if attempt == 2 or e.codes[:1] != ["HANDLE_INVALID"]:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    # -- the orchestrator's vTPMs (named by uuid) ----------------------------
    def find_vm(self, vtpm_uuid: str, candidates: Iterable[str],
                pending: Iterable[str]) -> "Deferred[tuple[str | None, str]]":
        """(vm, handle) of the vTPM ``vtpm_uuid``; vm is None when none of
        ``candidates`` (VMs xguard serves) or ``pending`` (VMs with writes
        awaiting delivery) has it. Known mappings need no upstream call;
        otherwise upstream must answer (a transient error if it does not).

        A VM with pending writes must be found if it owns the vTPM, or its
        older writes would land after the orchestrator's call: a transient
        failure to look one up fails the call (the orchestrator retries),
        and only upstream's word that a VM has no such vTPM rules it out."""
        async def run() -> tuple[str | None, str]:
            vm = self.known.vm_of_vtpm(vtpm_uuid)
            if vm is not None:
                ref = self.known.vtpm_of_vm(vm)
                assert ref is not None
                return vm, ref
            ref = str(await self.upstream.vtpm_by_uuid(vtpm_uuid))
            vm = self.known.vm_of_handle(ref)
            if vm is None:
                vm = await self._search(ref, set(candidates), set(pending))
            if vm is not None:
                await self.known.record_vtpm_uuid(vtpm_uuid, ref)
            return vm, ref
        return ensureDeferred(run())

    async def _search(self, ref: str, candidates: set[str], pending: set[str]) -> str | None:
        """Resolve the vTPM handles of candidate VMs not resolved yet."""
        for vm in sorted(candidates | pending):
            if self.known.vtpm_of_vm(vm) is not None:
                continue
            try:
                found = str(await self.upstream.vtpm_for_vm(vm))
            except PermanentUpstreamError:
                continue
            except TransientUpstreamError:
                if vm in pending:
                    raise
                continue
            await self.known.record_vtpm_handle(vm, found)
            if found == ref:
                return vm
        return None

    def read_unserved(self, vtpm: str) -> "Deferred[str]":
        """The contents of the vTPM handle ``vtpm`` of a VM xguard neither
        serves nor holds writes for (nothing to order with, nothing to
        copy), under its lock."""
        async def read() -> str:
            return await self.upstream.get_vtpm_contents(vtpm)
        return self.locks.run(self.lock_key(vtpm), read)

    def write_unserved(self, vtpm: str, contents: str) -> "Deferred[None]":
        """Replace the contents of such a vTPM, under its lock."""
        async def write() -> None:
            await self.upstream.set_vtpm_contents(vtpm, contents)
        return self.locks.run(self.lock_key(vtpm), write)

    def learn(self, vm_uuid: str) -> "Deferred[None]":
        """A swtpm socket was created for ``vm_uuid``: find its vTPM's
        handle now, while upstream answers, so the orchestrator's calls can
        be ordered with this VM's writes even if it is gone later. Best
        effort: failures are left to later lookups."""
        async def run() -> None:
            try:
                ref = await self.upstream.vtpm_for_vm(vm_uuid)
            except UpstreamError:
                return
            await self.known.record_vtpm_handle(vm_uuid, ref)
        return ensureDeferred(run())

    def forget(self, vm_uuid: str) -> None:
        """The VM's sockets are gone: upstream may change its vTPM now."""
        vtpm = self.known.vtpm_of_vm(vm_uuid)
        if vtpm is not None:
            self.confirmed.discard(vtpm)


@implementer(INvramSink)
class NvramSink:
    """Delivers a VM's EFI-variables (one item, key 0), one upstream call
    per VM at a time; reads of the NVRAM map take the same lock."""

    service = Service.VARSTORED

    def __init__(self, upstream: IUpstream, locks: KeyedLocks, known: KnownState) -> None:
        self.upstream = upstream
        self.locks = locks
        self.known = known

    def deliver(self, vm_uuid: str, items: Mapping[int, bytes],
                base: Base = DIRECT) -> "Deferred[Outcome]":
        try:
            (write,) = [NvramWrite.decode(v) for v in items.values()]
        except ValueError as e:
            return fail(PermanentUpstreamError(["NVRAM_RECORD_INVALID", vm_uuid], str(e)))
        ours = {0: write.encode()}

        async def send() -> Outcome:
            if base.check:
                elsewhere = await _elsewhere(self.upstream, self.known, vm_uuid, base)
                if elsewhere is not None:
                    return Outcome("elsewhere", elsewhere, ours)
                nvram = dict(await self.upstream.get_nvram(vm_uuid))
                await self.known.record_nvram(vm_uuid, nvram)
                now = nvram.get(NVRAM_EFI_VARIABLES, "")
                if now == write.value:
                    return ALREADY
                unverified = _unverified(self.known, vm_uuid, base)
                if unverified is not None:
                    return Outcome("unverified", unverified, ours)
                if base.accept is not None and digest(now) not in base.accept.get(0, ()):
                    return Outcome("conflict", "upstream's EFI variables changed since this "
                                   "write's base (another writer)", ours)
            await self.upstream.set_nvram_efi_variables(vm_uuid, write.value, write.update)
            await self.known.record_nvram_key(vm_uuid, NVRAM_EFI_VARIABLES, write.value)
            return DELIVERED

        return self.locks.run(("nvram", vm_uuid), send)

    def last_seen(self, vm_uuid: str) -> "Deferred[Mapping[int, str] | None]":
        """The EFI variables as last seen (absent and empty are the same:
        a VM that never booted)."""
        return self.known.nvram(vm_uuid).addCallback(
            lambda copy: None if copy is None else {
                0: digest(copy.get(NVRAM_EFI_VARIABLES, ""))})

    def read(self, vm_uuid: str) -> "Deferred[dict[str, str]]":
        """The VM's NVRAM map as upstream has it (copied)."""
        async def get() -> dict[str, str]:
            nvram = dict(await self.upstream.get_nvram(vm_uuid))
            await self.known.record_nvram(vm_uuid, nvram)
            return nvram

        return self.locks.run(("nvram", vm_uuid), get)

    def secureboot_state(self, vm_uuid: str) -> "Deferred[str]":
        """The VM's secure-boot certificates state (copied)."""
        async def get() -> str:
            state = str(await self.upstream.get_secureboot_certificates_state(vm_uuid))
            await self.known.record_sb_state(vm_uuid, state)
            return state

        return self.locks.run(("sb", vm_uuid), get)

    def create_message(self, vm_uuid: str, name: str, priority: int, body: str) -> "Deferred[str]":
        """Raise an alert about the VM (varstored's secure-boot failure)."""
        return self.upstream.create_message(vm_uuid, name, priority, body)


def _ascii(content: bytes) -> str:
    try:
        return content.decode("ascii")
    except UnicodeDecodeError:
        raise PermanentUpstreamError(["VTPM_CONTENTS_INVALID"], "not ASCII") from None


def parse_state(vm_uuid: str, contents: str) -> TpmState:
    try:
        return TpmState.deserialize(contents)
    except ValueError as e:
        raise PermanentUpstreamError(["VTPM_CONTENTS_INVALID", vm_uuid], str(e)) from None


def _updated(vm_uuid: str, contents: str, changes: Mapping[TpmKey, str]) -> TpmState:
    try:
        return parse_state(vm_uuid, contents).update(changes)
    except ValueError as e:
        raise PermanentUpstreamError(["VTPM_CONTENTS_INVALID", vm_uuid], str(e)) from None


DELIVERED = Outcome("delivered")
ALREADY = Outcome("already")


async def _elsewhere(upstream: IUpstream, known: KnownState, vm_uuid: str,
                     base: Base) -> str | None:
    """Why a write made before this process started must not be delivered
    (the VM runs on another host: HA restarted it there, or it migrated),
    or None. Asked only for a VM xguard serves no socket for; the embedded
    store has no other host."""
    if not base.recovered or known.is_live(vm_uuid):
        return None
    where = await upstream.vm_residence(vm_uuid)
    if where is None or not where.elsewhere:
        return None
    return f"the VM is {where.power_state.lower()} on host {where.host or 'unknown'}"


def _unverified(known: KnownState, vm_uuid: str, base: Base) -> str | None:
    """Why a write whose base nobody recorded must not be delivered: its VM
    has not run here without a break since, so another host may have
    written. Files of the upstream daemon's format are delivered as before."""
    if base.accept is not None or base.legacy or (base.continuous
                                                  and known.is_live(vm_uuid)):
        return None
    return ("its base is unknown (xguard had not seen the VM's state when it was written) "
            "and the VM has not run here without a break since: another host may have "
            "written since")


def _ours(before: TpmState | None, changes: Mapping[TpmKey, str],
          accept: Accept | None) -> dict[int, bytes]:
    """Our whole vTPM state when it is known — the last state seen upstream
    is of our lineage for every key we do not change — else our keys."""
    values = {int(k): v.encode("ascii") for k, v in changes.items()}
    if before is None or accept is None:
        return values
    for key in TpmKey:
        if key not in changes and digest(before.get(key)) not in accept.get(key, ()):
            return values
    return {int(key): before.update(changes).get(key).encode("ascii") for key in TpmKey}
