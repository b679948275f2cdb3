# -*- test-case-name: tests.unit.test_items -*-
"""What xguard persists for a VM and how each item reaches upstream.

Swtpm items are the three vTPM keys; xapi stores them in one string, so a
delivery is a read-modify-write of that string under the vTPM's lock (shared
with the control channel). Varstored has one item, the NVRAM's
EFI-variables with its ``update`` flag.

:class:`DirectWriter` is the no-cache writer; the write-back cache
(:mod:`xguard.cache`) provides the same :class:`IItemWriter` seam.
:class:`TpmStore` and :class:`NvramStore` are what the domain sockets use:
reads see the latest pending version first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from zope.interface import implementer

from .errors import PermanentUpstreamError, TransientUpstreamError
from .interfaces import IItemSink, IItemWriter, IUpstream
from .locks import KeyedLocks
from .model import NVRAM_EFI_VARIABLES, NvramWrite, Service, TpmKey, TpmState

__all__ = ["VtpmSink", "NvramSink", "DirectWriter", "TpmStore", "NvramStore"]

T = TypeVar("T")


@implementer(IItemSink)
class VtpmSink:
    """Delivers vTPM keys with one serialized read-modify-write per vTPM."""

    service = Service.SWTPM

    def __init__(self, upstream: IUpstream, locks: KeyedLocks) -> None:
        self.upstream = upstream
        self.locks = locks

    def lock_key(self, vtpm: str) -> tuple[str, str]:
        """The lock every read-modify-write of the vTPM handle ``vtpm`` takes."""
        return ("vtpm", vtpm)

    def deliver(self, vm_uuid: str, items: Mapping[int, bytes]) -> "Deferred[None]":
        changes = {TpmKey(k): _ascii(v) for k, v in items.items()}

        def rmw(vtpm: str) -> "Deferred[None]":
            async def update() -> None:
                state = TpmState.deserialize(await self.upstream.get_vtpm_contents(vtpm))
                await self.upstream.set_vtpm_contents(vtpm, state.update(changes).serialize())

            return self.locks.run(self.lock_key(vtpm), update)

        return ensureDeferred(self._with_vtpm(vm_uuid, rmw))

    def read(self, vm_uuid: str, key: TpmKey) -> "Deferred[bytes]":
        """One key as upstream has it, read under the vTPM's lock so a
        read never sees half of a concurrent update."""
        def get(vtpm: str) -> "Deferred[str]":
            async def contents() -> str:
                return await self.upstream.get_vtpm_contents(vtpm)

            return self.locks.run(self.lock_key(vtpm), contents)

        return ensureDeferred(self._read(vm_uuid, key, get))

    async def _read(self, vm_uuid: str, key: TpmKey,
                    get: Callable[[str], "Deferred[str]"]) -> bytes:
        contents = await self._with_vtpm(vm_uuid, get)
        try:
            return TpmState.deserialize(contents).get(key).encode("ascii")
        except (ValueError, UnicodeEncodeError) as e:
            raise PermanentUpstreamError(["VTPM_CONTENTS_INVALID", vm_uuid], str(e)) from None

    async def _with_vtpm(self, vm_uuid: str, f: Callable[[str], "Deferred[T]"]) -> T:
        """``f(handle)`` for the VM's vTPM. A cached handle that upstream no
        longer knows (HANDLE_INVALID: the vTPM was re-created) is forgotten
        and resolved once more."""
        for attempt in (1, 2):
            vtpm = await self.upstream.vtpm_for_vm(vm_uuid)
            try:
                return await f(vtpm)
            except PermanentUpstreamError as e:
                if attempt == 2 or e.codes[:1] != ["HANDLE_INVALID"]:
                    raise
                self.upstream.forget(vm_uuid)
        raise AssertionError("unreachable")  # pragma: no cover


@implementer(IItemSink)
class NvramSink:
    """Delivers a VM's EFI-variables (one item, key 0), one write per VM at
    a time."""

    service = Service.VARSTORED

    def __init__(self, upstream: IUpstream, locks: KeyedLocks) -> None:
        self.upstream = upstream
        self.locks = locks

    def deliver(self, vm_uuid: str, items: Mapping[int, bytes]) -> "Deferred[None]":
        (write,) = [NvramWrite.decode(v) for v in items.values()]

        async def send() -> None:
            await self.upstream.set_nvram_efi_variables(vm_uuid, write.value, write.update)

        return self.locks.run(("nvram", vm_uuid), send)


@implementer(IItemWriter)
class DirectWriter:
    """No cache: a write is acknowledged only once upstream took it."""

    def __init__(self, sink: IItemSink) -> None:
        self.sink = sink
        self.service = sink.service

    def write(self, vm_uuid: str, key: int, content: bytes) -> "Deferred[None]":
        return self.sink.deliver(vm_uuid, {key: content})

    def pending(self, vm_uuid: str, key: int) -> "Deferred[bytes | None]":
        return succeed(None)


class TpmStore:
    """The swtpm socket's view of its VM's vTPM keys."""

    def __init__(self, writer: IItemWriter, sink: VtpmSink) -> None:
        self.writer = writer
        self.sink = sink

    async def get(self, vm_uuid: str, key: TpmKey) -> bytes:
        pending = await self.writer.pending(vm_uuid, key)
        if pending is not None:
            return pending
        return await self.sink.read(vm_uuid, key)

    def put(self, vm_uuid: str, key: TpmKey, content: bytes) -> "Deferred[None]":
        return self.writer.write(vm_uuid, key, content)


class NvramStore:
    """The varstored socket's view of its VM's NVRAM."""

    def __init__(self, writer: IItemWriter, upstream: IUpstream) -> None:
        self.writer = writer
        self.upstream = upstream

    async def get(self, vm_uuid: str) -> dict[str, str]:
        pending = await self.writer.pending(vm_uuid, 0)
        overlay = None if pending is None else NvramWrite.decode(pending).value
        try:
            nvram = dict(await self.upstream.get_nvram(vm_uuid))
        except TransientUpstreamError:
            if overlay is None:
                raise
            # Upstream is away but this VM's latest write is ours: serve it.
            return {NVRAM_EFI_VARIABLES: overlay}
        if overlay is not None:
            nvram[NVRAM_EFI_VARIABLES] = overlay
        return nvram

    def set_efi_variables(self, vm_uuid: str, value: str, update: str) -> "Deferred[None]":
        return self.writer.write(vm_uuid, 0, NvramWrite(value, update).encode())


def _ascii(content: bytes) -> str:
    try:
        return content.decode("ascii")
    except UnicodeDecodeError:
        raise PermanentUpstreamError(["VTPM_CONTENTS_INVALID"], "not ASCII") from None
