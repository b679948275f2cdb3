# -*- test-case-name: tests.unit.test_xmlrpc -*-
"""XML-RPC as xapi speaks it, for the varstored socket.

Requests come from a deprivileged, possibly compromised, helper: they are
parsed with defusedxml (DTDs, entity declarations and external references
refused, so no entity-expansion bomb or XXE) and decoded strictly — anything
that is not a well-formed ``methodCall`` raises :class:`XmlRpcError`, and
nothing else.

Answers are written by hand, byte for byte like xapi's: the ``Status``
member first, ``Value`` (or ``ErrorDescription``) second, strings untyped and
no whitespace anywhere, because varstored reads the struct by position and
compares ``<value>`` contents exactly.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any
from xml.etree.ElementTree import Element

from defusedxml.ElementTree import fromstring

__all__ = [
    "XmlRpcError",
    "parse_method_call",
    "encode_value",
    "encode_success",
    "encode_failure",
]

#: Deeper nesting is refused: no xapi call needs more than a few levels, and
#: the decoder is recursive.
MAX_DEPTH = 32

_INT = re.compile(r"[+-]?[0-9]+")
_DOUBLE = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_METHOD_NAME = re.compile(r"[A-Za-z0-9_.:/]+")
_BASE64_CHARS = re.compile(r"[A-Za-z0-9+/=]*")
_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)
# Characters XML 1.0 cannot carry at all, even escaped.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")

_HEAD = b'<?xml version="1.0"?><methodResponse><params><param><value><struct>'
_TAIL = b"</struct></value></param></params></methodResponse>"


class XmlRpcError(ValueError):
    """The request is not a well-formed XML-RPC ``methodCall`` (or uses a
    forbidden XML feature). The message is safe to log: it never quotes
    the request's content."""


# -- decoding --------------------------------------------------------------


def parse_method_call(data: bytes) -> tuple[str, list[Any]]:
    """Decode a ``methodCall`` into its method name and positional params.

    Values decode to str (typed or untyped), int (int/i4/i8), bool, float,
    bytes (base64), None (nil), list (array) and dict (struct).
    """
    try:
        root = fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except Exception as e:  # noqa: BLE001 - every parser failure is the client's
        raise XmlRpcError(f"not acceptable XML: {type(e).__name__}") from None
    if root.tag != "methodCall":
        raise XmlRpcError("root element is not methodCall")
    _no_text(root)
    children = list(root)
    if not children or children[0].tag != "methodName":
        raise XmlRpcError("methodCall must start with methodName")
    name_element = children[0]
    if len(name_element):
        raise XmlRpcError("methodName has child elements")
    name = (name_element.text or "").strip()
    if not _METHOD_NAME.fullmatch(name):
        raise XmlRpcError("invalid methodName")
    if len(children) == 1:
        return name, []
    if len(children) > 2 or children[1].tag != "params":
        raise XmlRpcError("methodCall holds something else than methodName and params")
    params_element = children[1]
    _no_text(params_element)
    params = []
    for param in params_element:
        if param.tag != "param":
            raise XmlRpcError("params holds something else than param")
        params.append(_decode_value(_only_child(param, "value"), 0))
    return name, params


def _no_text(element: Element) -> None:
    """Structural elements may hold whitespace between children (the Python
    SDK writes newlines there), nothing else."""
    if (element.text or "").strip():
        raise XmlRpcError(f"unexpected text in {element.tag}")
    for child in element:
        if (child.tail or "").strip():
            raise XmlRpcError(f"unexpected text after {child.tag}")


def _only_child(element: Element, tag: str) -> Element:
    _no_text(element)
    children = list(element)
    if len(children) != 1 or children[0].tag != tag:
        raise XmlRpcError(f"{element.tag} must hold exactly one {tag}")
    return children[0]


def _leaf_text(element: Element) -> str:
    if len(element):
        raise XmlRpcError(f"{element.tag} has child elements")
    return element.text or ""


def _decode_value(value: Element, depth: int) -> Any:
    if value.tag != "value":
        raise XmlRpcError("expected a value element")
    if depth > MAX_DEPTH:
        raise XmlRpcError("values nested too deeply")
    if not len(value):
        # An untyped value is a string, whitespace included.
        return value.text or ""
    typed = _only_child(value, value[0].tag)
    tag = typed.tag
    if tag == "string":
        return _leaf_text(typed)
    if tag in ("int", "i4", "i8"):
        text = _leaf_text(typed).strip()
        if not _INT.fullmatch(text):
            raise XmlRpcError(f"invalid {tag}")
        number = int(text)
        low, high = _INT64 if tag == "i8" else _INT32
        if not low <= number <= high:
            raise XmlRpcError(f"{tag} out of range")
        return number
    if tag == "boolean":
        text = _leaf_text(typed).strip()
        if text not in ("0", "1"):
            raise XmlRpcError("invalid boolean")
        return text == "1"
    if tag == "double":
        text = _leaf_text(typed).strip()
        if not _DOUBLE.fullmatch(text):
            raise XmlRpcError("invalid double")
        return float(text)
    if tag == "base64":
        text = "".join(_leaf_text(typed).split())
        if not _BASE64_CHARS.fullmatch(text):
            raise XmlRpcError("invalid base64")
        try:
            return base64.b64decode(text, validate=True)
        except binascii.Error:
            raise XmlRpcError("invalid base64") from None
    if tag == "nil":
        if _leaf_text(typed).strip():
            raise XmlRpcError("nil must be empty")
        return None
    if tag == "array":
        data = _only_child(typed, "data")
        _no_text(data)
        return [_decode_value(item, depth + 1) for item in data]
    if tag == "struct":
        _no_text(typed)
        result: dict[str, Any] = {}
        for member in typed:
            if member.tag != "member":
                raise XmlRpcError("struct holds something else than member")
            _no_text(member)
            parts = list(member)
            if len(parts) != 2 or parts[0].tag != "name" or parts[1].tag != "value":
                raise XmlRpcError("member must hold name then value")
            result[_leaf_text(parts[0])] = _decode_value(parts[1], depth + 1)
        return result
    raise XmlRpcError(f"unsupported value type {tag[:40]!r}")


# -- encoding --------------------------------------------------------------


def _escape(text: str) -> str:
    if _NOT_XML.search(text):
        raise ValueError("string holds a character XML cannot carry")
    # \r is escaped: a parser turns a literal one into \n.
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        .replace("\r", "&#13;")
    )


def encode_value(value: Any) -> str:
    """One ``<value>`` element, compact, strings untyped (as xapi writes)."""
    if value is None:
        return "<value><nil/></value>"
    if isinstance(value, bool):
        return f"<value><boolean>{int(value)}</boolean></value>"
    if isinstance(value, int):
        if _INT32[0] <= value <= _INT32[1]:
            return f"<value><int>{value}</int></value>"
        if _INT64[0] <= value <= _INT64[1]:
            return f"<value><i8>{value}</i8></value>"
        raise ValueError("integer out of XML-RPC range")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("XML-RPC has no NaN or infinity")
        return f"<value><double>{value!r}</double></value>"
    if isinstance(value, str):
        return f"<value>{_escape(value)}</value>"
    if isinstance(value, (bytes, bytearray)):
        return f"<value><base64>{base64.b64encode(value).decode('ascii')}</base64></value>"
    if isinstance(value, Mapping):
        members = []
        for name, item in value.items():
            if not isinstance(name, str):
                raise TypeError("struct member names must be strings")
            members.append(
                f"<member><name>{_escape(name)}</name>{encode_value(item)}</member>"
            )
        return "<value><struct>" + "".join(members) + "</struct></value>"
    if isinstance(value, Sequence):
        items = "".join(encode_value(v) for v in value)
        return "<value><array><data>" + items + "</data></array></value>"
    raise TypeError(f"cannot encode {type(value).__name__} in XML-RPC")


def encode_success(value: Any) -> bytes:
    """xapi's ``{Status: Success, Value: value}`` answer."""
    member = "<member><name>Value</name>" + encode_value(value) + "</member>"
    return (
        _HEAD
        + b"<member><name>Status</name><value>Success</value></member>"
        + member.encode("utf-8")
        + _TAIL
    )


def encode_failure(codes: Sequence[str]) -> bytes:
    """xapi's ``{Status: Failure, ErrorDescription: [code, …]}`` answer."""
    member = (
        "<member><name>ErrorDescription</name>"
        + encode_value([str(c) for c in codes])
        + "</member>"
    )
    return (
        _HEAD
        + b"<member><name>Status</name><value>Failure</value></member>"
        + member.encode("utf-8")
        + _TAIL
    )
