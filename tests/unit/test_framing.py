"""RFC 9112 framing for the domain sockets (xguard.domain.framing): the
request target, the body length from the headers, and the bounded chunked
decoder."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from xguard.domain.framing import (
    MAX_CHUNKS,
    ChunkedDecoder,
    FramingError,
    body_length,
    origin_form,
)


class OriginFormTests(SynchronousTestCase):
    def test_origin_form_is_kept(self) -> None:
        for target in [b"/", b"/tpm2-00.permall", b"/a?b=c&d", b"/%2E", b"//x"]:
            self.assertEqual(origin_form(target), target)

    def test_asterisk_is_kept(self) -> None:
        self.assertEqual(origin_form(b"*"), b"*")

    def test_absolute_form_becomes_path_and_query(self) -> None:
        self.assertEqual(origin_form(b"http://x/tpm2-00.permall"), b"/tpm2-00.permall")
        self.assertEqual(origin_form(b"hTTp://user@h:1/a/b?c"), b"/a/b?c")
        self.assertEqual(origin_form(b"https://h"), b"/")
        self.assertEqual(origin_form(b"http://h?q=1"), b"/?q=1")
        self.assertEqual(origin_form(b"http:///a"), b"/a")

    def test_refused(self) -> None:
        for target in [b"", b"a", b"xtpm2-00.permall", b"mailto:a@b", b"ftp://h/a", b"http:a",
                       b"http://h#f", b"/a b", b"/\x80", b"/\x7f", b"/%ff", b"/%C3"]:
            with self.subTest(target=target):
                self.assertRaises(FramingError, origin_form, target)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=40))
    def test_any_bytes_give_a_path_or_framing_error(self, target: bytes) -> None:
        try:
            result = origin_form(target)
        except FramingError as e:
            self.assertEqual(e.code, 400)
            return
        self.assertTrue(result == b"*" or result.startswith(b"/"))
        self.assertTrue(all(0x21 <= c <= 0x7E for c in result))


class BodyLengthTests(SynchronousTestCase):
    def test_no_framing_header_is_no_body(self) -> None:
        self.assertEqual(body_length(b"HTTP/1.1", [], []), 0)
        self.assertEqual(body_length(b"HTTP/1.0", [], []), 0)

    def test_content_length(self) -> None:
        self.assertEqual(body_length(b"HTTP/1.1", [b"42"], []), 42)
        self.assertEqual(body_length(b"HTTP/1.0", [b"0007"], []), 7)
        self.assertGreater(body_length(b"HTTP/1.1", [b"9" * 5000], []), 2**60)

    def test_bad_content_lengths(self) -> None:
        for lengths in [[b"-1"], [b"+1"], [b"1 "], [b"0x10"], [b""], [b"1,1"], [b"1", b"1"],
                        [b"\xd9\xa1"]]:
            with self.subTest(lengths=lengths):
                self.assertRaises(FramingError, body_length, b"HTTP/1.1", lengths, [])

    def test_chunked(self) -> None:
        for codings in [[b"chunked"], [b"Chunked"], [b" chunked ,"], [b"", b"chunked"]]:
            self.assertIsNone(body_length(b"HTTP/1.1", [], codings), codings)

    def test_other_codings(self) -> None:
        for codings in [[b"identity"], [b"gzip"], [b"chunked", b"identity"],
                        [b"gzip, chunked"], [b"chunked, chunked"], [b"chunked;a=b"], [b""]]:
            with self.subTest(codings=codings):
                self.assertRaises(FramingError, body_length, b"HTTP/1.1", [], codings)

    def test_both_headers(self) -> None:
        self.assertRaises(FramingError, body_length, b"HTTP/1.1", [b"5"], [b"chunked"])

    def test_chunked_on_http10(self) -> None:
        self.assertRaises(FramingError, body_length, b"HTTP/1.0", [], [b"chunked"])


class Collect:
    def __init__(self, max_body: int = 10_000, max_chunks: int = MAX_CHUNKS) -> None:
        self.body: list[bytes] = []
        self.rest: list[bytes] = []
        self.calls = 0
        self.decoder = ChunkedDecoder(self.deliver, self.rest.append, max_body=max_body,
                                      max_chunks=max_chunks)

    def deliver(self, data: bytes) -> None:
        self.calls += 1
        self.body.append(data)


def chunk(data: bytes, ext: bytes = b"") -> bytes:
    return b"%x%s\r\n%s\r\n" % (len(data), ext, data)


class ChunkedDecoderTests(SynchronousTestCase):
    def test_decodes_and_hands_over_the_rest(self) -> None:
        c = Collect()
        c.decoder.dataReceived(chunk(b"hello") + chunk(b" world", b";a=b") + b"0\r\n\r\nNEXT")
        self.assertEqual(b"".join(c.body), b"hello world")
        self.assertEqual(c.calls, 1)  # one call per read, not per chunk
        self.assertEqual(c.rest, [b"NEXT"])
        c.decoder.noMoreData()

    def test_trailers_are_skipped(self) -> None:
        c = Collect()
        c.decoder.dataReceived(chunk(b"a") + b"0\r\nX-A: 1\r\nX-B: 2\r\n\r\n")
        self.assertEqual((c.body, c.rest), ([b"a"], [b""]))

    def test_too_many_chunks(self) -> None:
        c = Collect(max_chunks=3)
        with self.assertRaises(FramingError) as ctx:
            c.decoder.dataReceived(chunk(b"a") * 4 + b"0\r\n\r\n")
        self.assertEqual(ctx.exception.code, 400)
        self.assertEqual(c.body, [])

    def test_over_the_limit_is_413_from_the_size(self) -> None:
        c = Collect(max_body=10)
        with self.assertRaises(FramingError) as ctx:
            c.decoder.dataReceived(b"b\r\n")
        self.assertEqual(ctx.exception.code, 413)

    def test_malformed(self) -> None:
        for data in [b"g\r\n", b" 1\r\nx\r\n", b"1\r\nxy", b"1\r\nx\n", b"0\r\nbad\r\n",
                     b"1" * (2000), b"0\r\n" + b"X: " + b"y" * 9000 + b"\r\n",
                     b"11111111111111111\r\n"]:
            with self.subTest(data=data[:20]):
                self.assertRaises(FramingError, Collect().decoder.dataReceived, data)

    def test_incomplete_body_at_close(self) -> None:
        c = Collect()
        c.decoder.dataReceived(b"5\r\nab")
        self.assertRaises(FramingError, c.decoder.noMoreData)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.binary(min_size=1, max_size=20), max_size=8),
           st.lists(st.integers(1, 30), min_size=1, max_size=30), st.binary(max_size=10))
    def test_any_split_of_the_stream_decodes_the_same(
            self, chunks: list[bytes], cuts: list[int], rest: bytes) -> None:
        stream = b"".join(chunk(c) for c in chunks) + b"0\r\n\r\n" + rest
        c = Collect()
        pos = 0
        for size in cuts * (len(stream) // sum(cuts) + 1):
            if c.rest or pos >= len(stream):
                break
            c.decoder.dataReceived(stream[pos:pos + size])
            pos += size
        self.assertEqual(b"".join(c.body), b"".join(chunks))
        self.assertEqual(c.rest[0] + stream[pos:], rest)
