# -*- test-case-name: tests.unit.test_lineage -*-
"""What upstream may hold for a VM when nobody but xguard wrote: the base
every cached write records, and what a delivery is checked against (SPEC
§6, "Other writers").

Per key of the service's items, a set of digests (:data:`~xguard.model.Accept`):

- the value xguard last saw upstream hold (the sink's last known state)
  when the VM's chain of pending writes started — the writes of one chain
  share its base, since none of them reached upstream yet;
- values xguard sent upstream whose outcome it did not learn (a Direct
  write past its deadline, a delivery that timed out): upstream may hold
  any of them. A file written while such a send is in flight records it;
  a file written before it holds the sent value itself, which the check
  accepts as ours. They are recorded (:class:`SentRecords`) before they
  are sent, so that a daemon killed before the answer still counts them
  as its own when it starts again: a Direct write upstream took just
  before the kill is not another writer's.

Once a delivery succeeds and nothing is pending (nor any delivered file
left to delete), upstream holds a state xguard knows (the sink recorded
it): the sent values are forgotten, and the next chain starts from that
state. A delivery is checked against the union of what its files
recorded and what is in flight now; whatever else upstream holds was
written by someone else.

When xguard never saw the VM's state (its last known state was not kept),
a write's base is unknown. Such a write can only be delivered while no
other host can have written since: while its VM has run here without a
break since the write. A VM's *life* here ends when it loses its last
socket (or its socket does not come back after a restart); the time of
that end (``CLOCK_MONOTONIC``, the clock versions are stamped with) is
kept per VM, and a version stamped before it belongs to a life that
ended. While such a version is pending the time is recorded as well
(:class:`LineageRecords`), so that a daemon killed after the VM started
here again does not take the new life for the old one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger

from ..model import Accept, NvramWrite, Service, digest

__all__ = ["Lineage", "LineageRecords", "union", "upstream_value"]


class LineageRecords(Protocol):
    """What a service's lineage keeps across a kill
    (:class:`xguard.state.known.ServiceRecords`): the values in flight, and
    when a VM's last life here ended."""

    def load(self, vm: str) -> Mapping[int, Iterable[str]]: ...

    def save(self, vm: str, sent: Mapping[int, Iterable[str]]) -> object: ...

    def ended(self, vm: str) -> int | None: ...

    def save_ended(self, vm: str, at: int) -> bool: ...


def union(accepts: Iterable[Accept | None]) -> Accept | None:
    """The union of several bases; unknown if any is unknown."""
    out: dict[int, set[str]] = {}
    for accept in accepts:
        if accept is None:
            return None
        for key, digests in accept.items():
            out.setdefault(key, set()).update(digests)
    return {key: frozenset(digests) for key, digests in out.items()}


def upstream_value(service: Service, content: bytes) -> bytes:
    """What upstream holds once ``content`` (as cached) is delivered: a
    vTPM key's content itself; an NVRAM write's EFI variables (its
    ``update`` flag is not a value upstream keeps)."""
    if service is Service.VARSTORED:
        return NvramWrite.decode(content).value.encode("utf-8")
    return content


class Lineage:
    """The bases of one service's cached writes.

    :param last_seen: the digests, per key, of the VM's state as upstream
        last showed it (the sink's last known state; None: never seen).
    :param monotonic_ns: the clock versions are stamped with.
    """

    log = Logger()

    def __init__(self, service: Service,
                 last_seen: Callable[[str], "Deferred[Mapping[int, str] | None]"],
                 records: LineageRecords | None = None, *,
                 monotonic_ns: Callable[[], int]) -> None:
        self.service = service
        self._last_seen = last_seen
        self._records = records
        self._monotonic_ns = monotonic_ns
        self._sent: dict[str, dict[int, set[str]]] = {}
        #: Per VM, when its last life here ended (-1: not that this
        #: process knows of); filled lazily from the records.
        self._ended: dict[str, int] = {}
        #: VMs whose end is not recorded (no version of the ended life was
        #: pending then).
        self._unrecorded: set[str] = set()

    def _sent_of(self, vm: str) -> dict[int, set[str]]:
        """``vm``'s values in flight; on first use, what an earlier process
        recorded and never saw answered."""
        sent = self._sent.get(vm)
        if sent is None:
            earlier = self._records.load(vm) if self._records is not None else {}
            sent = self._sent[vm] = {key: set(d) for key, d in earlier.items() if d}
        return sent

    def _ended_at(self, vm: str) -> int:
        at = self._ended.get(vm)
        if at is None:
            recorded = self._records.ended(vm) if self._records is not None else None
            # A time later than now is another boot's clock: that boot's
            # end ended every life (no socket survives a reboot).
            if recorded is None or recorded > self._monotonic_ns():
                recorded = -1
            at = self._ended[vm] = recorded
        return at

    def vm_gone(self, vm: str, *, pending: bool) -> None:
        """``vm``'s life here ended (its last socket was destroyed, or did
        not come back after a restart); ``pending``: versions of it are
        pending or on their way to disk, so the end is recorded now."""
        self._ended[vm] = self._monotonic_ns()
        self._unrecorded.add(vm)
        if pending:
            self._record_end(vm)

    def continuous(self, vm: str, ts: int) -> bool:
        """Whether a version of ``vm`` stamped ``ts`` was written in the
        VM's current life here (if it has one: the caller asks
        whether it is live)."""
        return ts > self._ended_at(vm)

    def written(self, vm: str, ts: int) -> None:
        """A version of ``vm`` stamped ``ts`` is durable. Written after its
        life ended (a Direct write cached past its deadline after the VM
        stopped), it needs that end recorded too."""
        if vm in self._unrecorded and not self.continuous(vm, ts):
            self._record_end(vm)

    def _record_end(self, vm: str) -> None:
        self._unrecorded.discard(vm)
        if self._records is not None and not self._records.save_ended(vm, self._ended[vm]):
            self.log.error("{service}: cannot record that VM {vm} stopped; if xguard is "
                           "killed before its pending writes are delivered, a write whose "
                           "base is unknown may be delivered over another host's state",
                           service=self.service.value, vm=vm)

    def sending(self, vm: str, contents: Mapping[int, bytes]) -> None:
        """``contents`` is about to be sent upstream for ``vm``: until a
        delivery is confirmed, upstream may hold it."""
        sent = self._sent_of(vm)
        for key, content in contents.items():
            try:
                value = upstream_value(self.service, content)
            except ValueError:
                continue  # not deliverable at all: upstream cannot hold it
            sent.setdefault(key, set()).add(digest(value))
        if self._records is not None:
            self._records.save(vm, sent)  # before the call goes out

    def settled(self, vm: str) -> None:
        """A delivery of ``vm`` succeeded and nothing of it is pending,
        not even a delivered file waiting for its deletion
        (:meth:`~xguard.cache.pending.PendingVersions.settles`): upstream
        holds the state the sink just recorded."""
        if self._sent.pop(vm, None) and self._records is not None:
            self._records.save(vm, {})

    def in_flight(self, vm: str) -> Accept:
        """Values sent for ``vm`` whose outcome is unknown."""
        return {key: frozenset(digests) for key, digests in self._sent_of(vm).items()}

    def base_for(self, vm: str, pending: list[Accept | None]) -> "Deferred[Accept | None]":
        """The base a new write of ``vm`` records: its chain's (the bases
        of the writes still ``pending``), or the last state seen upstream
        when it starts a chain; with what is in flight."""
        async def run() -> Accept | None:
            if pending:
                base = union(pending)
            else:
                seen = await self._last_seen(vm)
                base = None if seen is None else {k: frozenset({d}) for k, d in seen.items()}
            return union([base, self.in_flight(vm)])
        return ensureDeferred(run())

    def for_delivery(self, vm: str, recorded: list[Accept | None]) -> Accept | None:
        """What a delivery of files with these ``recorded`` bases may
        overwrite (None: unknown)."""
        return union([*recorded, self.in_flight(vm)])
