"""Sinks deliver with one serialized read-modify-write; stores read pending
versions first."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.fakes import FakeUpstream
from xguard.errors import PermanentUpstreamError, TransientUpstreamError
from xguard.interfaces import IItemSink, IItemWriter, IUpstream
from xguard.items import DirectWriter, NvramSink, NvramStore, TpmStore, VtpmSink
from xguard.locks import KeyedLocks
from xguard.model import NvramWrite, Service, TpmKey

VM = "11111111-2222-3333-4444-555555555555"


@implementer(IItemWriter)
class PendingWriter:
    """An IItemWriter whose pending versions are given (a cache stand-in)."""

    service = Service.SWTPM

    def __init__(self, pending: dict[tuple[str, int], bytes]) -> None:
        self._pending = pending

    def write(self, vm_uuid: str, key: int, content: bytes) -> Deferred[None]:
        self._pending[vm_uuid, key] = content
        return succeed(None)

    def pending(self, vm_uuid: str, key: int) -> Deferred[bytes | None]:
        return succeed(self._pending.get((vm_uuid, key)))


class SinkTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.upstream = FakeUpstream()
        self.vtpm = self.upstream.add_vm(VM)
        self.locks = KeyedLocks()
        self.sink = VtpmSink(self.upstream, self.locks)

    def test_interfaces(self) -> None:
        verifyObject(IUpstream, self.upstream)
        verifyObject(IItemSink, self.sink)
        verifyObject(IItemSink, NvramSink(self.upstream, self.locks))
        verifyObject(IItemWriter, DirectWriter(self.sink))

    def test_coalesced_delivery_is_one_rmw(self) -> None:
        self.successResultOf(self.sink.deliver(VM, {0: b"P", 1: b"S", 2: b"V"}))
        self.assertEqual(self.upstream.vtpms[self.vtpm], "P S V")
        self.assertEqual(self.upstream.count("get_vtpm_contents"), 1)
        self.assertEqual(self.upstream.count("set_vtpm_contents"), 1)

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
        self.assertEqual(self.upstream.count("forget"), 1)
        self.assertEqual(self.upstream.count("vtpm_for_vm"), 2)

    def test_handle_invalid_twice_surfaces(self) -> None:
        self.upstream.get_vtpm_contents = lambda vtpm: fail(  # type: ignore[method-assign]
            PermanentUpstreamError(["HANDLE_INVALID", "VTPM", vtpm]))
        self.failureResultOf(self.sink.deliver(VM, {0: b"P"}), PermanentUpstreamError)
        self.assertEqual(self.upstream.count("vtpm_for_vm"), 2)

    def test_garbled_upstream_contents_is_permanent(self) -> None:
        self.upstream.vtpms[self.vtpm] = "a b"
        self.failureResultOf(self.sink.read(VM, TpmKey.PERMALL), PermanentUpstreamError)

    def test_nvram_sink_keeps_update_flag(self) -> None:
        nvram = NvramSink(self.upstream, self.locks)
        self.successResultOf(nvram.deliver(VM, {0: NvramWrite("vars", "yes").encode()}))
        self.assertEqual(self.upstream.calls[-1], ("set_nvram_efi_variables", (VM, "vars", "yes")))


class StoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.upstream = FakeUpstream()
        self.vtpm = self.upstream.add_vm(VM, nvram={"other": "o", "EFI-variables": "old"})
        self.sink = VtpmSink(self.upstream, KeyedLocks())

    def test_tpm_get_prefers_pending(self) -> None:
        self.upstream.vtpms[self.vtpm] = "up"
        store = TpmStore(PendingWriter({(VM, 0): b"pending"}), self.sink)
        self.assertEqual(self.successResultOf(ensureDeferred(store.get(VM, TpmKey.PERMALL))),
                         b"pending")
        self.assertEqual(self.upstream.count("get_vtpm_contents"), 0)

    def test_tpm_get_falls_back_to_upstream(self) -> None:
        self.upstream.vtpms[self.vtpm] = "up"
        store = TpmStore(DirectWriter(self.sink), self.sink)
        self.assertEqual(self.successResultOf(ensureDeferred(store.get(VM, TpmKey.PERMALL))),
                         b"up")

    def test_nvram_overlay(self) -> None:
        writer = PendingWriter({(VM, 0): NvramWrite("new", "no").encode()})
        store = NvramStore(writer, self.upstream)
        self.assertEqual(self.successResultOf(ensureDeferred(store.get(VM))),
                         {"other": "o", "EFI-variables": "new"})

    def test_nvram_pending_served_while_upstream_down(self) -> None:
        writer = PendingWriter({(VM, 0): NvramWrite("new", "no").encode()})
        self.upstream.down = True
        store = NvramStore(writer, self.upstream)
        self.assertEqual(self.successResultOf(ensureDeferred(store.get(VM))),
                         {"EFI-variables": "new"})

    def test_nvram_down_and_nothing_pending_fails_transient(self) -> None:
        self.upstream.down = True
        store = NvramStore(PendingWriter({}), self.upstream)
        self.failureResultOf(ensureDeferred(store.get(VM)), TransientUpstreamError)

    def test_nvram_set_encodes_flag(self) -> None:
        pending: dict[Any, bytes] = {}
        store = NvramStore(PendingWriter(pending), self.upstream)
        self.successResultOf(store.set_efi_variables(VM, "v", "yes"))
        self.assertEqual(NvramWrite.decode(pending[VM, 0]), NvramWrite("v", "yes"))
