# -*- test-case-name: tests.unit.test_tap -*-
"""twistd glue: option parsing and ``makeService``. No side effects here:
everything that touches the system happens when the service starts."""

from __future__ import annotations

from typing import cast

from twisted.application.service import IService
from twisted.python import usage

from .daemon.config import (
    DEFAULT_CONTROL,
    DEFAULT_SOCKETS_FILE,
    DEFAULT_STATE_DIR,
    FAULT_FILE,
    LOG_LEVELS,
    Config,
)

__all__ = ["Options", "makeService"]


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
        ["metrics", None, None, "Serve Prometheus metrics at /metrics on this endpoint: "
         "unix:PATH or tcp:PORT:interface=ADDRESS (off by default)."],
        ["unresponsive-after", None, "5", "Seconds an upstream call may wait for its answer "
         "before upstream is reported unresponsive."],
        ["listen-backlog", None, "128", "Connections each domain socket queues before "
         "accepting them (capped by SOMAXCONN)."],
        ["stuck-after", None, "600", "Seconds a VM's cached writes may keep failing "
         "(transiently) before one alert is raised (log, Status, metric)."],
    ]

    def postOptions(self) -> None:
        if self["log-level"] not in LOG_LEVELS:
            raise usage.UsageError(f"--log-level must be one of {', '.join(LOG_LEVELS)}")
        for name in ("queue-size", "flush-concurrency", "listen-backlog"):
            try:
                int(self[name])
            except ValueError:
                raise usage.UsageError(f"--{name} must be an integer, got {self[name]!r}") from None
        for name in ("xapi-timeout", "direct-deadline", "request-timeout", "unresponsive-after",
                     "stuck-after"):
            try:
                float(self[name])
            except ValueError:
                raise usage.UsageError(f"--{name} must be a number, got {self[name]!r}") from None
        try:
            self.config = Config.from_options(self)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None


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
        service.log_observer = observer_for(twistd, options.config.log_level,
                                            call_from_thread=IReactorFromThreads(
                                                reactor).callFromThread)
    return service
