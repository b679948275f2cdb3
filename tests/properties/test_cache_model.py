"""A model-based test of the write-back cache: random writes, deletes and
reads of several VMs' vTPM keys while upstream goes down, comes back, holds
answers, fails transiently or permanently, and the daemon restarts over the
same directory. After every step a read returns the last acknowledged
value; once upstream stays up and the flusher settles, upstream holds
exactly the last acknowledged value of every item (or it is quarantined)
and the cache directory holds no file."""

from __future__ import annotations

import itertools
import os

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tests.unit.cachehelpers import VM1, VM2, Env
from xguard.cache.layout import Item
from xguard.errors import PermanentUpstreamError, TransientUpstreamError
from xguard.model import TpmKey

VMX = "99999999-9999-4999-8999-999999999999"  # unknown upstream: refused permanently
vms = st.sampled_from([VM1, VM2, VMX])
keys = st.sampled_from([0, 1, 2])


class CacheModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.env = Env(queue_size=3)
        self.cache = self.env.cache
        self.cache.recover()
        self.cache.start()
        self.values = itertools.count(1)
        self.acked: dict[Item, tuple[int, bytes]] = {}
        self.outstanding: dict[int, Item] = {}

    def teardown(self) -> None:
        self.settle()
        self.env.cleanup()

    # -- helpers -----------------------------------------------------------
    def _write(self, item: Item, content: bytes) -> None:
        seq = next(self.values)
        self.outstanding[seq] = item

        def ok(_: object) -> None:
            del self.outstanding[seq]
            if self.acked.get(item, (0, b""))[0] < seq:
                self.acked[item] = (seq, content)

        def failed(f: object) -> None:
            del self.outstanding[seq]
            f.trap(PermanentUpstreamError)  # type: ignore[attr-defined]

        self.cache.write(item.vm, item.key, content).addCallbacks(ok, failed)

    def quarantined_values(self, item: Item) -> set[bytes]:
        out = set()
        for q in self.cache.status()["quarantined"]:
            if q["vm"] == item.vm and q["key"] == item.key:
                with open(q["file"], "rb") as f:
                    out.add(f.read())
        return out

    def expected(self, item: Item) -> bytes:
        return self.acked.get(item, (0, b""))[1]

    # -- rules -------------------------------------------------------------
    @rule(vm=vms, key=keys)
    def put(self, vm: str, key: int) -> None:
        self._write(Item(vm, key), b"v%d" % next(self.values))

    @rule(vm=vms, key=keys)
    def delete(self, vm: str, key: int) -> None:
        self._write(Item(vm, key), b"")

    @rule(vm=st.sampled_from([VM1, VM2]), key=keys)
    def get(self, vm: str, key: int) -> None:
        item = Item(vm, key)
        if item in self.outstanding.values():
            return
        pending = self.cache.pending(vm, key)
        value = pending.result  # sync runner: already fired
        if value is None:
            if self.env.upstream.down or self.env.upstream.hold:
                return
            self.env.upstream._failures.clear()
            d = self.env.sink.read(vm, TpmKey(key))
            value = d.result if d.called else None
            if value is None:
                return
        if value != self.expected(item):
            assert self.expected(item) in self.quarantined_values(item), (item, value)

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
        assert self.env.clock.getDelayedCalls() == []
        assert not self.outstanding, "stop() persists every write in flight"
        self.env.upstream._held.clear()  # the process died: its calls never land
        if reboot:
            self.env.ticks = itertools.count(1, 1000)
        self.cache = self.env.build()
        self.cache.recover()
        self.cache.start()

    @rule()
    def settle(self) -> None:
        env = self.env
        env.upstream.down = False
        env.upstream.hold = False
        env.upstream._failures.clear()
        env.upstream.release()
        env.settle()
        assert not self.outstanding
        assert self.cache.status()["mode"] == "Direct"
        assert env.clock.getDelayedCalls() == []
        for item in set(self.acked):
            if item.vm == VMX:
                expected = self.expected(item)
                assert expected == b"" or expected in self.quarantined_values(item)
                continue
            got = TpmKey(item.key)
            state = env.tpm(item.vm).split(" ")
            value = (state + ["", ""])[got].encode() if state != [""] else b""
            if value != self.expected(item):
                assert self.expected(item) in self.quarantined_values(item), (item, value)
        files = [f for _, _, fs in os.walk(os.path.join(env.root, "Swtpm")) for f in fs]
        assert files == []

    # -- invariants --------------------------------------------------------
    @invariant()
    def reads_see_last_acknowledged(self) -> None:
        for item, (_, content) in self.acked.items():
            if item in self.outstanding.values():
                continue
            d = self.cache.pending(item.vm, item.key)
            if d.result is not None:
                assert d.result == content, (item, d.result, content)


CacheModel.TestCase.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)
TestCacheModel = CacheModel.TestCase

