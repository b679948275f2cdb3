# -*- test-case-name: tests.unit.test_contents -*-
"""The orchestrator's view of a vTPM (VtpmGetContents/VtpmSetContents),
ordered with everything else written for that vTPM (SPEC §3, §6 "Order
across the VM's lifecycle").

xenopsd reads a vTPM when it starts one (to restore it, or to see whether
it must be manufactured) and writes the whole state when it manufactures,
restores or stops one; a guest reboot is handled by xenopsd alone, so both
arrive while xapi restarts and while the cache holds that VM's writes.

- A set is a write of the three keys through the same writer as the swtpm
  socket's PUTs: newer than every write acknowledged before it, made durable
  in the cache when upstream is away, and never overtaken by an older
  cached version.
- A get is upstream's blob with every pending key overlaid; when upstream
  does not answer, the VM's last known state with the pending keys
  overlaid, or the pending keys alone when all three are pending;
  otherwise a transient error.

The control channel names a vTPM by uuid, the cache and the copies are per
VM: which VM a vTPM belongs to is learned from upstream (its handle, from
``VTPM.get_by_uuid``, is the one ``VM.get_VTPMs`` gives for its VM) and kept
durably with the VM's last known state, so both calls work during an
outage and after a restart. The sink does every upstream call of it (this
module calls upstream for nothing): a walk goes control → this view → the
writer → the sink → upstream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ..errors import InvalidContents, PermanentUpstreamError
from ..interfaces import IItemWriter, IVtpmSink
from ..model import TpmKey, TpmState
from ..util.deadlines import within_or
from .known import KnownState

__all__ = ["VtpmContents", "parse_contents"]


def parse_contents(contents: str) -> TpmState:
    """The orchestrator's contents string as the three keys (xapi's format:
    one field, a bare permall, or three separated by single spaces)."""
    if not contents.isascii():
        raise InvalidContents("vTPM contents must be ASCII")
    try:
        return TpmState.deserialize(contents)
    except ValueError as e:
        raise InvalidContents(f"vTPM contents are not xapi's format: {e}") from None


class VtpmContents:
    """Answers the orchestrator's vTPM calls.

    :param candidates: VMs whose vTPM may be the one asked for when no
        mapping is known yet (VMs with a swtpm socket); VMs with pending
        writes are always candidates.
    :param deadline: seconds a get waits for upstream before it is answered
        from local state.
    """

    log = Logger()

    def __init__(self, sink: IVtpmSink, writer: IItemWriter, known: KnownState, *,
                 candidates: Callable[[], Iterable[str]], clock: IReactorTime,
                 deadline: float) -> None:
        self.sink = sink
        self.writer = writer
        self.known = known
        self.candidates = candidates
        self.clock = clock
        self.deadline = deadline

    # -- the calls -------------------------------------------------------------
    def get(self, vtpm_uuid: str) -> "Deferred[str]":
        return ensureDeferred(self._get(vtpm_uuid))

    async def _get(self, vtpm_uuid: str) -> str:
        vm, ref = await self._resolve(vtpm_uuid)
        if vm is None:
            # Not a VM xguard serves or holds writes for: nothing to order.
            return await self.sink.read_unserved(ref)
        pending = {key: await self.writer.pending(vm, key) for key in TpmKey}
        overlay = {key: value.decode("ascii") for key, value in pending.items()
                   if value is not None}
        copy = await self.known.tpm(vm)
        if copy is None and len(overlay) == len(TpmKey):
            copy = TpmState()  # every key is pending: nothing of upstream's is needed
        fallback = None if copy is None else copy.update(overlay).serialize()
        contents = await within_or(self.clock, self.deadline, self.sink.read_contents(vm),
                                   fallback, "vTPM read")
        if not overlay:
            return contents
        try:
            base = TpmState.deserialize(contents)
        except ValueError as e:
            raise PermanentUpstreamError(["VTPM_CONTENTS_INVALID", vm], str(e)) from None
        return base.update(overlay).serialize()  # (again, for a fallback: the same)

    def set(self, vtpm_uuid: str, contents: str) -> "Deferred[None]":
        return ensureDeferred(self._set(vtpm_uuid, contents))

    async def _set(self, vtpm_uuid: str, contents: str) -> None:
        state = parse_contents(contents)
        vm, ref = await self._resolve(vtpm_uuid)
        if vm is None:
            await self.sink.write_unserved(ref, contents)
            return
        await self.writer.write_many(
            vm, {key: state.get(key).encode("ascii") for key in TpmKey})

    def learn(self, vm_uuid: str) -> "Deferred[None]":
        """A swtpm socket was created for ``vm_uuid`` (see the sink)."""
        return self.sink.learn(vm_uuid)

    def _resolve(self, vtpm_uuid: str) -> "Deferred[tuple[str | None, str]]":
        """(vm, handle) of ``vtpm_uuid``: vm None when no VM of ours has it."""
        return self.sink.find_vm(vtpm_uuid, self.candidates(), self.writer.pending_vms())
