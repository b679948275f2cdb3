# -*- test-case-name: tests.unit.test_tap -*-
"""twistd glue: option parsing and ``makeService``. No side effects here:
everything that touches the system happens when the service starts (the
configuration file is read while the options are parsed), but for one:
parsed for twistd (``xguard`` or ``twistd xguard``), just before twistd
imports its reactor, the options keep TLS out of the process when no
endpoint needs it (:mod:`xguard._internals.twisted_tls`).

Options come from the command line and from a TOML file
(``/etc/xguard/xguard.toml`` when it exists, or ``--config PATH``; see
:mod:`xguard.daemon.config`); the command line wins, option by option."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, cast

from twisted.application.service import IService
from twisted.python import usage

from ._internals.twisted_tls import leave_tls_out
from .daemon.config import (
    DEFAULT_ACTIVE_REQUESTS,
    DEFAULT_CONFIG_FILE,
    DEFAULT_CONTROL,
    DEFAULT_SOCKETS_FILE,
    DEFAULT_STATE_DIR,
    FAULT_FILE,
    INT_OPTIONS,
    LOG_LEVELS,
    NUMBER_OPTIONS,
    UPSTREAM_OPTIONS,
    Config,
    read_config_file,
)

__all__ = ["Options", "makeService"]


class _Noting:
    """An option's handler that also notes the option was on the command
    line (what the configuration file must not override)."""

    def __init__(self, given: set[str], name: str, handler: Any) -> None:
        self._given = given
        self._name = name
        self._handler: Callable[[str, Any], None] = getattr(handler, "dispatch", handler)

    def __call__(self, name: str, value: Any) -> None:
        self._given.add(self._name)
        self._handler(name, value)


class Options(usage.Options):
    """``twistd xguard`` options; names are part of the contract (SPEC §2)."""

    synopsis = "[options]"
    longdesc = (
        "Serve per-VM varstored and swtpm sockets, forwarding to xapi (or the "
        "embedded store) with a durable write-back cache while xapi is down."
    )
    optFlags = [
        ["no-cache", None, "Writes go to upstream only and fail while it is down."],
    ]
    optParameters = [
        ["config", None, None, "Read options from this TOML file (one key per long option; "
         f"the command line wins) [{DEFAULT_CONFIG_FILE} if it exists; --config= : none]."],
        ["xapi", None, None, "Upstream xapi: unix:PATH, http://HOST[:PORT] or https://HOST[:PORT]."],
        ["local-store", None, None, "Use the embedded SQLite store at PATH as upstream."],
        ["state-dir", None, DEFAULT_STATE_DIR, "Disk cache root (and default local store)."],
        ["sockets-file", None, DEFAULT_SOCKETS_FILE, "The list of active domain sockets."],
        ["control", None, DEFAULT_CONTROL, "Control channel: a UNIX socket endpoint "
         "(unix:PATH), served to root only."],
        ["queue-size", None, "512", "Bound of each cache queue."],
        ["xapi-timeout", None, "120", "Seconds before an upstream call times out."],
        ["log-level", None, "info", "debug, info, warn or error."],
        ["direct-deadline", None, "3", "Seconds a guest waits for a direct write before "
         "it is made durable on disk instead."],
        ["request-timeout", None, "60", "Seconds before an idle or stalled domain client "
         "is disconnected."],
        ["fault-file", None, FAULT_FILE, "While this file exists the cache is disabled."],
        ["flush-concurrency", None, "8", "Deliveries the cache flusher runs at once."],
        ["active-requests", None, str(DEFAULT_ACTIVE_REQUESTS), "Requests of each service's "
         "domain sockets served at once, one per socket in turn; the others wait, received "
         "(0: no limit)."],
        ["metrics", None, None, "Serve Prometheus metrics at /metrics on this endpoint: "
         "unix:PATH or tcp:PORT:interface=ADDRESS (off by default)."],
        ["unresponsive-after", None, "5", "Seconds an upstream call may wait for its answer "
         "before upstream is reported unresponsive."],
        ["listen-backlog", None, "128", "Connections each domain socket queues before "
         "accepting them (capped by SOMAXCONN)."],
        ["stuck-after", None, "600", "Seconds a VM's cached writes may keep failing "
         "(transiently) before one alert is raised (log, Status, metric)."],
    ]

    #: Read when --config is not given and the file exists.
    default_config_file = DEFAULT_CONFIG_FILE

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # usage.Options, untyped
        #: The options given on the command line (long names).
        self.given: set[str] = set()
        #: The options the configuration file set.
        self.from_file: tuple[str, ...] = ()
        for name, handler in list(self._dispatch.items()):
            self._dispatch[name] = _Noting(self.given, name, handler)

    def _read_config_file(self) -> None:
        """Take what the configuration file sets and the command line does
        not; ``self["config"]`` becomes the file read (or None)."""
        path = self["config"]
        if path is None:
            path = self.default_config_file
            if not os.path.lexists(path):
                return
        elif path == "":  # --config= : no file, not even the default one
            self["config"] = None
            return
        flags = [str(f[0]) for f in self.optFlags]
        parameters = [str(p[0]) for p in self.optParameters if p[0] != "config"]
        try:
            values = read_config_file(path, flags=flags, parameters=parameters)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        overridden = set(self.given)
        if overridden & set(UPSTREAM_OPTIONS):
            overridden |= set(UPSTREAM_OPTIONS)
        taken = {k: v for k, v in values.items() if k not in overridden}
        self.update(taken)
        self.from_file = tuple(sorted(taken))
        self["config"] = path

    def postOptions(self) -> None:
        self._read_config_file()
        try:
            self._check()
            self.config = Config.from_options(self)
        except (ValueError, usage.UsageError) as e:
            raise usage.UsageError(self._where(str(e))) from None
        if getattr(self, "parent", None) is not None and not self.config.uses_tls:
            # twistd's options are parsed and its reactor not yet imported.
            leave_tls_out()

    def _where(self, message: str) -> str:
        """``message`` naming the configuration file when one of its options
        is the one refused."""
        for name in self.from_file:
            if f"--{name}" in message:
                return f"{message} (set by {name} in {self['config']})"
        return message

    def _check(self) -> None:
        if self["log-level"] not in LOG_LEVELS:
            raise usage.UsageError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, "
                                   f"got {self['log-level']!r}")
        for name in INT_OPTIONS:
            try:
                int(self[name])
            except ValueError:
                raise usage.UsageError(f"--{name} must be an integer, got {self[name]!r}") from None
        for name in NUMBER_OPTIONS:
            try:
                float(self[name])
            except ValueError:
                raise usage.UsageError(f"--{name} must be a number, got {self[name]!r}") from None


def makeService(options: Options) -> IService:
    """Build (not start) the daemon for the running reactor. Under twistd
    (``options.parent`` is twistd's own options) it also chooses where the
    log goes; see :mod:`xguard.daemon.logconfig`."""
    from twisted.internet import reactor as global_reactor
    from twisted.internet.interfaces import IReactorFromThreads

    from .daemon.compose import build_service
    from .daemon.logconfig import observer_for
    from .interfaces import IDaemonReactor
    from .restart.reexec import Launch

    twistd = getattr(options, "parent", None)
    # What a restart in place runs again (xguard.restart.reexec).
    launch = Launch() if twistd is None else Launch(
        pidfile=twistd.get("pidfile") or None, foreground=bool(twistd.get("nodaemon")))
    # The installed reactor provides every interface IDaemonReactor names
    # (epoll, poll or select); Twisted types the global as the common part.
    reactor = cast(IDaemonReactor, global_reactor)
    service = build_service(options.config, reactor, launch=launch)
    if twistd is not None:
        # The filter's level is the one the control channel changes.
        service.log_observer = observer_for(twistd, service.log_levels or options.config.log_level,
                                            call_from_thread=IReactorFromThreads(
                                                reactor).callFromThread)
    return service
