"""systemd's LISTEN_* convention, read and written (xguard.restart.listenfds)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from twisted.trial.unittest import SynchronousTestCase

from xguard.restart import listenfds
from xguard.restart.listenfds import Passed, environment, parse, take, valid_name

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class ParseTests(SynchronousTestCase):
    def test_nothing_handed_over(self) -> None:
        self.assertEqual(parse({}, 42), [])

    def test_named_descriptors_from_3(self) -> None:
        env = {"LISTEN_PID": "42", "LISTEN_FDS": "3", "LISTEN_FDNAMES": "a:b:xgc-1-2-ab"}
        self.assertEqual(parse(env, 42),
                         [Passed(3, "a"), Passed(4, "b"), Passed(5, "xgc-1-2-ab")])

    def test_for_another_process(self) -> None:
        # Inherited from a parent that was handed them: not ours.
        env = {"LISTEN_PID": "41", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
        self.assertEqual(parse(env, 42), [])

    def test_without_names_they_are_unknown(self) -> None:
        env = {"LISTEN_PID": "42", "LISTEN_FDS": "2"}
        self.assertEqual(parse(env, 42), [Passed(3, "unknown"), Passed(4, "unknown")])

    def test_zero(self) -> None:
        self.assertEqual(parse({"LISTEN_PID": "42", "LISTEN_FDS": "0",
                                "LISTEN_FDNAMES": ""}, 42), [])

    def test_malformed(self) -> None:
        for env in ({"LISTEN_PID": "x", "LISTEN_FDS": "1"},
                    {"LISTEN_PID": "42", "LISTEN_FDS": "one"},
                    {"LISTEN_PID": "42"},
                    {"LISTEN_PID": "42", "LISTEN_FDS": "-1"},
                    {"LISTEN_PID": "42", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a"}):
            self.assertRaises(ValueError, parse, env, 42)

    def test_environment_round_trip(self) -> None:
        env = environment(["x", "y"], 7)
        self.assertEqual(env, {"LISTEN_PID": "7", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "x:y"})
        self.assertEqual(parse(env, 7), [Passed(3, "x"), Passed(4, "y")])
        self.assertEqual(parse(environment([], 7), 7), [])


class TakeTests(SynchronousTestCase):
    def test_takes_unsets_and_closes_on_exec(self) -> None:
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        os.set_inheritable(r, True)
        # take() reads fds from 3; point the variables at ours by pretending
        # r is the first of one (parse is checked above; here: the effects).
        env = {"LISTEN_PID": "42", "LISTEN_FDS": str(r - 2), "LISTEN_FDNAMES": ":".join(
            f"n{i}" for i in range(r - 2)), "OTHER": "kept"}
        passed = take(env, 42)
        self.assertEqual(passed[-1], Passed(r, f"n{r - 3}"))
        self.assertEqual(env, {"OTHER": "kept"})
        self.assertFalse(os.get_inheritable(r))

    def test_unsets_even_when_malformed_or_foreign(self) -> None:
        env = {"LISTEN_PID": "42", "LISTEN_FDS": "nope"}
        self.assertRaises(ValueError, take, env, 42)
        self.assertEqual(env, {})
        env = {"LISTEN_PID": "41", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "a"}
        self.assertEqual(take(env, 42), [])
        self.assertEqual(env, {})


class NameTests(SynchronousTestCase):
    def test_valid_names(self) -> None:
        for name in ("control", "xgd-fd00-2a-0123456789ab", "", "a b", "x" * 255):
            self.assertTrue(valid_name(name), name)
        for name in ("a:b", "tab\there", "é", "x" * 256, "nl\n"):
            self.assertFalse(valid_name(name), name)


class PlaceTests(SynchronousTestCase):
    def test_moves_descriptors_to_3_in_order_across_exec(self) -> None:
        """In a child (place() replaces whatever used 3 …): two pipes'
        write ends given in reverse order arrive at 3 and 4 after exec."""
        pipes = [os.pipe() for _ in range(2)]
        for r, _ in pipes:
            self.addCleanup(os.close, r)
        writers = [w for _, w in pipes]
        child = textwrap.dedent(f"""
            import os, sys
            from xguard.restart.listenfds import place
            place({writers[::-1]!r})
            os.execv(sys.executable, [sys.executable, "-c",
                     "import os; os.write(3, b'three'); os.write(4, b'four')"])
        """)
        env = {**os.environ, "PYTHONPATH": REPO}
        subprocess.run([sys.executable, "-c", child], pass_fds=writers, env=env, check=True,
                       timeout=60)
        for w in writers:
            os.close(w)
        self.assertEqual(os.read(pipes[1][0], 100), b"three")
        self.assertEqual(os.read(pipes[0][0], 100), b"four")

    def test_nothing_to_place(self) -> None:
        listenfds.place([])
