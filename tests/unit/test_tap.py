"""Option parsing and the twistd plugin."""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.python.usage import UsageError
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from xguard.daemon.config import Config
from xguard.tap import Options


class OptionsTests(SynchronousTestCase):
    def parse(self, *argv: str) -> Config:
        options = Options()
        options.parseOptions(list(argv))
        return options.config

    def test_defaults_use_embedded_store(self) -> None:
        config = self.parse()
        self.assertIsNone(config.xapi)
        self.assertEqual(config.store_path, "/var/lib/xapi-guard/local-store.sqlite")
        self.assertEqual(config.queue_size, 512)
        self.assertEqual(config.xapi_timeout, 120.0)
        self.assertEqual(config.control, "unix:/run/xguard/control.sock")
        self.assertEqual(config.sockets_file, "/run/nonpersistent/varstored-guard-active.json")
        self.assertFalse(config.no_cache)

    def test_xapi_means_no_local_store(self) -> None:
        config = self.parse("--xapi", "unix:/var/lib/xcp/xapi")
        self.assertIsNone(config.store_path)

    def test_local_store_path(self) -> None:
        self.assertEqual(self.parse("--local-store", "/tmp/s.db").store_path, "/tmp/s.db")

    def test_all_options(self) -> None:
        config = self.parse("--xapi", "https://xapi.example:443", "--state-dir", "/s",
                            "--sockets-file", "/f.json", "--control", "unix:/c.sock",
                            "--queue-size", "7", "--xapi-timeout", "3.5", "--log-level",
                            "debug", "--no-cache")
        self.assertEqual((config.xapi, config.state_dir, config.sockets_file, config.control,
                          config.queue_size, config.xapi_timeout, config.log_level,
                          config.no_cache),
                         ("https://xapi.example:443", "/s", "/f.json", "unix:/c.sock", 7, 3.5,
                          "debug", True))

    def test_bad_input_is_a_usage_error(self) -> None:
        for argv in (["--xapi", "unix:/x", "--local-store", "/y"],
                     ["--xapi", "ftp://x"], ["--xapi", "unix:relative"],
                     ["--queue-size", "0"], ["--queue-size", "many"],
                     ["--xapi-timeout", "-1"], ["--log-level", "loud"],
                     ["--direct-deadline", "soon"]):
            self.assertRaises(UsageError, self.parse, *argv)


class PluginTests(SynchronousTestCase):
    def test_twistd_lists_xguard(self) -> None:
        """A regular install puts the plugin where twistd scans. An
        editable one (``pip install -e .``) cannot: that is why the
        ``xguard`` command names the plugin itself (xguard.daemon.run)."""
        editable = subprocess.run(  # PEP 610, asked away from the checkout
            [sys.executable, "-c", "import importlib.metadata as m, json; "
             "t = m.distribution('xguard').read_text('direct_url.json'); "
             "print(json.loads(t or '{}').get('dir_info', {}).get('editable', False))"],
            cwd="/", capture_output=True, text=True, check=False).stdout.strip()
        if editable == "True":
            raise SkipTest("editable install: twistd cannot see the plugin; "
                           "the xguard command runs it")
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        out = subprocess.run([twistd, "--help"],
                             capture_output=True, text=True, check=False,
                             env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        self.assertIn("xguard", out.stdout)

    def test_makeservice_is_side_effect_free(self) -> None:
        from xguard.daemon.service import XguardService
        from xguard.tap import makeService

        options = Options()
        options.parseOptions(["--state-dir", "/nonexistent/xguard-test"])
        service = makeService(options)
        self.assertIsInstance(service, XguardService)
        self.assertFalse(os.path.exists("/nonexistent/xguard-test"))


class ControlPathTests(SynchronousTestCase):
    def test_unix_endpoint_path(self) -> None:
        self.assertEqual(Config(control="unix:/run/x/c.sock:mode=600").control_path,
                         "/run/x/c.sock")
        self.assertRaises(ValueError, Config, control="tcp:9999:interface=127.0.0.1")


class ReactorTests(SynchronousTestCase):
    def test_the_reactor_provides_what_the_daemon_types_it_with(self) -> None:
        """tap.py casts the global reactor to IDaemonReactor: every Twisted
        interface that intersection names is one the installed reactor
        declares (the intersections themselves are ours, declared by nobody)."""
        from twisted.internet import reactor

        from xguard.interfaces import IDaemonReactor

        twisted_ones = [i for i in IDaemonReactor.__iro__
                        if i.__module__.startswith("twisted.")]
        self.assertTrue(twisted_ones)
        self.assertEqual([i for i in twisted_ones if not i.providedBy(reactor)], [])
