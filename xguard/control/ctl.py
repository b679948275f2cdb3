# -*- test-case-name: tests.unit.test_ctl -*-
"""``xguard-ctl``: the command-line client of the control channel, with the
upstream daemon's command names.

Exit status: 0 on success; 1 when the daemon answered with an error or
could not be reached (the reason on stderr); 2 on usage errors. The core,
:func:`run`, takes its streams and its way of connecting as arguments so it
is tested in-process.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import IO, Any

from twisted.internet import task
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionClosed
from twisted.protocols import amp
from twisted.python import usage

from .. import __version__
from .commands import (
    ERRORS,
    ListSockets,
    Status,
    VarstoreCreate,
    VarstoreDestroy,
    VtpmCreate,
    VtpmDestroy,
    VtpmGetContents,
    VtpmSetContents,
    error_code,
)

__all__ = ["main", "run", "DEFAULT_CONTROL", "format_status", "format_sockets"]

DEFAULT_CONTROL = "/run/xguard/control.sock"
SERVICES = ("Swtpm", "Varstored")

Connect = Callable[[Any, str], "Deferred[amp.AMP]"]


class _Help(Exception):
    """--help or --version: print this text and exit 0 (usage.Options would
    print to sys.stdout and call sys.exit itself)."""


class _Options(usage.Options):
    longdesc = ""  # else usage.Options shows __main__'s docstring

    def getSynopsis(self) -> str:
        parent = getattr(self, "parent", None)
        if parent is None:
            return f"Usage: {self.synopsis}"
        return f"Usage: xguard-ctl [--control PATH] {parent.subCommand} {self.synopsis}".rstrip()

    def opt_help(self) -> None:
        raise _Help(str(self))

    opt_h = opt_help

    def opt_version(self) -> None:
        raise _Help(f"xguard-ctl {__version__}")


def _gid(text: str) -> int:
    try:
        gid = int(text, 10)
    except ValueError:
        raise usage.UsageError(f"GID must be a number, not {text!r}") from None
    if gid < 0:
        raise usage.UsageError(f"GID must not be negative ({gid})")
    return gid


class _CreateOptions(_Options):
    synopsis = "DBG VM_UUID GID PATH"

    def parseArgs(self, dbg: str, vm_uuid: str, gid: str, path: str) -> None:
        self.update(dbg=dbg, vm_uuid=vm_uuid, gid=_gid(gid), path=path)


class _DestroyOptions(_Options):
    synopsis = "DBG GID PATH"

    def parseArgs(self, dbg: str, gid: str, path: str) -> None:
        self.update(dbg=dbg, gid=_gid(gid), path=path)


class _SetContentsOptions(_Options):
    synopsis = "DBG VTPM_UUID CONTENTS"
    longdesc = ("CONTENTS '-' reads the contents from standard input (one trailing "
                "newline dropped): contents of several MiB do not fit in an argument.")

    def parseArgs(self, dbg: str, vtpm_uuid: str, contents: str) -> None:
        self.update(dbg=dbg, vtpm_uuid=vtpm_uuid, contents=contents)


class _GetContentsOptions(_Options):
    synopsis = "DBG VTPM_UUID"

    def parseArgs(self, dbg: str, vtpm_uuid: str) -> None:
        self.update(dbg=dbg, vtpm_uuid=vtpm_uuid)


class _ListOptions(_Options):
    synopsis = ""
    optFlags = [["json", None, "print the sockets as a JSON list"]]

    def parseArgs(self) -> None:
        pass


class _StatusOptions(_ListOptions):
    optFlags = [["json", None, "print the daemon's raw status document"]]


class Options(_Options):
    synopsis = "xguard-ctl [--control PATH] COMMAND [ARGS...]"
    longdesc = ("Controls xguard over its privileged socket. Exit status: 0 success, "
                "1 error (reported by the daemon, or daemon unreachable), 2 usage error.")
    optParameters = [["control", "c", None,
                      f"control socket path [$XGUARD_CONTROL or {DEFAULT_CONTROL}]"]]
    subCommands = [
        ["varstore_create", None, _CreateOptions, "serve a VM's varstored socket"],
        ["varstore_destroy", None, _DestroyOptions, "remove a varstored socket"],
        ["vtpm_create", None, _CreateOptions, "serve a VM's swtpm socket"],
        ["vtpm_destroy", None, _DestroyOptions, "remove a swtpm socket"],
        ["vtpm_set_contents", None, _SetContentsOptions, "replace a vTPM's contents"],
        ["vtpm_get_contents", None, _GetContentsOptions, "print a vTPM's contents"],
        ["list", None, _ListOptions, "list the domain sockets"],
        ["status", None, _StatusOptions, "show cache modes, queues, upstream, sockets"],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("a command is required")


# -- commands ---------------------------------------------------------------
async def _call(proto: amp.AMP, command: type[amp.Command], **kw: Any) -> Any:
    return await proto.callRemote(command, **kw)


async def _varstore_create(proto: amp.AMP, o: usage.Options, out: IO[str]) -> None:
    await _call(proto, VarstoreCreate, dbg=o["dbg"], vm_uuid=o["vm_uuid"], gid=o["gid"],
                path=o["path"])


async def _varstore_destroy(proto: amp.AMP, o: usage.Options, out: IO[str]) -> None:
    await _call(proto, VarstoreDestroy, dbg=o["dbg"], gid=o["gid"], path=o["path"])


async def _vtpm_create(proto: amp.AMP, o: usage.Options, out: IO[str]) -> None:
    await _call(proto, VtpmCreate, dbg=o["dbg"], vm_uuid=o["vm_uuid"], gid=o["gid"],
                path=o["path"])


async def _vtpm_destroy(proto: amp.AMP, o: usage.Options, out: IO[str]) -> None:
    await _call(proto, VtpmDestroy, dbg=o["dbg"], gid=o["gid"], path=o["path"])


async def _vtpm_set_contents(proto: amp.AMP, o: usage.Options, out: IO[str]) -> None:
    await _call(proto, VtpmSetContents, dbg=o["dbg"], vtpm_uuid=o["vtpm_uuid"],
                contents=o["contents"])


async def _vtpm_get_contents(proto: amp.AMP, o: usage.Options, out: IO[str]) -> None:
    answer = await _call(proto, VtpmGetContents, dbg=o["dbg"], vtpm_uuid=o["vtpm_uuid"])
    out.write(answer["contents"] + "\n")


async def _list(proto: amp.AMP, o: usage.Options, out: IO[str]) -> None:
    sockets = (await _call(proto, ListSockets))["sockets"]
    if o["json"]:
        out.write(json.dumps(sockets, indent=2) + "\n")
    else:
        out.write(format_sockets(sockets))


async def _status(proto: amp.AMP, o: usage.Options, out: IO[str]) -> None:
    document = (await _call(proto, Status))["status"]
    if o["json"]:
        out.write(document.rstrip("\n") + "\n")
    else:
        out.write(format_status(json.loads(document)))


_COMMANDS: dict[str, Callable[[amp.AMP, usage.Options, IO[str]], Awaitable[None]]] = {
    "varstore_create": _varstore_create,
    "varstore_destroy": _varstore_destroy,
    "vtpm_create": _vtpm_create,
    "vtpm_destroy": _vtpm_destroy,
    "vtpm_set_contents": _vtpm_set_contents,
    "vtpm_get_contents": _vtpm_get_contents,
    "list": _list,
    "status": _status,
}


# -- output -----------------------------------------------------------------
def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines) + "\n"


def format_sockets(sockets: Sequence[Mapping[str, Any]]) -> str:
    """ListSockets' answer as a table, one socket a line."""
    rows = [[str(s.get("service", "-")), str(s.get("vm_uuid", "-")), str(s.get("gid", "-")),
             str(s.get("path", "-"))] for s in sockets]
    return _table(["SERVICE", "VM_UUID", "GID", "PATH"], rows)


def _count(value: Any) -> str:
    """A count from whatever shape the document uses: a number, a list, or
    a per-VM mapping of numbers (or of lists)."""
    if isinstance(value, bool) or value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Mapping):
        values = list(value.values())
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return str(sum(values))
        return str(sum(len(v) if isinstance(v, (list, Mapping)) else 1 for v in values))
    if isinstance(value, (list, tuple)):
        return str(len(value))
    return "-"


def _reachability(upstream: Any, service: Mapping[str, Any]) -> str:
    if service.get("outage_since") is not None:
        return f"down since {service['outage_since']}"
    for doc in (service, upstream if isinstance(upstream, Mapping) else {}):
        for key in ("reachable", "upstream_reachable"):
            if isinstance(doc.get(key), bool):
                return "reachable" if doc[key] else "unreachable"
    return "-"


def format_status(document: Mapping[str, Any]) -> str:
    """The Status document as a table, one service a line; missing fields
    show as ``-`` so an older or newer daemon's document still prints."""
    upstream = document.get("upstream")
    services = document.get("services")
    services = services if isinstance(services, Mapping) else {}
    sockets = document.get("sockets")
    sockets = sockets if isinstance(sockets, Mapping) else {}
    names = sorted(set(SERVICES) | set(services) | set(sockets))
    rows = []
    for name in names:
        svc = services.get(name)
        svc = svc if isinstance(svc, Mapping) else {}
        rows.append([name, str(svc.get("mode", "-")), _count(svc.get("queue_depth")),
                     _count(svc.get("pending")), _count(svc.get("quarantined")),
                     _reachability(upstream, svc), _count(sockets.get(name))])
    lines = []
    if isinstance(upstream, Mapping):
        target = upstream.get("target") or upstream.get("kind") or "-"
        lines.append(f"upstream: {target}")
        if upstream.get("last_error"):
            lines.append(f"upstream last error: {upstream['last_error']}")
    text = "\n".join(lines) + ("\n" if lines else "")
    text += _table(["SERVICE", "MODE", "QUEUE", "PENDING", "QUARANTINED", "UPSTREAM",
                    "SOCKETS"], rows)
    for name in names:
        svc = services.get(name)
        if isinstance(svc, Mapping) and svc.get("last_error"):
            text += f"{name} last error: {svc['last_error']}\n"
    return text


# -- driver -----------------------------------------------------------------
def connect_unix(reactor: Any, path: str) -> "Deferred[amp.AMP]":
    """An AMP connection to the daemon's control socket."""
    return connectProtocol(UNIXClientEndpoint(reactor, path), amp.AMP())


def _control_path(option: str | None, environ: Mapping[str, str]) -> str:
    path = option or environ.get("XGUARD_CONTROL") or DEFAULT_CONTROL
    # Accept the daemon's endpoint syntax too (--control unix:/path).
    return path[len("unix:"):] if path.startswith("unix:") else path


def _describe(error: BaseException) -> str:
    code = error_code(error)
    if code is None and isinstance(error, amp.RemoteAmpError):
        return f"{error.errorCode.decode('ascii', 'replace')}: {error.description}"
    return f"{code}: {error}" if code else f"{type(error).__name__}: {error}"


def run(reactor: Any, argv: Sequence[str], stdout: IO[str], stderr: IO[str], *,
        stdin: IO[str] | None = None, environ: Mapping[str, str] | None = None,
        connect: Connect = connect_unix) -> "Deferred[int]":
    """Run one xguard-ctl command; fires with the exit status."""
    return ensureDeferred(_run(reactor, argv, stdout, stderr, stdin,
                               os.environ if environ is None else environ, connect))


async def _run(reactor: Any, argv: Sequence[str], stdout: IO[str], stderr: IO[str],
               stdin: IO[str] | None, environ: Mapping[str, str], connect: Connect) -> int:
    config = Options()
    try:
        config.parseOptions(list(argv))
    except _Help as e:
        stdout.write(f"{e}\n")
        return 0
    except usage.UsageError as e:
        stderr.write(f"xguard-ctl: {e}\nTry 'xguard-ctl --help' or "
                     "'xguard-ctl COMMAND --help'.\n")
        return 2
    sub = config.subOptions
    if config.subCommand == "vtpm_set_contents" and sub["contents"] == "-":
        data = (stdin if stdin is not None else sys.stdin).read()
        sub["contents"] = data[:-1] if data.endswith("\n") else data

    path = _control_path(config["control"], environ)
    try:
        proto = await connect(reactor, path)
    except Exception as e:
        stderr.write(f"xguard-ctl: cannot reach xguard at {path}: {e}\n")
        return 1
    try:
        await _COMMANDS[config.subCommand](proto, sub, stdout)
    except ConnectionClosed as e:
        stderr.write(f"xguard-ctl: lost the connection to xguard at {path}: {e}\n")
        return 1
    except (amp.AmpError, *ERRORS) as e:
        stderr.write(f"xguard-ctl: {_describe(e)}\n")
        return 1
    finally:
        if proto.transport is not None:
            proto.transport.loseConnection()
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    """The ``xguard-ctl`` console script."""
    args = sys.argv[1:] if argv is None else list(argv)

    async def react_main(reactor: Any) -> None:
        code = await run(reactor, args, sys.stdout, sys.stderr)
        if code:
            raise SystemExit(code)

    task.react(lambda reactor: ensureDeferred(react_main(reactor)))


if __name__ == "__main__":
    main()
