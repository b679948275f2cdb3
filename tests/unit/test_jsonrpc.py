"""JSON-RPC encoding, xapi's error shapes, and the transient/permanent split."""

from __future__ import annotations

import json

from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import ResponseNeverReceived

from xguard.errors import PermanentUpstreamError, TransientUpstreamError
from xguard.upstream.jsonrpc import (
    PERMANENT_CODES,
    classify_codes,
    classify_exception,
    classify_http_status,
    decode_response,
    encode_call,
    error_codes,
)


class EncodeTests(SynchronousTestCase):
    def test_positional_call(self) -> None:
        doc = json.loads(encode_call("VM.get_by_uuid", ("OpaqueRef:s", "u"), 7))
        self.assertEqual(doc, {"jsonrpc": "2.0", "method": "VM.get_by_uuid",
                               "params": ["OpaqueRef:s", "u"], "id": 7})


class DecodeTests(SynchronousTestCase):
    def test_result(self) -> None:
        body = b'{"jsonrpc":"2.0","result":{"EFI-variables":"x"},"id":3}'
        self.assertEqual(decode_response(body, 3), {"EFI-variables": "x"})

    def test_null_result(self) -> None:
        self.assertIsNone(decode_response(b'{"jsonrpc":"2.0","result":null,"id":1}', 1))

    def test_xapi_v2_error(self) -> None:
        body = (b'{"jsonrpc":"2.0","error":{"code":1,"message":"UUID_INVALID",'
                b'"data":["VM","abc"]},"id":1}')
        with self.assertRaises(PermanentUpstreamError) as cm:
            decode_response(body, 1)
        self.assertEqual(cm.exception.codes, ["UUID_INVALID", "VM", "abc"])

    def test_transient_code(self) -> None:
        body = b'{"jsonrpc":"2.0","error":{"code":1,"message":"HOST_STILL_BOOTING"},"id":1}'
        with self.assertRaises(TransientUpstreamError) as cm:
            decode_response(body, 1)
        self.assertEqual(cm.exception.codes, ["HOST_STILL_BOOTING"])

    def test_v1_error(self) -> None:
        body = b'{"result":null,"error":["HANDLE_INVALID","VM","r"],"id":1}'
        with self.assertRaises(PermanentUpstreamError) as cm:
            decode_response(body, 1)
        self.assertEqual(cm.exception.codes, ["HANDLE_INVALID", "VM", "r"])

    def test_malformed_is_transient(self) -> None:
        for body in [b"", b"<html>", b"[1]", b'{"jsonrpc":"2.0","id":1}', b"\xff\xfe",
                     b'{"jsonrpc":"2.0","result":1,"id":2}']:
            with self.assertRaises(TransientUpstreamError, msg=body) as cm:
                decode_response(body, 1)
            self.assertEqual(cm.exception.codes[0], "MALFORMED_RESPONSE")


class ErrorShapeTests(SynchronousTestCase):
    def test_shapes(self) -> None:
        cases = [
            ({"code": 1, "message": "SESSION_INVALID", "data": ["OpaqueRef:x"]},
             ["SESSION_INVALID", "OpaqueRef:x"]),
            ({"code": 1, "message": "", "data": ["UUID_INVALID", "VM", "u"]},
             ["UUID_INVALID", "VM", "u"]),
            ({"code": 1, "message": "X", "data": "detail"}, ["X", "detail"]),
            ({"ErrorDescription": ["A", "b"]}, ["A", "b"]),
            ({"code": -32601}, ["JSONRPC_ERROR", "-32601"]),
            ({}, ["UNKNOWN_ERROR"]),
            (["MESSAGE_PARAMETER_COUNT_MISMATCH", 3, 4],
             ["MESSAGE_PARAMETER_COUNT_MISMATCH", "3", "4"]),
            ([], ["UNKNOWN_ERROR"]),
            ("TOO_BUSY", ["TOO_BUSY"]),
        ]
        for error, codes in cases:
            self.assertEqual(error_codes(error), codes, error)


class ClassifyTests(SynchronousTestCase):
    def test_codes(self) -> None:
        """Only proof that a call can never succeed is permanent (SPEC §6):
        a gone object, or refused content. Everything else may pass."""
        for code in ["HOST_STILL_BOOTING", "HOST_IS_SLAVE", "HOST_HAS_NO_MANAGEMENT_IP",
                     "TOO_BUSY", "INTERNAL_ERROR", "SOME_CODE_XGUARD_NEVER_SAW",
                     "MESSAGE_PARAMETER_COUNT_MISMATCH", "SESSION_INVALID"]:
            self.assertNotIn(code, PERMANENT_CODES)
            self.assertIsInstance(classify_codes([code]), TransientUpstreamError, code)
        for code in ["UUID_INVALID", "HANDLE_INVALID", "VM_HAS_NO_VTPM", "INVALID_VALUE",
                     "VALUE_NOT_SUPPORTED", "FIELD_TYPE_ERROR"]:
            self.assertIsInstance(classify_codes([code, "x"]), PermanentUpstreamError, code)
        self.assertIsInstance(classify_codes([]), TransientUpstreamError)

    def test_http_status(self) -> None:
        self.assertIsNone(classify_http_status(200))
        for status in (500, 502, 503, 504, 302, 408, 429, 400, 401, 403, 404, 405):
            self.assertIsInstance(classify_http_status(status), TransientUpstreamError, status)
        self.assertIsInstance(classify_http_status(413), PermanentUpstreamError)

    def test_exceptions(self) -> None:
        cases = {
            net_error.ConnectionRefusedError(): "CONNECTION_REFUSED",
            net_error.TimeoutError(): "TIMEOUT",
            CancelledError(): "TIMEOUT",
            net_error.DNSLookupError(): "DNS_LOOKUP_FAILED",
            net_error.NoRouteError(): "CONNECT_FAILED",
            net_error.ConnectionLost(): "CONNECTION_LOST",
            ResponseNeverReceived([Failure(net_error.ConnectionDone())]): "CONNECTION_LOST",
            ConnectionResetError(): "CONNECTION_FAILED",
        }
        for exc, code in cases.items():
            error = classify_exception(exc)
            self.assertIsInstance(error, TransientUpstreamError, exc)
            self.assertEqual(error.codes[0], code, exc)

    def test_upstream_errors_pass_through(self) -> None:
        e = PermanentUpstreamError(["UUID_INVALID"])
        self.assertIs(classify_exception(e), e)

    def test_bugs_are_not_outages(self) -> None:
        self.assertIsNone(classify_exception(KeyError("x")))
