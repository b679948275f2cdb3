# -*- test-case-name: tests.unit.test_views -*-
"""What the domain sockets read and write through: :class:`TpmKeys`
(swtpm's three keys) and :class:`VmNvram` (varstored's NVRAM, secure-boot
state and alert).

Writes go to the service's writer (the write-back cache, or the no-cache
writer). Reads see the latest pending version first, then upstream (through
the sink), then the last known state. Upstream gets the direct deadline
only when there is a last known state to fall back on: without one,
waiting longer is better than a certain error.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from ..interfaces import IItemWriter, INvramSink, IVtpmSink
from ..model import NVRAM_EFI_VARIABLES, NvramWrite, TpmKey
from ..util.deadlines import within_or
from .known import KnownState

__all__ = ["TpmKeys", "VmNvram"]

SinkT = TypeVar("SinkT", IVtpmSink, INvramSink)


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


class TpmKeys(_DomainView[IVtpmSink]):
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


class VmNvram(_DomainView[INvramSink]):
    """The varstored socket's view of its VM's NVRAM, secure-boot state and
    secure-boot alert."""

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

    def alert(self, vm_uuid: str, name: str, priority: int, body: str) -> "Deferred[str]":
        """Raise a message about the VM (no state: nothing cached)."""
        return self.sink.create_message(vm_uuid, name, priority, body)
