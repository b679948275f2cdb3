"""contrib/xguard.service: systemd accepts it, its hardening scores as
doc/operations.md says, and what it sets agrees with the daemon's defaults."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from unittest import skipIf

from twisted.trial.unittest import SynchronousTestCase

from xguard.daemon.config import (
    DEFAULT_CONTROL,
    DEFAULT_SOCKETS_FILE,
    DEFAULT_STATE_DIR,
    FAULT_FILE,
)
from xguard.daemon.run import _ServerOptions, split_argv

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UNIT = os.path.join(REPO, "contrib", "xguard.service")
MAN_PAGE = os.path.join(REPO, "doc", "xguard.8")
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = skipIf(ANALYZE is None, "systemd-analyze is not installed "
                       "(apt-get install systemd)")


def _settings() -> dict[str, list[str]]:
    with open(UNIT) as f:
        text = f.read().replace("\\\n", " ")
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def _exec_start(xguard_opts: str = "") -> list[str]:
    """ExecStart's command line, ``$XGUARD_OPTS`` expanded as systemd does
    (an unquoted ``$VAR`` is split at whitespace; empty: no word)."""
    words = shlex.split(_settings()["ExecStart"][0])
    i = words.index("$XGUARD_OPTS")
    return words[:i] + xguard_opts.split() + words[i + 1:]


class UnitFileTests(SynchronousTestCase):
    @needs_analyze
    def test_systemd_analyze_verify(self) -> None:
        """Run against a copy whose ExecStart names an executable that exists
        here (the installed xguard command when there is one), with the man page
        the unit's Documentation= names on MANPATH, as an install puts it."""
        xguard = os.path.join(os.path.dirname(sys.executable), "xguard")
        binary = xguard if os.access(xguard, os.X_OK) else shutil.which("true")
        with tempfile.TemporaryDirectory(prefix="xg") as d:
            os.makedirs(os.path.join(d, "man", "man8"))
            shutil.copy(MAN_PAGE, os.path.join(d, "man", "man8"))
            with open(UNIT) as f:
                text = f.read().replace("/usr/bin/xguard", str(binary))
            with open(os.path.join(d, "xguard.service"), "w") as f:
                f.write(text)
            proc = subprocess.run([str(ANALYZE), "verify", os.path.join(d, "xguard.service")],
                                  capture_output=True, text=True, timeout=120,
                                  env={**os.environ, "MANPATH": os.path.join(d, "man")})
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        self.assertNotIn("xguard.service", proc.stdout + proc.stderr)

    @needs_analyze
    def test_security_exposure_is_low(self) -> None:
        proc = subprocess.run([str(ANALYZE), "security", "--offline=true", UNIT],
                              capture_output=True, text=True, timeout=120)
        found = re.search(r"Overall exposure level for xguard.service: (\d+\.\d+)", proc.stdout)
        self.assertTrue(found, proc.stdout + proc.stderr)
        self.assertLessEqual(float(found.group(1)), 2.6)  # doc/operations.md reports it

    def test_upstream_ordering_and_start_limits(self) -> None:
        s = _settings()
        self.assertGreaterEqual(set(" ".join(s["Before"]).split()),
                                {"xapi-domains.service", "xenopsd-xc.service"})
        self.assertEqual(s["PartOf"], ["toolstack.target"])
        self.assertEqual(s["Type"], ["notify"])
        self.assertGreater(int(s["StartLimitBurst"][0]), 0)
        self.assertTrue(s["StartLimitIntervalSec"])
        self.assertEqual(s["Documentation"], ["man:xguard(8)"])

    def test_documentation_is_installed(self) -> None:
        import tomllib

        with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
            data_files = tomllib.load(f)["tool"]["setuptools"]["data-files"]
        self.assertEqual(data_files["share/man/man8"], ["doc/xguard.8"])

    def test_options_from_the_environment_file(self) -> None:
        """Issue 18, item 4: /etc/default/xguard's XGUARD_OPTS reach the
        command line (a missing file is fine), no drop-in needed."""
        from xguard.tap import Options

        self.patch(Options, "default_config_file", "/nonexistent/xguard.toml")
        s = _settings()
        self.assertEqual(s["EnvironmentFile"], ["-/etc/default/xguard"])
        self.assertEqual(s["Environment"], ["XGUARD_OPTS="])  # unset: no warning
        argv = _exec_start("--metrics tcp:9101:interface=127.0.0.1 --log-level debug")
        config = _ServerOptions()
        config.parseOptions(split_argv(argv[1:]))
        options = config.subOptions.config
        self.assertEqual((options.metrics, options.log_level),
                         ("tcp:9101:interface=127.0.0.1", "debug"))
        self.assertEqual(options.xapi, "unix:/var/lib/xcp/xapi")

    def test_a_bad_configuration_is_not_restarted(self) -> None:
        from xguard.daemon.process import EXIT_NO_ACCESS, EXIT_USAGE

        s = _settings()
        self.assertEqual(s["RestartPreventExitStatus"],
                         [f"{EXIT_USAGE} {EXIT_NO_ACCESS}"])

    def test_exec_start_parses_and_matches_the_sandbox(self) -> None:
        from xguard.tap import Options

        self.patch(Options, "default_config_file", "/nonexistent/xguard.toml")
        argv = _exec_start()
        self.assertEqual(argv[0], "/usr/bin/xguard")
        config = _ServerOptions()
        config.parseOptions(split_argv(argv[1:]))
        options = config.subOptions.config
        s = _settings()
        # The state directory is the one systemd creates and leaves writable.
        self.assertEqual(options.state_dir, DEFAULT_STATE_DIR)
        self.assertEqual(DEFAULT_STATE_DIR, "/var/lib/" + s["StateDirectory"][0])
        # The control socket, the active list and the domain sockets are in /run.
        writable = " ".join(s["ReadWritePaths"]).split()
        self.assertIn("/run", writable)
        self.assertEqual(options.control, DEFAULT_CONTROL)
        self.assertTrue(options.control_path.startswith(
            "/run/" + s["RuntimeDirectory"][0] + "/"))
        self.assertEqual(options.sockets_file, DEFAULT_SOCKETS_FILE)
        self.assertTrue(options.sockets_file.startswith("/run/"))
        # The fault switch in the host's /tmp stays visible.
        self.assertTrue(FAULT_FILE.startswith("/tmp/"))
        self.assertEqual(s.get("PrivateTmp", ["no"]), ["no"])
        # Chowning sockets to a VM's group needs CAP_CHOWN and the host's ids.
        self.assertIn("CAP_CHOWN", s["CapabilityBoundingSet"][0].split())
        self.assertNotIn("PrivateUsers", s)
        # The open-files limit xguard raises its soft limit to.
        soft, hard = s["LimitNOFILE"][0].split(":")
        self.assertGreaterEqual(int(hard), 65536)
        self.assertLessEqual(int(soft), int(hard))

    def test_fd_store_and_reload_keep_sockets_across_restarts(self) -> None:
        """Issue 12: the fd store holds every socket of a large host (two per
        VM plus the control socket), and reload is the in-place re-exec."""
        s = _settings()
        self.assertGreaterEqual(int(s["FileDescriptorStoreMax"][0]), 2 * 4096 + 1)
        self.assertEqual(s["ExecReload"], ["/bin/kill -HUP $MAINPID"])
        # The new process inherits every stored socket: they must fit.
        self.assertGreater(int(s["LimitNOFILE"][0].split(":")[1]),
                           int(s["FileDescriptorStoreMax"][0]))
        self.assertNotIn("FileDescriptorStorePreserve", s)  # unknown before systemd 254
