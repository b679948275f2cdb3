# -*- test-case-name: tests.unit.test_jsonrpc -*-
"""JSON-RPC 2.0 as xapi speaks it, and the transient/permanent split.

Requests are ``{"jsonrpc": "2.0", "method": "VM.get_by_uuid", "params":
[session, uuid], "id": n}`` POSTed to ``/jsonrpc``. Success is ``{"result":
value}``; an API failure is ``{"error": {"code": 1, "message": "UUID_INVALID",
"data": ["VM", "…"]}}`` — xapi puts the error code in ``message`` and the rest
of its ErrorDescription in ``data`` (``code`` is a constant kept for
JSON-RPC's sake). Older or foreign servers answer JSON-RPC 1.0 style
(``"error": [code, …]``) or with an empty ``message`` and the whole list in
``data``; both are accepted.

Classification decides what the write-back cache does with a write
upstream did not take (SPEC §6, "Only proof that a write can never succeed
sets it aside"):

- Permanent — proof that the call can never succeed: the object is gone
  (``UUID_INVALID``, ``HANDLE_INVALID``; callers look a cached handle up
  afresh before they believe it), or xapi refuses the content itself
  (``INVALID_VALUE``, ``VALUE_NOT_SUPPORTED``, ``FIELD_TYPE_ERROR``, HTTP
  413). A direct write hands it to the client; the flusher sets the write
  aside for the operator.
- Transient — everything else: no answer (connection refused/reset/lost,
  time-out), a malformed body (what a restarting xapi or a half-closed
  connection produces), any other HTTP status, xapi's availability codes
  (``HOST_STILL_BOOTING`` …), ``INTERNAL_ERROR`` (a database hiccup), and
  codes xguard does not know. Retrying them is harmless; treating them as
  final would drop an acknowledged write. The write stays pending and is
  retried with backoff; one that keeps failing raises an alert.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError

from xguard._internals.twisted_web import NO_ANSWER
from xguard.errors import PermanentUpstreamError, TransientUpstreamError, UpstreamError

__all__ = [
    "PERMANENT_CODES",
    "encode_call",
    "decode_response",
    "error_codes",
    "classify_codes",
    "classify_http_status",
    "classify_exception",
]

#: xapi error codes that prove a call can never succeed (see the module
#: docstring); VM_HAS_NO_VTPM, VTPM_CONTENTS_INVALID and NVRAM_RECORD_INVALID
#: are xguard's own, for the same proofs.
PERMANENT_CODES: frozenset[str] = frozenset({
    "UUID_INVALID",
    "HANDLE_INVALID",
    "VM_HAS_NO_VTPM",
    "INVALID_VALUE",
    "VALUE_NOT_SUPPORTED",
    "FIELD_TYPE_ERROR",
    "VTPM_CONTENTS_INVALID",
    "NVRAM_RECORD_INVALID",
})

# Failures of the transport: whatever their detail, nobody answered.
_CONNECTION_LOST: tuple[type[BaseException], ...] = (
    net_error.ConnectionClosed,  # ConnectionLost, ConnectionDone
    *NO_ANSWER,
)


def encode_call(method: str, params: Sequence[Any], call_id: int) -> bytes:
    """The request body of one positional-parameter call."""
    return json.dumps(
        {"jsonrpc": "2.0", "method": method, "params": list(params), "id": call_id},
        separators=(",", ":"),
    ).encode("utf-8")


def _malformed(detail: str) -> TransientUpstreamError:
    return TransientUpstreamError(["MALFORMED_RESPONSE", detail])


def decode_response(body: bytes, call_id: int | None = None) -> Any:
    """The ``result`` of a response body.

    :raises TransientUpstreamError: the body is not a JSON-RPC response (or
        answers another call); or xapi answered an availability error.
    :raises PermanentUpstreamError: xapi answered with an API error.
    """
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise _malformed("not JSON") from None
    if not isinstance(doc, dict):
        raise _malformed("not a JSON object")
    if call_id is not None and "id" in doc and doc["id"] is not None and doc["id"] != call_id:
        raise _malformed(f"answers id {doc['id']!r}, not {call_id!r}")
    error = doc.get("error")
    if error is not None:
        raise classify_codes(error_codes(error))
    if "result" not in doc:
        raise _malformed("neither result nor error")
    return doc["result"]


def error_codes(error: Any) -> list[str]:
    """xapi's ErrorDescription list out of a JSON-RPC ``error`` member,
    whatever shape the server used."""
    if isinstance(error, list):
        return [_text(c) for c in error] or ["UNKNOWN_ERROR"]
    if isinstance(error, dict):
        if isinstance(error.get("ErrorDescription"), list):
            return error_codes(error["ErrorDescription"])
        message = error.get("message")
        data = error.get("data")
        rest = data if isinstance(data, list) else ([] if data is None else [data])
        if isinstance(message, str) and message:
            return [message] + [_text(c) for c in rest]
        if rest:
            return error_codes(rest)
        if "code" in error:
            return ["JSONRPC_ERROR", _text(error["code"])]
        return ["UNKNOWN_ERROR"]
    return [_text(error)]


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def classify_codes(codes: Sequence[str]) -> UpstreamError:
    """The exception for an xapi error code list (first item the code)."""
    codes = list(codes) or ["UNKNOWN_ERROR"]
    if codes[0] in PERMANENT_CODES:
        return PermanentUpstreamError(codes)
    return TransientUpstreamError(codes)


def classify_http_status(status: int) -> UpstreamError | None:
    """None for a 2xx answer (decode its body), else the error to raise:
    413 refuses the content itself; any other status may pass."""
    if 200 <= status < 300:
        return None
    codes = ["HTTP_ERROR", str(status)]
    if status == 413:
        return PermanentUpstreamError(codes)
    return TransientUpstreamError(codes)


#: Codes of transient errors where upstream did not answer at all (as
#: opposed to answering "not now", e.g. HOST_STILL_BOOTING or HTTP 503).
NO_ANSWER_CODES = frozenset({"CONNECTION_REFUSED", "TIMEOUT", "DNS_LOOKUP_FAILED",
                             "CONNECT_FAILED", "CONNECTION_LOST", "CONNECTION_FAILED",
                             "TLS_ERROR"})


def classify_exception(exc: BaseException) -> UpstreamError | None:
    """The transient error for a transport failure; None when ``exc`` is not
    one (a bug, which the caller should not disguise as an outage)."""
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, net_error.ConnectionRefusedError):
        return TransientUpstreamError(["CONNECTION_REFUSED"], str(exc))
    if isinstance(exc, (net_error.TimeoutError, net_error.TCPTimedOutError, CancelledError)):
        return TransientUpstreamError(["TIMEOUT"], str(exc) or "timed out")
    if isinstance(exc, net_error.DNSLookupError):
        return TransientUpstreamError(["DNS_LOOKUP_FAILED"], str(exc))
    if isinstance(exc, net_error.ConnectError):
        return TransientUpstreamError(["CONNECT_FAILED", type(exc).__name__], str(exc))
    if isinstance(exc, _CONNECTION_LOST):
        return TransientUpstreamError(["CONNECTION_LOST", type(exc).__name__], str(exc))
    if isinstance(exc, OSError):
        return TransientUpstreamError(["CONNECTION_FAILED", type(exc).__name__], str(exc))
    try:
        from OpenSSL import SSL
    except ImportError:  # pragma: no cover - TLS is optional
        return None
    if isinstance(exc, SSL.Error):
        return TransientUpstreamError(["TLS_ERROR"], str(exc))
    return None
