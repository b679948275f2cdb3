# -*- test-case-name: tests.unit.test_ctl -*-
"""``xguard-ctl``: the command-line client of the control channel, with the
upstream daemon's command names.

Exit status: 0 on success; 1 when the daemon answered with an error or
could not be reached (the reason on stderr, with a hint for the usual
causes: xguard not running, not root); 2 on usage errors. ``status`` says
the daemon's health by its exit status too: 0 healthy, 3 degraded, 4
failed (:data:`HEALTH_EXIT`). The core,
:func:`run`, takes its streams and its way of connecting as arguments so it
is tested in-process.

``--json`` prints one JSON document on one line for every command that has
it (``status`` passes the daemon's document through as it came): it is for
scripts and ``jq``, and a line-per-document output is what they read best;
the tables are for people.
"""

from __future__ import annotations

import errno
import getopt
import json
import os
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime, tzinfo
from typing import IO, Any

import attrs
from twisted.internet import task
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError, ConnectionClosed, ConnectionRefusedError
from twisted.internet.protocol import connectionDone
from twisted.protocols import amp
from twisted.python import usage
from twisted.python.failure import Failure

from .. import __version__
from ..interfaces import IClientReactor
from ..status import (
    DEGRADED,
    FAILED,
    FAULT_FILE,
    HEALTHY,
    CacheStatus,
    DaemonStatus,
    Drain,
    SetAside,
    UpstreamStatus,
    from_json,
)
from .commands import (
    ERRORS,
    LOG_LEVELS,
    ControlError,
    ListSockets,
    Restart,
    SetAsideExport,
    SetAsideResolve,
    SetLogLevel,
    Status,
    VarstoreCreate,
    VarstoreDestroy,
    VtpmCreate,
    VtpmDestroy,
    VtpmGetContents,
    VtpmSetContents,
    error_code,
)

__all__ = ["main", "run", "DEFAULT_CONTROL", "format_status", "format_sockets",
           "format_set_aside"]

DEFAULT_CONTROL = "/run/xguard/control.sock"
SERVICES = ("Swtpm", "Varstored")
#: ``xguard-ctl status``'s exit status per health verdict (1: no answer, or
#: an error; 2: usage).
HEALTH_EXIT = {HEALTHY: 0, DEGRADED: 3, FAILED: 4}

Connect = Callable[[Any, str], "Deferred[amp.AMP]"]


class _Help(Exception):
    """--help or --version: print this text and exit 0 (usage.Options would
    print to sys.stdout and call sys.exit itself)."""


class _Options(usage.Options):
    longdesc = ""  # else usage.Options shows __main__'s docstring
    synopsis = ""

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


class _CommandOptions(_Options):
    """A command's options: ``--control`` is accepted after the command too
    (``xguard-ctl status --control PATH``), as operators type it; and every
    option may follow the command's arguments (``restart DBG --timeout 5``,
    ``resolve ID keep --dbg op-1``), as in GNU tools. ``--`` ends them."""

    optParameters = [["control", "c", None, "control socket path (as before the command)"]]

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        args = list(sys.argv[1:] if options is None else options)
        try:
            found, rest = getopt.gnu_getopt(args, self.shortOpt, self.longOpt)
        except getopt.GetoptError as e:
            raise usage.UsageError(str(e)) from None
        args = []
        for name, value in found:
            if name.startswith("--"):
                takes = f"{name[2:]}=" in self.longOpt
                args.append(f"{name}={value}" if takes else name)
            else:
                takes = f"{name[1]}:" in self.shortOpt
                args.extend([name, value] if takes else [name])
        super().parseOptions([*args, "--", *rest])  # type: ignore[no-untyped-call]  # usage.Options, untyped


class _CreateOptions(_CommandOptions):
    synopsis = "DBG VM_UUID GID PATH"

    def parseArgs(self, dbg: str, vm_uuid: str, gid: str, path: str) -> None:  # type: ignore[override]  # usage.Options' way
        self.update(dbg=dbg, vm_uuid=vm_uuid, gid=_gid(gid), path=path)


class _DestroyOptions(_CommandOptions):
    synopsis = "DBG GID PATH"

    def parseArgs(self, dbg: str, gid: str, path: str) -> None:  # type: ignore[override]  # usage.Options' way
        self.update(dbg=dbg, gid=_gid(gid), path=path)


class _SetContentsOptions(_CommandOptions):
    synopsis = "DBG VTPM_UUID CONTENTS"
    longdesc = ("CONTENTS '-' reads the contents from standard input (one trailing "
                "newline dropped): contents of several MiB do not fit in an argument.")

    def parseArgs(self, dbg: str, vtpm_uuid: str, contents: str) -> None:  # type: ignore[override]  # usage.Options' way
        self.update(dbg=dbg, vtpm_uuid=vtpm_uuid, contents=contents)


class _GetContentsOptions(_CommandOptions):
    synopsis = "DBG VTPM_UUID"

    def parseArgs(self, dbg: str, vtpm_uuid: str) -> None:  # type: ignore[override]  # usage.Options' way
        self.update(dbg=dbg, vtpm_uuid=vtpm_uuid)


class _ListOptions(_CommandOptions):
    synopsis = ""
    optFlags = [["json", None, "print the sockets as a JSON list on one line"]]

    def parseArgs(self) -> None:
        pass


class _StatusOptions(_ListOptions):
    longdesc = ("The first line is the daemon's health and why. The exit status says it "
                "too: 0 healthy, 3 degraded, 4 failed (1: no answer from the daemon).")
    optFlags = [["json", None, "print the daemon's raw status document (one line)"],
                ["quiet", "q", "print nothing: the exit status says the health"]]


class _RestartOptions(_CommandOptions):
    synopsis = "[DBG]"
    longdesc = ("Restart xguard in place (it re-executes itself, handing its listening "
                "sockets over: no VM connection is refused) and wait until it is ready.")
    optParameters = [["timeout", "t", "120", "seconds to wait for the restarted daemon"]]

    def parseArgs(self, dbg: str = "xguard-ctl") -> None:
        try:
            timeout = float(self["timeout"])
        except ValueError:
            raise usage.UsageError(f"--timeout must be a number, not {self['timeout']!r}") \
                from None
        self.update(dbg=dbg, timeout=timeout)


class _SetAsideOptions(_ListOptions):
    synopsis = ""
    longdesc = ("List the writes set aside: acknowledged, never delivered, waiting for you "
                "(another writer changed upstream since, the VM runs on another host, "
                "upstream refused them for good, or their file is damaged). Resolve each "
                "with 'xguard-ctl resolve'.")
    optFlags = [["json", None, "print them as a JSON list on one line"]]


class _ResolveOptions(_CommandOptions):
    synopsis = "ID push|keep|export [FILE]"
    longdesc = ("Resolve a write set aside (ID as 'xguard-ctl set-aside' shows it): push "
                "ours over upstream's; keep upstream's (ours is dropped); or export ours to "
                "FILE (a JSON document, 0600) and keep upstream's. Every resolution is "
                "logged by the daemon.")
    optParameters = [["dbg", None, "xguard-ctl", "the dbg string logged with it"]]

    def parseArgs(self, item_id: str, action: str, file: str | None = None) -> None:  # type: ignore[override]  # usage.Options' way
        if action not in ("push", "keep", "export"):
            raise usage.UsageError(f"the resolution is push, keep or export, not {action!r}")
        if (action == "export") != (file is not None):
            raise usage.UsageError("export takes a FILE; push and keep take none")
        self.update(id=item_id, action=action, file=file)


class _LogLevelOptions(_CommandOptions):
    synopsis = "[" + "|".join(LOG_LEVELS) + "]"
    longdesc = ("Log at LEVEL from now on, without a restart; the configured level "
                "(--log-level, or log-level in the configuration file) is back at the next "
                "start. Without LEVEL, print the level the daemon logs at now.")
    optParameters = [["dbg", None, "xguard-ctl", "the dbg string logged with it"]]

    def parseArgs(self, level: str | None = None) -> None:
        if level is not None and level not in LOG_LEVELS:
            raise usage.UsageError(f"the log level is one of {', '.join(LOG_LEVELS)}, "
                                   f"not {level!r}")
        self.update(level=level)


class Options(_Options):
    synopsis = "xguard-ctl [--control PATH] COMMAND [ARGS...]"
    longdesc = ("Controls xguard over its privileged socket. Exit status: 0 success, "
                "1 error (reported by the daemon, or daemon unreachable), 2 usage error; "
                "status: 0 healthy, 3 degraded, 4 failed.")
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
        ["restart", None, _RestartOptions, "restart in place, keeping every socket"],
        ["set-aside", None, _SetAsideOptions, "list the writes set aside"],
        ["resolve", None, _ResolveOptions, "resolve a write set aside: push, keep, export"],
        ["log-level", None, _LogLevelOptions, "log at another level until the next start"],
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
        out.write(json.dumps(sockets, sort_keys=True) + "\n")
    else:
        out.write(format_sockets(sockets))


async def _status(proto: amp.AMP, o: usage.Options, out: IO[str]) -> int:
    """The exit status says the daemon's health (:data:`HEALTH_EXIT`), in
    every form."""
    document = (await _call(proto, Status))["status"]
    status = from_json(json.loads(document))
    if o["quiet"]:
        pass
    elif o["json"]:
        out.write(document.rstrip("\n") + "\n")
    else:
        out.write(format_status(status, now=o.get("now"), tz=o.get("tz")))
    return HEALTH_EXIT.get(status.health.verdict, HEALTH_EXIT[FAILED])


async def _restart(proto: amp.AMP, o: usage.Options, out: IO[str]) -> None:
    """Ask for the restart, wait for the old image to go (it closes this
    connection when it execs), then for the new one to say it is ready:
    calls made meanwhile wait in the handed-over socket's backlog."""
    await _call(proto, Restart, dbg=o["dbg"])
    lost = getattr(proto, "lost", None)
    if lost is not None:
        await lost
    await o["wait_ready"](o["timeout"])
    out.write("xguard restarted in place and is ready\n")


async def _set_aside(proto: amp.AMP, o: usage.Options, out: IO[str]) -> None:
    document = json.loads((await _call(proto, Status))["status"])
    status = from_json(document)
    items = [item for svc in status.services.values() for item in svc.quarantined]
    if o["json"]:
        out.write(json.dumps([attrs.asdict(item) for item in items], sort_keys=True) + "\n")
    else:
        out.write(format_set_aside(items, now=o.get("now")))


async def _resolve(proto: amp.AMP, o: usage.Options, out: IO[str]) -> None:
    action = o["action"]
    if action == "export":
        document = (await _call(proto, SetAsideExport, dbg=o["dbg"], id=o["id"]))["document"]
        _write_private(o["file"], document + "\n")
        out.write(f"{o['id']}: ours exported to {o['file']}\n")
        action = "exported"
    await _call(proto, SetAsideResolve, dbg=o["dbg"], id=o["id"], action=action)
    out.write({"push": f"{o['id']}: ours pushed over upstream's\n",
               "keep": f"{o['id']}: upstream's kept, ours dropped\n",
               "exported": f"{o['id']}: upstream's kept\n"}[action])


async def _log_level(proto: amp.AMP, o: usage.Options, out: IO[str]) -> None:
    if o["level"] is None:
        status = from_json(json.loads((await _call(proto, Status))["status"]))
        out.write(f"{status.log_level or 'unknown (an older xguard)'}\n")
        return
    answer = await _call(proto, SetLogLevel, dbg=o["dbg"], level=o["level"])
    out.write(f"log level {o['level']} (was {answer['previous']}); the configured "
              f"{answer['configured']} is back at the next start\n")


def _write_private(path: str, text: str) -> None:
    """Write ``text`` to ``path``, mode 0600, durably (the export may hold
    the only copy of a VM's state)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        data = text.encode("utf-8")
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


#: Each command's coroutine; one that returns an int gives the exit status.
_COMMANDS: dict[str, Callable[[amp.AMP, usage.Options, IO[str]], Awaitable[int | None]]] = {
    "varstore_create": _varstore_create,
    "varstore_destroy": _varstore_destroy,
    "vtpm_create": _vtpm_create,
    "vtpm_destroy": _vtpm_destroy,
    "vtpm_set_contents": _vtpm_set_contents,
    "vtpm_get_contents": _vtpm_get_contents,
    "list": _list,
    "status": _status,
    "restart": _restart,
    "set-aside": _set_aside,
    "resolve": _resolve,
    "log-level": _log_level,
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


def duration(seconds: float) -> str:
    """A short human duration: ``45s``, ``3m12s``, ``2h05m``, ``1d03h``."""
    total = max(0, int(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _clock(timestamp: float, now: float | None, tz: tzinfo | None) -> str:
    """``14:02:11`` (the date too when not today)."""
    when = datetime.fromtimestamp(timestamp, tz)
    if now is not None and datetime.fromtimestamp(now, tz).date() == when.date():
        return when.strftime("%H:%M:%S")
    return when.strftime("%Y-%m-%d %H:%M:%S")


def _since(timestamp: float, now: float | None, tz: tzinfo | None) -> str:
    """``down for 3m12s, since 14:02:11`` (the date too when not today)."""
    clock = _clock(timestamp, now, tz)
    if now is None:
        return f"down since {clock}"
    return f"down for {duration(now - timestamp)}, since {clock}"


def _reachability(upstream: UpstreamStatus, service: CacheStatus, now: float | None,
                  tz: tzinfo | None) -> str:
    if service.outage_since is not None:
        return _since(service.outage_since, now, tz)
    if upstream.reachable is None:
        return "-"
    return "reachable" if upstream.reachable else "unreachable"


def format_status(status: DaemonStatus, *, now: float | None = None,
                  tz: tzinfo | None = None) -> str:
    """The Status document as a table, one service a line.

    :param now: the current time (seconds since the epoch) for outage
        durations; without it only the outage's start is shown.
    :param tz: the time zone of the clock times shown (local by default).

    An error is shown only while it matters: a service's last error while
    its outage lasts, upstream's while it is unreachable (``--json`` keeps
    them all)."""
    upstream = status.upstream
    health = status.health
    names = sorted(set(SERVICES) | set(status.services) | set(status.sockets))
    rows = []
    for name in names:
        svc = status.services.get(name)
        if svc is None:  # a daemon that does not report it
            rows.append([name] + ["-"] * 6 + [str(status.sockets.get(name, "-"))])
            continue
        rows.append([name, svc.mode, "off" if svc.cache == "off" else
                     ("on" if svc.enabled else "OFF"),
                     str(svc.queue_depth), str(svc.pending_items), str(len(svc.quarantined)),
                     _reachability(upstream, svc, now, tz), str(status.sockets.get(name, 0))])
    lines = [f"health: {health.verdict}"
             + "".join(f"{': ' if i == 0 else '; '}{r.text}"
                       for i, r in enumerate(health.reasons)),
             f"upstream: {upstream.target}"]
    if upstream.last_error and upstream.reachable is False:
        lines.append(f"upstream last error: {upstream.last_error}")
    if upstream.unresponsive_since is not None:
        lines.append("upstream unresponsive: "
                     + _since(upstream.unresponsive_since, now, tz).replace("down", "a call"))
    if not status.cache_enabled or any(not s.enabled for s in status.services.values()):
        lines.append("cache: OFF: writes go to upstream only and fail while it is down "
                     f"({_cache_off_because(status)})")
    else:
        lines.append("cache: on")
    if status.log_level is not None:
        lines.append(f"log level: {status.log_level}")
    for svc in status.services.values():
        if svc.disk_error is not None:
            lines.append(f"{svc.service} cache disk error: {svc.disk_error} "
                         "(writes are refused until it recovers)")
    text = "\n".join(lines) + "\n"
    text += _table(["SERVICE", "MODE", "CACHE", "QUEUE", "PENDING", "QUARANTINED", "UPSTREAM",
                    "SOCKETS"], rows)
    for name in names:
        svc = status.services.get(name)
        if svc is not None and svc.last_error and svc.outage_since is not None:
            text += f"{name} last error: {svc.last_error}\n"
    for name in names:
        svc = status.services.get(name)
        if svc is not None and svc.drain is not None:
            text += f"{name} {_drain(svc.drain, now, tz)}\n"
    return text


def _cache_off_because(status: DaemonStatus) -> str:
    """--no-cache, or the fault switch file the daemon names (an older
    daemon does not: its default then)."""
    services = status.services.values()
    if services and all(s.cache == "off" for s in services):
        return "--no-cache"
    fault_file = status.fault_file or f"{FAULT_FILE}, or the one --fault-file names,"
    return f"the fault switch file {fault_file} exists"


def _drain(drain: Drain, now: float | None, tz: tzinfo | None) -> str:
    """A backlog being delivered (items left, rate), or the last one."""
    if drain.ended is None:
        elapsed = "" if now is None else f" in {duration(now - drain.started)}"
        eta = (f", about {duration(drain.left / drain.rate)} to go" if drain.rate > 0 else "")
        return (f"delivering the backlog: {_items(drain.left)} left, {drain.delivered} "
                f"delivered{elapsed} ({drain.rate:.1f}/s){eta}")
    return (f"last backlog: {_items(drain.delivered)} delivered in "
            f"{duration(drain.ended - drain.started)} ({drain.rate:.1f}/s), ended "
            f"{_clock(drain.ended, now, tz)}")


def _items(n: int) -> str:
    return "1 item" if n == 1 else f"{n} items"


def format_set_aside(items: Sequence[SetAside], *, now: float | None = None) -> str:
    """The writes set aside as a table, then each one's reason."""
    if not items:
        return "no write is set aside\n"
    rows = [[item.id, item.kind, ",".join(map(str, item.keys)) or "-",
             "-" if item.since is None or now is None else duration(now - item.since),
             "yes" if item.held else "no", "yes" if item.complete else "no"]
            for item in items]
    text = _table(["ID", "KIND", "KEYS", "AGE", "HELD", "WHOLE"], rows)
    text += "".join(f"{item.id}: {item.reason}\n" for item in items)
    return text


#: What a command may fail with, for ``except``: AMP's errors and ours.
_ERROR_TYPES: tuple[type[BaseException], ...] = (amp.AmpError, *ERRORS)


# -- driver -----------------------------------------------------------------
class _Client(amp.AMP):
    """An AMP client that tells when its connection is gone."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # amp's, untyped
        self.lost: Deferred[None] = Deferred()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)  # type: ignore[no-untyped-call]
        if not self.lost.called:
            self.lost.callback(None)


def connect_unix(reactor: IClientReactor, path: str) -> "Deferred[amp.AMP]":
    """An AMP connection to the daemon's control socket."""
    connected: Deferred[amp.AMP] = connectProtocol(UNIXClientEndpoint(reactor, path), _Client())
    return connected


async def _wait_ready(reactor: IClientReactor, connect: Connect, path: str, timeout: float,
                      poll: float = 0.1) -> None:
    """Ask for Status until the daemon says it is ready."""
    deadline = reactor.seconds() + timeout
    while True:
        try:
            proto = await connect(reactor, path)
            try:
                document = (await _call(proto, Status))["status"]
            finally:
                if proto.transport is not None:
                    proto.transport.loseConnection()
            if json.loads(document).get("ready"):
                return
        except (ConnectError, ConnectionClosed, OSError):
            pass  # the old image is going away, or the new one not listening yet
        if reactor.seconds() >= deadline:
            raise ControlError(f"xguard was not ready again within {timeout:g}s; see its log")
        await task.deferLater(reactor, poll, lambda: None)


_NOT_RUNNING = ("is xguard running? (systemctl status xguard) Or name its socket: "
                "--control PATH")


def _cannot_connect(path: str, error: BaseException) -> str:
    """Why the control socket could not be reached, with what to do."""
    code = getattr(error, "osError", None) if isinstance(error, ConnectError) else None
    if isinstance(error, OSError):
        code = error.errno
    if code in (errno.EACCES, errno.EPERM):
        reason = "permission denied: the control socket is root-only; run as root"
    elif code == errno.ENOENT:
        reason = f"no such socket; {_NOT_RUNNING}"
    elif code == errno.ECONNREFUSED or isinstance(error, ConnectionRefusedError):
        reason = f"connection refused (nothing listens there); {_NOT_RUNNING}"
    else:
        reason = str(error)
    return f"cannot reach xguard at {path}: {reason}"


def _control_path(option: str | None, environ: Mapping[str, str]) -> str:
    """The control socket's path. The daemon's endpoint syntax is accepted
    (``unix:/path``); any other endpoint is a usage error: the control
    channel is a UNIX socket only (root's)."""
    path = option or environ.get("XGUARD_CONTROL") or DEFAULT_CONTROL
    if path.startswith("unix:"):
        return path[len("unix:"):]
    scheme = path.split(":", 1)[0]
    if ":" in path and not path.startswith("/") and scheme.isalnum():
        raise usage.UsageError(
            f"--control takes the control socket's path (or unix:PATH), not {path!r}: "
            "the control channel listens on a UNIX socket only")
    return path


def _describe(error: BaseException) -> str:
    code = error_code(error)
    if code is None and isinstance(error, amp.RemoteAmpError):
        return f"{error.errorCode.decode('ascii', 'replace')}: {error.description}"
    return f"{code}: {error}" if code else f"{type(error).__name__}: {error}"


def run(reactor: IClientReactor, argv: Sequence[str], stdout: IO[str], stderr: IO[str], *,
        stdin: IO[str] | None = None, environ: Mapping[str, str] | None = None,
        connect: Connect = connect_unix, euid: int | None = None,
        tz: tzinfo | None = None) -> "Deferred[int]":
    """Run one xguard-ctl command; fires with the exit status.

    :param reactor: connects, and tells the time (``seconds()``) for the
        status table's outage durations.
    :param euid: who runs the command (``os.geteuid()`` by default): a
        non-root user gets a hint when the daemon hangs up on them.
    :param tz: time zone of clock times shown (local by default)."""
    return ensureDeferred(_run(reactor, argv, stdout, stderr, stdin,
                               os.environ if environ is None else environ, connect,
                               os.geteuid() if euid is None else euid, tz))


async def _run(reactor: IClientReactor, argv: Sequence[str], stdout: IO[str], stderr: IO[str],
               stdin: IO[str] | None, environ: Mapping[str, str], connect: Connect,
               euid: int, tz: tzinfo | None) -> int:
    config = Options()  # type: ignore[no-untyped-call]  # usage.Options, untyped
    try:
        config.parseOptions(list(argv))  # type: ignore[no-untyped-call]
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

    if config.subCommand in ("status", "set-aside"):
        sub["now"], sub["tz"] = reactor.seconds(), tz

    try:
        path = _control_path(sub["control"] or config["control"], environ)
    except usage.UsageError as e:
        stderr.write(f"xguard-ctl: {e}\n")
        return 2
    if config.subCommand == "restart":
        sub["wait_ready"] = lambda timeout: _wait_ready(reactor, connect, path, timeout)
    try:
        proto = await connect(reactor, path)
    except Exception as e:
        stderr.write(f"xguard-ctl: {_cannot_connect(path, e)}\n")
        return 1
    try:
        # postOptions: one is set
        code = await _COMMANDS[str(config.subCommand)](proto, sub, stdout)
    except ConnectionClosed as e:
        hint = (": the control channel serves root only; run as root" if euid != 0
                else f": {e}")
        stderr.write(f"xguard-ctl: xguard at {path} closed the connection{hint}\n")
        return 1
    except _ERROR_TYPES as e:
        stderr.write(f"xguard-ctl: {_describe(e)}\n")
        return 1
    finally:
        if proto.transport is not None:
            proto.transport.loseConnection()
    return code or 0


def main(argv: Sequence[str] | None = None) -> None:
    """The ``xguard-ctl`` console script."""
    args = sys.argv[1:] if argv is None else list(argv)

    async def react_main(reactor: IClientReactor) -> None:
        code = await run(reactor, args, sys.stdout, sys.stderr)
        if code:
            raise SystemExit(code)

    task.react(lambda reactor: ensureDeferred(react_main(reactor)))


if __name__ == "__main__":
    main()
