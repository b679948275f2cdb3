"""The domain sockets' views read pending versions first, then upstream,
then the last known state."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import SynchronousTestCase

from tests.fakes import FakeUpstream, PendingWriter, StoreKit
from xguard.errors import TransientUpstreamError
from xguard.model import NvramWrite, TpmKey
from xguard.state.views import TpmKeys, VmNvram

VM = "11111111-2222-3333-4444-555555555555"


class StoreTests(SynchronousTestCase):
    """Reads: the pending version, else upstream within the deadline, else
    the last known state, else a transient error."""

    def setUp(self) -> None:
        self.upstream = FakeUpstream()
        self.vtpm = self.upstream.add_vm(VM, nvram={"other": "o", "EFI-variables": "old"},
                                         sb_state="update_available")
        self.kit = StoreKit(self.upstream)
        self.addCleanup(self.kit.cleanup)
        self.clock = self.kit.clock

    def get(self, store: TpmKeys, key: TpmKey = TpmKey.PERMALL) -> Deferred[bytes]:
        return ensureDeferred(store.get(VM, key))

    def test_tpm_get_prefers_pending(self) -> None:
        self.upstream.vtpms[self.vtpm] = "up"
        store = self.kit.tpm_keys(PendingWriter({(VM, 0): b"pending"}))
        self.assertEqual(self.successResultOf(self.get(store)), b"pending")
        self.assertEqual(self.upstream.count("get_vtpm_contents"), 0)

    def test_tpm_get_from_upstream(self) -> None:
        self.upstream.vtpms[self.vtpm] = "up"
        self.assertEqual(self.successResultOf(self.get(self.kit.tpm)), b"up")

    def test_tpm_get_during_outage_serves_the_last_known_state(self) -> None:
        self.upstream.vtpms[self.vtpm] = "p s v"
        self.successResultOf(self.get(self.kit.tpm))
        self.upstream.down = True
        self.assertEqual(self.successResultOf(self.get(self.kit.tpm, TpmKey.SAVESTATE)), b"s")

    def test_tpm_get_during_outage_without_copy_is_transient(self) -> None:
        self.upstream.down = True
        self.failureResultOf(self.get(self.kit.tpm), TransientUpstreamError)

    def test_tpm_get_past_the_deadline_serves_the_copy(self) -> None:
        """A hung upstream costs a reader the deadline, not xapi's timeout."""
        self.upstream.vtpms[self.vtpm] = "p s v"
        self.successResultOf(self.get(self.kit.tpm))
        self.upstream.hold = True
        d = self.get(self.kit.tpm, TpmKey.VOLATILESTATE)
        self.assertNoResult(d)
        self.clock.advance(3.0)
        self.assertEqual(self.successResultOf(d), b"v")
        self.upstream.hold = False
        self.upstream.release()  # the late answer is consumed quietly
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_nvram_overlay(self) -> None:
        writer = PendingWriter({(VM, 0): NvramWrite("new", "no").encode()})
        store = VmNvram(writer, self.kit.nvram_sink, self.kit.known, clock=self.clock,
                           deadline=3.0)
        self.assertEqual(self.successResultOf(ensureDeferred(store.get(VM))),
                         {"other": "o", "EFI-variables": "new"})
        # The copy is upstream's map, not the overlay.
        self.assertEqual(self.successResultOf(self.kit.known.nvram(VM)),
                         {"other": "o", "EFI-variables": "old"})

    def test_nvram_pending_served_while_upstream_down(self) -> None:
        writer = PendingWriter({(VM, 0): NvramWrite("new", "no").encode()})
        self.upstream.down = True
        store = VmNvram(writer, self.kit.nvram_sink, self.kit.known, clock=self.clock,
                           deadline=3.0)
        self.assertEqual(self.successResultOf(ensureDeferred(store.get(VM))),
                         {"EFI-variables": "new"})

    def test_nvram_during_outage_serves_the_last_known_map(self) -> None:
        self.successResultOf(ensureDeferred(self.kit.nvram.get(VM)))
        self.upstream.down = True
        self.assertEqual(self.successResultOf(ensureDeferred(self.kit.nvram.get(VM))),
                         {"other": "o", "EFI-variables": "old"})

    def test_nvram_write_updates_the_copy(self) -> None:
        self.successResultOf(ensureDeferred(self.kit.nvram.get(VM)))
        self.successResultOf(self.kit.nvram.set_efi_variables(VM, "newer", "no"))
        self.upstream.down = True
        self.assertEqual(self.successResultOf(ensureDeferred(self.kit.nvram.get(VM))),
                         {"other": "o", "EFI-variables": "newer"})

    def test_nvram_down_and_nothing_known_fails_transient(self) -> None:
        self.upstream.down = True
        self.failureResultOf(ensureDeferred(self.kit.nvram.get(VM)), TransientUpstreamError)

    def test_secureboot_state_falls_back_to_the_copy(self) -> None:
        self.upstream.down = True
        sb = self.kit.nvram.secureboot_state
        self.failureResultOf(ensureDeferred(sb(VM)), TransientUpstreamError)
        self.upstream.down = False
        self.assertEqual(self.successResultOf(ensureDeferred(sb(VM))), "update_available")
        self.upstream.down = True
        self.assertEqual(self.successResultOf(ensureDeferred(sb(VM))), "update_available")

    def test_nvram_set_encodes_flag(self) -> None:
        pending: dict[Any, bytes] = {}
        store = VmNvram(PendingWriter(pending), self.kit.nvram_sink, self.kit.known,
                           clock=self.clock, deadline=3.0)
        self.successResultOf(store.set_efi_variables(VM, "v", "yes"))
        self.assertEqual(NvramWrite.decode(pending[VM, 0]), NvramWrite("v", "yes"))



