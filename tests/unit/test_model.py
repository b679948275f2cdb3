"""The pure domain model: vTPM contents string, keys, NVRAM records, uuids."""

from __future__ import annotations

import string

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from xguard.model import NvramWrite, TpmKey, TpmState, is_valid_uuid, normalise_update

b64 = st.text(alphabet=string.ascii_letters + string.digits + "+/=", max_size=40)


class TpmStateTests(SynchronousTestCase):
    def test_bare_permall_is_backward_compatible(self) -> None:
        self.assertEqual(TpmState.deserialize("abc"), TpmState(permall="abc"))

    def test_three_fields(self) -> None:
        self.assertEqual(TpmState.deserialize("a b c"), TpmState("a", "b", "c"))

    def test_empty_contents(self) -> None:
        self.assertEqual(TpmState.deserialize(""), TpmState())

    def test_two_fields_refused(self) -> None:
        self.assertRaises(ValueError, TpmState.deserialize, "a b")

    def test_update_refuses_separator(self) -> None:
        self.assertRaises(ValueError, TpmState().update, {TpmKey.SAVESTATE: "a b"})

    def test_update_keeps_other_keys(self) -> None:
        state = TpmState("p", "s", "v").update({TpmKey.SAVESTATE: "S"})
        self.assertEqual(state, TpmState("p", "S", "v"))

    @given(b64, b64, b64)
    def test_roundtrip(self, p: str, s: str, v: str) -> None:
        state = TpmState(p, s, v)
        self.assertEqual(TpmState.deserialize(state.serialize()), state)

    @given(st.dictionaries(st.sampled_from(list(TpmKey)), b64), b64, b64, b64)
    def test_update_then_get(self, changes: dict[TpmKey, str], p: str, s: str, v: str) -> None:
        state = TpmState(p, s, v).update(changes)
        for key in TpmKey:
            self.assertEqual(state.get(key), changes.get(key, TpmState(p, s, v).get(key)))


class TpmKeyTests(SynchronousTestCase):
    def test_paths(self) -> None:
        self.assertEqual(TpmKey.PERMALL.path, "/tpm2-00.permall")
        self.assertEqual(TpmKey.from_path("/tpm2-00.volatilestate"), TpmKey.VOLATILESTATE)
        self.assertIsNone(TpmKey.from_path("/tpm2-00.other"))


class NvramWriteTests(SynchronousTestCase):
    @given(st.text(), st.sampled_from(["yes", "no", "unspecified"]))
    def test_roundtrip(self, value: str, update: str) -> None:
        self.assertEqual(NvramWrite.decode(NvramWrite(value, update).encode()),
                         NvramWrite(value, update))

    def test_decode_rejects_garbage(self) -> None:
        self.assertRaises(ValueError, NvramWrite.decode, b"[]")

    def test_normalise_update(self) -> None:
        self.assertEqual([normalise_update(u) for u in ("yes", "no", "maybe", None, "")],
                         ["yes", "no", "unspecified", "unspecified", "unspecified"])


class UuidTests(SynchronousTestCase):
    def test_valid(self) -> None:
        self.assertTrue(is_valid_uuid("04efbb51-2bce-495f-9d86-75fc70ba01e0"))

    def test_invalid(self) -> None:
        for bad in ("", "x", "04efbb512bce495f9d8675fc70ba01e0", "../etc/passwd" + "x" * 23,
                    "04efbb51-2bce-495f-9d86-75fc70ba01eZ"):
            self.assertFalse(is_valid_uuid(bad), bad)
