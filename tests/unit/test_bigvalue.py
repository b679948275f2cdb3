"""Values over AMP's 64 KiB limit travel spread over several keys of one
box and come back intact (xguard.control.bigvalue)."""

from __future__ import annotations

from typing import Any

from twisted.protocols import amp
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from xguard.control.bigvalue import PIECE_SIZE, BigAmpList, BigUnicode, piece_keys, split

MiB = 1024 * 1024


class Echo(amp.Command):
    """Send a big value, get it back (plus its length as the server saw it)."""

    arguments = [(b"value", BigUnicode()), (b"tail", amp.Unicode())]
    response = [(b"value", BigUnicode()), (b"length", amp.Integer())]


class Entries(amp.Command):
    """A long list of entries."""

    arguments = [(b"count", amp.Integer())]
    response = [(b"entries", BigAmpList([(b"path", amp.Unicode()), (b"gid", amp.Integer())]))]


class Maybe(amp.Command):
    """An optional big argument."""

    arguments = [(b"value", BigUnicode(optional=True))]
    response = [(b"seen", amp.Unicode())]


class EchoLocator(amp.CommandLocator):
    @Echo.responder
    def echo(self, value: str, tail: str) -> dict[str, Any]:
        return {"value": value + tail, "length": len(value)}

    @Entries.responder
    def entries(self, count: int) -> dict[str, Any]:
        return {"entries": [{"path": f"/run/xen/vm-{i:05}/sock", "gid": i} for i in range(count)]}

    @Maybe.responder
    def maybe(self, value: str | None) -> dict[str, Any]:
        return {"seen": "None" if value is None else str(len(value))}


def wire(arg: amp.Argument, value: Any, name: bytes = b"value") -> amp.AmpBox:
    """``value`` as ``arg`` puts it in a box."""
    box = amp.AmpBox()
    arg.toBox(name, box, {name.decode(): value}, None)
    return box


def unwire(arg: amp.Argument, box: amp.AmpBox, name: bytes = b"value") -> Any:
    objects: dict[str, Any] = {}
    arg.fromBox(name, box.copy(), objects, None)
    return objects[name.decode()]


class SplitTests(SynchronousTestCase):
    def test_split_empty_is_one_piece(self) -> None:
        self.assertEqual(split(b""), [b""])

    def test_split_sizes(self) -> None:
        self.assertEqual(split(b"abcde", 2), [b"ab", b"cd", b"e"])
        self.assertEqual(split(b"abcd", 2), [b"ab", b"cd"])

    def test_piece_keys(self) -> None:
        keys = piece_keys(b"contents")
        self.assertEqual([next(keys) for _ in range(3)],
                         [b"contents", b"contents.1", b"contents.2"])


class BoxTests(SynchronousTestCase):
    """toBox/fromBox without a connection, at the boundaries."""

    def roundtrip(self, value: str) -> amp.AmpBox:
        box = wire(BigUnicode(), value)
        box.serialize()  # raises TooLong if any value exceeds 65535 bytes
        self.assertEqual(unwire(BigUnicode(), box), value)
        return box

    def test_boundary_sizes(self) -> None:
        for size, pieces in [(0, 1), (1, 1), (PIECE_SIZE, 1), (PIECE_SIZE + 1, 2),
                             (2 * PIECE_SIZE, 2), (2 * PIECE_SIZE + 1, 3)]:
            box = self.roundtrip("x" * size)
            self.assertEqual(len(box), pieces, size)

    def test_first_piece_keeps_the_argument_name(self) -> None:
        box = self.roundtrip("y" * (PIECE_SIZE + 10))
        self.assertEqual(sorted(box), [b"value", b"value.1"])
        self.assertEqual(len(box[b"value"]), PIECE_SIZE)
        self.assertEqual(box[b"value.1"], b"y" * 10)

    def test_multibyte_characters_cut_by_a_piece_boundary(self) -> None:
        cut = 0
        for char in ("é", "€", "😀"):
            for prefix in range(4):
                value = "a" * prefix + char * (PIECE_SIZE // len(char.encode()) + 5)
                box = self.roundtrip(value)
                try:
                    box[b"value"].decode("utf-8")
                except UnicodeDecodeError:
                    cut += 1
        # Most (prefix, char) pairs really split a character mid-way.
        self.assertGreaterEqual(cut, 6)

    def test_missing_required_value(self) -> None:
        with self.assertRaises(KeyError):
            unwire(BigUnicode(), amp.AmpBox())

    def test_missing_optional_value(self) -> None:
        self.assertIsNone(unwire(BigUnicode(optional=True), amp.AmpBox()))
        self.assertEqual(dict(wire(BigUnicode(optional=True), None)), {})

    def test_other_keys_untouched(self) -> None:
        box = wire(BigUnicode(), "z" * (PIECE_SIZE + 1))
        box[b"value2"] = b"other"
        objects: dict[str, Any] = {}
        BigUnicode().fromBox(b"value", box, objects, None)
        self.assertEqual(dict(box), {b"value2": b"other"})

    def test_amp_list_over_64k(self) -> None:
        arg = BigAmpList([(b"path", amp.Unicode()), (b"gid", amp.Integer())])
        entries = [{"path": f"/run/xen/{i:06}/swtpm.sock", "gid": i} for i in range(5000)]
        box = wire(arg, entries, b"entries")
        box.serialize()
        self.assertGreater(len(box), 1)
        self.assertEqual(unwire(arg, box, b"entries"), entries)


class ConnectionTests(SynchronousTestCase):
    """Through real AMP protocols over an in-memory connection."""

    def setUp(self) -> None:
        self.client, _, self.pump = iosim.connectedServerAndClient(
            lambda: amp.AMP(locator=EchoLocator()), amp.AMP)

    def call(self, command: type[amp.Command], **kw: Any) -> Any:
        d = self.client.callRemote(command, **kw)
        self.pump.flush()
        return self.successResultOf(d)

    def test_four_mib_both_ways(self) -> None:
        value = ("0123456789abcdef€" * (4 * MiB // 19 + 1))[: 4 * MiB]
        answer = self.call(Echo, value=value, tail="!")
        self.assertEqual(answer["length"], len(value))
        self.assertEqual(answer["value"], value + "!")

    def test_boundaries_both_ways(self) -> None:
        for value in ["", "a" * PIECE_SIZE, "a" * (PIECE_SIZE + 1), "é" * PIECE_SIZE]:
            answer = self.call(Echo, value=value, tail="")
            self.assertEqual(answer["value"], value)

    def test_long_list(self) -> None:
        answer = self.call(Entries, count=3000)
        self.assertEqual(len(answer["entries"]), 3000)
        self.assertEqual(answer["entries"][2999], {"path": "/run/xen/vm-02999/sock", "gid": 2999})

    def test_optional(self) -> None:
        self.assertEqual(self.call(Maybe, value=None)["seen"], "None")
        self.assertEqual(self.call(Maybe, value="q" * 70000)["seen"], "70000")
