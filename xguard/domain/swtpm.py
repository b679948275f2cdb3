# -*- test-case-name: tests.unit.test_swtpm -*-
"""The swtpm socket: the REST state backend of XenServer's swtpm, for the
socket's own VM only.

Protocol: ``GET``/``PUT``/``DELETE``/``HEAD`` on ``/tpm2-00.permall``,
``/tpm2-00.savestate`` and ``/tpm2-00.volatilestate``; bodies are base64
text, stored and returned exactly as received.

Status codes are chosen for swtpm, which fails the TPM at once on any 4xx
and retries 5xx and broken connections:

- 4xx only for requests swtpm never sends: unknown path (404), other
  methods (405), a body that is not strict base64 (400), too large (413,
  from :class:`~xguard.domain.site.DomainSite`), and HEAD of an empty key
  (404, which swtpm expects);
- a transient upstream failure (upstream unreachable and nothing pending
  locally; a PUT can only fail so without the disk cache) → 503, retried;
- a permanent upstream error (e.g. the VM has no vTPM) → 500: it is the
  server side that is wrong, not the request.

The key is the route's (a percent-encoded or absolute-form target that
decodes to a key's path is that key), never parsed again from the raw
path. The body's base64 check runs inside the VM's queue, in steps of
:data:`B64_SLICE` bytes, so a VM flooding its socket with large bodies
competes with itself and delays other VMs by one step at most.
"""

from __future__ import annotations

import binascii
from typing import cast

from klein import Klein
from twisted.internet.defer import Deferred, DeferredLock
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import HTTPException as WerkzeugHTTPException

from ..errors import PermanentUpstreamError, TransientUpstreamError
from ..model import TpmKey
from ..state.views import TpmKeys
from .site import VmResource, next_turn, plain_response, request_logger, routing_error_response
from .steps import Steps, run_steps

__all__ = ["SwtpmSocket", "HTTPError", "iter_check_base64", "B64_SLICE"]

_METHODS = ["GET", "PUT", "DELETE", "HEAD"]
#: Bytes of a body checked per step (a multiple of 4; ~0.2 ms here).
B64_SLICE = 64 * 1024


class HTTPError(Exception):
    """Answer the request with ``code`` and a short text."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


def iter_check_base64(body: bytes, slice_size: int = B64_SLICE) -> Steps[None]:
    """Strict base64, in steps: whole groups of four, at most two ``=`` and
    only at the end, nothing outside the alphabet (no whitespace; what
    b64decode(validate=True) lets through, like "QUJD=", is refused too:
    binascii's strict mode alone still accepts a stray ``=`` group at the
    end). ``slice_size`` must be a multiple of 4."""
    padding = len(body) - len(body.rstrip(b"="))
    if len(body) % 4 or padding > 2:
        raise HTTPError(400, "body is not base64")
    for start in range(0, len(body), slice_size):
        if start:
            yield
        piece = body[start:start + slice_size]
        if start + slice_size < len(body) and piece.endswith(b"="):
            raise HTTPError(400, "body is not base64")
        try:
            binascii.a2b_base64(piece, strict_mode=True)
        except (binascii.Error, ValueError):
            raise HTTPError(400, "body is not base64") from None


class SwtpmSocket:
    """The REST app of one VM's swtpm socket.

    :param vm_uuid: the VM whose vTPM every request acts on.
    :param keys: reads (latest pending version first) and durable writes.
    """

    app = Klein()
    log = Logger()

    def __init__(self, vm_uuid: str, keys: TpmKeys) -> None:
        self.vm_uuid = vm_uuid
        self.keys = keys
        # One request at a time, in arrival order (SPEC §4.2).
        self._lock = DeferredLock()

    def resource(self) -> IResource:
        """The Klein resource to serve (wrap it in a DomainSite)."""
        return VmResource(self.app.resource(), self.vm_uuid)

    @app.route(TpmKey.PERMALL.path, methods=_METHODS)
    def permall(self, request: IRequest) -> "Deferred[bytes]":
        return self.key_request(request, TpmKey.PERMALL)

    @app.route(TpmKey.SAVESTATE.path, methods=_METHODS)
    def savestate(self, request: IRequest) -> "Deferred[bytes]":
        return self.key_request(request, TpmKey.SAVESTATE)

    @app.route(TpmKey.VOLATILESTATE.path, methods=_METHODS)
    def volatilestate(self, request: IRequest) -> "Deferred[bytes]":
        return self.key_request(request, TpmKey.VOLATILESTATE)

    def key_request(self, request: IRequest, key: TpmKey) -> "Deferred[bytes]":
        """Queue the request behind the VM's earlier ones."""
        method = request.method
        body = request.content.read() if method == b"PUT" else b""
        # Shielded from Klein's cancellation when the client hangs up: an
        # accepted write completes, and later requests keep their order.
        d: Deferred[bytes] = Deferred()
        self._lock.run(self._handle, request, method, key, body).chainDeferred(d)
        return d

    async def _handle(self, request: IRequest, method: bytes, key: TpmKey, body: bytes) -> bytes:
        log = request_logger(request, self.log)
        if method == b"PUT":
            await run_steps(iter_check_base64(body), lambda: next_turn(request))
            await self._put(key, body, log)
            return self._no_content(request)
        if method == b"DELETE":
            await self._put(key, b"", log)
            return self._no_content(request)
        content = await self._get(key, log)
        if method == b"HEAD":
            # No body and a zero length, whatever the content's size.
            request.setResponseCode(200 if content else 404)
            request.setHeader(b"content-length", b"0")
            return b""
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-length", b"%d" % len(content))
        return content

    async def _get(self, key: TpmKey, log: Logger) -> bytes:
        try:
            return await self.keys.get(self.vm_uuid, key)
        except Exception as e:  # noqa: BLE001 - mapped to a status swtpm retries
            raise self._upstream_failed("GET", key, e, log) from None

    async def _put(self, key: TpmKey, body: bytes, log: Logger) -> None:
        try:
            await self.keys.put(self.vm_uuid, key, body)
        except Exception as e:  # noqa: BLE001 - mapped to a status swtpm retries
            raise self._upstream_failed("PUT", key, e, log) from None
        log.debug("Stored {key} of VM {vm} ({size} bytes)",
                  key=key.name.lower(), vm=self.vm_uuid, size=len(body))

    def _upstream_failed(self, what: str, key: TpmKey, e: Exception, log: Logger) -> HTTPError:
        name = key.name.lower()
        if isinstance(e, TransientUpstreamError):
            # debug: swtpm retries a 503 at once, and the outage itself is
            # logged once when it starts and once when it ends.
            log.debug("{what} {key} of VM {vm}: upstream unavailable ({codes})",
                     what=what, key=name, vm=self.vm_uuid, codes=e.codes)
            return HTTPError(503, "upstream unavailable, retry later")
        if isinstance(e, PermanentUpstreamError):
            log.warn("{what} {key} of VM {vm}: upstream refused ({codes})",
                     what=what, key=name, vm=self.vm_uuid, codes=e.codes)
            return HTTPError(500, "upstream error: " + " ".join(e.codes)[:200])
        log.failure("{what} {key} of VM {vm} failed", Failure(e),
                    what=what, key=name, vm=self.vm_uuid)
        return HTTPError(500, "internal error")

    @staticmethod
    def _no_content(request: IRequest) -> bytes:
        request.setResponseCode(204)
        return b""

    @app.handle_errors(HTTPError)
    def http_error(self, request: IRequest, failure: Failure) -> bytes:
        error = cast(HTTPError, failure.value)  # handle_errors(HTTPError): nothing else
        return plain_response(request, error.code, error.text)

    @app.handle_errors(WerkzeugHTTPException)
    def routing_error(self, request: IRequest, failure: Failure) -> bytes:
        """404 for unknown paths, 405 (with Allow) for other methods."""
        return routing_error_response(request, failure.value)
