"""A model-based test of a VM's vTPM state through outages: random writes,
deletes and reads of several VMs' keys by their swtpm sockets, the
orchestrator's VtpmSetContents/VtpmGetContents, sockets destroyed and
created again (a reboot), upstream going down, coming back, holding
answers, failing transiently or permanently, and the daemon restarting over
the same directory.

Invariants:

- no read older than the latest acknowledged write: every read that
  answers (socket GET, VtpmGetContents, upstream or last known state)
  returns, for each key, the last acknowledged value;
- upstream never steps back: once upstream held an acknowledged value of a
  key, it never holds an older one afterwards;
- once upstream stays up and the flusher settles, upstream holds exactly
  the last acknowledged value of every item (or it is quarantined) and the
  cache directory holds no file.
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
from xguard.cache.layout import Item
from xguard.errors import PermanentUpstreamError, TransientUpstreamError
from xguard.model import TpmKey, TpmState
from xguard.state.contents import VtpmContents
from xguard.state.views import TpmKeys

VMX = "99999999-9999-4999-8999-999999999999"  # unknown upstream: refused permanently
vms = st.sampled_from([VM1, VM2, VMX])
real_vms = st.sampled_from([VM1, VM2])
keys = st.sampled_from([0, 1, 2])


def seq_of(value: bytes | str) -> int | None:
    """The write a value came from (``v12``, ``o12k1`` …), None for ''."""
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
        self.start()

    def start(self) -> None:
        env = self.env
        self.cache = env.cache
        self.cache.recover()
        self.cache.start()
        self.vtpms = VtpmContents(env.sink, self.cache, env.known,
                                  candidates=lambda: sorted(env.live), clock=env.clock,
                                  deadline=3.0)
        self.store = TpmKeys(self.cache, env.sink, env.known, clock=env.clock, deadline=3.0)

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

    def quarantined_values(self, item: Item) -> set[bytes]:
        """The values of ``item`` set aside (for the operator)."""
        out = set()
        for q in self.cache.status().quarantined:
            if q.vm == item.vm and item.key in q.keys:
                values = self.cache.set_aside_values(q.id).result
                out.add(values[item.key])
        return out

    def expected(self, item: Item) -> bytes:
        return self.acked.get(item, (0, b""))[1]

    def check_read(self, item: Item, value: bytes) -> None:
        if self.busy(item):
            return  # a write of it is in flight: either answer is fine
        if value != self.expected(item):
            assert self.expected(item) in self.quarantined_values(item), (
                item, value, self.expected(item))

    # -- the swtpm socket --------------------------------------------------
    @rule(vm=vms, key=keys)
    def put(self, vm: str, key: int) -> None:
        content = b"v%d" % next(self.values)
        self._track(self.cache.write(vm, key, content), {Item(vm, key): content})

    @rule(vm=vms, key=keys)
    def delete(self, vm: str, key: int) -> None:
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
        self.env.live.discard(vm)
        self.env.known.vm_gone(vm, after=self.env.upstream.reachability.last_ticket)
        self.cache.vm_gone(vm)

    @rule(vm=real_vms)
    def create_sockets(self, vm: str) -> None:
        self.env.live.add(vm)

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

    @rule(permanent=st.booleans())
    def fail_next(self, permanent: bool) -> None:
        exc = (PermanentUpstreamError(["HANDLE_INVALID"]) if permanent
               else TransientUpstreamError(["HOST_STILL_BOOTING"]))
        self.env.upstream.fail_next(exc)

    @rule(reboot=st.booleans())
    def restart(self, reboot: bool) -> None:
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
        self.env.upstream._held.clear()  # the process died: its calls never land
        if reboot:
            self.env.ticks = itertools.count(1, 1000)
        self.env.known = self.env.build_known()
        self.env.sink.known = self.env.known
        self.env.cache = self.env.build()
        self.start()

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
            if item.vm == VMX:
                expected = self.expected(item)
                assert expected == b"" or expected in self.quarantined_values(item)
                continue
            value = TpmState.deserialize(env.tpm(item.vm)).get(TpmKey(item.key)).encode()
            if value != self.expected(item):
                assert self.expected(item) in self.quarantined_values(item), (item, value)
        files = [f for _, _, fs in os.walk(os.path.join(env.root, "Swtpm")) for f in fs]
        assert files == []

    # -- invariants --------------------------------------------------------
    @invariant()
    def reads_see_last_acknowledged(self) -> None:
        for item, (_, content) in self.acked.items():
            if self.busy(item):
                continue
            d = self.cache.pending(item.vm, item.key)
            if d.result is not None:
                assert d.result == content, (item, d.result, content)

    @invariant()
    def upstream_never_steps_back(self) -> None:
        for vm, vtpm in self.vtpm.items():
            high = {k: 0 for k in range(3)}
            for name, args in self.env.upstream.calls:
                if name != "set_vtpm_contents" or args[0] != vtpm:
                    continue
                state = TpmState.deserialize(args[1])
                for k in range(3):
                    seq = seq_of(state.get(TpmKey(k)))
                    if seq is None:
                        continue
                    assert seq >= high[k], (vm, k, seq, high[k])
                    if (Item(vm, k), seq) in self.ever_acked:
                        high[k] = seq


class CacheModelTests(SynchronousTestCase):
    """A test method, not Hypothesis's ``CacheModel.TestCase``: trial
    collects only methods named ``test*``, and that class has ``runTest``."""

    def test_model(self) -> None:
        run_state_machine_as_test(CacheModel, settings=settings(
            max_examples=150, stateful_step_count=50, deadline=None))
