"""The XML-RPC codec: strict, defused parsing of methodCall; answers byte
for byte like xapi's."""

from __future__ import annotations

import glob
import os
import xmlrpc.client
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from xguard.domain.steps import drain
from xguard.domain.xmlrpc import (
    MAX_DEPTH,
    MAX_ELEMENTS,
    MAX_SIZE,
    MAX_TOKEN,
    SLICE,
    XmlRpcError,
    encode_failure,
    encode_success,
    encode_value,
    iter_method_call,
    iter_success,
    parse_method_call,
)
from xguard.testing.hostile import apply_edits

# Real request/response samples of the upstream interfaces, kept as test
# vectors (copied from the design references: reference/wire/).
WIRE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "vectors", "wire",
                    "varstored")


def sample(kind: str, name: str) -> bytes:
    with open(os.path.join(WIRE, kind, name), "rb") as f:
        return f.read()


def call(name: str, *values: str) -> bytes:
    """A methodCall whose params are raw <value> elements."""
    params = "".join(f"<param>{v}</param>" for v in values)
    return (f'<?xml version="1.0"?><methodCall><methodName>{name}</methodName>'
            f"<params>{params}</params></methodCall>").encode()


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<methodCall><methodName>VM.get_NVRAM</methodName><params><param><value>&lol4;</value></param>
</params></methodCall>"""

XXE = b"""<?xml version="1.0"?>
<!DOCTYPE foo [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<methodCall><methodName>VM.get_NVRAM</methodName><params><param><value>&xxe;</value></param>
</params></methodCall>"""

EXTERNAL_DTD = b"""<?xml version="1.0"?>
<!DOCTYPE methodCall SYSTEM "http://example.invalid/x.dtd">
<methodCall><methodName>VM.get_NVRAM</methodName></methodCall>"""


class ParseTests(SynchronousTestCase):
    def test_every_sample_request(self) -> None:
        files = sorted(glob.glob(os.path.join(WIRE, "requests", "*")))
        self.assertEqual(len(files), 8)
        for path in files:
            with open(path, "rb") as f:
                name, params = parse_method_call(f.read())
            self.assertEqual(name, os.path.basename(path).rsplit(".request.", 1)[0])
            self.assertTrue(all(isinstance(p, str) for p in params))

    def test_message_create_priority_arrives_untyped(self) -> None:
        name, params = parse_method_call(sample("requests", "message.create.request.0"))
        self.assertEqual(params[2], "0")

    def test_typed_values(self) -> None:
        name, params = parse_method_call(call(
            "m", "<value><string>s</string></value>", "<value><int>-3</int></value>",
            "<value><i4>4</i4></value>", "<value><i8>9000000000</i8></value>",
            "<value><boolean>1</boolean></value>", "<value><double>2.5</double></value>",
            "<value><base64>QUJD</base64></value>", "<value><nil/></value>",
            "<value><array><data><value>a</value><value><int>1</int></value></data></array></value>",
            "<value><struct><member><name>k</name><value>v</value></member></struct></value>",
            "<value></value>", "<value><string/></value>", "<value> spaced </value>",
        ))
        self.assertEqual(params, ["s", -3, 4, 9000000000, True, 2.5, b"ABC", None, ["a", 1],
                                  {"k": "v"}, "", "", " spaced "])

    def test_no_params(self) -> None:
        self.assertEqual(
            parse_method_call(b"<methodCall><methodName>a.b</methodName></methodCall>"),
            ("a.b", []))

    def test_python_sdk_formatting(self) -> None:
        # xmlrpc.client (the XenAPI SDK) puts newlines between elements.
        params = ("OpaqueRef:x", 1, True, 1.5, b"\x00\xff", None, ["a", {"b": [1, 2]}], {})
        data = xmlrpc.client.dumps(params, "VM.get_NVRAM", allow_none=True).encode()
        self.assertEqual(parse_method_call(data), ("VM.get_NVRAM", list(params[:6]) + [
            ["a", {"b": [1, 2]}], {}]))

    def test_entity_expansion_bomb_refused(self) -> None:
        self.assertRaises(XmlRpcError, parse_method_call, BILLION_LAUGHS)

    def test_external_entity_refused(self) -> None:
        with self.assertRaises(XmlRpcError) as ctx:
            parse_method_call(XXE)
        self.assertNotIn("root", str(ctx.exception))

    def test_external_dtd_refused(self) -> None:
        self.assertRaises(XmlRpcError, parse_method_call, EXTERNAL_DTD)

    def test_malformed(self) -> None:
        bad = [
            b"", b"junk", b"<methodCall>", b"<methodResponse/>",
            b"<methodCall/>",
            b"<methodCall><methodName></methodName></methodCall>",
            b"<methodCall><methodName>a b</methodName></methodCall>",
            b"<methodCall><methodName>a<x/></methodName></methodCall>",
            b"<methodCall>text<methodName>a</methodName></methodCall>",
            b"<methodCall><methodName>a</methodName><params/><params/></methodCall>",
            b"<methodCall><methodName>a</methodName><other/></methodCall>",
            b"<methodCall><methodName>a</methodName><params><value>x</value></params></methodCall>",
            b"<methodCall><methodName>a</methodName><params><param/></params></methodCall>",
            call("a", "<value><int>x</int></value>"),
            call("a", "<value><int>99999999999</int></value>"),
            call("a", "<value><boolean>2</boolean></value>"),
            call("a", "<value><double>nan</double></value>"),
            call("a", "<value><base64>QUJ</base64></value>"),
            call("a", "<value><base64>QU!D</base64></value>"),
            call("a", "<value><nil>x</nil></value>"),
            call("a", "<value><dateTime.iso8601>20260101T00:00:00</dateTime.iso8601></value>"),
            call("a", "<value><string>a</string><string>b</string></value>"),
            call("a", "<value>text<string>b</string></value>"),
            call("a", "<value><string><x/></string></value>"),
            call("a", "<value><array><value>a</value></array></value>"),
            call("a", "<value><array><data>x<value>a</value></data></array></value>"),
            call("a", "<value><struct><member><value>v</value></member></struct></value>"),
            call("a", "<value><struct><x/></struct></value>"),
            call("a", "<param>x</param>"),
            b'<?xml version="1.0" encoding="bogus"?><methodCall/>',
            b"\xff\xfe<\x00",
        ]
        for data in bad:
            with self.subTest(data=data):
                self.assertRaises(XmlRpcError, parse_method_call, data)

    def test_depth_limited(self) -> None:
        n = MAX_DEPTH + 2
        deep = "<value><array><data>" * n + "</data></array></value>" * n
        self.assertRaises(XmlRpcError, parse_method_call, call("a", deep))
        ok = "<value><array><data>" * 5 + "</data></array></value>" * 5
        self.assertEqual(parse_method_call(call("a", ok))[1], [[[[[[]]]]]])

    def test_very_deep_nesting_is_an_error_not_a_crash(self) -> None:
        n = 100_000
        self.assertRaises(XmlRpcError, parse_method_call,
                          call("a", "<value><array><data>" * n + "</data></array></value>" * n))


def steps_until_refused(data: bytes) -> tuple[int, str]:
    """How many steps of parsing ``data`` ran before it was refused, and
    why. Hostile bodies below end with bytes that are not XML at all: a
    parser that read that far would report them instead."""
    steps = iter_method_call(data)
    count = 0
    while True:
        count += 1
        try:
            next(steps)
        except XmlRpcError as e:
            return count, str(e)
        except StopIteration:
            raise AssertionError("accepted") from None


def hostile(inner: bytes) -> bytes:
    """``inner`` inside a call, cut to the size limit, then bytes no XML
    parser accepts (so a parser reading to the end says so)."""
    body = call("a", "<value>")[:-len("</param></params></methodCall>")] + inner
    return body[:MAX_SIZE - 2] + b"\xff\xfe"


class LimitTests(SynchronousTestCase):
    """Hostile bodies are refused as soon as they break a limit, while
    expat reads them, in bounded steps."""

    def test_int_beyond_pythons_digit_limit_is_a_parse_error(self) -> None:
        self.assertRaises(XmlRpcError, parse_method_call,
                          call("a", "<value><int>" + "9" * 4301 + "</int></value>"))
        self.assertRaises(XmlRpcError, parse_method_call,
                          call("a", "<value><i8>" + "0" * 40 + "1</i8></value>"))

    def test_element_count(self) -> None:
        many = "<value><array><data>" + "<value/>" * MAX_ELEMENTS + "</data></array></value>"
        self.assertRaises(XmlRpcError, parse_method_call, call("a", many))
        fine = "<value><array><data>" + "<value/>" * 100 + "</data></array></value>"
        self.assertEqual(parse_method_call(call("a", fine))[1], [[""] * 100])

    def test_deep_nesting_stops_in_the_first_step(self) -> None:
        # The 684 KiB body of 100,000 nested elements.
        body = hostile(b"<array><data><value>" * 33_334)
        self.assertEqual(steps_until_refused(body), (1, "elements nested too deeply"))

    def test_many_elements_stop_in_the_first_step(self) -> None:
        body = hostile(b"<array><data>" + b"<value/>" * 100_000)
        self.assertEqual(steps_until_refused(body), (1, f"more than {MAX_ELEMENTS} elements"))

    def test_attributes_are_refused(self) -> None:
        self.assertRaises(XmlRpcError, parse_method_call,
                          b'<methodCall a="1"><methodName>a</methodName></methodCall>')

    def test_huge_tokens_are_refused_before_they_end(self) -> None:
        for token in [b'<string a="' + b"x" * MAX_SIZE, b"<a" + b"x" * MAX_SIZE,
                      b"<!--" + b"x" * MAX_SIZE, b"<?pi " + b"x" * MAX_SIZE,
                      b"<a " + b'b="" ' * 200_000]:
            steps, why = steps_until_refused(hostile(token))
            self.assertLessEqual(steps, MAX_TOKEN // SLICE + 2, token[:10])
            self.assertEqual(why, f"an XML token longer than {MAX_TOKEN} bytes")

    def test_a_long_string_is_fine(self) -> None:
        text = "x" * (MAX_SIZE - 200)
        self.assertEqual(parse_method_call(call("a", f"<value>{text}</value>"))[1], [text])
        cdata = f"<value><![CDATA[{text[:1000]}]]></value>"
        self.assertEqual(parse_method_call(call("a", cdata))[1], [text[:1000]])

    def test_leading_whitespace_is_bounded(self) -> None:
        steps, why = steps_until_refused(b" " * (MAX_TOKEN + SLICE) + call("a"))
        self.assertEqual((steps, why), (3, f"an XML token longer than {MAX_TOKEN} bytes"))

    def test_over_size(self) -> None:
        self.assertRaises(XmlRpcError, parse_method_call, call("a", "<value>" + "x" * MAX_SIZE
                                                              + "</value>"))

    def test_dtd_is_refused_in_the_first_step(self) -> None:
        body = BILLION_LAUGHS + b" " * (4 * SLICE) + b"\xff"
        steps, why = steps_until_refused(body)
        self.assertEqual(steps, 1)
        self.assertIn("DTD", why)

    def test_declared_encoding_is_ignored_utf8_only(self) -> None:
        declared = b'<?xml version="1.0" encoding="iso-8859-1"?>'
        body = call("a", "<value>\xe9</value>").replace(b'<?xml version="1.0"?>', declared)
        self.assertRaises(XmlRpcError, parse_method_call, body.replace("é".encode(), b"\xe9"))
        self.assertEqual(parse_method_call(body)[1], ["é"])

    def test_steps_are_slices_of_the_body(self) -> None:
        body = call("a", "<value>" + "x" * (10 * SLICE) + "</value>")
        steps = iter_method_call(body)
        count = 0
        while True:
            try:
                next(steps)
            except StopIteration as done:
                self.assertEqual(done.value[0], "a")
                break
            count += 1
        self.assertEqual(count, -(-len(body) // SLICE) - 1)

    def test_answers_are_encoded_in_steps(self) -> None:
        value = {"EFI-variables": "<&>" * 100_000}
        steps = iter_success(value)
        count = 0
        while True:
            try:
                next(steps)
                count += 1
            except StopIteration as done:
                self.assertEqual(done.value, encode_success(value))
                break
        self.assertGreater(count, 10)
        self.assertEqual(drain(iter_success(value)), encode_success(value))


class EncodeTests(SynchronousTestCase):
    def test_matches_samples_exactly(self) -> None:
        self.assertEqual(encode_success("string"), sample("responses", "VM.get_by_uuid.response.0"))
        self.assertEqual(encode_success(None), sample("responses", "session.logout.response.0"))
        self.assertEqual(encode_success({"NVRAM": "NVRAM"}),
                         sample("responses", "VM.get_NVRAM.response.0"))
        self.assertEqual(encode_failure(["Unimplemented", "error"]),
                         sample("responses", "VM.get_by_uuid.response.3"))

    def test_status_first_and_no_whitespace(self) -> None:
        data = encode_success({"a": ["b"]})
        self.assertIn(b"<struct><member><name>Status</name><value>Success</value></member>"
                      b"<member><name>Value</name>", data)
        self.assertNotIn(b" <", data)
        self.assertNotIn(b"\n", data)

    def test_empty_struct(self) -> None:
        self.assertIn(b"<name>Value</name><value><struct></struct></value>", encode_success({}))

    def test_escaping(self) -> None:
        self.assertEqual(encode_value("a<b&c>\r"), "<value>a&lt;b&amp;c&gt;&#13;</value>")
        self.assertRaises(ValueError, encode_value, "\x00")
        self.assertRaises(TypeError, encode_value, object())
        self.assertRaises(ValueError, encode_value, 2**70)
        self.assertRaises(ValueError, encode_value, float("nan"))

    def test_characters_xml_cannot_carry(self) -> None:
        for bad in ["\x00", "\x08", "\x0b", "\x1f", "\ud800", "a\udfffb", "\ufffe", "\uffff"]:
            self.assertRaises(ValueError, encode_value, bad)
        for fine in ["\t\n", "\ud7ff\ue000\ufffd", "\U00010000\U0010ffff", "\x7f\x80"]:
            self.assertEqual(xmlrpc.client.loads(encode_success(fine))[0][0]["Value"], fine)

    @settings(deadline=None, max_examples=300)
    @given(st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF,
                                 blacklist_categories=()), max_size=30))
    def test_refuses_exactly_what_xml_cannot_carry(self, text: str) -> None:
        import re

        not_xml = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
        try:
            encode_value(text)
            refused = False
        except ValueError:
            refused = True
        self.assertEqual(refused, not_xml.search(text) is not None, repr(text))

    def test_failure_codes_are_strings(self) -> None:
        ((answer,), _) = xmlrpc.client.loads(encode_failure(["X", 3]))
        self.assertEqual(answer, {"Status": "Failure", "ErrorDescription": ["X", "3"]})


_XML_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufffe\uffff")
    .filter(lambda c: c in "\t\n\r" or c >= " "))
_NO_CR_TEXT = _XML_TEXT.filter(lambda t: "\r" not in t)
_SCALARS = (st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
            | st.floats(allow_nan=False, allow_infinity=False) | _XML_TEXT | st.binary())
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(_XML_TEXT, inner, max_size=4), max_leaves=20)


class PropertyTests(SynchronousTestCase):
    @settings(deadline=None, max_examples=200)
    @given(_VALUES)
    def test_round_trip_through_stdlib(self, value: Any) -> None:
        ((answer,), _) = xmlrpc.client.loads(encode_success(value), use_builtin_types=True)
        self.assertEqual(answer, {"Status": "Success", "Value": value})
        self.assertEqual(list(answer), ["Status", "Value"])

    @settings(deadline=None, max_examples=200)
    @given(st.lists(st.recursive(
        st.none() | st.booleans() | st.integers(-(2**31), 2**31 - 1)
        | st.floats(allow_nan=False, allow_infinity=False) | _NO_CR_TEXT | st.binary(),
        lambda inner: st.lists(inner, max_size=3)
        | st.dictionaries(_NO_CR_TEXT, inner, max_size=3),
        max_leaves=10), max_size=5))
    def test_parses_what_stdlib_sends(self, params: list[Any]) -> None:
        data = xmlrpc.client.dumps(tuple(params), "m.x", allow_none=True).encode()
        self.assertEqual(parse_method_call(data), ("m.x", params))

    @settings(deadline=None, max_examples=300)
    @given(st.binary(max_size=300))
    def test_random_bytes_only_raise_parse_errors(self, data: bytes) -> None:
        try:
            parse_method_call(data)
        except XmlRpcError:
            pass

    @settings(deadline=None, max_examples=500)
    @given(st.sampled_from(sorted(glob.glob(os.path.join(WIRE, "requests", "*")))),
           st.lists(st.tuples(st.integers(0, 400), st.integers(0, 2), st.binary(max_size=3)),
                    min_size=1, max_size=4))
    def test_mutated_requests_only_raise_parse_errors(
            self, path: str, mutations: list[tuple[int, int, bytes]]) -> None:
        with open(path, "rb") as f:
            data = apply_edits(f.read(), mutations)
        try:
            name, params = parse_method_call(data)
        except XmlRpcError:
            return
        self.assertIsInstance(name, str)
        self.assertIsInstance(params, list)
