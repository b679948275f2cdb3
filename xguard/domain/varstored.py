# -*- test-case-name: tests.unit.test_varstored -*-
"""The varstored socket: xapi's XML-RPC, reduced to the calls varstored
makes, always about the socket's own VM.

Protocol: ``POST`` (any path) of an XML-RPC ``methodCall`` with positional
params; the answer is xapi's ``{Status, Value}`` / ``{Status,
ErrorDescription}`` struct (see :mod:`xguard.domain.xmlrpc`).

Error mapping, chosen among what SPEC §4.1 allows:

- a body that cannot be decoded as a ``methodCall`` (bad XML, DTD or entity
  declarations, malformed values) → HTTP 400, since there is no call to
  answer;
- a decoded call that is not acceptable (unknown method, wrong parameter
  count, wrong parameter type) → ``Failure`` with xapi's codes
  (``MESSAGE_METHOD_UNKNOWN``, ``MESSAGE_PARAMETER_COUNT_MISMATCH``,
  ``FIELD_TYPE_ERROR``), without any upstream call;
- upstream errors (transient or permanent) → ``Failure`` with the error's
  code list.

The VM a call targets is never taken from the request: handles and uuids
sent by the client are checked for type and ignored.

Fairness: a request is parsed (and its answer encoded) inside the VM's
one-at-a-time queue, in bounded steps with a reactor turn between two
(:mod:`xguard.domain.xmlrpc`), so a VM flooding its socket, from however
many connections, competes with itself and delays another VM's request by
one step at most.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from klein import Klein
from twisted.internet.defer import Deferred, DeferredLock
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import HTTPException as WerkzeugHTTPException

from ..errors import TransientUpstreamError, UpstreamError
from ..model import normalise_update
from ..state.views import VmNvram
from .site import (
    VmResource,
    next_turn,
    plain_response,
    request_logger,
    routing_error_response,
    write_in_steps,
)
from .steps import run_steps
from .xmlrpc import XmlRpcError, encode_failure, iter_method_call, iter_success_pieces

__all__ = ["VarstoredSocket", "SESSION_HANDLE", "VM_HANDLE", "MESSAGE_NAME"]

#: What login answers; never checked (the socket is the credential).
SESSION_HANDLE = "OpaqueRef:xguard-session"
#: What VM.get_by_uuid answers, whatever uuid was asked for.
VM_HANDLE = "OpaqueRef:xguard-vm"
#: The only message varstored may raise.
MESSAGE_NAME = "VM_SECURE_BOOT_FAILED"

_STR = "string"
_INT = "int"

# method -> parameter (name, type) list, positional as varstored sends them.
_SIGNATURES: dict[str, tuple[tuple[str, str], ...]] = {
    "session.login_with_password": (
        ("uname", _STR), ("pwd", _STR), ("version", _STR), ("originator", _STR)),
    "session.logout": (("session", _STR),),
    "VM.get_by_uuid": (("session", _STR), ("uuid", _STR)),
    "VM.get_NVRAM": (("session", _STR), ("vm", _STR)),
    "VM.set_NVRAM_EFI_variables": (("session", _STR), ("vm", _STR), ("value", _STR)),
    "VM.set_NVRAM_EFI_variables_v2": (
        ("session", _STR), ("vm", _STR), ("value", _STR), ("update", _STR)),
    "VM.get_secureboot_certificates_state": (("session", _STR), ("vm", _STR)),
    "message.create": (
        ("session", _STR), ("name", _STR), ("priority", _INT), ("class", _STR),
        ("obj_uuid", _STR), ("body", _STR)),
}


class _CallRefused(Exception):
    """A decoded call we will not run; ``codes`` is the Failure to answer."""

    def __init__(self, codes: list[str]) -> None:
        super().__init__(codes[0])
        self.codes = codes


def _check(method: str, params: list[Any]) -> list[Any]:
    """The params, type-checked (priority as an int), or _CallRefused."""
    signature = _SIGNATURES.get(method)
    if signature is None:
        raise _CallRefused(["MESSAGE_METHOD_UNKNOWN", method])
    if len(params) != len(signature):
        raise _CallRefused(
            ["MESSAGE_PARAMETER_COUNT_MISMATCH", method, str(len(signature)), str(len(params))])
    checked: list[Any] = []
    for (name, kind), value in zip(signature, params):
        if kind == _STR and isinstance(value, str):
            checked.append(value)
        elif kind == _INT and isinstance(value, int) and not isinstance(value, bool):
            checked.append(value)
        elif kind == _INT and isinstance(value, str) and _is_decimal(value):
            # xapi's XML-RPC carries int64 as a string: varstored sends "0".
            checked.append(int(value.strip()))
        else:
            raise _CallRefused(["FIELD_TYPE_ERROR", name])
    return checked


def _is_decimal(text: str) -> bool:
    text = text.strip()
    digits = text[1:] if text[:1] in ("-", "+") else text
    return 0 < len(digits) <= 19 and digits.isascii() and digits.isdigit()


#: The method serving each call (a name: one table for every socket, not a
#: dict of bound methods per socket; 2,000 sockets are common).
_HANDLERS = {
    "session.login_with_password": "_login",
    "session.logout": "_logout",
    "VM.get_by_uuid": "_get_by_uuid",
    "VM.get_NVRAM": "_get_nvram",
    "VM.set_NVRAM_EFI_variables": "_set_nvram",
    "VM.set_NVRAM_EFI_variables_v2": "_set_nvram_v2",
    "VM.get_secureboot_certificates_state": "_get_sb_state",
    "message.create": "_create_message",
}


class VarstoredSocket:
    """The XML-RPC app of one VM's varstored socket.

    :param vm_uuid: the VM every call acts on.
    :param nvram: NVRAM and secure-boot state reads (falling back to the last
        known state), writes (through the write-back cache) and the
        secure-boot alert.
    """

    app = Klein()
    log = Logger()

    def __init__(self, vm_uuid: str, nvram: VmNvram) -> None:
        self.vm_uuid = vm_uuid
        self.nvram = nvram
        # One call at a time, in arrival order, like xapi-guard's per-VM mutex.
        self._lock = DeferredLock()

    def resource(self) -> IResource:
        """The Klein resource to serve (wrap it in a DomainSite)."""
        return VmResource(self.app.resource(), self.vm_uuid)

    @app.route("/", methods=["POST"], branch=True)
    def rpc(self, request: IRequest) -> "Deferred[bytes]":
        body = request.content.read()
        request.setHeader(b"content-type", b"text/xml")
        # Shielded: a client hanging up must not cancel a write half-way,
        # and the calls queued behind it keep their order.
        d: Deferred[bytes] = Deferred()
        self._lock.run(self._serve, request, body).chainDeferred(d)
        return d

    async def _serve(self, request: IRequest, body: bytes) -> bytes:
        """Parse, run and answer one call, in the VM's turn."""
        log = request_logger(request, self.log)

        def turn() -> "Deferred[None]":
            return next_turn(request)

        try:
            method, params = await run_steps(iter_method_call(body), turn)
        except XmlRpcError as e:
            log.info("Refused an undecodable XML-RPC request for VM {vm}: {why}",
                     vm=self.vm_uuid, why=str(e))
            return plain_response(request, 400, "not an XML-RPC methodCall")
        pieces = await self._answer(method, params, log, turn)
        # Clients (varstored) expect a Content-Length, not a chunked answer.
        request.setHeader(b"content-length", b"%d" % sum(map(len, pieces)))
        await write_in_steps(request, pieces, turn)
        return b""

    async def _answer(self, method: str, params: list[Any], log: Logger,
                      turn: Callable[[], "Deferred[None]"]) -> list[bytes]:
        """The answer's bytes, in pieces."""
        try:
            checked = _check(method, params)
            value = await getattr(self, _HANDLERS[method])(checked)
        except _CallRefused as e:
            log.info("Refused {method} for VM {vm}: {code}",
                     method=method[:80], vm=self.vm_uuid, code=e.codes[0])
            return [encode_failure(e.codes)]
        except UpstreamError as e:
            # An outage is logged when it starts and ends, not per retry.
            emit = log.debug if isinstance(e, TransientUpstreamError) else log.info
            emit("{method} for VM {vm} failed upstream: {codes}",
                 method=method, vm=self.vm_uuid, codes=e.codes)
            return [encode_failure(e.codes)]
        except Exception:  # noqa: BLE001 - a bug must not kill the socket
            log.failure("{method} for VM {vm} failed", Failure(),
                        method=method, vm=self.vm_uuid)
            return [encode_failure(["INTERNAL_ERROR", "xguard"])]
        try:
            return await run_steps(iter_success_pieces(value), turn)
        except (TypeError, ValueError):
            log.failure("Cannot encode the answer to {method} for VM {vm}", Failure(),
                        method=method, vm=self.vm_uuid)
            return [encode_failure(["INTERNAL_ERROR", "xguard"])]

    @app.handle_errors(WerkzeugHTTPException)
    def routing_error(self, request: IRequest, failure: Failure) -> bytes:
        """405 (with Allow) for methods other than POST."""
        return routing_error_response(request, failure.value)

    # -- the calls; params are checked, the VM is always self.vm_uuid -------

    async def _login(self, params: list[Any]) -> str:
        return SESSION_HANDLE

    async def _logout(self, params: list[Any]) -> None:
        return None

    async def _get_by_uuid(self, params: list[Any]) -> str:
        return VM_HANDLE

    async def _get_nvram(self, params: list[Any]) -> dict[str, str]:
        return await self.nvram.get(self.vm_uuid)

    async def _set_nvram(self, params: list[Any]) -> None:
        _session, _vm, value = params
        await self.nvram.set_efi_variables(self.vm_uuid, value, normalise_update(None))
        self.log.debug("Set NVRAM of VM {vm} ({size} bytes)", vm=self.vm_uuid, size=len(value))

    async def _set_nvram_v2(self, params: list[Any]) -> None:
        _session, _vm, value, update = params
        await self.nvram.set_efi_variables(self.vm_uuid, value, normalise_update(update))
        self.log.debug("Set NVRAM of VM {vm} ({size} bytes, update={update})",
                       vm=self.vm_uuid, size=len(value), update=normalise_update(update))

    async def _get_sb_state(self, params: list[Any]) -> str:
        return await self.nvram.secureboot_state(self.vm_uuid)

    async def _create_message(self, params: list[Any]) -> None:
        _session, _name, priority, _class, _obj_uuid, body = params
        await self.nvram.alert(self.vm_uuid, MESSAGE_NAME, priority, body)
        # xapi-guard answers unit here (the samples show <nil/>), not the ref.
        return None
