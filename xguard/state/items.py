# -*- test-case-name: tests.unit.test_items -*-
"""What xguard persists for a VM and how each item reaches upstream.

Swtpm items are the three vTPM keys; xapi stores them in one string, so a
delivery is a read-modify-write of that string under the vTPM's lock (shared
with the control channel). Varstored has one item, the NVRAM's
EFI-variables with its ``update`` flag.

Sinks are the only code that talks to upstream about VM state, so they are
where the last known state is recorded: every answer upstream gives, and
every delivery it takes, is copied to :class:`~xguard.state.known.KnownState`
*under the same lock* as the upstream call, so copies land in upstream's
order and before the write is acknowledged.

:class:`DirectWriter` is the no-cache writer; the write-back cache
(:mod:`xguard.cache`) provides the same :class:`IItemWriter` seam.
:class:`TpmKeys` and :class:`VmNvram` are what the domain sockets use:
reads see the latest pending version first, then upstream, then the last
known state. Upstream gets the direct deadline only when there is a last
known state to fall back on: without one, waiting longer is better than a
certain error.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from ..errors import PermanentUpstreamError
from ..interfaces import IItemSink, IItemWriter, IUpstream
from ..model import NVRAM_EFI_VARIABLES, NvramWrite, Service, TpmKey, TpmState
from ..util.deadlines import within_or
from ..util.locks import KeyedLocks
from .known import KnownState

__all__ = ["VtpmSink", "NvramSink", "DirectWriter", "TpmKeys", "VmNvram"]

T = TypeVar("T")
SinkT = TypeVar("SinkT", "VtpmSink", "NvramSink")


@implementer(IItemSink)
class VtpmSink:
    """Delivers vTPM keys with one serialized read-modify-write per vTPM.

    The read is skipped when it can add nothing:

    - a delivery that sets all three keys (the orchestrator's whole state,
      or a coalesced round of the flusher): nothing of upstream's string
      survives it;
    - a vTPM *confirmed* in this process: its last known copy holds exactly
      what upstream holds, because this sink read it or wrote it, under the
      vTPM's lock, and every write of a running VM's vTPM goes through this
      sink (doc/cache.md gives the argument). A write whose outcome is
      unknown (an error, a timeout) unconfirms it, and so does a copy that
      could not be recorded; the next delivery reads again.
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

    def deliver(self, vm_uuid: str, items: Mapping[int, bytes]) -> "Deferred[None]":
        try:
            changes = {TpmKey(k): _ascii(v) for k, v in items.items()}
        except PermanentUpstreamError:
            return fail()

        async def update(vtpm: str) -> None:
            state = await self._current(vm_uuid, vtpm, changes)
            self.confirmed.discard(vtpm)  # until upstream says it took it
            await self.upstream.set_vtpm_contents(vtpm, state.serialize())
            if await self.known.record_tpm(vm_uuid, state):
                self.confirmed.add(vtpm)

        return ensureDeferred(self._locked(vm_uuid, update))

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
                self.confirmed.add(vtpm)
            else:
                self.confirmed.discard(vtpm)
            return contents

        return ensureDeferred(self._locked(vm_uuid, get))

    def read(self, vm_uuid: str, key: TpmKey) -> "Deferred[bytes]":
        """One key as upstream has it."""
        return self.read_contents(vm_uuid).addCallback(
            lambda contents: _parse_state(vm_uuid, contents).get(key).encode("ascii"))

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

    def forget(self, vm_uuid: str) -> None:
        """The VM's sockets are gone: upstream may change its vTPM now."""
        vtpm = self.known.vtpm_of_vm(vm_uuid)
        if vtpm is not None:
            self.confirmed.discard(vtpm)


@implementer(IItemSink)
class NvramSink:
    """Delivers a VM's EFI-variables (one item, key 0), one upstream call
    per VM at a time; reads of the NVRAM map take the same lock."""

    service = Service.VARSTORED

    def __init__(self, upstream: IUpstream, locks: KeyedLocks, known: KnownState) -> None:
        self.upstream = upstream
        self.locks = locks
        self.known = known

    def deliver(self, vm_uuid: str, items: Mapping[int, bytes]) -> "Deferred[None]":
        try:
            (write,) = [NvramWrite.decode(v) for v in items.values()]
        except ValueError as e:
            return fail(PermanentUpstreamError(["NVRAM_RECORD_INVALID", vm_uuid], str(e)))

        async def send() -> None:
            await self.upstream.set_nvram_efi_variables(vm_uuid, write.value, write.update)
            await self.known.record_nvram_key(vm_uuid, NVRAM_EFI_VARIABLES, write.value)

        return self.locks.run(("nvram", vm_uuid), send)

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


@implementer(IItemWriter)
class DirectWriter:
    """No cache: a write is acknowledged only once upstream took it."""

    def __init__(self, sink: IItemSink) -> None:
        self.sink = sink
        self.service = sink.service

    def write(self, vm_uuid: str, key: int, content: bytes) -> "Deferred[None]":
        return self.sink.deliver(vm_uuid, {key: content})

    def write_many(self, vm_uuid: str, changes: Mapping[int, bytes]) -> "Deferred[None]":
        return self.sink.deliver(vm_uuid, dict(changes))

    def pending(self, vm_uuid: str, key: int) -> "Deferred[bytes | None]":
        return succeed(None)

    def has_pending(self, vm_uuid: str) -> bool:
        return False

    def pending_vms(self) -> set[str]:
        return set()


class _DomainView(Generic[SinkT]):
    """What a domain socket's view of its VM's state reads and writes
    through: the service's writer (pending versions first), the sink's
    upstream reads, and the last known state.

    :param deadline: seconds a read waits for upstream before it is served
        from the last known state (when there is one).
    """

    def __init__(self, writer: IItemWriter, sink: SinkT, known: KnownState, *,
                 clock: IReactorTime, deadline: float) -> None:
        self.writer = writer
        self.sink: SinkT = sink
        self.known = known
        self.clock = clock
        self.deadline = deadline


class TpmKeys(_DomainView[VtpmSink]):
    """The swtpm socket's view of its VM's vTPM keys."""

    async def get(self, vm_uuid: str, key: TpmKey) -> bytes:
        pending = await self.writer.pending(vm_uuid, key)
        if pending is not None:
            return pending
        copy = await self.known.tpm(vm_uuid)
        fallback = None if copy is None else copy.get(key).encode("ascii")
        return await within_or(self.clock, self.deadline, self.sink.read(vm_uuid, key),
                               fallback, "vTPM read")

    def put(self, vm_uuid: str, key: TpmKey, content: bytes) -> "Deferred[None]":
        return self.writer.write(vm_uuid, key, content)


class VmNvram(_DomainView[NvramSink]):
    """The varstored socket's view of its VM's NVRAM and secure-boot state."""

    async def get(self, vm_uuid: str) -> dict[str, str]:
        pending = await self.writer.pending(vm_uuid, 0)
        overlay = None if pending is None else NvramWrite.decode(pending).value
        copy = await self.known.nvram(vm_uuid)
        # This VM's latest write is ours, or its last known state is.
        fallback = None if copy is None and overlay is None else dict(copy or {})
        read: Deferred[dict[str, str]] = self.sink.read(vm_uuid)
        answer = await within_or(self.clock, self.deadline, read, fallback, "NVRAM read")
        nvram = dict(answer)
        if overlay is not None:
            nvram[NVRAM_EFI_VARIABLES] = overlay
        return nvram

    async def secureboot_state(self, vm_uuid: str) -> str:
        return await within_or(self.clock, self.deadline, self.sink.secureboot_state(vm_uuid),
                               await self.known.sb_state(vm_uuid), "secure-boot state read")

    def set_efi_variables(self, vm_uuid: str, value: str, update: str) -> "Deferred[None]":
        return self.writer.write(vm_uuid, 0, NvramWrite(value, update).encode())


def _ascii(content: bytes) -> str:
    try:
        return content.decode("ascii")
    except UnicodeDecodeError:
        raise PermanentUpstreamError(["VTPM_CONTENTS_INVALID"], "not ASCII") from None


def _parse_state(vm_uuid: str, contents: str) -> TpmState:
    try:
        return TpmState.deserialize(contents)
    except ValueError as e:
        raise PermanentUpstreamError(["VTPM_CONTENTS_INVALID", vm_uuid], str(e)) from None


def _updated(vm_uuid: str, contents: str, changes: Mapping[TpmKey, str]) -> TpmState:
    try:
        return _parse_state(vm_uuid, contents).update(changes)
    except ValueError as e:
        raise PermanentUpstreamError(["VTPM_CONTENTS_INVALID", vm_uuid], str(e)) from None
