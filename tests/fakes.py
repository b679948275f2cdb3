"""Fakes for unit tests: in-memory, scriptable, no mocks of our own code."""

from __future__ import annotations

import itertools
import shutil
import signal
import tempfile
import uuid as _uuid
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from zope.interface import implementer

from xguard.errors import NoVtpm, PermanentUpstreamError, TransientUpstreamError, UpstreamError
from xguard.interfaces import IItemWriter, IUpstream
from xguard.model import Residence, Service
from xguard.state.contents import VtpmContents
from xguard.state.direct import DirectWriter
from xguard.state.known import KnownState
from xguard.state.sinks import NvramSink, VtpmSink
from xguard.state.views import TpmKeys, VmNvram
from xguard.status import DaemonStatus, UpstreamStatus
from xguard.upstream.reachability import Reachability
from xguard.util.locks import KeyedLocks


@implementer(IUpstream)
class FakeUpstream:
    """An in-memory IUpstream with scriptable faults.

    - ``down = True``: every call fails with TransientUpstreamError.
    - ``fail_next(exc, n)``: the next ``n`` calls fail with ``exc``.
    - ``hold = True``: calls wait until ``release()`` (answers in order);
      a client that dies meanwhile: ``drop_held()`` (they never land) or
      ``land_held()`` (they land, unanswered).
    - ``calls``: (method, args) of every call, for assertions.
    - ``residence[vm] = Residence("Running", "host-b", here=False)``: where
      ``vm_residence`` says the VM is (absent: halted, nowhere).
    - another host writes by changing ``vtpms`` / ``vms`` directly.
    """

    description = "fake upstream"

    def __init__(self, clock: Any = None) -> None:
        self._clock = clock or Clock()
        self.reachability = Reachability(self._clock, self.description)
        self.vms: dict[str, dict[str, Any]] = {}
        self.vtpms: dict[str, str] = {}
        self.messages: list[tuple[str, str, int, str]] = []
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.down = False
        self.hold = False
        self._held: list[tuple[Deferred[Any], Callable[[], Any]]] = []
        #: (method, args) of each held call, in the same order.
        self._held_calls: list[tuple[str, tuple[Any, ...]]] = []
        self._failures: list[UpstreamError] = []
        self._refs = itertools.count()
        self.closed = False
        self.residence: dict[str, Residence] = {}
        #: (vtpm, before, after, who) of every vTPM contents change, in the
        #: order upstream applied them ("xguard", or "other" host).
        self.history: list[tuple[str, str, str, str]] = []

    # -- scripting ---------------------------------------------------------
    def new_client(self) -> None:
        """The daemon restarted: its client starts afresh (reachability
        unknown, no timers); the store itself keeps everything."""
        self.reachability.stop()
        self.reachability = Reachability(self._clock, self.description)

    def add_vm(self, vm_uuid: str, *, vtpm: bool = True, nvram: dict[str, str] | None = None,
               sb_state: str = "ok") -> str | None:
        vtpm_uuid = str(_uuid.uuid4()) if vtpm else None
        self.vms[vm_uuid] = {"nvram": dict(nvram or {}), "vtpm": vtpm_uuid, "sb": sb_state}
        if vtpm_uuid:
            self.vtpms[vtpm_uuid] = ""
        return vtpm_uuid

    def fail_next(self, exc: UpstreamError, n: int = 1) -> None:
        self._failures.extend([exc] * n)

    def release(self) -> None:
        """Answer every held call, in order."""
        held, self._held = self._held, []
        self._held_calls = []
        for d, run in held:
            try:
                result = run()
            except Exception as e:  # noqa: BLE001 - hand the failure over
                d.errback(e)
            else:
                d.callback(result)

    @property
    def held(self) -> int:
        return len(self._held)

    def holds_a_call_for(self, *uuids: str) -> bool:
        """Whether a held call (received, not yet applied or answered)
        names any of ``uuids`` (a VM's, its vTPM's)."""
        return any(arg in uuids for _, args in self._held_calls for arg in args)

    def drop_held(self) -> None:
        """The client died: its held calls never land."""
        self._held, self._held_calls = [], []

    def land_held(self) -> None:
        """The client died, but upstream still applies what it had
        received, in order (xapi finishes a call whose caller went away):
        its held calls land, and nobody hears the answers."""
        held, self._held, self._held_calls = self._held, [], []
        for _, run in held:
            try:
                run()
            except UpstreamError:
                pass

    def _call(self, name: str, args: tuple[Any, ...], run: Callable[[], Any]) -> "Deferred[Any]":
        self.calls.append((name, args))
        ticket = self.reachability.call_started()
        if self.down:
            return self._note(fail(TransientUpstreamError(["CONNECTION_REFUSED"])), ticket)
        if self._failures:
            return self._note(fail(self._failures.pop(0)), ticket)
        if self.hold:
            d: Deferred[Any] = Deferred()
            self._held.append((d, run))
            self._held_calls.append((name, args))
            return self._note(d, ticket)
        try:
            return self._note(succeed(run()), ticket)
        except UpstreamError as e:
            return self._note(fail(e), ticket)

    def _note(self, d: "Deferred[Any]", ticket: int) -> "Deferred[Any]":
        """Report each outcome to ``reachability``, as real upstreams do."""
        def ok(result: Any) -> Any:
            self.reachability.answered(ticket)
            return result

        def failed(f: Any) -> Any:
            if f.check(TransientUpstreamError):
                self.reachability.failed(" ".join(f.value.codes))
            else:
                self.reachability.answered(ticket)
            return f

        return d.addCallbacks(ok, failed)

    def count(self, name: str) -> int:
        return sum(1 for n, _ in self.calls if n == name)

    def _vm(self, vm_uuid: str) -> dict[str, Any]:
        try:
            return self.vms[vm_uuid]
        except KeyError:
            raise PermanentUpstreamError(["UUID_INVALID", "VM", vm_uuid]) from None

    # -- IUpstream ---------------------------------------------------------
    def ensure_vm(self, vm_uuid: str) -> "Deferred[None]":
        return succeed(None)

    def vtpm_for_vm(self, vm_uuid: str) -> "Deferred[str]":
        def run() -> str:
            vtpm = self._vm(vm_uuid)["vtpm"]
            if vtpm is None:
                raise NoVtpm(vm_uuid)
            return vtpm
        return self._call("vtpm_for_vm", (vm_uuid,), run)

    def vtpm_by_uuid(self, vtpm_uuid: str) -> "Deferred[str]":
        def run() -> str:
            if vtpm_uuid not in self.vtpms:
                raise PermanentUpstreamError(["UUID_INVALID", "VTPM", vtpm_uuid])
            return vtpm_uuid  # this fake's handles are the uuids
        return self._call("vtpm_by_uuid", (vtpm_uuid,), run)

    def get_vtpm_contents(self, vtpm_uuid: str) -> "Deferred[str]":
        def run() -> str:
            if vtpm_uuid not in self.vtpms:
                raise PermanentUpstreamError(["UUID_INVALID", "VTPM", vtpm_uuid])
            return self.vtpms[vtpm_uuid]
        return self._call("get_vtpm_contents", (vtpm_uuid,), run)

    def other_host_writes(self, vtpm_uuid: str, contents: str) -> None:
        """Another host's guard sets the vTPM's contents (HA, migration)."""
        self.history.append((vtpm_uuid, self.vtpms[vtpm_uuid], contents, "other"))
        self.vtpms[vtpm_uuid] = contents

    def set_vtpm_contents(self, vtpm_uuid: str, contents: str) -> "Deferred[None]":
        def run() -> None:
            if vtpm_uuid not in self.vtpms:
                raise PermanentUpstreamError(["UUID_INVALID", "VTPM", vtpm_uuid])
            self.history.append((vtpm_uuid, self.vtpms[vtpm_uuid], contents, "xguard"))
            self.vtpms[vtpm_uuid] = contents
        return self._call("set_vtpm_contents", (vtpm_uuid, contents), run)

    def get_nvram(self, vm_uuid: str) -> "Deferred[dict[str, str]]":
        return self._call("get_nvram", (vm_uuid,), lambda: dict(self._vm(vm_uuid)["nvram"]))

    def set_nvram_efi_variables(self, vm_uuid: str, value: str, update: str) -> "Deferred[None]":
        def run() -> None:
            self._vm(vm_uuid)["nvram"]["EFI-variables"] = value
            self._vm(vm_uuid)["update"] = update
        return self._call("set_nvram_efi_variables", (vm_uuid, value, update), run)

    def get_secureboot_certificates_state(self, vm_uuid: str) -> "Deferred[str]":
        return self._call("get_secureboot_certificates_state", (vm_uuid,),
                          lambda: self._vm(vm_uuid)["sb"])

    def create_message(self, vm_uuid: str, name: str, priority: int, body: str) -> "Deferred[str]":
        def run() -> str:
            self._vm(vm_uuid)
            self.messages.append((vm_uuid, name, priority, body))
            return f"OpaqueRef:message-{next(self._refs)}"
        return self._call("create_message", (vm_uuid, name, priority, body), run)

    def confirm(self, vm_uuid: str) -> "Deferred[None]":
        return self._call("confirm", (vm_uuid,), lambda: None)

    def vm_residence(self, vm_uuid: str) -> "Deferred[Residence | None]":
        def run() -> Residence:
            self._vm(vm_uuid)
            return self.residence.get(vm_uuid, Residence("Halted"))
        return self._call("vm_residence", (vm_uuid,), run)

    def forget(self, vm_uuid: str) -> None:
        self.calls.append(("forget", (vm_uuid,)))

    def probe(self) -> "Deferred[None]":
        return self._call("probe", (), lambda: None)

    def status(self) -> dict[str, Any]:
        return {"kind": "fake", "target": self.description, "reachable": not self.down}

    def close(self) -> "Deferred[None]":
        self.closed = True
        return succeed(None)


def sync_runner(f: Callable[..., Any], *args: Any, **kwargs: Any) -> "Deferred[Any]":
    """A blocking-work runner that runs inline: tests stay synchronous."""
    try:
        return succeed(f(*args, **kwargs))
    except Exception:  # noqa: BLE001
        return fail()


class StoreKit:
    """What the domain sockets are built on, without a cache: the sinks,
    the no-cache writers, the stores and a real last-known-state store in a
    temporary directory (``cleanup()`` removes it)."""

    def __init__(self, upstream: Any, clock: Any = None, *,
                 live: Callable[[str], bool] = lambda vm: True, deadline: float = 3.0) -> None:
        self.clock = clock or Clock()
        self.root = tempfile.mkdtemp(prefix="xgk")
        # Removed with this object, or at exit, if no test calls cleanup().
        self._remove = weakref.finalize(self, shutil.rmtree, self.root, True)
        self.known = KnownState(self.root, runner=sync_runner, is_live=live,
                                boot_id=lambda: "boot")
        self.known.open()
        self.locks = KeyedLocks()
        self.vtpm_sink = VtpmSink(upstream, self.locks, self.known)
        self.nvram_sink = NvramSink(upstream, self.locks, self.known)
        self.tpm = self.tpm_keys(DirectWriter(self.vtpm_sink), deadline=deadline)
        self.nvram = VmNvram(DirectWriter(self.nvram_sink), self.nvram_sink, self.known,
                                clock=self.clock, deadline=deadline)

    def tpm_keys(self, writer: Any, deadline: float = 3.0) -> TpmKeys:
        return TpmKeys(writer, self.vtpm_sink, self.known, clock=self.clock, deadline=deadline)

    def vtpm_contents(self, writer: Any = None,
                      candidates: Callable[[], Any] = lambda: ()) -> VtpmContents:
        """The orchestrator's vTPM calls over these sinks (no cache unless
        ``writer`` is one)."""
        return VtpmContents(self.vtpm_sink,
                            writer or DirectWriter(self.vtpm_sink), self.known,
                            candidates=candidates, clock=self.clock, deadline=3.0)

    def cleanup(self) -> None:
        self._remove()


@implementer(IItemWriter)
class PendingWriter:
    """A write-back cache stand-in that never delivers: every write stays
    pending (``items`` may be seeded)."""

    service = Service.SWTPM

    def __init__(self, items: dict[tuple[str, int], bytes] | None = None) -> None:
        self.items: dict[tuple[str, int], bytes] = {} if items is None else items

    def write(self, vm_uuid: str, key: int, content: bytes) -> "Deferred[None]":
        return self.write_many(vm_uuid, {key: content})

    def write_many(self, vm_uuid: str, changes: Mapping[int, bytes]) -> "Deferred[None]":
        for key, content in changes.items():
            self.items[(vm_uuid, int(key))] = content
        return succeed(None)

    def pending(self, vm_uuid: str, key: int) -> "Deferred[bytes | None]":
        return succeed(self.items.get((vm_uuid, int(key))))

    def has_pending(self, vm_uuid: str) -> bool:
        return any(vm == vm_uuid for vm, _ in self.items)

    def pending_vms(self) -> set[str]:
        return {vm for vm, _ in self.items}


def some_status(**sockets: int) -> DaemonStatus:
    """A small Status value for control-channel tests."""
    return DaemonStatus(version="test", ready=True, cache_enabled=True, services={},
                        upstream=UpstreamStatus(kind="fake", target="fake upstream"),
                        sockets=dict(sockets))


class FakeSignals:
    """The part of the ``signal`` module ExitStatus uses: handlers recorded,
    for the test to call."""

    SIGTERM, SIGINT, SIGHUP = signal.SIGTERM, signal.SIGINT, signal.SIGHUP

    def __init__(self) -> None:
        self.handlers: dict[int, Any] = {}

    def signal(self, signum: int, handler: Any) -> None:
        self.handlers[signum] = handler


class InlineReactor(MemoryReactorClock):
    """A MemoryReactorClock whose callFromThread runs the call at once (as a
    signal handler's hand-off to the reactor would, one iteration later)."""

    def callFromThread(self, f: Any, *args: Any) -> None:
        f(*args)
