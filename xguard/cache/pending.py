# -*- test-case-name: tests.unit.test_cache -*-
"""The versions a service's cache holds: on disk, and indexed in memory.

A write is a :class:`~xguard.cache.layout.Batch`: one item for a domain
write, the vTPM's three keys for the orchestrator's VtpmSetContents. Its
versions are stamped together, so a batch is newer than everything
acknowledged before it, and older versions are deleted only once the whole
batch is durable. Each version's file records the base of the write
(:mod:`xguard.cache.lineage`) and is checked: a file that fails its check is
moved aside (:mod:`xguard.cache.aside`) and never delivered or served.

The index (versions per item) is kept in step with the files: it answers
reads and emptiness checks without listing directories. Every file
operation goes through the injected runner (a thread pool in production,
inline in tests).
"""

from __future__ import annotations

import collections
import errno
import os
from collections.abc import Callable, Iterable

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..errors import CacheUnavailable
from ..model import Accept, Service, digest
from ..util.threads import Runner, run_acknowledging
from . import recovery
from .aside import SetAsideStore
from .entry import Damaged, Entry, decode
from .files import BatchWriteError, VersionFiles
from .layout import KEYS, Batch, Item, Version, item_order, service_dir, version_order
from .lineage import Lineage, union, upstream_value

__all__ = ["PendingVersions"]


class PendingVersions:
    """Acknowledged versions of one service's items not yet delivered."""

    log = Logger()

    def __init__(self, root: str, service: Service, *, clock: IReactorTime, runner: Runner,
                 monotonic_ns: Callable[[], int], lineage: Lineage,
                 aside: SetAsideStore,
                 make_room: Callable[[int], "Deferred[int]"] | None = None) -> None:
        self.root = root
        self.service = service
        self._keys = tuple(sorted(KEYS[service]))  # each item's keys, in order
        self.clock = clock
        self.runner = runner
        self.monotonic_ns = monotonic_ns
        self.lineage = lineage
        self.aside = aside
        #: Frees disk space held by what is only a cache (the last known
        #: state) when a write does not fit; the bytes freed.
        self.make_room = make_room
        self.files = VersionFiles(root, service)
        self.index: dict[Item, list[int]] = {}
        self.sizes: dict[Version, int] = {}
        #: The base of each version's chain (None: unknown): what its file
        #: records, without the values of the chain (accepts_of); for a
        #: version found at start-up, all its file records.
        self.accepts: dict[Version, Accept | None] = {}
        #: What upstream holds once each version is delivered (its digest).
        self.values: dict[Version, str] = {}
        #: Versions found at start-up: written before this process started.
        self.recovered: set[Version] = set()
        #: Why the disk refuses writes, and since when (None: it takes them).
        self.disk_error: str | None = None
        self.disk_error_since: float | None = None
        self._last_ts: dict[Item, int] = {}
        #: Writes on their way to disk, per VM (see _persist).
        self._persisting: dict[str, int] = {}
        self._newest: dict[Item, int] = {}  # newest version acknowledged or durable
        #: Delivered this round, files to delete: with their size, chain
        #: base and value, pending again if the deletion fails.
        self._done: dict[Version, tuple[int, Accept | None, str | None]] = {}
        #: Per VM, delivered versions whose files are not durably gone yet.
        self._undeleted: collections.Counter[str] = collections.Counter()

    # -- start / stop ----------------------------------------------------------
    def recover(self) -> "Deferred[list[Version]]":
        """Start-up recovery (before anything listens): the versions pending."""
        return ensureDeferred(self._recover())

    async def _recover(self) -> list[Version]:
        base = service_dir(self.root, self.service)
        listing = await self.runner(recovery.scan, base)
        damaged, valid = await self.runner(recovery.check, base, listing, _read_entry)
        actions = recovery.plan(self.service, listing, self.monotonic_ns(), damaged)
        unacknowledged = 0
        for a in actions:
            if isinstance(a, recovery.Delete):
                if a.reason == recovery.NEVER_ACKNOWLEDGED:
                    unacknowledged += 1
                else:
                    self.log.info("cache recovery: deleting {path} ({reason})",
                                  path=os.path.join(base, *a.path), reason=a.reason)
            elif isinstance(a, recovery.Move):
                self.log.info("cache recovery: retiming {path} to {ts}",
                              path=os.path.join(base, *a.src), ts=a.version.ts)
        moved: list[tuple[recovery.SetAside, str]] = []

        def set_aside(action: recovery.SetAside) -> None:
            moved.append((action, self.files.quarantine(action.version,
                                                        f"damaged: {action.reason}")))

        await self.runner(recovery.apply, base, actions, set_aside)
        for action, path in moved:
            self._report_damaged(action.version, path, action.reason)
        if unacknowledged:
            self.log.info("{service} cache: removed {n} temporary files of writes that were "
                          "never acknowledged (the daemon stopped mid-write)",
                          service=self.service.value, n=unacknowledged)
        entries: dict[Version, Entry] = {}
        for a in actions:
            if isinstance(a, (recovery.Keep, recovery.Move)):
                entries[a.version] = valid[a.path if isinstance(a, recovery.Keep) else a.src]
        versions = sorted(entries, key=version_order)
        sizes = await self.runner(self.files.sizes, versions)
        for v in versions:
            self._record(v, sizes[v], entries[v].accept)
            self._value(v, entries[v].content)
        self.recovered = set(versions)
        legacy = {v.item.vm for v in versions if entries[v].legacy}
        if legacy:
            self.log.info("{service} cache: {n} VMs' pending writes were made by the upstream "
                          "daemon or an earlier xguard, which did not record their base: they "
                          "are delivered without checking for other writers", n=len(legacy),
                          service=self.service.value)
        unknown = {v.item.vm for v in versions if entries[v].accept is None} - legacy
        if unknown:
            self.log.info("{service} cache: {n} VMs' pending writes were made before xguard saw "
                          "their VM's state, so their base is unknown: each is delivered only if "
                          "its VM has run here without a break since, else set aside",
                          n=len(unknown), service=self.service.value)
        return versions

    # -- queries ---------------------------------------------------------------
    def items(self) -> list[Item]:
        """Every item with a pending version."""
        return sorted(self.index, key=item_order)

    def _items_of(self, vm: str) -> list[Item]:
        """``vm``'s items with a pending version: looked up by its keys (at
        most three), never by a scan of every VM's (a storm caches
        thousands, and each write asks)."""
        return [item for item in (Item(vm, key) for key in self._keys)
                if item in self.index]

    def has_pending(self, vm: str) -> bool:
        """Whether ``vm`` has a version pending, or one being written."""
        return bool(self._items_of(vm)) or vm in self._persisting

    def holds(self, vm: str) -> bool:
        """Whether anything of ``vm`` is on disk or on its way: a version
        pending or being written, or a delivered (or set aside) one whose
        file is not durably gone yet — a crash brings it back."""
        return self.has_pending(vm) or bool(self._undeleted[vm])

    def settles(self, vm: str) -> bool:
        """Whether what was sent upstream for ``vm`` may be forgotten
        (:meth:`Lineage.settled`): nothing of it is pending or being
        written, and no delivered version's file is still on disk. A kill
        before a round's deletions are done brings such files back, with
        the base of their chain, which predates what was delivered with
        them: only what was sent says that upstream's state is ours."""
        return not self.holds(vm)

    def vms(self) -> set[str]:
        return {item.vm for item in self.index}

    def __bool__(self) -> bool:
        return bool(self.index)

    def per_vm(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for item in self.index:
            counts[item.vm] = counts.get(item.vm, 0) + 1
        return counts

    def oldest_stamp(self) -> int | None:
        return min((versions[0] for versions in self.index.values()), default=None)

    def total_bytes(self) -> int:
        return sum(self.sizes.values())

    # -- writing -----------------------------------------------------------------
    def stamp(self, vm: str, changes: Iterable[tuple[int, bytes]]) -> Batch:
        """A batch of new versions, stamped strictly increasing per item and
        later than anything recovered."""
        entries = []
        for key, content in sorted(changes):
            item = Item(vm, key)
            ts = max(self.monotonic_ns(), self._last_ts.get(item, 0) + 1)
            self._last_ts[item] = ts
            entries.append((Version(item, ts), content))
        return Batch(vm, tuple(entries))

    def persist(self, batch: Batch) -> "Deferred[None]":
        """Make ``batch`` durable, with the base it records, then delete the
        older versions. A disk that refuses it fails the write with
        CacheUnavailable (nothing acknowledged) and leaves no part of it
        behind. Called under the service lock (bases are computed in
        order)."""
        return ensureDeferred(self._persist(batch))

    async def _persist(self, batch: Batch) -> None:
        # Pending from now on (has_pending): a delivery of this VM that
        # succeeds while this write is on its way to disk must not forget
        # what it sent (Lineage.settled), or this write, whose base was
        # taken before that send, would take our own delivery for another
        # writer's once upstream holds it.
        self._persisting[batch.vm] = self._persisting.get(batch.vm, 0) + 1
        try:
            await self._persist_counted(batch)
        finally:
            left = self._persisting.pop(batch.vm) - 1
            if left:
                self._persisting[batch.vm] = left

    async def _persist_counted(self, batch: Batch) -> None:
        chain = await self.lineage.base_for(batch.vm, self.accepts_of(batch.vm))
        # Computed once per write (an NVRAM record is decoded for it).
        holds = {version: value for version, content in batch.entries
                 if (value := self._holds(content)) is not None}
        # A batch is one write, delivered whole: each of its files accepts
        # upstream holding any of its values (a crash during the deletions
        # of the round that delivered it may leave only one of them).
        accept = union([chain, *self.values_of(batch.vm),
                        {version.item.key: frozenset({value}) for version, value in holds.items()}])
        todo = [(version, Entry(content, accept)) for version, content in batch.entries
                # a newer version already acknowledged supersedes it
                if self._newest.get(version.item, -1) <= version.ts]
        older = sorted({Version(version.item, ts) for version, _ in todo
                        for ts in self.index.get(version.item, ()) if ts < version.ts},
                       key=version_order)
        written: list[Version] = []
        try:
            await self._write_all(todo, older, written)
        except OSError as e:
            await self._refused_by_disk(written, e, chain)
            raise CacheUnavailable(e.strerror or str(e)) from e
        if self.disk_error is not None:
            self.log.info("{service} cache: the disk takes writes again",
                          service=self.service.value)
            self.disk_error = self.disk_error_since = None
        for version, entry in todo:
            # The chain's base, not its values: they are those still pending
            # when the next write comes (a chain of thousands of rewrites of
            # one key would otherwise record them all).
            self._record(version, len(entry.content), chain)
            if version in holds:
                self.values[version] = holds[version]
        if todo:
            self.lineage.written(batch.vm, min(version.ts for version, _ in todo))
        for version in older:
            self._unindex(version)

    def accepts_of(self, vm: str) -> list[Accept | None]:
        """The chain bases of ``vm``'s pending versions."""
        return [self.accepts.get(Version(item, ts)) for item in self._items_of(vm)
                for ts in self.index[item]]

    def values_of(self, vm: str) -> list[Accept]:
        """The values of ``vm``'s pending versions: one may have been
        delivered already (a crash during the deletions of its round brings
        its file back, and after a host crash no record says what was
        sent), so a write after it accepts upstream holding it — a value of
        its own chain, not another writer's."""
        return [{item.key: frozenset({self.values[Version(item, ts)]})}
                for item in self._items_of(vm) for ts in self.index[item]
                if Version(item, ts) in self.values]

    def _value(self, version: Version, content: bytes) -> None:
        value = self._holds(content)
        if value is not None:
            self.values[version] = value

    def _holds(self, content: bytes) -> str | None:
        """The digest of what upstream holds once ``content`` is delivered
        (None: never deliverable, upstream cannot hold it)."""
        try:
            return digest(upstream_value(self.service, content))
        except ValueError:
            return None

    async def _write_all(self, todo: list[tuple[Version, Entry]], older: list[Version],
                         written: list[Version]) -> None:
        """One trip to the I/O threads: every version made durable, then
        the versions they supersede unlinked (:meth:`VersionFiles.write_all`),
        answered as soon as the versions are durable.
        On a full disk, make room by dropping what is only a cache, and go
        on while that freed something. ``written`` collects what is on
        disk (the part of a refused batch to remove)."""
        while True:
            try:
                await run_acknowledging(self.runner, self.files.write_all,
                                        todo[len(written):], older)
                written[:] = [version for version, _ in todo]
                return
            except BatchWriteError as e:
                written.extend(version for version, _ in todo[len(written):][:e.written])
                size = len(todo[len(written)][1].content)
                if (e.error.errno not in (errno.ENOSPC, errno.EDQUOT) or self.make_room is None
                        or not await self.make_room(size + 8192)):  # the file, its metadata
                    raise e.error from None

    async def _refused_by_disk(self, written: list[Version], error: OSError,
                               chain: Accept | None) -> None:
        """One log line per episode; the part of the batch already written
        goes (it was never acknowledged); a file that cannot go stays
        pending, with its chain's base."""
        if self.disk_error is None:
            self.disk_error_since = self.clock.seconds()
            self.log.error("{service} cache: cannot write to {root}: {error}; VM writes fail "
                           "(and are retried by the clients) until it recovers",
                           service=self.service.value, root=self.root,
                           error=error.strerror or str(error))
        self.disk_error = error.strerror or str(error)
        for version in written:
            try:
                await self.runner(self.files.delete, version)
            except OSError:
                self._record(version, 0, chain)  # still on disk: it will be delivered

    def superseded_by(self, versions: Iterable[Version]) -> "Deferred[None]":
        """``versions`` reached upstream directly: older files of their
        items must never be delivered (deleted before the write is
        acknowledged)."""
        async def run() -> None:
            for version in versions:
                item = version.item
                self._newest[item] = max(self._newest.get(item, -1), version.ts)
                for ts in [t for t in self.index.get(item, []) if t < version.ts]:
                    await self.runner(self.files.delete, Version(item, ts))
                    self._unindex(Version(item, ts))
        return ensureDeferred(run())

    # -- reading -----------------------------------------------------------------
    def latest(self, item: Item) -> "Deferred[tuple[Version, Entry] | None]":
        """The latest pending version of ``item`` and its entry."""
        return ensureDeferred(self._read_latest(item))

    async def _read_latest(self, item: Item) -> tuple[Version, Entry] | None:
        """A file deleted under our feet (delivered meanwhile) is dropped
        from the index and the next latest is read; a damaged one is moved
        aside, and the next latest is read."""
        while True:
            versions = self.index.get(item)
            if not versions:
                return None
            version = Version(item, versions[-1])
            raw = await self.runner(self.files.read, version)
            if raw is not None:
                try:
                    return version, decode(raw)
                except Damaged as e:
                    await self._damaged(version, str(e))
                    continue
            if self.index.get(item, [])[-1:] == [version.ts]:
                self._unindex(version)  # vanished from disk

    async def snapshot(self, vm: str, keys: Iterable[int]) -> dict[int, tuple[Version, Entry]]:
        """The latest version of each of ``keys`` with its entry, read in
        one go (one trip to the I/O threads, not one per key)."""
        latest = {key: Version(Item(vm, key), self.index[Item(vm, key)][-1])
                  for key in sorted(keys) if self.index.get(Item(vm, key))}
        contents = await self.runner(self.files.read_many, list(latest.values()))
        out: dict[int, tuple[Version, Entry]] = {}
        for key, version in latest.items():
            raw = contents.get(version)
            entry = None
            if raw is not None:
                try:
                    entry = decode(raw)
                except Damaged as e:
                    await self._damaged(version, str(e))
            if entry is None:  # deleted meanwhile (superseded), or damaged: the slow way
                found = await self._read_latest(version.item)
                if found is None:
                    continue
                out[key] = found
            else:
                out[key] = (version, entry)
        return out

    async def _damaged(self, version: Version, reason: str) -> None:
        """A file failed its check: never delivered or served; moved aside."""
        path = await self.runner(self.files.quarantine, version, f"damaged: {reason}")
        self._unindex(version)
        self._report_damaged(version, path, reason)

    def _report_damaged(self, version: Version, path: str, reason: str) -> None:
        self.aside.moved(version.item.vm, version.item.key, path, f"damaged: {reason}")
        self.log.error("{service}: the cached write of VM {vm} key {key} is damaged ({reason}); "
                       "it is never delivered, and is set aside as {file}",
                       service=self.service.value, vm=version.item.vm, key=version.item.key,
                       reason=reason, file=path)

    def scan(self) -> "Deferred[list[Item]]":
        """The directory scan of Disengaged mode; the disk is authoritative."""
        def found(on_disk: dict[Item, list[int]]) -> list[Item]:
            for item, stamps in on_disk.items():
                for ts in stamps:
                    if ts not in self.index.get(item, []):
                        self._record(Version(item, ts), 0)
            return sorted(on_disk, key=item_order)
        return self.runner(self.files.scan).addCallback(found)

    # -- delivered ---------------------------------------------------------------
    async def delivered(self, version: Version) -> None:
        """Upstream confirmed ``version``: it and older versions of its item
        are no longer pending; their files go in :meth:`round_done`."""
        item = version.item
        self._newest[item] = max(self._newest.get(item, -1), version.ts)
        for ts in [t for t in self.index.get(item, []) if t <= version.ts]:
            done = Version(item, ts)
            self._done[done] = (self.sizes.get(done, 0), self.accepts.get(done),
                                self.values.get(done))
            self._undeleted[item.vm] += 1
            self._unindex(done)

    def round_done(self) -> "Deferred[None]":
        """The flusher's round ended: delete what it delivered, durably, in
        one go. Awaited before the next round and before the mode changes,
        so no newer version of these items reaches upstream before their
        deletion is durable (else a crash could bring an old file back)."""
        # Each VM's oldest first: a crash in the middle leaves the newest,
        # whose base holds the values of the older ones (values_of), so a
        # write built on what is left takes none of them for another writer's.
        kept, self._done = self._done, {}
        done = sorted(kept, key=_oldest_first)
        if not done:
            return succeed(None)

        def failed(failure: Failure) -> Failure:
            # Files that may still be there are pending again, with the base
            # they record (not an unknown one): delivered again (the same
            # content upstream has) or superseded by a newer version, and
            # deleted in a later round.
            for version in done:
                size, accept, value = kept[version]
                self._record(version, size, accept)
                if value is not None:
                    self.values[version] = value
            return failure

        def counted(result: object) -> object:
            self._undeleted -= collections.Counter(v.item.vm for v in done)
            return result

        d = self.runner(self.files.delete_many, done).addErrback(failed)
        return d.addBoth(counted)

    # -- the index ---------------------------------------------------------------
    def _record(self, version: Version, size: int, accept: Accept | None = None) -> None:
        item = version.item
        self.sizes[version] = size
        self.accepts[version] = accept
        versions = self.index.setdefault(item, [])
        if version.ts not in versions:
            versions.append(version.ts)
            versions.sort()
        self._newest[item] = max(self._newest.get(item, -1), version.ts)
        self._last_ts[item] = max(self._last_ts.get(item, 0), version.ts)

    def _unindex(self, version: Version) -> None:
        self.sizes.pop(version, None)
        self.accepts.pop(version, None)
        self.values.pop(version, None)
        self.recovered.discard(version)
        versions = self.index.get(version.item)
        if versions is not None and version.ts in versions:
            versions.remove(version.ts)
            if not versions:
                del self.index[version.item]


def _oldest_first(version: Version) -> tuple[str, int, int]:
    return version.item.vm, version.ts, version.item.key


def _read_entry(path: str) -> Entry:
    with open(path, "rb") as f:
        return decode(f.read())
