# -*- test-case-name: tests.unit.test_xmlrpc -*-
"""XML-RPC as xapi speaks it, for the varstored socket.

Requests come from a deprivileged, possibly compromised, helper. They are
parsed incrementally with expat, fed in slices of :data:`SLICE` bytes, and
abandoned as soon as they break a limit — a DTD, an entity declaration or
an external reference (so no entity-expansion bomb or XXE, as defusedxml
refuses), more than :data:`MAX_ELEMENTS` elements, elements nested deeper
than :data:`MAX_XML_DEPTH`, an attribute, more than :data:`MAX_TOKEN` bytes
that expat holds without reporting anything (one huge tag, comment or
name, which expat would otherwise process in one go), a body over
:data:`MAX_SIZE` — not after building a tree. :func:`iter_method_call`
yields between slices so the caller can let the reactor serve other VMs;
the tree it builds is bounded by those limits before it is decoded.
Decoding is strict: anything that is not a well-formed ``methodCall``
raises :class:`XmlRpcError`, and nothing else.

Answers are written by hand, byte for byte like xapi's: the ``Status``
member first, ``Value`` (or ``ErrorDescription``) second, strings untyped and
no whitespace anywhere, because varstored reads the struct by position and
compares ``<value>`` contents exactly. :func:`iter_success_pieces` escapes
long strings in slices too, and leaves the answer in pieces.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn
from xml.etree.ElementTree import Element, TreeBuilder
from xml.parsers import expat

from .steps import Steps, drain

__all__ = [
    "XmlRpcError",
    "parse_method_call",
    "iter_method_call",
    "encode_value",
    "encode_success",
    "encode_failure",
    "iter_success",
    "iter_success_pieces",
]

#: Deeper nesting of values is refused: no xapi call needs more than a few
#: levels, and the decoder is recursive.
MAX_DEPTH = 32
#: Deepest element nesting: methodCall/params/param/value, then three
#: elements (array/data/value or struct/member/value) per level of values.
MAX_XML_DEPTH = 4 + 3 * (MAX_DEPTH + 1)
#: Elements in one request; varstored's calls have about twenty.
MAX_ELEMENTS = 1024
#: Bytes fed to expat at once (a bounded step of work, ~0.2 ms here).
SLICE = 16 * 1024
#: Bytes expat may hold without reporting an event (a tag, text, a
#: comment...): real tags are a few bytes long.
MAX_TOKEN = 2 * SLICE
#: Largest request body accepted (the sockets' limit, SPEC §4.1).
MAX_SIZE = 1024 * 1024
#: Characters of a string escaped at once when encoding an answer.
ESCAPE_SLICE = 16 * 1024

_INT = re.compile(r"[+-]?[0-9]{1,32}")
_DOUBLE = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_METHOD_NAME = re.compile(r"[A-Za-z0-9_.:/]+")
_BASE64_CHARS = re.compile(r"[A-Za-z0-9+/=]*")
_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)
# Characters XML 1.0 cannot carry at all, even escaped: C0 controls but tab,
# LF and CR; also surrogates, U+FFFE and U+FFFF (checked in _escape_piece).
_CONTROL = bytes(c for c in range(32) if c not in (9, 10, 13))

_HEAD = b'<?xml version="1.0"?><methodResponse><params><param><value><struct>'
_TAIL = b"</struct></value></param></params></methodResponse>"


class XmlRpcError(ValueError):
    """The request is not a well-formed XML-RPC ``methodCall`` (or uses a
    forbidden XML feature, or breaks a limit). The message is safe to log:
    it never quotes the request's content."""


# -- parsing ---------------------------------------------------------------


class _LimitedParser:
    """expat driven into a TreeBuilder, refusing what the limits forbid
    from inside its handlers, so parsing stops at the first offence."""

    def __init__(self) -> None:
        # The document's own encoding declaration is ignored: UTF-8 only.
        parser = expat.ParserCreate(encoding="utf-8")
        parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
        parser.buffer_text = True
        parser.ordered_attributes = True
        parser.StartDoctypeDeclHandler = self._forbidden("a DTD")
        parser.EntityDeclHandler = self._forbidden("an entity declaration")
        parser.UnparsedEntityDeclHandler = self._forbidden("an entity declaration")
        parser.NotationDeclHandler = self._forbidden("a notation declaration")
        parser.ExternalEntityRefHandler = self._forbidden("an external entity")
        parser.StartElementHandler = self._start
        parser.EndElementHandler = self._end
        parser.CharacterDataHandler = self._data
        parser.CommentHandler = self._event
        parser.ProcessingInstructionHandler = self._event
        parser.StartCdataSectionHandler = self._event
        parser.EndCdataSectionHandler = self._event
        parser.XmlDeclHandler = self._event
        self._parser = parser
        self._builder = TreeBuilder()
        self._depth = 0
        self._elements = 0
        self._fed = 0
        self._quiet = 0
        self._events = False

    def _forbidden(self, what: str) -> Any:
        def refuse(*args: object) -> NoReturn:
            raise XmlRpcError(f"{what} is not allowed")

        return refuse

    def _event(self, *args: object) -> None:
        self._events = True

    def _start(self, tag: str, attributes: list[str]) -> None:
        self._events = True
        self._elements += 1
        self._depth += 1
        if self._elements > MAX_ELEMENTS:
            raise XmlRpcError(f"more than {MAX_ELEMENTS} elements")
        if self._depth > MAX_XML_DEPTH:
            raise XmlRpcError("elements nested too deeply")
        if attributes:
            raise XmlRpcError("XML-RPC elements have no attributes")
        if self._elements == 1 and tag != "methodCall":
            raise XmlRpcError("root element is not methodCall")
        self._builder.start(tag, {})

    def _end(self, tag: str) -> None:
        self._events = True
        self._depth -= 1
        self._builder.end(tag)

    def _data(self, text: str) -> None:
        self._events = True
        self._builder.data(text)

    def feed(self, data: bytes, final: bool = False) -> None:
        self._fed += len(data)
        if self._fed > MAX_SIZE:
            raise XmlRpcError(f"body over {MAX_SIZE} bytes")
        self._events = False
        try:
            self._parser.Parse(data, final)
        except expat.ExpatError as e:
            raise XmlRpcError(f"not well-formed XML ({expat.ErrorString(e.code)})") from None
        self._quiet = 0 if self._events else self._quiet + len(data)
        if self._quiet > MAX_TOKEN:
            raise XmlRpcError(f"an XML token longer than {MAX_TOKEN} bytes")

    def close(self) -> Element:
        self.feed(b"", final=True)
        root: Element = self._builder.close()
        return root


def iter_method_call(data: bytes) -> Steps[tuple[str, list[Any]]]:
    """Parse a ``methodCall`` in steps of :data:`SLICE` bytes (yielding
    between two); returns its method name and positional params.

    Values decode to str (typed or untyped), int (int/i4/i8), bool, float,
    bytes (base64), None (nil), list (array) and dict (struct).
    """
    if len(data) > MAX_SIZE:
        raise XmlRpcError(f"body over {MAX_SIZE} bytes")
    parser = _LimitedParser()
    for start in range(0, len(data), SLICE):
        if start:
            yield
        parser.feed(data[start:start + SLICE])
    try:
        root = parser.close()
    except XmlRpcError:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. no element at all
        raise XmlRpcError(f"not acceptable XML: {type(e).__name__}") from None
    return _decode_call(root)


def parse_method_call(data: bytes) -> tuple[str, list[Any]]:
    """:func:`iter_method_call`, all at once."""
    return drain(iter_method_call(data))


def _decode_call(root: Element) -> tuple[str, list[Any]]:
    """The method name and params of a parsed ``methodCall`` tree."""
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


def _escape_piece(text: str) -> bytes:
    """``text`` escaped, as UTF-8; ValueError if XML cannot carry it. Done
    on bytes: 2-3 times faster than on str (it is most of the work of a
    large answer)."""
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        raise ValueError("string holds a character XML cannot carry") from None
    if (len(data.translate(None, _CONTROL)) != len(data)
            or b"\xef\xbf\xbe" in data or b"\xef\xbf\xbf" in data):  # U+FFFE, U+FFFF
        raise ValueError("string holds a character XML cannot carry")
    # \r is escaped: a parser turns a literal one into \n.
    return (data.replace(b"&", b"&amp;").replace(b"<", b"&lt;").replace(b">", b"&gt;")
            .replace(b"\r", b"&#13;"))


def _escape(text: str, out: list[bytes]) -> Steps[None]:
    """Escape ``text`` into ``out``, :data:`ESCAPE_SLICE` characters per
    step (a 1 MiB string of ``<&>`` takes ~30 ms here in one go)."""
    for start in range(0, len(text), ESCAPE_SLICE):
        if start:
            yield
        out.append(_escape_piece(text[start:start + ESCAPE_SLICE]))


def _encode(value: Any, out: list[bytes]) -> Steps[None]:
    """Append ``value``'s ``<value>`` element to ``out``, in steps."""
    if value is None:
        out.append(b"<value><nil/></value>")
    elif isinstance(value, bool):
        out.append(b"<value><boolean>%d</boolean></value>" % int(value))
    elif isinstance(value, int):
        if _INT32[0] <= value <= _INT32[1]:
            out.append(b"<value><int>%d</int></value>" % value)
        elif _INT64[0] <= value <= _INT64[1]:
            out.append(b"<value><i8>%d</i8></value>" % value)
        else:
            raise ValueError("integer out of XML-RPC range")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("XML-RPC has no NaN or infinity")
        out.append(f"<value><double>{value!r}</double></value>".encode("ascii"))
    elif isinstance(value, str):
        out.append(b"<value>")
        yield from _escape(value, out)
        out.append(b"</value>")
    elif isinstance(value, (bytes, bytearray)):
        out += [b"<value><base64>", base64.b64encode(value), b"</base64></value>"]
    elif isinstance(value, Mapping):
        out.append(b"<value><struct>")
        for name, item in value.items():
            if not isinstance(name, str):
                raise TypeError("struct member names must be strings")
            out.append(b"<member><name>")
            yield from _escape(name, out)
            out.append(b"</name>")
            yield from _encode(item, out)
            out.append(b"</member>")
        out.append(b"</struct></value>")
    elif isinstance(value, Sequence):
        out.append(b"<value><array><data>")
        for item in value:
            yield from _encode(item, out)
        out.append(b"</data></array></value>")
    else:
        raise TypeError(f"cannot encode {type(value).__name__} in XML-RPC")


def encode_value(value: Any) -> str:
    """One ``<value>`` element, compact, strings untyped (as xapi writes)."""
    out: list[bytes] = []
    drain(_encode(value, out))
    return b"".join(out).decode("utf-8")


def iter_success_pieces(value: Any) -> Steps[list[bytes]]:
    """xapi's ``{Status: Success, Value: value}`` answer, in steps, as
    pieces: a large answer is written piece by piece, never joined (each
    copy of a 4 MiB answer costs milliseconds)."""
    out = [_HEAD, b"<member><name>Status</name><value>Success</value></member>"
                  b"<member><name>Value</name>"]
    yield from _encode(value, out)
    out += [b"</member>", _TAIL]
    return out


def iter_success(value: Any) -> Steps[bytes]:
    """:func:`iter_success_pieces`, joined."""
    return b"".join((yield from iter_success_pieces(value)))


def encode_success(value: Any) -> bytes:
    """:func:`iter_success`, all at once."""
    return drain(iter_success(value))


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
