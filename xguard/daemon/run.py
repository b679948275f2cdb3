# -*- test-case-name: tests.unit.test_run -*-
"""``xguard``: the daemon's own command. It runs the twistd plugin as
``twistd xguard`` would, taking twistd's options and xguard's in one list::

    xguard [twistd options] [xguard options]
    xguard -n --pidfile= --state-dir /var/lib/xapi-guard --xapi unix:/var/lib/xcp/xapi

Why not just ``twistd xguard``: twistd finds plugins by scanning every
``twisted/plugins`` directory on ``sys.path``, which an editable install
(``pip install -e .``) does not put there ("Unknown command: xguard"), and
the scan writes ``dropin.cache`` next to the plugin (into site-packages,
untracked by any package manager) or warns "Unable to write to plugin
cache" where it cannot. This command names the plugin directly: no scan, no
cache. ``twistd xguard`` keeps working where the plugin is installed.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

from twisted.application.service import ServiceMaker
from twisted.copyright import version as twisted_version
from twisted.python import usage
from twisted.scripts import twistd

from .. import __version__
from ..tap import Options

__all__ = ["PLUGIN", "main", "split_argv"]

#: The plugin of ``twisted/plugins/xguard_plugin.py``, named here directly.
PLUGIN = ServiceMaker(
    "xguard",
    "xguard.tap",
    "Guard daemon persisting Xen VMs' UEFI NVRAM and vTPM state",
    "xguard",
)

SYNOPSIS = "Usage: xguard [twistd options] [xguard options]"


# twistd picks ServerOptions per platform at run time: mypy cannot see it.
class _ServerOptions(twistd.ServerOptions):  # type: ignore[misc,name-defined]
    """twistd's options with one plugin as the only command, without
    scanning for plugins."""

    synopsis = SYNOPSIS

    def __init__(self, plugin: ServiceMaker = PLUGIN) -> None:
        self.plugin = plugin
        super().__init__()

    @property
    def subCommands(self) -> Iterator[tuple[str, None, Any, str]]:
        plugin = self.plugin
        self.loadedPlugins = {plugin.tapname: plugin}
        yield plugin.tapname, None, lambda: plugin.options(), plugin.description


def _option_names(options: type[usage.Options]) -> tuple[set[str], set[str]]:
    """(flags, parameters) of ``options`` as ``--name`` strings."""
    flags = {f"--{f[0]}" for f in getattr(options, "optFlags", [])}
    params = {f"--{p[0]}" for p in getattr(options, "optParameters", [])}
    return flags, params


def split_argv(argv: Sequence[str], plugin: ServiceMaker = PLUGIN) -> list[str]:
    """Reorder one mixed option list into twistd's shape:
    ``[twistd options] xguard [xguard options]``. The two sets of names do
    not overlap; anything that is not an xguard option (with its value) is
    twistd's, in the order given. ``--`` ends twistd's part."""
    flags, params = _option_names(plugin.options)
    ours: list[str] = []
    theirs: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if arg == "--":
            ours.extend(argv[i + 1:])
            break
        if name in params:
            if "=" in arg:
                ours.append(arg)
            else:
                ours.extend(argv[i:i + 2])
                i += 1
        elif name in flags:
            ours.append(arg)
        else:
            theirs.append(arg)
        i += 1
    return [*theirs, plugin.tapname, *ours]


def help_text() -> str:
    return "\n".join([
        SYNOPSIS,
        "",
        "xguard options:",
        Options().getUsage().rstrip(),
        "",
        "twistd options (-n: stay in the foreground; --pidfile= : no pid file; "
        "--logfile, --syslog, --prefix: where the log goes):",
        _ServerOptions().getUsage().rstrip(),
        "",
    ])


def main(argv: Sequence[str] | None = None, plugin: ServiceMaker = PLUGIN) -> NoReturn | None:
    """The ``xguard`` console script (``plugin``: another build of the
    daemon, e.g. the benchmarks' upstream-design variant)."""
    args = list(sys.argv[1:] if argv is None else argv)
    before_end = args[:args.index("--")] if "--" in args else args
    if "--help" in before_end or "-h" in before_end:
        sys.stdout.write(help_text())
        sys.exit(0)
    if "--version" in before_end:
        sys.stdout.write(f"xguard {__version__} (Twisted {twisted_version})\n")
        sys.exit(0)
    config = _ServerOptions(plugin)
    try:
        config.parseOptions(split_argv(args, plugin))
    except usage.UsageError as e:
        sys.stderr.write(f"xguard: {e}\nTry 'xguard --help'.\n")
        sys.exit(2)
    twistd.runApp(config)
    return None


if __name__ == "__main__":
    main()
