# -*- test-case-name: tests.unit.test_cache -*-
"""The durable write-back cache of one service: the :class:`IItemWriter`
domain sockets and the orchestrator write through.

A write is acknowledged only once it is durable: upstream took it (Direct)
or it is on disk (``.pre``, fsync, rename, directory fsync). Which of the two
is the machine's decision (:mod:`xguard.cache.machine`); this module holds
what the machine acts on:

- ``lock``: the service lock. Every machine input runs under it, and so does
  every disk write decided by the machine; no upstream call runs under it.
- ``vm_locks``: one delivery lock per VM. Every upstream delivery this cache
  makes (Direct attempt, flusher) holds it until upstream answers, so an
  abandoned Direct attempt still blocks newer deliveries of its VM and a late
  answer can never overwrite a newer version. (VtpmSink also takes the vTPM's
  RMW lock, shared with the control channel.)
- ``index``: the versions on disk per item, kept in step with the files; it
  answers reads and emptiness checks without listing directories.

A write is a :class:`~xguard.cache.layout.Batch`: one item for a domain
write, the vTPM's three keys for the orchestrator's VtpmSetContents. Its
versions are stamped together, so a batch is newer than everything
acknowledged before it, and older versions are deleted only once the whole
batch is durable.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import Any

from twisted.internet.defer import (
    Deferred,
    DeferredLock,
    DeferredQueue,
    ensureDeferred,
    gatherResults,
    maybeDeferred,
    succeed,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..errors import CacheUnavailable, TransientUpstreamError
from ..interfaces import IItemSink, IItemWriter, IStatusSource
from ..status import CacheStatus, Quarantined
from ..util.locks import KeyedLocks
from ..util.threads import Runner
from . import recovery
from .files import VersionFiles
from .flusher import Flusher, default_backoff
from .layout import Batch, Item, Version, service_dir
from .machine import _CacheCore, _CacheInputs, build_machine

__all__ = ["WriteBackCache"]


class _Attempt:
    """A Direct write in flight; abandoned once its deadline passed or it
    failed transiently (then it is on disk)."""

    def __init__(self, batch: Batch, done: "Deferred[None]") -> None:
        self.batch = batch
        self.done = done
        self.abandoned = False
        self.timer: IDelayedCall | None = None
        self.fallback: Deferred[None] | None = None


@implementer(IItemWriter, IStatusSource)
class WriteBackCache:
    log = Logger()

    def __init__(self, sink: IItemSink, root: str, *, clock: IReactorTime, runner: Runner,
                 monotonic_ns: Callable[[], int], queue_size: int = 512,
                 direct_deadline: float = 3.0, max_concurrency: int = 8,
                 backoff: Callable[[int], float] | None = None,
                 enabled: Callable[[], bool] = lambda: True, interval: float = 0.5,
                 coalesce: bool = True) -> None:
        self.sink = sink
        self.service = sink.service
        self.root = root
        self.clock = clock
        self.runner = runner
        self.monotonic_ns = monotonic_ns
        self.direct_deadline = direct_deadline
        self.enabled = enabled
        self.files = VersionFiles(root, self.service)
        self.lock = DeferredLock()
        self.vm_locks = KeyedLocks()
        self.queue: DeferredQueue[Version] = DeferredQueue(size=queue_size)
        self.index: dict[Item, list[int]] = {}
        self.sizes: dict[Version, int] = {}
        self.quarantined: list[Quarantined] = []
        #: Why the disk refuses writes, and since when (None: it takes them).
        self.disk_error: str | None = None
        self.disk_error_since: float | None = None
        #: Direct writes upstream did not answer in time (made durable here).
        self.deadline_fallbacks = 0
        self._last_ts: dict[Item, int] = {}
        self._newest: dict[Item, int] = {}  # newest version acknowledged or durable
        self._attempts: set[_Attempt] = set()
        self._done: list[Version] = []  # delivered this round, files to delete
        self._cleanups: set[Deferred[None]] = set()
        self.flusher = Flusher(self, clock, interval=interval,
                               backoff=backoff or default_backoff(),
                               max_concurrency=max_concurrency, coalesce=coalesce)
        self.machine: _CacheInputs = build_machine(
            _CacheCore(self.service.value, self.queue, self, self.log))

    # -- start / stop ------------------------------------------------------
    def recover(self) -> "Deferred[None]":
        """Start-up recovery (before anything listens), then the first mode."""
        return ensureDeferred(self._recover())

    async def _recover(self) -> None:
        base = service_dir(self.root, self.service)
        listing = await self.runner(recovery.scan, base)
        actions = recovery.plan(self.service, listing, self.monotonic_ns())
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
        await self.runner(recovery.apply, base, actions)
        if unacknowledged:
            self.log.info("{service} cache: removed {n} temporary files of writes that were "
                          "never acknowledged (the daemon stopped mid-write)",
                          service=self.service.value, n=unacknowledged)
        versions = recovery.kept_versions(actions)
        sizes = await self.runner(self.files.sizes, versions)
        for v in versions:
            self._record(v, sizes[v])
        self.quarantined = await self.runner(self.files.quarantined)
        if versions:
            self.log.info("{service} cache: {n} pending items recovered",
                          service=self.service.value, n=len(versions))
            self.machine.start_pending(versions)
        else:
            self.machine.start_empty()

    def start(self) -> None:
        """Let the flusher run (it polls only while something is pending)."""
        self.flusher.resume()
        if self.machine.mode() != "Direct":
            self.flusher.wake()

    def stop(self) -> "Deferred[None]":
        """Stop flushing; Direct writes in flight are persisted now (and
        acknowledged), so shutdown never waits for upstream."""
        self.flusher.stop()
        pending = [self._give_up(a, "shutting down") for a in list(self._attempts)]
        pending.extend(self._cleanups)
        return gatherResults([d for d in pending if d is not None],
                             consumeErrors=True).addCallback(lambda _: None)

    def upstream_answers(self) -> None:
        """Upstream is back: deliveries waiting out a backoff go now."""
        self.flusher.upstream_answers()

    # -- IItemWriter -------------------------------------------------------
    def write(self, vm_uuid: str, key: int, content: bytes) -> "Deferred[None]":
        return self.write_many(vm_uuid, {key: content})

    def write_many(self, vm_uuid: str, changes: Mapping[int, bytes]) -> "Deferred[None]":
        """Write several items of one VM as one batch (all or none
        acknowledged), newer than every write acknowledged before."""
        batch = Batch(vm_uuid, tuple((self._stamp(Item(vm_uuid, key)), content)
                                     for key, content in sorted(changes.items())))
        if not self.enabled():
            return self.vm_locks.run(vm_uuid, lambda: self._write_through(batch))
        done: Deferred[None] = Deferred()

        def failed(f: Failure) -> None:
            if not done.called:
                done.errback(f)

        self.lock.run(self.machine.write, batch, done).addErrback(failed)
        return done

    def pending(self, vm_uuid: str, key: int) -> "Deferred[bytes | None]":
        async def latest() -> bytes | None:
            found = await self._read_latest(Item(vm_uuid, key))
            return None if found is None else found[1]
        return ensureDeferred(latest())

    def has_pending(self, vm_uuid: str) -> bool:
        return any(item.vm == vm_uuid for item in self.index)

    def pending_vms(self) -> set[str]:
        return {item.vm for item in self.index}

    def _stamp(self, item: Item) -> Version:
        """Strictly increasing per item, and later than anything recovered."""
        ts = max(self.monotonic_ns(), self._last_ts.get(item, 0) + 1)
        self._last_ts[item] = ts
        return Version(item, ts)

    # -- what the machine acts on (_CacheOps) --------------------------------
    def attempt_direct(self, batch: Batch, done: "Deferred[None]") -> None:
        attempt = _Attempt(batch, done)
        self._attempts.add(attempt)
        attempt.timer = self.clock.callLater(self.direct_deadline, self._deadline_passed,
                                             attempt)
        self.vm_locks.run(batch.vm, lambda: self._run_attempt(attempt))

    async def _run_attempt(self, attempt: _Attempt) -> None:
        if attempt.abandoned:
            return  # its deadline passed while waiting: it is on disk already
        batch = attempt.batch
        try:
            await maybeDeferred(self.sink.deliver, batch.vm, batch.contents())
        except TransientUpstreamError as e:
            fallback = self._give_up(attempt, str(e))
            if fallback is not None:
                try:
                    await fallback  # on disk before this VM's next delivery starts
                except Exception:
                    pass  # the client was told (CacheUnavailable)
            return
        except Exception as e:
            if not attempt.abandoned:
                self._finish(attempt)
                attempt.done.errback(e)
            else:
                self.log.info("late failure of an abandoned write of VM {vm}: {error}",
                              vm=batch.vm, error=str(e))
            return
        if not attempt.abandoned:
            self._finish(attempt)
            await self._superseded_by(batch.versions)
            attempt.done.callback(None)

    def _finish(self, attempt: _Attempt) -> None:
        attempt.abandoned = True
        self._attempts.discard(attempt)
        if attempt.timer is not None and attempt.timer.active():
            attempt.timer.cancel()

    def _deadline_passed(self, attempt: _Attempt) -> None:
        if not attempt.abandoned:
            self.deadline_fallbacks += 1
        self._give_up(attempt, "no answer within the deadline")

    def _give_up(self, attempt: _Attempt, reason: str) -> "Deferred[None] | None":
        """Treat the attempt as a transient failure: durable on disk, queued,
        Engaged, acknowledged. The upstream call is not cancelled."""
        if attempt.abandoned:
            return attempt.fallback
        self._finish(attempt)
        self.log.debug("write of VM {vm} goes to disk: {reason}",
                       vm=attempt.batch.vm, reason=reason)
        d = self.lock.run(self._engage, attempt.batch)
        d.addCallbacks(lambda _: attempt.done.callback(None), attempt.done.errback)
        attempt.fallback = d
        return d

    async def _engage(self, batch: Batch) -> None:
        await self.persist(batch)
        self.machine.push_failed_transient(batch)

    def _write_through(self, batch: Batch) -> "Deferred[None]":
        """Cache disabled: upstream or an error, like DirectWriter."""
        async def run() -> None:
            await maybeDeferred(self.sink.deliver, batch.vm, batch.contents())
            await self._superseded_by(batch.versions)
        return ensureDeferred(run())

    def persist(self, batch: Batch) -> "Deferred[None]":
        """Make ``batch`` durable, then delete the older versions. A disk
        that refuses it fails the write with CacheUnavailable (nothing
        acknowledged) and leaves no part of it behind."""
        return ensureDeferred(self._persist(batch))

    async def _persist(self, batch: Batch) -> None:
        written: list[Version] = []
        try:
            for version, content in batch.entries:
                if self._newest.get(version.item, -1) > version.ts:
                    continue  # a newer version is already acknowledged: superseded
                await self.runner(self.files.write, version, content)
                written.append(version)
        except OSError as e:
            await self._refused_by_disk(written, e)
            raise CacheUnavailable(e.strerror or str(e)) from e
        if self.disk_error is not None:
            self.log.info("{service} cache: the disk takes writes again",
                          service=self.service.value)
            self.disk_error = self.disk_error_since = None
        sizes = {version: len(content) for version, content in batch.entries}
        older = []
        for version in written:
            self._record(version, sizes[version])
            older += [Version(version.item, t) for t in self.index[version.item]
                      if t < version.ts]
        if older:
            # Not on the acknowledgement's path, and not synced: once the
            # new versions are durable, a crash before (or instead of)
            # these deletions leaves older files beside them, which
            # recovery discards (it keeps only the latest).
            self._background(self._discard_all(older))

    async def _refused_by_disk(self, written: list[Version], error: OSError) -> None:
        """One log line per episode; the part of the batch already written
        goes (it was never acknowledged)."""
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
                self._record(version, 0)  # still on disk: it will be delivered

    async def _discard_all(self, versions: list[Version]) -> None:
        """Remove superseded versions (see :meth:`VersionFiles.discard`)."""
        for version in versions:
            await self.runner(self.files.discard, version)
            self._unindex(version)

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        d: Deferred[None] = ensureDeferred(work)
        self._cleanups.add(d)

        def done(result: object) -> None:
            self._cleanups.discard(d)
            if isinstance(result, Failure):
                self.log.failure("{service} cache: deleting superseded versions failed",
                                 result, service=self.service.value)

        d.addBoth(done)

    def _record(self, version: Version, size: int) -> None:
        item = version.item
        self.sizes[version] = size
        versions = self.index.setdefault(item, [])
        if version.ts not in versions:
            versions.append(version.ts)
            versions.sort()
        self._newest[item] = max(self._newest.get(item, -1), version.ts)
        self._last_ts[item] = max(self._last_ts.get(item, 0), version.ts)

    def _unindex(self, version: Version) -> None:
        self.sizes.pop(version, None)
        versions = self.index.get(version.item)
        if versions is not None and version.ts in versions:
            versions.remove(version.ts)
            if not versions:
                del self.index[version.item]

    async def _forget(self, version: Version) -> None:
        """Delete ``version``'s file, then drop it from the index."""
        await self.runner(self.files.delete, version)
        self._unindex(version)

    async def _superseded_by(self, versions: Iterable[Version]) -> None:
        """``versions`` reached upstream: older files of their items must
        never be delivered (deleted before the write is acknowledged)."""
        for version in versions:
            item = version.item
            self._newest[item] = max(self._newest.get(item, -1), version.ts)
            for ts in [t for t in self.index.get(item, []) if t < version.ts]:
                await self._forget(Version(item, ts))

    async def _read_latest(self, item: Item) -> tuple[Version, bytes] | None:
        """The latest pending version of ``item`` and its content. A file
        deleted under our feet (delivered meanwhile) is dropped from the
        index and the next latest is read."""
        while True:
            versions = self.index.get(item)
            if not versions:
                return None
            version = Version(item, versions[-1])
            data = await self.runner(self.files.read, version)
            if data is not None:
                return version, data
            if self.index.get(item, [])[-1:] == [version.ts]:
                self._unindex(version)  # vanished from disk

    def wake_flusher(self) -> None:
        self.flusher.wake()

    def pending_items(self) -> list[Item]:
        return sorted(self.index)

    def has_work(self) -> bool:
        return bool(self.index) or self.flusher.has_work()

    def scan(self) -> "Deferred[list[Item]]":
        """The directory scan of Disengaged mode; the disk is authoritative."""
        def found(on_disk: dict[Item, list[int]]) -> list[Item]:
            for item, stamps in on_disk.items():
                for ts in stamps:
                    if ts not in self.index.get(item, []):
                        self._record(Version(item, ts), 0)
            return sorted(on_disk)
        return self.runner(self.files.scan).addCallback(found)

    # -- what the flusher uses (FlushTarget) --------------------------------
    def next_batch(self) -> "Deferred[list[Item] | None]":
        return self.machine.next_batch()

    def settle(self) -> "Deferred[None]":
        return self.lock.run(self.machine.settle)

    def with_vm_lock(self, vm: str, f: Callable[[], Awaitable[Any]]) -> "Deferred[Any]":
        return self.vm_locks.run(vm, f)

    def deliver(self, vm: str, contents: Mapping[int, bytes]) -> "Deferred[None]":
        return self.sink.deliver(vm, contents)

    async def snapshot(self, vm: str, keys: Iterable[int]) -> dict[int, tuple[Version, bytes]]:
        """The latest version of each of ``keys`` with its content, read in
        one go (one trip to the I/O threads, not one per key)."""
        latest = {key: Version(Item(vm, key), self.index[Item(vm, key)][-1])
                  for key in sorted(keys) if self.index.get(Item(vm, key))}
        contents = await self.runner(self.files.read_many, list(latest.values()))
        out: dict[int, tuple[Version, bytes]] = {}
        for key, version in latest.items():
            data = contents.get(version)
            if data is None:  # deleted meanwhile (superseded): the slow way
                found = await self._read_latest(version.item)
                if found is None:
                    continue
                out[key] = found
            else:
                out[key] = (version, data)
        return out

    async def delivered(self, version: Version) -> None:
        """Upstream confirmed ``version``: it and older versions of its item
        are no longer pending; their files go in :meth:`round_done`."""
        item = version.item
        self._newest[item] = max(self._newest.get(item, -1), version.ts)
        for ts in [t for t in self.index.get(item, []) if t <= version.ts]:
            self._done.append(Version(item, ts))
            self._unindex(Version(item, ts))

    def round_done(self) -> "Deferred[None]":
        """The flusher's round ended: delete what it delivered, durably, in
        one go. Awaited before the next round and before the mode changes,
        so no newer version of these items reaches upstream before their
        deletion is durable (else a crash could bring an old file back)."""
        done, self._done = sorted(self._done), []
        if not done:
            return succeed(None)

        def failed(failure: Failure) -> Failure:
            # Files that may still be there are pending again: delivered
            # again (the same content upstream has) or superseded by a newer
            # version, and deleted in a later round.
            for version in done:
                self._record(version, 0)
            return failure

        return self.runner(self.files.delete_many, done).addErrback(failed)

    async def quarantine(self, version: Version, reason: str) -> None:
        path = await self.runner(self.files.quarantine, version, reason)
        self._unindex(version)
        self.quarantined.append(Quarantined(vm=version.item.vm, key=version.item.key, file=path,
                                            reason=reason))
        self.log.error("{service}: write of {vm} key {key} refused by upstream ({reason}); "
                       "quarantined as {file}", service=self.service.value, vm=version.item.vm,
                       key=version.item.key, reason=reason, file=path)

    # -- IStatusSource -----------------------------------------------------
    def status(self) -> CacheStatus:
        per_vm: dict[str, int] = {}
        for item in self.index:
            per_vm[item.vm] = per_vm.get(item.vm, 0) + 1
        oldest = min((versions[0] for versions in self.index.values()), default=None)
        return CacheStatus(
            service=self.service.value,
            mode=self.machine.mode(),
            enabled=bool(self.enabled()),
            queue_depth=len(self.queue.pending),
            pending=per_vm,
            quarantined=tuple(self.quarantined),
            last_error=self.flusher.last_error,
            delivered=self.flusher.delivered,
            disk_error=self.disk_error,
            disk_error_since=self.disk_error_since,
            # Stamps are CLOCK_MONOTONIC: turned into the clock's time.
            oldest_pending_since=None if oldest is None else
            self.clock.seconds() - max(0, self.monotonic_ns() - oldest) / 1e9,
            pending_bytes=sum(self.sizes.values()),
            deadline_fallbacks=self.deadline_fallbacks,
        )
