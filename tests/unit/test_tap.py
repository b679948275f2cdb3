"""Option parsing and the twistd plugin."""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.python.usage import UsageError
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from xguard.daemon.config import INT_OPTIONS, NUMBER_OPTIONS, Config
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


class ConfigFileTests(SynchronousTestCase):
    """Issue 18, item 4: /etc/xguard/xguard.toml (or --config PATH), every
    long option a key, the command line winning."""

    def setUp(self) -> None:
        import shutil
        import tempfile

        self.root = tempfile.mkdtemp(prefix="xgc")
        self.addCleanup(shutil.rmtree, self.root)
        self.default = os.path.join(self.root, "xguard.toml")
        self.patch(Options, "default_config_file", self.default)

    def write(self, text: str, name: str = "xguard.toml") -> str:
        path = os.path.join(self.root, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(list(argv))
        return options

    def refused(self, *argv: str) -> str:
        return str(self.assertRaises(UsageError, self.parse, *argv))

    def test_no_file_is_fine(self) -> None:
        options = self.parse()
        self.assertIsNone(options.config.config_file)
        self.assertEqual(options.config, Config())

    def test_the_default_file_is_read(self) -> None:
        self.write('metrics = "tcp:9101:interface=127.0.0.1"\nlog-level = "debug"\n'
                   "queue-size = 64\nxapi-timeout = 7.5\ndirect-deadline = 2\n"
                   "no-cache = true\n")
        config = self.parse().config
        self.assertEqual((config.metrics, config.log_level, config.queue_size,
                          config.xapi_timeout, config.direct_deadline, config.no_cache),
                         ("tcp:9101:interface=127.0.0.1", "debug", 64, 7.5, 2.0, True))
        self.assertEqual(config.config_file, self.default)
        self.assertEqual(config.from_file, ("direct-deadline", "log-level", "metrics",
                                            "no-cache", "queue-size", "xapi-timeout"))

    def test_the_command_line_wins(self) -> None:
        self.write('log-level = "debug"\nqueue-size = 64\nstate-dir = "/from/file"\n')
        config = self.parse("--log-level", "warn", "--queue-size=512").config
        self.assertEqual((config.log_level, config.queue_size, config.state_dir),
                         ("warn", 512, "/from/file"))
        self.assertEqual(config.from_file, ("state-dir",))

    def test_one_upstream_choice_on_the_command_line_overrides_both(self) -> None:
        self.write('local-store = "/srv/store.sqlite"\n')
        config = self.parse("--xapi", "unix:/var/lib/xcp/xapi").config
        self.assertEqual((config.xapi, config.local_store), ("unix:/var/lib/xcp/xapi", None))
        self.write('xapi = "unix:/var/lib/xcp/xapi"\n')
        config = self.parse("--local-store", "/s.sqlite").config
        self.assertEqual((config.xapi, config.local_store), (None, "/s.sqlite"))

    def test_config_names_another_file_or_none(self) -> None:
        self.write('queue-size = 64\n')
        other = self.write('queue-size = 32\n', "other.toml")
        self.assertEqual(self.parse("--config", other).config.queue_size, 32)
        self.assertEqual(self.parse("--config=").config.queue_size, 512)
        self.assertIsNone(self.parse("--config=").config.config_file)

    def test_every_long_option_is_a_key(self) -> None:
        values: dict[str, str] = {
            "xapi": '"https://xapi.example"', "local-store": None,  # type: ignore[dict-item]
            "control": '"unix:/run/x/c.sock"', "metrics": '"unix:/run/x/m.sock"',
            "log-level": '"error"', "no-cache": "true",
        }
        names = [p[0] for p in Options.optParameters if p[0] != "config"] + \
            [f[0] for f in Options.optFlags]
        lines = []
        for name in names:
            value = values.get(name, "3" if name in INT_OPTIONS + NUMBER_OPTIONS
                               else f'"/p/{name}"')
            if value is not None:
                lines.append(f"{name} = {value}")
        self.write("\n".join(lines) + "\n")
        options = self.parse()
        self.assertEqual(set(options.from_file), set(names) - {"local-store"})
        config = options.config
        self.assertEqual((config.state_dir, config.fault_file, config.listen_backlog,
                          config.stuck_after, config.log_level),
                         ("/p/state-dir", "/p/fault-file", 3, 3.0, "error"))

    def test_errors_name_the_file_and_the_key(self) -> None:
        cases = [
            ("metric = \"unix:/m.sock\"\n", "metric is not an option; did you mean metrics?"),
            ("logfile = \"/x.log\"\n", "--logfile is twistd's, and stays on the command line"),
            ("queue-size = \"512\"\n", "queue-size must be an integer, not '512' (a string)"),
            ("xapi-timeout = true\n", "xapi-timeout must be a number of seconds"),
            ("no-cache = 1\n", "no-cache must be true or false"),
            ("state-dir = 5\n", "state-dir must be a string"),
            ("[xguard]\nqueue-size = 5\n", "xguard is not an option"),
            ("queue-size = \n", "is not valid TOML"),
            ("config = \"/other.toml\"\n", "config is not an option"),
        ]
        for text, expected in cases:
            self.write(text)
            message = self.refused()
            self.assertIn(self.default, message)
            self.assertIn(expected, message)

    def test_bad_values_name_the_file(self) -> None:
        self.write('queue-size = 0\nlog-level = "loud"\n')
        self.assertIn(f"--log-level must be one of debug, info, warn, error, got 'loud' "
                      f"(set by log-level in {self.default})", self.refused())
        self.write('queue-size = 0\n')
        self.assertEqual(self.refused(),
                         f"--queue-size must be positive, got 0 (set by queue-size in "
                         f"{self.default})")
        self.write('xapi = "ftp://x"\n')
        self.assertIn(f"(set by xapi in {self.default})", self.refused())

    def test_a_missing_or_unreadable_file_named_is_an_error(self) -> None:
        missing = os.path.join(self.root, "missing.toml")
        self.assertEqual(self.refused("--config", missing),
                         f"cannot read the configuration file {missing}: "
                         "No such file or directory")
        os.mkdir(self.default)  # exists, but cannot be read as a file
        self.assertIn(self.default, self.refused())
