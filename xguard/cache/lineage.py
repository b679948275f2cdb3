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
break since the write. Each VM's *life* here counts the times it lost its
last socket; a version records the life it was written in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from twisted.internet.defer import Deferred, ensureDeferred

from ..model import Accept, NvramWrite, Service, digest

__all__ = ["Lineage", "SentRecords", "union", "upstream_value"]


class SentRecords(Protocol):
    """Where a service's values in flight are kept across a kill
    (:meth:`xguard.state.known.KnownState.sent` and ``record_sent``)."""

    def load(self, vm: str) -> Mapping[int, Iterable[str]]: ...

    def save(self, vm: str, sent: Mapping[int, Iterable[str]]) -> object: ...


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
    """

    def __init__(self, service: Service,
                 last_seen: Callable[[str], "Deferred[Mapping[int, str] | None]"],
                 records: SentRecords | None = None) -> None:
        self.service = service
        self._last_seen = last_seen
        self._records = records
        self._sent: dict[str, dict[int, set[str]]] = {}
        self._lives: dict[str, int] = {}

    def _sent_of(self, vm: str) -> dict[int, set[str]]:
        """``vm``'s values in flight; on first use, what an earlier process
        recorded and never saw answered."""
        sent = self._sent.get(vm)
        if sent is None:
            earlier = self._records.load(vm) if self._records is not None else {}
            sent = self._sent[vm] = {key: set(d) for key, d in earlier.items() if d}
        return sent

    def life(self, vm: str) -> int:
        """How many times ``vm`` lost its last socket here since the start."""
        return self._lives.get(vm, 0)

    def vm_gone(self, vm: str) -> None:
        """``vm``'s last socket was destroyed: a new life starts."""
        self._lives[vm] = self.life(vm) + 1

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
