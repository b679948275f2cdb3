"""A model-based test of a VM's vTPM state through outages: random writes,
deletes and reads of several VMs' keys by their swtpm sockets, the
orchestrator's VtpmSetContents/VtpmGetContents, sockets destroyed and
created again (a reboot), upstream going down, coming back, holding
answers, failing transiently (INTERNAL_ERROR, HOST_STILL_BOOTING, a
time-out), the daemon restarting over the same directory (kill -9: the
calls upstream held then land later, or never; a kill in the middle of a
round's deletions leaves some of its delivered files) or the
host crashing (kill -9 and the loss of /run: no socket comes back, the
last known state is not trusted), and another host writing a stopped VM's
vTPM (HA restarting it elsewhere, a migration), running it there or not.

Invariants:

- no acknowledged write is lost while no other writer exists: for a VM no
  other host wrote, every read that answers returns the last acknowledged
  value of each key, and once upstream stays up and the flusher settles,
  upstream holds exactly those values, nothing is set aside, and the
  cache directory holds no file;
- upstream never steps back: once upstream held an acknowledged value of a
  key, it never holds an older one afterwards (until another host writes);
- upstream never takes a value whose base is not what upstream held: no
  value xguard writes was written before another host's last write (which
  would mix that host's lineage with an older one of ours — for a vTPM,
  keys of two lineages);
- what another host's write left unreachable is set aside, never lost:
  every acknowledged value newer than that write is upstream or set aside;
- an unknown VM's writes are set aside (refused), never retried forever.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.unit.cachehelpers import VM1, VM2, Env
from xguard.cache.files import VersionFiles
from xguard.cache.layout import Item, Version, version_path
from xguard.errors import PermanentUpstreamError, TransientUpstreamError
from xguard.model import Residence, TpmKey, TpmState
from xguard.state.contents import VtpmContents
from xguard.state.sinks import VtpmSink
from xguard.state.views import TpmKeys
from xguard.util.locks import KeyedLocks

VMX = "99999999-9999-4999-8999-999999999999"  # unknown upstream: refused (proof)
TRANSIENT = [TransientUpstreamError(["INTERNAL_ERROR", "db"]),
             TransientUpstreamError(["HOST_STILL_BOOTING"]),
             TransientUpstreamError(["TIMEOUT"]), TransientUpstreamError(["UNKNOWN_CODE"])]
vms = st.sampled_from([VM1, VM2, VMX])
real_vms = st.sampled_from([VM1, VM2])
keys = st.sampled_from([0, 1, 2])


def seq_of(value: bytes | str) -> int | None:
    """The write a value came from (``v12``, ``o12k1``, another host's
    ``x12k1`` …), None for ''."""
    text = value.decode() if isinstance(value, bytes) else value
    if not text:
        return None
    digits = "".join(itertools.takewhile(str.isdigit, text[1:]))
    return int(digits)


class CacheModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.env = Env(queue_size=3)
        self.env.live = {VM1, VM2, VMX}
        self.vtpm = {vm: self.env.upstream.vms[vm]["vtpm"] for vm in (VM1, VM2)}
        self.values = itertools.count(1)
        self.acked: dict[Item, tuple[int, bytes]] = {}
        self.ever_acked: set[tuple[Item, int]] = set()
        self.outstanding: dict[int, set[Item]] = {}
        self.control_calls: set[int] = set()
        #: VM -> the number of the last write another host made of it.
        self.foreign: dict[str, int] = {}
        #: Changes of the cache's files so far, and what the last round
        #: deleted: (changes then, xguard's upstream writes then, the files
        #: in the order they were deleted, with their bytes, and the records
        #: of what was sent as they were while it deleted them).
        self.file_changes = 0
        #: VMs stopped so far: a stop asks whether the VM's files are gone
        #: (here, where a round's deletions are instant, they always are).
        self.stops = 0
        self.last_round: tuple[int, int, int, list[tuple[str, bytes]],
                               list[tuple[str, bytes]]] | None = None
        self.start()
        for vm in self.vtpm:  # the VMs booted: their helpers read their state
            self.env.sink.read_contents(vm)

    def start(self) -> None:
        env = self.env
        self.cache = env.cache
        self.watch(self.cache.versions.files)
        self.cache.recover()
        self.cache.start()
        self.vtpms = VtpmContents(env.sink, self.cache, env.known,
                                  candidates=lambda: sorted(env.live), clock=env.clock,
                                  deadline=3.0)
        self.store = TpmKeys(self.cache, env.sink, env.known, clock=env.clock, deadline=3.0)
        # As the composition root wires it: facts about upstream's answers.
        env.upstream.reachability.subscribe_answered_call(
            lambda ticket: env.known.upstream_answered(ticket, self.cache.has_pending))

    def xguard_writes(self) -> int:
        return sum(1 for *_, who in self.env.upstream.history if who != "other")

    def watch(self, files: VersionFiles) -> None:
        """Count every change of the cache's files, and keep what the last
        round deleted, so that a restart can be a kill in the middle of
        that round's deletions (they run one file at a time)."""
        def counting(original: Any) -> Any:
            def counted(*args: Any, **kwargs: Any) -> Any:
                self.file_changes += 1
                return original(*args, **kwargs)
            return counted

        for name in ("write", "write_all", "delete", "discard", "quarantine"):
            setattr(files, name, counting(getattr(files, name)))
        delete_many = files.delete_many

        def deleting(versions: list[Version]) -> None:
            deleted = []
            for version in versions:
                path = version_path(files.root, files.service, version)
                if os.path.exists(path):
                    with open(path, "rb") as f:
                        deleted.append((path, f.read()))
            # What the known state says meanwhile (the records of what was
            # sent are only emptied, and those of lives that ended only
            # dropped, once the round's deletions are done).
            known = os.path.join(self.env.root, "known")
            records = [os.path.join(top, name) for top, _, names in os.walk(known)
                       for name in names if name.startswith(("sent-", "ended-"))]
            sent = []
            for path in records:
                with open(path, "rb") as f:
                    sent.append((path, f.read()))
            delete_many(versions)
            self.file_changes += 1
            self.last_round = (self.file_changes, self.xguard_writes(), self.stops, deleted,
                               sent)

        files.delete_many = deleting  # type: ignore[method-assign]

    def teardown(self) -> None:
        self.settle()
        self.env.cleanup()

    # -- helpers -----------------------------------------------------------
    def busy(self, item: Item) -> bool:
        return any(item in items for items in self.outstanding.values())

    def _track(self, d: "Deferred[Any]", written: dict[Item, bytes],
               orchestrator: bool = False) -> None:
        seq = next(self.values)
        self.outstanding[seq] = set(written)
        if orchestrator:
            self.control_calls.add(seq)

        def ok(_: object) -> None:
            self.outstanding.pop(seq, None)
            for item, content in written.items():
                self.ever_acked.add((item, seq))
                if self.acked.get(item, (0, b""))[0] < seq:
                    self.acked[item] = (seq, content)

        def failed(f: Failure) -> None:
            self.outstanding.pop(seq, None)
            f.trap(PermanentUpstreamError, TransientUpstreamError)

        d.addCallbacks(ok, failed)

    def quarantined_values(self, item: Item, kinds: tuple[str, ...] = ()) -> set[bytes]:
        """The values of ``item`` set aside (of these kinds, if given)."""
        out = set()
        for q in self.cache.status().quarantined:
            if q.vm == item.vm and item.key in q.keys and (not kinds or q.kind in kinds):
                values = self.cache.set_aside_values(q.id).result
                out.add(values[item.key])
        return out

    def expected(self, item: Item) -> bytes:
        return self.acked.get(item, (0, b""))[1]

    def check_read(self, item: Item, value: bytes) -> None:
        if self.busy(item) or item.vm in self.foreign:
            return  # a write of it is in flight, or another host's: either answer
        if value != self.expected(item):
            assert self.expected(item) in self.quarantined_values(item), (
                item, value, self.expected(item))

    # -- the swtpm socket --------------------------------------------------
    @rule(vm=vms, key=keys)
    def put(self, vm: str, key: int) -> None:
        if vm not in self.env.live:
            return  # no socket to write through
        content = b"v%d" % next(self.values)
        self._track(self.cache.write(vm, key, content), {Item(vm, key): content})

    @rule(vm=vms, key=keys)
    def delete(self, vm: str, key: int) -> None:
        if vm not in self.env.live:
            return
        self._track(self.cache.write(vm, key, b""), {Item(vm, key): b""})

    @rule(vm=real_vms, key=keys)
    def get(self, vm: str, key: int) -> None:
        if vm not in self.env.live:
            return  # no socket to read through
        d = ensureDeferred(self.store.get(vm, TpmKey(key)))
        if d.called:
            d.addCallbacks(lambda value: self.check_read(Item(vm, key), value),
                           lambda f: f.trap(TransientUpstreamError, PermanentUpstreamError))
        else:
            d.addErrback(lambda f: None)  # answered later: not checked

    # -- the orchestrator --------------------------------------------------
    def resolves_now(self, vm: str) -> bool:
        """Whether the orchestrator's call reaches the cache at once: the
        model numbers writes when they are issued, which is their order
        only if nothing delays them on the way (an unknown vTPM is looked
        up upstream first, and a held upstream delays that)."""
        return not self.env.upstream.hold or (
            self.env.known.vm_of_vtpm(self.vtpm[vm]) is not None)

    @rule(vm=real_vms)
    def orchestrator_set(self, vm: str) -> None:
        if not self.resolves_now(vm):
            return
        seq = next(self.values)
        contents = {Item(vm, k): b"o%dk%d" % (seq, k) for k in range(3)}
        d = self.vtpms.set(self.vtpm[vm], " ".join(c.decode() for c in contents.values()))
        self._track(d, contents, orchestrator=True)

    @rule(vm=real_vms)
    def orchestrator_get(self, vm: str) -> None:
        if not self.resolves_now(vm):
            return
        d = self.vtpms.get(self.vtpm[vm])

        def got(contents: str) -> None:
            state = TpmState.deserialize(contents)
            for key in TpmKey:
                self.check_read(Item(vm, key), state.get(key).encode())

        if d.called:
            d.addCallbacks(got, lambda f: f.trap(TransientUpstreamError, PermanentUpstreamError))
        else:
            d.addErrback(lambda f: None)

    # -- the VM's sockets --------------------------------------------------
    @rule(vm=real_vms)
    def destroy_sockets(self, vm: str) -> None:
        """The VM stops, or reboots (a create follows)."""
        env = self.env
        env.live.discard(vm)
        self.stops += 1
        # In the composition root's order (xguard.daemon.compose).
        env.sink.forget(vm)
        env.known.vm_gone(vm, after=env.upstream.reachability.last_ticket)
        self.cache.vm_gone(vm)
        env.upstream.confirm(vm).addErrback(lambda f: None)

    @rule(vm=real_vms)
    def create_sockets(self, vm: str) -> None:
        self.env.live.add(vm)
        self.env.upstream.residence[vm] = Residence("Running", "this host", here=True)

    @rule(vm=real_vms, runs_there=st.booleans())
    def other_host_writes(self, vm: str, runs_there: bool) -> None:
        """HA restarted the VM on another host, or it migrated: that host
        writes the whole vTPM. Only a VM not running here, with nothing of
        it in flight (a VM runs on one host at a time): no write of it
        waiting for its answer, and no call of it that upstream received
        and has not applied yet (a write acknowledged from the cache past
        its deadline leaves its Direct call in flight). xapi has no
        compare-and-set: a call it applies after another host's write
        cannot be checked by anyone (doc/cache.md, "Other writers")."""
        if vm in self.env.live or any(i.vm == vm for items in self.outstanding.values()
                                      for i in items):
            return
        if self.env.upstream.holds_a_call_for(vm, self.vtpm[vm]):
            return
        seq = next(self.values)
        self.foreign[vm] = seq
        self.env.upstream.other_host_writes(
            self.vtpm[vm], " ".join(f"x{seq}k{k}" for k in range(3)))
        self.env.upstream.residence[vm] = (Residence("Running", "host-b", here=False)
                                           if runs_there else Residence("Halted"))

    # -- upstream ----------------------------------------------------------
    @rule()
    def upstream_down(self) -> None:
        self.env.upstream.down = True

    @rule()
    def upstream_up(self) -> None:
        self.env.upstream.down = False

    @rule()
    def hold(self) -> None:
        self.env.upstream.hold = True

    @rule()
    def release(self) -> None:
        self.env.upstream.hold = False
        self.env.upstream.release()

    @rule(seconds=st.sampled_from([0.5, 1.0, 3.0, 10.0]))
    def advance(self, seconds: float) -> None:
        self.env.clock.advance(seconds)

    @rule(error=st.sampled_from(TRANSIENT))
    def fail_next(self, error: TransientUpstreamError) -> None:
        """One call fails with no proof that anything can never succeed."""
        self.env.upstream.fail_next(error)

    @rule(reboot=st.booleans(), crash=st.booleans(), land=st.booleans(),
          torn=st.integers(min_value=0, max_value=8))
    def restart(self, reboot: bool, crash: bool, land: bool, torn: int) -> None:
        """kill -9 and a new daemon over the same directory; ``reboot``: the
        host restarted (after a clean stop of xguard: its last known state
        is trusted), so /run is gone (no socket comes back) and the
        monotonic clock starts again; ``crash``: the same after a host
        crash, so the last known state is not trusted (another boot);
        ``land``: the calls
        upstream held when the daemon died are applied before the new one
        starts (a stalled xapi that recovers), else they never land;
        ``torn``: when nothing changed since the last round, the kill (or
        the crash) came in the middle of its deletions and that many of its
        last files are still there (a crash keeps the unlinks of a prefix,
        in order); with ``crash`` no record says what was sent. Not after a
        VM stopped since the round: the daemon saw its files gone then (its
        deletions are instant here), which a kill in the middle of them
        contradicts; with real deletions, still running at the stop, the
        stop records the end of the VM's life (tests/unit/test_conflicts)."""
        if torn and self.last_round is not None:
            changes, writes, stops, deleted, sent = self.last_round
            if (changes, writes, stops) == (self.file_changes, self.xguard_writes(), self.stops):
                for path, data in [*deleted[-torn:], *sent]:
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    with open(path, "wb") as f:
                        f.write(data)
        self.last_round = None
        self.cache.stop()
        self.env.upstream.new_client()
        # Deadlines of reads still waiting for upstream die with the process.
        for call in self.env.clock.getDelayedCalls():
            assert call.func.__name__ == "expire", call  # the cache left no timer
            call.cancel()
        # A control call still looking its vTPM up never reached the cache:
        # its connection dies with the process, never acknowledged.
        for seq in self.control_calls & set(self.outstanding):
            del self.outstanding[seq]
        assert not self.outstanding, "stop() persists every write in flight"
        if land:
            self.env.upstream.land_held()
        else:
            self.env.upstream.drop_held()
        if reboot or crash:
            # The monotonic clock starts again, and no VM survives: /run is
            # gone (no socket comes back), and by the time xapi answers
            # again it has noticed that what ran here is halted (what runs
            # elsewhere still does).
            self.env.ticks = itertools.count(1, 1000)
            self.env.live.clear()
            for vm, where in list(self.env.upstream.residence.items()):
                if where.here:
                    self.env.upstream.residence[vm] = Residence("Halted")
        if crash:
            self.env.boot_id += "+"
        self.env.known = self.env.build_known()
        # A new process: nothing confirmed, no lock held.
        self.env.locks = KeyedLocks()
        self.env.sink = VtpmSink(self.env.upstream, self.env.locks, self.env.known)
        self.env.cache = self.env.build()
        self.start()
        self.cache.sockets_resumed()
        self.env.known.unserved_at_start(after=self.env.upstream.reachability.last_ticket)

    @rule()
    def settle(self) -> None:
        env = self.env
        env.upstream.down = False
        env.upstream.hold = False
        env.upstream._failures.clear()
        env.upstream.release()
        env.settle()
        assert not self.outstanding
        assert self.cache.status().mode == "Direct"
        assert env.clock.getDelayedCalls() == []
        for item in set(self.acked):
            expected = self.expected(item)
            if item.vm == VMX:
                assert expected == b"" or expected in self.quarantined_values(item)
                continue
            value = TpmState.deserialize(env.tpm(item.vm)).get(TpmKey(item.key)).encode()
            if item.vm not in self.foreign:
                # No other writer: nothing lost, and no conflict seen where
                # there is none. A write whose base xguard never saw (the host
                # crashed, its copies were not trusted) of a VM that does not
                # run here is set aside as unverified, not delivered blindly.
                assert value == expected or expected in self.quarantined_values(
                    item, ("unverified",)), (item, value, expected)
                assert not self.quarantined_values(item, ("conflict", "elsewhere")), item
            elif (seq_of(expected) or 0) > self.foreign[item.vm]:
                # Written after the other host's write: upstream, or set aside
                # with the rest of its lineage.
                assert value == expected or expected in self.quarantined_values(item), (
                    item, value, expected)
        files = [f for _, _, fs in os.walk(os.path.join(env.root, "Swtpm")) for f in fs]
        assert files == []

    # -- invariants --------------------------------------------------------
    @invariant()
    def reads_see_last_acknowledged(self) -> None:
        for item, (_, content) in self.acked.items():
            if self.busy(item) or item.vm in self.foreign:
                continue
            d = self.cache.pending(item.vm, item.key)
            if d.result is not None:
                assert d.result == content, (item, d.result, content)

    @invariant()
    def upstream_never_steps_back(self) -> None:
        """Replayed from what upstream applied, in its order; another
        host's write starts a new lineage."""
        high: dict[tuple[str, int], int] = {}
        vms = {vtpm: vm for vm, vtpm in self.vtpm.items()}
        for vtpm, _before, after, who in self.env.upstream.history:
            vm = vms[vtpm]
            if who == "other":
                high = {k: v for k, v in high.items() if k[0] != vm}
                continue
            state = TpmState.deserialize(after)
            for k in range(3):
                seq = seq_of(state.get(TpmKey(k)))
                if seq is None:
                    continue
                assert seq >= high.get((vm, k), 0), (vm, k, seq, high.get((vm, k)))
                if (Item(vm, k), seq) in self.ever_acked:
                    high[(vm, k)] = seq

    @invariant()
    def never_over_what_xguard_did_not_see(self) -> None:
        """Every value xguard writes after another host's write was written
        after it: a write based on the state before it is never delivered
        over it (the other keys would belong to another lineage)."""
        last_other: dict[str, int] = {}
        for vtpm, before, after, who in self.env.upstream.history:
            if who == "other":
                last_other[vtpm] = seq_of(after.split(" ")[0]) or 0
                continue
            if vtpm not in last_other:
                continue
            old, new = TpmState.deserialize(before), TpmState.deserialize(after)
            for key in TpmKey:
                if new.get(key) != old.get(key) and new.get(key):
                    assert (seq_of(new.get(key)) or 0) > last_other[vtpm], (
                        vtpm, key, before, after, last_other[vtpm])


def unknown_base_write(vm: str) -> list[Any]:
    """Replay steps leaving ``vm`` with a cached write whose base is
    unknown: upstream holds every call, the host crashes (the last known
    state is dropped), the VM starts here and writes; the write's call is
    held, so its deadline or the next restart caches it."""
    return [
        lambda m: m.hold(),
        lambda m: m.restart(crash=True, land=False, reboot=False, torn=0),
        lambda m: m.create_sockets(vm=vm),
        lambda m: m.put(key=0, vm=vm),
    ]


class CacheModelTests(SynchronousTestCase):
    """A test method, not Hypothesis's ``CacheModel.TestCase``: trial
    collects only methods named ``test*``, and that class has ``runTest``."""

    def test_model(self) -> None:
        run_state_machine_as_test(CacheModel, settings=settings(
            max_examples=150, stateful_step_count=50, deadline=None))

    def replay(self, steps: list[Any]) -> None:
        """One sequence the model found, run step by step with every
        invariant checked after each (as Hypothesis does)."""
        machine = CacheModel()

        def check() -> None:
            machine.never_over_what_xguard_did_not_see()
            machine.reads_see_last_acknowledged()
            machine.upstream_never_steps_back()

        check()
        for step in steps:
            step(machine)
            check()
        machine.teardown()

    def test_a_delivery_after_the_vm_stopped_does_not_confirm_it(self) -> None:
        """Found in CI: the cached write delivered after the VM stopped
        confirmed its vTPM again, so the VM's delete, back here after
        another host's write, was built on the old copy."""
        self.replay([
            lambda m: m.fail_next(error=TransientUpstreamError(["INTERNAL_ERROR", "db"])),
            lambda m: m.put(key=0, vm=VM1),
            lambda m: m.destroy_sockets(vm=VM1),
            lambda m: m.advance(seconds=0.5),
            lambda m: m.other_host_writes(runs_there=False, vm=VM1),
            lambda m: m.create_sockets(vm=VM1),
            lambda m: m.delete(key=1, vm=VM1),
        ])

    def test_a_vm_that_did_not_come_back_ends_its_life(self) -> None:
        """A write of unknown base recovered after a kill, for a VM whose
        sockets were not resumed: when the VM starts here again after
        another host's write, it is not delivered blindly over it."""
        self.replay([
            *unknown_base_write(VM1),
            lambda m: m.restart(crash=True, land=False, reboot=False, torn=0),
            lambda m: m.other_host_writes(runs_there=False, vm=VM1),
            lambda m: m.create_sockets(vm=VM1),
            lambda m: m.settle(),
        ])

    def test_a_vm_back_after_another_host_wrote_reads_before_writing(self) -> None:
        """The VM stops (its vTPM no longer confirmed), another host writes
        its vTPM, the VM starts here again and deletes a key: the Direct
        write reads upstream first, never builds on the old copy. (Found
        when the model kept the sink's confirmed set across a stop and a
        restart, which the daemon does not.)"""
        self.replay([
            lambda m: m.put(key=1, vm=VM1),
            # no answer after the stop: the copy is kept (as for a reboot)
            lambda m: m.fail_next(error=TransientUpstreamError(["INTERNAL_ERROR", "db"])),
            lambda m: m.destroy_sockets(vm=VM1),
            lambda m: m.other_host_writes(runs_there=False, vm=VM1),
            lambda m: m.create_sockets(vm=VM1),
            lambda m: m.delete(key=0, vm=VM1),
        ])

    def test_a_crash_in_a_round_s_deletions_leaves_no_conflict(self) -> None:
        """A kill in the middle of a round's deletions brings back its last
        file, then a host crash drops the records of what was sent: a write
        built on that file does not take the values of the file's chain,
        written before it and delivered with it, for another writer's."""
        self.replay([
            lambda m: m.upstream_down(),
            lambda m: m.put(key=1, vm=VM1),
            lambda m: m.put(key=0, vm=VM1),
            lambda m: m.release(),
            lambda m: m.settle(),
            lambda m: m.restart(crash=False, land=False, reboot=False, torn=1),
            lambda m: m.restart(crash=True, land=False, reboot=False, torn=0),
            lambda m: m.create_sockets(vm=VM1),
            lambda m: m.put(key=0, vm=VM1),
            lambda m: m.settle(),
        ])

    def test_a_crash_in_a_round_s_deletions_leaves_no_conflict_in_a_batch(self) -> None:
        """The same, with the crash itself in the middle of the deletions:
        nor the other values of the file's own batch (the orchestrator's
        VtpmSetContents writes the three keys as one)."""
        self.replay([
            lambda m: m.orchestrator_get(vm=VM1),
            lambda m: m.upstream_down(),
            lambda m: m.orchestrator_set(vm=VM1),
            lambda m: m.orchestrator_set(vm=VM1),
            lambda m: m.settle(),
            lambda m: m.restart(crash=True, land=False, reboot=False, torn=1),
            lambda m: m.create_sockets(vm=VM1),
            lambda m: m.delete(key=0, vm=VM1),
            lambda m: m.settle(),
        ])

    def test_a_torn_round_brings_back_the_record_of_a_life_s_end(self) -> None:
        """A write of unknown base is set aside (its VM stopped), another
        host writes, the VM starts here again, and a kill in the middle of
        the round's deletions brings the write's file back: the record of
        the life's end, there while the file was, is back with it."""
        self.replay([
            *unknown_base_write(VM2),
            lambda m: m.restart(crash=True, land=False, reboot=False, torn=0),
            lambda m: m.create_sockets(vm=VM1),
            lambda m: m.restart(crash=False, land=False, reboot=False, torn=0),
            lambda m: m.settle(),
            lambda m: m.get(key=0, vm=VM1),
            lambda m: m.other_host_writes(runs_there=False, vm=VM2),
            lambda m: m.create_sockets(vm=VM2),
            lambda m: m.restart(crash=False, land=False, reboot=False, torn=1),
            lambda m: m.settle(),
        ])

    def test_a_life_that_ended_stays_ended_across_a_restart(self) -> None:
        """The VM stops with a write of unknown base pending, the daemon is
        killed (the write's Direct call never lands), another host writes,
        the VM starts here again, and the daemon is killed once more: the
        next process must still know that the write belongs to the life
        that ended (kept in memory only, it was judged continuous)."""
        self.replay([
            *unknown_base_write(VM1),
            lambda m: m.advance(seconds=10.0),  # past its deadline: cached
            lambda m: m.destroy_sockets(vm=VM1),
            lambda m: m.restart(crash=False, land=False, reboot=False, torn=0),
            lambda m: m.other_host_writes(runs_there=False, vm=VM1),
            lambda m: m.create_sockets(vm=VM1),
            lambda m: m.restart(crash=False, land=False, reboot=False, torn=0),
            lambda m: m.settle(),
        ])
