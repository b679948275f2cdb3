"""The ``xguard`` command (xguard.daemon.run): twistd's options and xguard's in one
list, the plugin named directly (no plugin scan, so no dropin.cache)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from twisted.trial.unittest import SynchronousTestCase

from xguard.daemon.run import PLUGIN, split_argv
from xguard.testing.daemon import REPO, Daemon, _env


class SplitTests(SynchronousTestCase):
    def test_twistd_options_first_then_xguard_options(self) -> None:
        self.assertEqual(
            split_argv(["--log-level", "debug", "-n", "--pidfile=", "--state-dir=/s",
                        "--logfile", "/l", "--no-cache", "--syslog", "--control", "unix:/c"]),
            ["-n", "--pidfile=", "--logfile", "/l", "--syslog", "xguard",
             "--log-level", "debug", "--state-dir=/s", "--no-cache", "--control", "unix:/c"])

    def test_double_dash_ends_twistds_part(self) -> None:
        self.assertEqual(split_argv(["-n", "--", "--help"]), ["-n", "xguard", "--help"])

    def test_no_options(self) -> None:
        self.assertEqual(split_argv([]), ["xguard"])


class PluginTests(SynchronousTestCase):
    def test_same_plugin_as_twistds(self) -> None:
        sys.path.insert(0, REPO)
        self.addCleanup(sys.path.remove, REPO)
        from twisted.plugins.xguard_plugin import xguard

        self.assertEqual((PLUGIN.tapname, PLUGIN.module, PLUGIN.description),
                         (xguard.tapname, xguard.module, xguard.description))


def _xguard(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xguard", *args], capture_output=True,
                          text=True, timeout=60, env=_env())


class CommandTests(SynchronousTestCase):
    def test_help_lists_both_option_sets(self) -> None:
        proc = _xguard("--help")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertTrue(proc.stdout.startswith(
            "Usage: xguard [twistd options] [xguard options]"))
        for option in ("--state-dir", "--xapi", "--log-level", "--config", "--nodaemon",
                       "--pidfile", "--syslog"):
            self.assertIn(option, proc.stdout)

    def test_usage_error(self) -> None:
        proc = _xguard("--state-dir")
        self.assertEqual(proc.returncode, 2)
        self.assertIn("xguard --help", proc.stderr)

    def test_a_bad_configuration_file_is_a_usage_error(self) -> None:
        """One line naming the file and the key; exit 2; nothing started."""
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
            f.write('metric = "tcp:9101:interface=127.0.0.1"\n')
            f.flush()
            proc = _xguard("-n", "--pidfile=", "--config", f.name)
        self.assertEqual(proc.returncode, 2)
        self.assertEqual(proc.stderr.splitlines()[0],
                         f"xguard: configuration file {f.name}: metric is not an option; "
                         "did you mean metrics?")
        proc = _xguard("--config", "/nonexistent/xguard.toml")
        self.assertEqual(proc.returncode, 2)
        self.assertIn("cannot read the configuration file /nonexistent/xguard.toml",
                      proc.stderr)


class ScriptDaemon(Daemon):
    """The daemon started as ``xguard OPTIONS`` with twistd's options and
    xguard's interleaved."""

    def argv(self) -> list[str]:
        argv = super().argv()
        argv.remove("xguard")
        # an xguard option first, before twistd's -n
        return [sys.executable, "-m", "xguard", "--log-level", "debug", *argv[1:]]


@pytest.mark.integration
class ScriptTests(SynchronousTestCase):
    def test_runs_the_daemon_without_a_plugin_scan(self) -> None:
        cache = os.path.join(REPO, "twisted", "plugins", "dropin.cache")
        if os.path.exists(cache):
            os.unlink(cache)
        with ScriptDaemon() as d:
            d.start()
            self.assertIs(d.status()["ready"], True)
            self.assertEqual(d.stop(), 0)
            self.assertIn("xguard ready", d.log())
        self.assertFalse(os.path.exists(cache))
