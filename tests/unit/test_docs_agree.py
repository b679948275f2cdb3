"""Issue 18, item 9: the documentation agrees with the program.

Every option ``xguard --help`` lists (xguard's and twistd's) is in the man
page and in doc/operations.md; the man page has the sections an operator
looks for; the exit statuses it and operations.md give are the code's; and
``xguard-ctl`` takes a command's options where doc/control.md shows them,
after the command's arguments too."""

from __future__ import annotations

import os
import re

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from tests.unit.test_control import VM
from tests.unit.test_ctl import CtlTestCase
from xguard.control import ctl
from xguard.daemon import process
from xguard.daemon.run import help_text

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _read(*path: str) -> str:
    with open(os.path.join(REPO, *path), encoding="utf-8") as f:
        return f.read()


def _man_text() -> str:
    """doc/xguard.8 as it reads: troff's escaped dashes and font changes
    undone."""
    text = _read("doc", "xguard.8").replace("\\-", "-")
    return re.sub(r"\\f[BIRP]", "", text)


def _help_options() -> tuple[set[str], set[str]]:
    """(xguard's, twistd's) long options, as ``xguard --help`` lists them."""
    text = help_text()
    ours, theirs = text.split("\ntwistd options", 1)
    find = re.compile(r"^\s+(?:-\w, )?(--[a-z][a-z0-9_-]*)", re.MULTILINE)
    return set(find.findall(ours)), set(find.findall(theirs))


class OptionsDocumentedTests(SynchronousTestCase):
    def test_help_lists_the_options(self) -> None:
        ours, theirs = _help_options()
        self.assertGreaterEqual(ours, {"--config", "--metrics", "--unresponsive-after",
                                       "--listen-backlog", "--state-dir", "--no-cache"})
        self.assertGreaterEqual(theirs, {"--nodaemon", "--pidfile", "--logfile", "--syslog"})

    def test_every_option_is_in_the_man_page(self) -> None:
        man = _man_text()
        ours, theirs = _help_options()
        missing = sorted(o for o in ours | theirs if not re.search(re.escape(o) + r"\b", man))
        self.assertEqual(missing, [], "options of xguard --help missing from doc/xguard.8")
        # xguard's each have their own entry (.TP, then the option first).
        entries = set(re.findall(r"^\.TP\n\.BI? (--[a-z-]+)", man, re.MULTILINE))
        self.assertEqual(sorted(ours - entries), [])

    def test_every_option_is_in_operations_md(self) -> None:
        doc = _read("doc", "operations.md")
        ours, theirs = _help_options()
        missing = sorted(o for o in ours | theirs if not re.search(re.escape(o) + r"\b", doc))
        self.assertEqual(missing, [], "options of xguard --help missing from doc/operations.md")
        # xguard's each have a row of the options table.
        rows = set(re.findall(r"^\| `(--[a-z-]+)[ `]", doc, re.MULTILINE))
        self.assertEqual(sorted(ours - rows - {"--help", "--version"}), [])


class ManPageTests(SynchronousTestCase):
    def test_sections(self) -> None:
        sections = re.findall(r"^\.SH (.+)$", _read("doc", "xguard.8"), re.MULTILINE)
        for name in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "CONFIGURATION FILE",
                     "XGUARD-CTL COMMANDS", "ENVIRONMENT", "FILES", "EXIT STATUS",
                     "SEE ALSO"):
            self.assertIn(name, sections)

    def test_every_xguard_ctl_command(self) -> None:
        man = _man_text()
        for name, *_ in ctl.Options.subCommands:
            self.assertRegex(man, rf'\.B[IR]? "?{re.escape(name)}\b', name)

    def test_exit_statuses_are_the_code_s(self) -> None:
        man = _man_text()
        section = man[man.index(".SH EXIT STATUS"):man.index(".SH SEE ALSO")]
        listed = {int(c) for c in re.findall(r"^\.B (\d+)$", section, re.MULTILINE)}
        codes = {0, process.EXIT_FAILURE, process.EXIT_USAGE, process.EXIT_NO_ACCESS,
                 process.EXIT_IN_USE, process.EXIT_RUNNING}
        self.assertEqual(listed, codes)
        table = _read("doc", "operations.md").split("### Exit status", 1)[1]
        rows = {int(c) for c in re.findall(r"^\| (\d+) \|", table.split("\n\n", 2)[1],
                                             re.MULTILINE)}
        self.assertEqual(rows, codes)


class CtlOptionPlacementTests(CtlTestCase):
    """doc/control.md: ``restart [DBG] [--timeout S]``, ``--control`` after
    the command: options may follow the arguments."""

    def parse(self, cls: type[usage.Options], *argv: str) -> usage.Options:
        options = cls()
        options.parseOptions(list(argv))
        return options

    def test_options_after_the_arguments(self) -> None:
        o = self.parse(ctl._RestartOptions, "op-1", "--timeout", "5")
        self.assertEqual((o["dbg"], o["timeout"]), ("op-1", 5.0))
        o = self.parse(ctl._ResolveOptions, "Swtpm/x", "keep", "--dbg", "op-2")
        self.assertEqual((o["id"], o["action"], o["dbg"]), ("Swtpm/x", "keep", "op-2"))
        o = self.parse(ctl._StatusOptions, "--control=/x", "--json")
        self.assertEqual((o["control"], o["json"]), ("/x", 1))
        o = self.parse(ctl._LogLevelOptions, "debug", "--dbg=op-3")
        self.assertEqual((o["level"], o["dbg"]), ("debug", "op-3"))

    def test_double_dash_and_stdin_stay_arguments(self) -> None:
        o = self.parse(ctl._GetContentsOptions, "--", "--odd-dbg", VM)
        self.assertEqual(o["dbg"], "--odd-dbg")
        o = self.parse(ctl._SetContentsOptions, "d", VM, "-", "-c", "/x")
        self.assertEqual((o["contents"], o["control"]), ("-", "/x"))

    def test_errors_still_name_the_option(self) -> None:
        code, _, err = self.ctl("restart", "d", "--timeout")
        self.assertEqual(code, 2)
        self.assertIn("timeout", err)
        code, _, err = self.ctl("list", "--nope")
        self.assertEqual(code, 2)
        self.assertIn("nope", err)

    def test_control_after_the_arguments(self) -> None:
        code, _, err = self.ctl("vtpm_create", "d", VM, "0", "/run/a.tpm", "--control", "/c")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(self.connected_to, ["/c"])


class StatusExampleTests(SynchronousTestCase):
    def test_control_md_shows_what_status_prints(self) -> None:
        """doc/control.md's ``xguard-ctl status`` example, for the state it
        describes (a 3m12s outage, three writes cached, a backlog delivered
        before it)."""
        from datetime import UTC, datetime

        from xguard.control.ctl import format_status
        from xguard.status import CacheStatus, DaemonStatus, Drain, UpstreamStatus

        doc = _read("doc", "control.md")
        start = doc.index("  health: degraded: upstream unreachable")
        example = "\n".join(line[2:] for line in doc[start:doc.index("  ```", start)]
                            .splitlines()) + "\n"
        since = datetime(2026, 3, 4, 14, 2, 11, tzinfo=UTC).timestamp()
        ended = datetime(2026, 3, 4, 13, 58, 40, tzinfo=UTC).timestamp()
        status = DaemonStatus(
            version="0.1.0", ready=True, cache_enabled=True, log_level="info",
            fault_file="/tmp/fist_disable_xapi_guard_cache",
            upstream=UpstreamStatus(kind="xapi", target="xapi unix:/var/lib/xcp/xapi",
                                    reachable=False, down_since=since,
                                    last_error="CONNECTION_REFUSED"),
            sockets={"Swtpm": 2, "Varstored": 3},
            services={
                "Swtpm": CacheStatus(service="Swtpm", mode="Engaged", queue_depth=3,
                                     pending={"a": 1, "b": 1, "c": 1}, outage_since=since,
                                     last_error="CONNECTION_REFUSED",
                                     drain=Drain(started=ended - 73, delivered=5000, left=0,
                                                 rate=68.5, ended=ended)),
                "Varstored": CacheStatus(service="Varstored", outage_since=since)})
        self.assertEqual(format_status(status, now=since + 192, tz=UTC), example)
