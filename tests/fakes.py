"""Fakes for unit tests: in-memory, scriptable, no mocks of our own code."""

from __future__ import annotations

import itertools
import uuid as _uuid
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from xguard.errors import NoVtpm, PermanentUpstreamError, TransientUpstreamError, UpstreamError
from xguard.interfaces import IUpstream


@implementer(IUpstream)
class FakeUpstream:
    """An in-memory IUpstream with scriptable faults.

    - ``down = True``: every call fails with TransientUpstreamError.
    - ``fail_next(exc, n)``: the next ``n`` calls fail with ``exc``.
    - ``hold = True``: calls wait until ``release()`` (answers in order).
    - ``calls``: (method, args) of every call, for assertions.
    """

    description = "fake upstream"

    def __init__(self) -> None:
        self.vms: dict[str, dict[str, Any]] = {}
        self.vtpms: dict[str, str] = {}
        self.messages: list[tuple[str, str, int, str]] = []
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.down = False
        self.hold = False
        self._held: list[tuple[Deferred[Any], Callable[[], Any]]] = []
        self._failures: list[UpstreamError] = []
        self._refs = itertools.count()
        self.closed = False

    # -- scripting ---------------------------------------------------------
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

    def _call(self, name: str, args: tuple[Any, ...], run: Callable[[], Any]) -> "Deferred[Any]":
        self.calls.append((name, args))
        if self.down:
            return fail(TransientUpstreamError(["CONNECTION_REFUSED"]))
        if self._failures:
            return fail(self._failures.pop(0))
        if self.hold:
            d: Deferred[Any] = Deferred()
            self._held.append((d, run))
            return d
        try:
            return succeed(run())
        except UpstreamError as e:
            return fail(e)

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

    def set_vtpm_contents(self, vtpm_uuid: str, contents: str) -> "Deferred[None]":
        def run() -> None:
            if vtpm_uuid not in self.vtpms:
                raise PermanentUpstreamError(["UUID_INVALID", "VTPM", vtpm_uuid])
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

    def forget(self, vm_uuid: str) -> None:
        self.calls.append(("forget", (vm_uuid,)))

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
