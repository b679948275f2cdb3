"""The orchestrator's vTPM calls ordered with the write-back cache (SPEC §6,
"Order across the VM's lifecycle"), on the real cache with a Clock."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.unit.cachehelpers import VM1, VM2, Env
from xguard.errors import InvalidContents, TransientUpstreamError
from xguard.model import TpmKey
from xguard.state.contents import VtpmContents
from xguard.state.views import TpmKeys


class VtpmContentsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.env = Env(queue_size=16)
        self.addCleanup(self.env.cleanup)
        self.start()
        self.up = self.env.upstream
        self.vtpm = self.up.vms[VM1]["vtpm"]
        self.up.vtpms[self.vtpm] = "p1 s1 v1"

    def start(self) -> None:
        env = self.env
        self.cache = env.cache
        self.successResultOf(self.cache.recover())
        self.cache.start()
        self.vtpms = VtpmContents(env.sink, self.cache, env.known,
                                  candidates=lambda: sorted(env.live), clock=env.clock,
                                  deadline=3.0)
        self.tpm = TpmKeys(self.cache, env.sink, env.known, clock=env.clock, deadline=3.0)

    def tearDown(self) -> None:
        self.successResultOf(self.cache.stop())

    def restart(self) -> None:
        """The daemon restarts over the same state directory."""
        self.successResultOf(self.cache.stop())
        self.env.known = self.env.build_known()
        self.env.sink.known = self.env.known
        self.env.cache = self.env.build()
        self.start()

    def get(self) -> str:
        return self.successResultOf(self.vtpms.get(self.vtpm))

    def read(self, key: TpmKey) -> bytes:
        return self.successResultOf(self.tpm.get(VM1, key))  # type: ignore[arg-type]

    def writes(self) -> list[str]:
        return [args[1] for name, args in self.up.calls
                if name == "set_vtpm_contents" and args[0] == self.vtpm]

    def test_set_after_xapi_returns_wins_over_an_older_cached_write(self) -> None:
        """The reproduced rollback: permall v3 cached during the outage; xapi
        returns; the orchestrator sets the whole state before the flusher's
        next retry. The older cached permall must never land on top."""
        self.successResultOf(self.vtpms.learn(VM1))
        self.up.down = True
        self.successResultOf(self.cache.write(VM1, 0, b"p3"))
        self.env.clock.advance(0.5)  # a failed retry: the flusher backs off
        self.up.down = False
        self.successResultOf(self.vtpms.set(self.vtpm, "new new new"))
        self.env.settle()
        self.assertEqual(self.up.vtpms[self.vtpm], "new new new")
        self.assertNotIn("p3", " ".join(self.writes()[self.writes().index("new new new"):]))
        self.assertEqual(self.cache.status().pending, {})

    def test_set_resolves_the_vm_when_nothing_was_learnt(self) -> None:
        self.up.down = True
        self.successResultOf(self.cache.write(VM1, 0, b"p3"))
        self.up.down = False
        self.successResultOf(self.vtpms.set(self.vtpm, "n"))
        self.env.settle()
        self.assertEqual(self.up.vtpms[self.vtpm], "n")

    def test_get_overlays_pending_keys(self) -> None:
        self.up.down = True
        self.successResultOf(self.cache.write(VM1, 0, b"p3"))
        self.up.down = False
        # xapi answers again, but the cache has not drained yet.
        self.assertEqual(self.get(), "p3 s1 v1")

    def test_get_during_outage_from_the_last_known_state(self) -> None:
        self.assertEqual(self.get(), "p1 s1 v1")  # learnt the vTPM, copied the state
        self.up.down = True
        self.assertEqual(self.get(), "p1 s1 v1")
        self.successResultOf(self.cache.write(VM1, 2, b"v2"))
        self.assertEqual(self.get(), "p1 s1 v2")

    def test_get_during_outage_without_copy(self) -> None:
        self.get()  # xenopsd reads the vTPM when it starts it: the mapping is learnt
        self.env.known.drop(VM1)  # (no copy, e.g. after a host crash)
        self.successResultOf(self.env.known.record_vtpm_handle(VM1, self.vtpm))
        self.successResultOf(self.env.known.record_vtpm_uuid(self.vtpm, self.vtpm))
        self.up.down = True
        self.successResultOf(self.cache.write(VM1, 0, b"p"))
        self.failureResultOf(self.vtpms.get(self.vtpm), TransientUpstreamError)
        self.successResultOf(self.cache.write(VM1, 1, b"s"))
        self.successResultOf(self.cache.write(VM1, 2, b"v"))
        self.assertEqual(self.get(), "p s v")  # every key known locally

    def test_set_during_outage_is_cached_visible_and_delivered_in_order(self) -> None:
        self.get()
        self.up.down = True
        self.successResultOf(self.cache.write(VM1, 1, b"s2"))
        self.successResultOf(self.vtpms.set(self.vtpm, "P S V"))
        self.successResultOf(self.cache.write(VM1, 2, b"v3"))
        self.assertEqual(self.get(), "P S v3")
        self.assertEqual([self.read(k) for k in TpmKey], [b"P", b"S", b"v3"])
        self.up.down = False
        self.env.settle()
        self.assertEqual(self.up.vtpms[self.vtpm], "P S v3")
        for contents in self.writes():
            self.assertNotIn("s2", contents)  # superseded, never delivered

    def test_bare_permall_clears_the_other_keys(self) -> None:
        self.get()
        self.up.down = True
        self.successResultOf(self.vtpms.set(self.vtpm, "P"))
        self.assertEqual(self.get(), "P")
        self.assertEqual(self.read(TpmKey.VOLATILESTATE), b"")
        self.up.down = False
        self.env.settle()
        self.assertEqual(self.up.vtpms[self.vtpm], "P")

    def test_set_during_outage_needs_to_know_the_vm(self) -> None:
        self.up.down = True
        self.failureResultOf(self.vtpms.set(self.vtpm, "P S V"), TransientUpstreamError)
        self.assertEqual(self.cache.status().pending, {})

    def test_mapping_and_cache_survive_a_restart(self) -> None:
        self.assertEqual(self.get(), "p1 s1 v1")
        self.up.down = True
        self.restart()
        self.successResultOf(self.vtpms.set(self.vtpm, "A B C"))
        self.assertEqual(self.get(), "A B C")
        self.restart()
        self.assertEqual(self.get(), "A B C")
        self.up.down = False
        self.env.settle()
        self.assertEqual(self.up.vtpms[self.vtpm], "A B C")

    def test_direct_set_is_acknowledged_after_upstream_took_it(self) -> None:
        self.successResultOf(self.vtpms.set(self.vtpm, "A B C"))
        self.assertEqual(self.up.vtpms[self.vtpm], "A B C")
        self.assertEqual(self.cache.status().mode, "Direct")
        self.assertEqual(self.up.count("get_vtpm_contents"), 0)  # the whole state: no read

    def test_a_vtpm_of_no_vm_of_ours_goes_straight_upstream(self) -> None:
        self.env.live.clear()
        other = self.up.vms[VM2]["vtpm"]
        self.successResultOf(self.vtpms.set(other, "x y z"))
        self.assertEqual(self.up.vtpms[other], "x y z")
        self.assertEqual(self.successResultOf(self.vtpms.get(other)), "x y z")

    def test_invalid_contents(self) -> None:
        for bad in ("a b", "a b c d", "\u00e9"):
            self.failureResultOf(self.vtpms.set(self.vtpm, bad), InvalidContents)
        self.assertEqual(self.writes(), [])
