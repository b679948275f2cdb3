# -*- test-case-name: tests.unit.test_machine -*-
"""The cache's three modes as one Automat machine per service.

The table below is the whole machine (the design diagram of
reference/000_xapi_guard_design.txt plus the start-up choice); behaviours
follow it. Inputs that report an asynchronous result (a Direct attempt that
failed, a full queue, a drained queue, an empty scan) are fed back by the
core, as ``_client_service`` does with ``_connectionFailed``. The core owns
the data the modes act on (the queue, the Direct attempts with their
timers, the versions on disk); :class:`CacheModes` feeds every input under
the service lock.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from automat import TypeMachineBuilder, pep614
from twisted.internet.defer import Deferred, DeferredLock, DeferredQueue, QueueOverflow, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from .layout import Batch, Item, Version

__all__ = ["CacheMachine", "CacheModes", "build_machine", "TRANSITIONS"]


class _Attempts(Protocol):
    """Direct writes in flight (:class:`~xguard.cache.attempts.DirectAttempts`)."""

    def start(self, batch: Batch, done: "Deferred[None]") -> None: ...


class _Versions(Protocol):
    """The versions on disk (:class:`~xguard.cache.pending.PendingVersions`)."""

    def persist(self, batch: Batch) -> "Deferred[None]": ...
    def scan(self) -> "Deferred[list[Item]]": ...
    def __bool__(self) -> bool: ...


class _CacheInputs(Protocol):
    def mode(self) -> str:
        "The current mode's name (Status, tests)."

    def start_empty(self) -> None:
        "Recovery found nothing pending."

    def start_pending(self, versions: Sequence[Version]) -> None:
        "Recovery found ``versions`` pending delivery."

    def write(self, batch: Batch, done: "Deferred[None]") -> "Deferred[None]":
        """A write (domain socket or orchestrator); ``done`` fires once it is
        durable (upstream or disk). The result fires when the service lock
        may be released."""

    def push_failed_transient(self, batch: Batch) -> None:
        "A Direct attempt failed or missed its deadline; ``batch`` is now on disk."

    def queue_overflowed(self) -> None:
        "A name did not fit the bounded queue."

    def next_batch(self) -> "Deferred[list[Item] | None]":
        "The flusher asks what to deliver (None: nothing, stop polling)."

    def settle(self) -> "Deferred[None]":
        "The flusher finished a round: check whether the cache is empty."

    def queue_drained(self) -> None:
        "The flusher found the queue empty and nothing pending."

    def cache_found_empty(self) -> None:
        "A scan under the lock found no pending version."


@dataclass
class _CacheCore:
    """The data the modes act on; the machine's behaviours own it (the
    cache itself is only a face, as ``ClientService`` is over its core)."""

    service: str
    #: Names of versions to deliver (Engaged); bounded: a full queue is the
    #: ``queue_overflowed`` input.
    queue: DeferredQueue[Version]
    #: Direct writes in flight, with their deadline timers.
    attempts: _Attempts
    #: The versions on disk and their index.
    versions: _Versions
    #: Start delivery rounds (the flusher polls only while not Direct).
    wake_flusher: Callable[[], None]
    #: Whether the flusher holds items to retry.
    flusher_retrying: Callable[[], bool]
    log: Logger

    def has_work(self) -> bool:
        """Something is pending, or the flusher holds items to retry."""
        return bool(self.versions) or self.flusher_retrying()


builder = TypeMachineBuilder(_CacheInputs, _CacheCore)
Starting = builder.state("Starting")
Direct = builder.state("Direct")
Engaged = builder.state("Engaged")
Disengaged = builder.state("Disengaged")

# ---- the table ---------------------------------------------------------
# (state, input, next state) — behaviours for those without .returns below.
TRANSITIONS = [
    ("Starting", "start_empty", "Direct"),
    ("Starting", "start_pending", "Engaged"),
    ("Direct", "write", "Direct"),               # sent to xapi
    ("Direct", "push_failed_transient", "Engaged"),
    ("Direct", "next_batch", "Direct"),          # reader waits
    ("Engaged", "write", "Engaged"),             # on disk, name queued
    ("Engaged", "push_failed_transient", "Engaged"),
    ("Engaged", "queue_overflowed", "Disengaged"),
    ("Engaged", "next_batch", "Engaged"),        # reader takes names from the queue
    ("Engaged", "settle", "Engaged"),
    ("Engaged", "queue_drained", "Direct"),
    ("Disengaged", "write", "Disengaged"),       # on disk only
    ("Disengaged", "push_failed_transient", "Disengaged"),
    ("Disengaged", "queue_overflowed", "Disengaged"),
    ("Disengaged", "next_batch", "Disengaged"),  # reader scans the directory
    ("Disengaged", "settle", "Disengaged"),
    ("Disengaged", "cache_found_empty", "Direct"),
]

Starting.upon(_CacheInputs.start_empty).to(Direct).returns(None)
Direct.upon(_CacheInputs.settle).loop().returns(succeed(None))
Direct.upon(_CacheInputs.queue_overflowed).loop().returns(None)
Direct.upon(_CacheInputs.queue_drained).loop().returns(None)
Direct.upon(_CacheInputs.cache_found_empty).loop().returns(None)
Engaged.upon(_CacheInputs.cache_found_empty).loop().returns(None)
Disengaged.upon(_CacheInputs.queue_drained).loop().returns(None)
for _state in (Starting, Direct, Engaged, Disengaged):
    _state.upon(_CacheInputs.mode).loop().returns(_state.name)


def _enqueue(inputs: _CacheInputs, core: _CacheCore, version: Version) -> None:
    try:
        core.queue.put(version)
    except QueueOverflow:
        inputs.queue_overflowed()


@pep614(Starting.upon(_CacheInputs.start_pending).to(Engaged))
def _start_pending(inputs: _CacheInputs, core: _CacheCore, versions: Sequence[Version]) -> None:
    for version in versions:
        _enqueue(inputs, core, version)
    core.wake_flusher()


@pep614(Direct.upon(_CacheInputs.write).loop())
def _direct_write(inputs: _CacheInputs, core: _CacheCore, batch: Batch,
                  done: "Deferred[None]") -> "Deferred[None]":
    core.attempts.start(batch, done)
    return succeed(None)  # no disk work: release the lock at once


def _persist(inputs: _CacheInputs, core: _CacheCore, batch: Batch,
             done: "Deferred[None]", queue: bool) -> "Deferred[None]":
    d = core.versions.persist(batch)

    def durable(_: object) -> None:
        if queue:
            for version in batch.versions:
                _enqueue(inputs, core, version)
        done.callback(None)

    def failed(failure: Failure) -> None:
        done.errback(failure)  # not acknowledged; the lock is released

    d.addCallbacks(durable, failed)
    return d


@pep614(Engaged.upon(_CacheInputs.write).loop())
def _engaged_write(inputs: _CacheInputs, core: _CacheCore, batch: Batch,
                   done: "Deferred[None]") -> "Deferred[None]":
    return _persist(inputs, core, batch, done, queue=True)


@pep614(Disengaged.upon(_CacheInputs.write).loop())
def _disengaged_write(inputs: _CacheInputs, core: _CacheCore, batch: Batch,
                      done: "Deferred[None]") -> "Deferred[None]":
    return _persist(inputs, core, batch, done, queue=False)


@pep614(Direct.upon(_CacheInputs.push_failed_transient).to(Engaged))
def _engage(inputs: _CacheInputs, core: _CacheCore, batch: Batch) -> None:
    core.log.info("{service} cache engaged", service=core.service)
    for version in batch.versions:
        _enqueue(inputs, core, version)
    core.wake_flusher()


@pep614(Engaged.upon(_CacheInputs.push_failed_transient).loop())
def _queue_more(inputs: _CacheInputs, core: _CacheCore, batch: Batch) -> None:
    for version in batch.versions:
        _enqueue(inputs, core, version)


@pep614(Disengaged.upon(_CacheInputs.push_failed_transient).loop())
def _scan_will_find(inputs: _CacheInputs, core: _CacheCore, batch: Batch) -> None:
    """The scan finds it."""


@pep614(Engaged.upon(_CacheInputs.queue_overflowed).to(Disengaged))
@pep614(Disengaged.upon(_CacheInputs.queue_overflowed).loop())
def _overflowed(inputs: _CacheInputs, core: _CacheCore) -> None:
    core.log.info("{service} cache queue full: disengaged", service=core.service)


@pep614(Direct.upon(_CacheInputs.next_batch).loop())
def _nothing(inputs: _CacheInputs, core: _CacheCore) -> "Deferred[list[Item] | None]":
    return succeed(None)


@pep614(Engaged.upon(_CacheInputs.next_batch).loop())
def _from_queue(inputs: _CacheInputs, core: _CacheCore) -> "Deferred[list[Item] | None]":
    names: list[Version] = []
    while core.queue.pending:
        core.queue.get().addCallback(names.append)
    return succeed(sorted({v.item for v in names}))


@pep614(Disengaged.upon(_CacheInputs.next_batch).loop())
def _from_scan(inputs: _CacheInputs, core: _CacheCore) -> "Deferred[list[Item] | None]":
    return core.versions.scan()  # type: ignore[return-value]


@pep614(Engaged.upon(_CacheInputs.settle).loop())
def _check_drained(inputs: _CacheInputs, core: _CacheCore) -> "Deferred[None]":
    if not core.queue.pending and not core.has_work():
        inputs.queue_drained()
    return succeed(None)


@pep614(Disengaged.upon(_CacheInputs.settle).loop())
def _check_empty(inputs: _CacheInputs, core: _CacheCore) -> "Deferred[None]":
    def scanned(items: list[Item]) -> None:
        if not items and not core.has_work():
            inputs.cache_found_empty()

    return core.versions.scan().addCallback(scanned)


@pep614(Engaged.upon(_CacheInputs.queue_drained).to(Direct))
@pep614(Disengaged.upon(_CacheInputs.cache_found_empty).to(Direct))
def _direct_again(inputs: _CacheInputs, core: _CacheCore) -> None:
    while core.queue.pending:  # stale names: everything is delivered
        core.queue.get()
    core.log.info("{service} cache empty: direct", service=core.service)


CacheMachine = builder.build()


def build_machine(core: _CacheCore) -> _CacheInputs:
    """A machine in Starting; ``start_empty``/``start_pending`` choose the mode."""
    return CacheMachine(core)


class CacheModes:
    """The machine behind its service lock: every input that can change
    the mode, or acts on the disk for it, runs holding the lock, so a mode
    never changes between a check and the action depending on it. No
    upstream call ever runs under it."""

    def __init__(self, core: _CacheCore) -> None:
        self.core = core
        self.machine = build_machine(core)
        self.lock = DeferredLock()

    def mode(self) -> str:
        return self.machine.mode()

    def start(self, versions: Sequence[Version]) -> None:
        """Recovery is done: Engaged with ``versions``, or Direct."""
        if versions:
            self.machine.start_pending(versions)
        else:
            self.machine.start_empty()

    def write(self, batch: Batch) -> "Deferred[None]":
        """Fires once ``batch`` is durable (upstream or disk)."""
        done: Deferred[None] = Deferred()

        def failed(f: Failure) -> None:
            if not done.called:
                done.errback(f)

        self.lock.run(self.machine.write, batch, done).addErrback(failed)
        return done

    def failed_transient(self, batch: Batch) -> "Deferred[None]":
        """A Direct attempt gave up: make ``batch`` durable and queue it."""
        async def engage() -> None:
            await self.core.versions.persist(batch)
            self.machine.push_failed_transient(batch)
        return self.lock.run(engage)

    def next_batch(self) -> "Deferred[list[Item] | None]":
        return self.machine.next_batch()

    def settle(self) -> "Deferred[None]":
        return self.lock.run(self.machine.settle)
