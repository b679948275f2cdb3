"""Sinks deliver with one serialized read-modify-write, and copy what
upstream holds."""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests.fakes import FakeUpstream, PendingWriter, StoreKit
from xguard.errors import PermanentUpstreamError, TransientUpstreamError
from xguard.interfaces import IItemWriter, INvramSink, IUpstream, IVtpmSink
from xguard.model import NvramWrite, TpmKey, TpmState
from xguard.state.direct import DirectWriter

VM = "11111111-2222-3333-4444-555555555555"


class SinkTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.upstream = FakeUpstream()
        self.vtpm = self.upstream.add_vm(VM)
        self.kit = StoreKit(self.upstream)
        self.addCleanup(self.kit.cleanup)
        self.locks = self.kit.locks
        self.sink = self.kit.vtpm_sink

    def test_interfaces(self) -> None:
        verifyObject(IUpstream, self.upstream)
        verifyObject(IVtpmSink, self.sink)
        verifyObject(INvramSink, self.kit.nvram_sink)
        verifyObject(IItemWriter, DirectWriter(self.sink))
        verifyObject(IItemWriter, PendingWriter())

    def test_two_keys_are_one_rmw(self) -> None:
        self.upstream.vtpms[self.vtpm] = "p s v"
        self.successResultOf(self.sink.deliver(VM, {0: b"P", 2: b"V"}))
        self.assertEqual(self.upstream.vtpms[self.vtpm], "P s V")
        self.assertEqual(self.upstream.count("get_vtpm_contents"), 1)
        self.assertEqual(self.upstream.count("set_vtpm_contents"), 1)

    def test_all_three_keys_need_no_read(self) -> None:
        """Nothing of upstream's string survives a write of every key."""
        self.upstream.vtpms[self.vtpm] = "not even valid contents"
        self.successResultOf(self.sink.deliver(VM, {0: b"P", 1: b"S", 2: b"V"}))
        self.assertEqual(self.upstream.vtpms[self.vtpm], "P S V")
        self.assertEqual(self.upstream.count("get_vtpm_contents"), 0)

    def test_deliveries_and_reads_are_copied(self) -> None:
        self.upstream.vtpms[self.vtpm] = "p s v"
        self.successResultOf(self.sink.read(VM, TpmKey.SAVESTATE))
        self.assertEqual(self.successResultOf(self.kit.known.tpm(VM)), TpmState("p", "s", "v"))
        self.successResultOf(self.sink.deliver(VM, {1: b"S"}))
        self.assertEqual(self.successResultOf(self.kit.known.tpm(VM)), TpmState("p", "S", "v"))
        self.assertEqual(self.kit.known.vtpm_of_vm(VM), self.vtpm)

    def test_a_confirmed_vtpm_is_not_read_before_a_write(self) -> None:
        """Its copy is exactly upstream's: the read adds nothing."""
        self.upstream.vtpms[self.vtpm] = "p s v"
        self.successResultOf(self.sink.read(VM, TpmKey.PERMALL))  # confirms it
        reads = self.upstream.count("get_vtpm_contents")
        for value in (b"P1", b"P2"):
            self.successResultOf(self.sink.deliver(VM, {0: value}))
        self.assertEqual(self.upstream.count("get_vtpm_contents"), reads)
        self.assertEqual(self.upstream.vtpms[self.vtpm], "P2 s v")

    def test_an_unknown_outcome_unconfirms(self) -> None:
        self.upstream.vtpms[self.vtpm] = "p s v"
        self.successResultOf(self.sink.read(VM, TpmKey.PERMALL))
        set_contents = self.upstream.set_vtpm_contents
        self.upstream.set_vtpm_contents = lambda vtpm, c: fail(  # type: ignore[method-assign]
            TransientUpstreamError(["TIMEOUT"]))
        self.failureResultOf(self.sink.deliver(VM, {0: b"X"}), TransientUpstreamError)
        self.upstream.set_vtpm_contents = set_contents  # type: ignore[method-assign]
        self.upstream.vtpms[self.vtpm] = "p s2 v"  # whatever upstream holds now
        reads = self.upstream.count("get_vtpm_contents")
        self.successResultOf(self.sink.deliver(VM, {0: b"Y"}))
        self.assertEqual(self.upstream.count("get_vtpm_contents"), reads + 1)  # read again
        self.assertEqual(self.upstream.vtpms[self.vtpm], "Y s2 v")

    def test_a_stopped_vm_is_read_again(self) -> None:
        self.upstream.vtpms[self.vtpm] = "p s v"
        self.successResultOf(self.sink.read(VM, TpmKey.PERMALL))
        self.sink.forget(VM)  # its sockets were destroyed: xapi may change it now
        self.upstream.vtpms[self.vtpm] = "p reverted v"
        self.successResultOf(self.sink.deliver(VM, {0: b"P"}))
        self.assertEqual(self.upstream.vtpms[self.vtpm], "P reverted v")

    def test_a_delivery_after_the_vm_stopped_does_not_confirm_it(self) -> None:
        """A stopped VM's cached write delivered later (its copy still kept
        until upstream answers): the VM may start on another host, which
        writes; when it comes back here, its next write must read that
        lineage, not the copy this delivery recorded."""
        live = {VM}
        kit = StoreKit(self.upstream, live=lambda vm: vm in live)
        self.addCleanup(kit.cleanup)
        sink = kit.vtpm_sink
        self.upstream.vtpms[self.vtpm] = "p s v"
        self.successResultOf(sink.read(VM, TpmKey.PERMALL))
        live.clear()
        sink.forget(VM)  # its sockets were destroyed
        self.successResultOf(sink.deliver(VM, {0: b"P"}))  # a cached write, flushed
        self.upstream.vtpms[self.vtpm] = "x y z"  # another host's lineage
        live.add(VM)  # back here
        self.successResultOf(sink.deliver(VM, {1: b"S"}))
        self.assertEqual(self.upstream.vtpms[self.vtpm], "x S z")

    def test_failed_delivery_is_not_copied(self) -> None:
        self.upstream.vtpms[self.vtpm] = "p"
        self.successResultOf(self.sink.read(VM, TpmKey.PERMALL))
        self.upstream.set_vtpm_contents = lambda vtpm, c: fail(  # type: ignore[method-assign]
            TransientUpstreamError(["HOST_STILL_BOOTING"]))
        self.failureResultOf(self.sink.deliver(VM, {0: b"P"}), TransientUpstreamError)
        self.assertEqual(self.successResultOf(self.kit.known.tpm(VM)), TpmState("p"))

    def test_concurrent_updates_of_different_keys_keep_both(self) -> None:
        self.upstream.hold = True
        d0 = self.sink.deliver(VM, {0: b"P"})
        d1 = self.sink.deliver(VM, {1: b"S"})
        while self.upstream.held:
            self.upstream.release()
        self.successResultOf(d0)
        self.successResultOf(d1)
        self.assertEqual(self.upstream.vtpms[self.vtpm], "P S ")

    def test_read_waits_for_rmw_in_flight(self) -> None:
        self.upstream.hold = True
        write = self.sink.deliver(VM, {0: b"NEW"})
        read = self.sink.read(VM, TpmKey.PERMALL)
        while self.upstream.held:
            self.upstream.release()
        self.successResultOf(write)
        self.assertEqual(self.successResultOf(read), b"NEW")

    def test_no_vtpm_is_permanent(self) -> None:
        self.upstream.add_vm("22222222-2222-3333-4444-555555555555", vtpm=False)
        f = self.failureResultOf(
            self.sink.deliver("22222222-2222-3333-4444-555555555555", {0: b"x"}),
            PermanentUpstreamError)
        self.assertEqual(f.value.codes[0], "VM_HAS_NO_VTPM")

    def test_stale_vtpm_handle_is_forgotten_and_resolved_once(self) -> None:
        stale = [PermanentUpstreamError(["HANDLE_INVALID", "VTPM", "old"])]
        get = self.upstream.get_vtpm_contents

        def get_once_stale(vtpm: str) -> Deferred[str]:
            if stale:
                self.upstream.calls.append(("get_vtpm_contents", (vtpm,)))
                return fail(stale.pop())
            return get(vtpm)

        self.upstream.get_vtpm_contents = get_once_stale  # type: ignore[method-assign]
        self.successResultOf(self.sink.deliver(VM, {0: b"P"}))
        self.assertEqual(self.upstream.vtpms[self.vtpm], "P")
        self.assertEqual(self.upstream.count("vtpm_for_vm"), 2)  # looked up once more

    def test_handle_invalid_twice_surfaces(self) -> None:
        self.upstream.get_vtpm_contents = lambda vtpm: fail(  # type: ignore[method-assign]
            PermanentUpstreamError(["HANDLE_INVALID", "VTPM", vtpm]))
        self.failureResultOf(self.sink.deliver(VM, {0: b"P"}), PermanentUpstreamError)
        self.assertEqual(self.upstream.count("vtpm_for_vm"), 2)

    def test_garbled_upstream_contents_is_permanent(self) -> None:
        self.upstream.vtpms[self.vtpm] = "a b"
        self.failureResultOf(self.sink.read(VM, TpmKey.PERMALL), PermanentUpstreamError)

    def test_nvram_sink_keeps_update_flag(self) -> None:
        nvram = self.kit.nvram_sink
        self.successResultOf(nvram.deliver(VM, {0: NvramWrite("vars", "yes").encode()}))
        self.assertEqual(self.upstream.calls[-1], ("set_nvram_efi_variables", (VM, "vars", "yes")))
        self.assertEqual(self.successResultOf(self.kit.known.nvram(VM)), {"EFI-variables": "vars"})

    def test_undecodable_nvram_record_is_permanent(self) -> None:
        f = self.failureResultOf(self.kit.nvram_sink.deliver(VM, {0: b"not json"}),
                                 PermanentUpstreamError)
        self.assertEqual(f.value.codes[0], "NVRAM_RECORD_INVALID")

    def test_non_ascii_tpm_content_is_permanent(self) -> None:
        self.failureResultOf(self.sink.deliver(VM, {0: b"\xff"}), PermanentUpstreamError)


