# -*- test-case-name: tests.unit.test_logconfig -*-
"""Where xguard's log goes, at which severity, and how much of it.

twistd picks a log observer from its own options (``--logfile``,
``--syslog``, ``--prefix``, ``-n``), but its choices do not fit a host:
its syslog observer sends warnings as *info* and errors as *alert*, with
facility ``user`` and no PID; on stdout under systemd it writes no
priority, so journald stores every line at one level. And twistd has no
level filter. So xguard builds the observer itself, from twistd's options
and ``--log-level``, and hands it to twistd the documented way: as the
application's :class:`~twisted.logger.ILogObserver` component, which
twistd's ``AppLogger.start`` uses instead of its own (an explicit
``--logger`` still wins). The observer is:

- ``--syslog``: RFC 3164 datagrams to ``/dev/log``, facility ``daemon``,
  tag ``xguard[PID]`` (``--prefix`` renames the tag), each level at its own
  syslog severity.
- stdout (``-n`` without ``--logfile``, or ``--logfile -``): when stdout is
  the journal (``$JOURNAL_STREAM`` names it, systemd.exec(5)) every line
  starts with its sd-daemon(3) ``<N>`` priority and carries no timestamp
  (journald adds one); otherwise twistd's usual text.
- ``--logfile PATH``: twistd's usual file, rotated by twistd at 1 MB and on
  SIGUSR1, exactly as twistd would.

Every observer is behind the ``--log-level`` filter (a public
:class:`~twisted.logger.FilteringLogObserver`), and Twisted's per-socket
"starting on" / "Port Closed" lines are demoted to debug (the control
socket's and the metrics port's; the domain sockets' ports,
:class:`xguard._internals.twisted_unix.QuietPort`, log none). The filter's
level is a :class:`LogLevels`, which ``xguard-ctl log-level`` changes while
the daemon runs (the configured level is back at the next start).

Convention for every log call in xguard: identifiers (VM/vTPM uuid, path,
dbg) and sizes only, never VM contents.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    eventAsText,
    textFileLogObserver,
)
from twisted.python.components import Componentized
from twisted.python.logfile import LogFile
from zope.interface import implementer

from ..status import LOG_LEVELS

__all__ = [
    "LEVELS",
    "SEVERITY",
    "JournalStreamObserver",
    "LogLevels",
    "SyslogObserver",
    "attach",
    "level_filter",
    "observer_for",
    "stream_is_journal",
]

LEVELS = {name: LogLevel.levelWithName(name) for name in LOG_LEVELS}

#: syslog(3) severities; journald's ``<N>`` prefixes use the same numbers.
SEVERITY = {
    LogLevel.debug: 7,  # LOG_DEBUG
    LogLevel.info: 6,  # LOG_INFO
    LogLevel.warn: 4,  # LOG_WARNING
    LogLevel.error: 3,  # LOG_ERR
    LogLevel.critical: 2,  # LOG_CRIT
}
#: syslog facility ``daemon`` (3), shifted as in a PRI field.
LOG_DAEMON = 3 << 3
SYSLOG_SOCKET = "/dev/log"
#: twistd's default ``--prefix``: left at it, the tag is ``xguard``.
_TWISTD_PREFIX = "twisted"


def _severity(event: LogEvent) -> int:
    return SEVERITY.get(event.get("log_level", LogLevel.info), 6)


def _lines(event: LogEvent) -> list[str]:
    """The event's text (with its traceback, if any), one entry a line."""
    text = eventAsText(event, includeTraceback=True, includeTimestamp=False,
                       includeSystem=False)
    return text.splitlines() or [""]


@implementer(ILogObserver)
class JournalStreamObserver:
    """Lines for journald's stdout stream, each with its sd-daemon(3)
    priority prefix (``<4>`` for a warning), so ``journalctl -p warning``
    shows warnings and worse. A traceback's lines all carry the priority of
    the event they belong to."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def __call__(self, event: LogEvent) -> None:
        severity = _severity(event)
        self._stream.write("".join(f"<{severity}>{line}\n" for line in _lines(event)))
        self._stream.flush()


@implementer(ILogObserver)
class SyslogObserver:
    """RFC 3164 messages to the local syslog socket, as syslog(3) writes
    them: ``<PRI>Mmm dd hh:mm:ss TAG[PID]: text``, one datagram per line.

    The PID is read for every message: twistd forks after logging starts
    when it daemonizes. The socket is non-blocking: a syslog daemon that
    stalls must not stall the guests' writes, so a message it has no room
    for is dropped (and counted in ``dropped``). A message that cannot be
    sent otherwise (no syslog daemon, or it restarted) is sent again once on
    a new connection, then dropped: logging never raises into the daemon.
    """

    def __init__(self, tag: str = "xguard", *, facility: int = LOG_DAEMON,
                 address: str = SYSLOG_SOCKET,
                 getpid: Callable[[], int] = os.getpid) -> None:
        self.tag = tag
        self.facility = facility
        self.address = address
        self._getpid = getpid
        self._socket: socket.socket | None = None
        self.dropped = 0

    def __call__(self, event: LogEvent) -> None:
        stamp = time.strftime("%b %e %H:%M:%S", time.localtime(event.get("log_time")))
        header = f"<{self.facility | _severity(event)}>{stamp} {self.tag}[{self._getpid()}]: "
        for line in _lines(event):
            self._send((header + line).encode("utf-8", "replace"))

    def _send(self, datagram: bytes) -> None:
        for _attempt in range(2):
            try:
                if self._socket is None:
                    self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    self._socket.setblocking(False)
                    self._socket.connect(self.address)
                self._socket.send(datagram)
                return
            except BlockingIOError:
                break  # the syslog daemon is behind: do not wait for it
            except OSError:
                self.close()
        self.dropped += 1

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def stream_is_journal(stream: IO[str], environ: Mapping[str, str]) -> bool:
    """Whether ``stream`` is connected to journald: systemd sets
    ``$JOURNAL_STREAM`` to ``DEVICE:INODE`` of the service's stdout/stderr
    (systemd.exec(5)); a child process with other streams inherits the
    variable, hence the comparison."""
    value = environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


#: Twisted's listening ports log their start and stop unconditionally
#: (``DomainSite starting on '/run/…'``, ``(UNIX Port /run/… Closed)``).
_PORT_CHATTER = re.compile(r"\S+ starting on .+|\(UNIX Port .+ Closed\)|\(TCP Port .+ Closed\)")


#: AMP logs every connection's start and end: two lines per xguard-ctl
#: call, or per orchestrator command.
_AMP_CHATTER = frozenset({
    "{cls} connection established (HOST:{host} PEER:{peer})",
    "{cls} connection lost (HOST:{host} PEER:{peer})",
})


def _is_chatter(event: LogEvent) -> bool:
    """Twisted's routine per-port and per-connection lines."""
    namespace = event.get("log_namespace")
    if namespace == "twisted.protocols.amp":
        return event.get("log_format") in _AMP_CHATTER
    if namespace != "log_legacy":
        return False
    message = event.get("message")
    return (isinstance(message, tuple) and len(message) == 1 and isinstance(message[0], str)
            and _PORT_CHATTER.fullmatch(message[0]) is not None)


@implementer(ILogObserver)
class _DemoteChatter:
    """Passes events on, Twisted's routine per-port and per-connection lines
    as debug (a copy: other observers see the event unchanged)."""

    def __init__(self, observer: ILogObserver) -> None:
        self._observer = observer

    def __call__(self, event: LogEvent) -> None:
        if _is_chatter(event) and event.get("log_level") == LogLevel.info:
            event = dict(event, log_level=LogLevel.debug)
        self._observer(event)


class LogLevels:
    """The level of the ``--log-level`` filter: ``configured`` at start,
    changed while the daemon runs by :meth:`set` (``xguard-ctl log-level``;
    not kept across a restart)."""

    log = Logger(namespace="xguard.daemon.logconfig")

    def __init__(self, level: str) -> None:
        _check_level(level)
        self.configured = level
        self.level = level
        self.predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])

    def debugging(self) -> bool:
        """Whether debug lines pass the filter now (callers skip making
        ones that would be dropped)."""
        return self.level == "debug"

    def set(self, level: str, dbg: str = "") -> str:
        """Filter at ``level`` from now on; returns the level it was.

        The change itself is always in the log: said at the more verbose of
        the two levels (info at least), while that level is the filter's.

        :raises ValueError: ``level`` is not one of :data:`LEVELS`.
        """
        _check_level(level)
        previous = self.level
        verbose = min(LEVELS[level], LEVELS[previous])
        say = max(verbose, LogLevel.info)
        more_verbose = LEVELS[level] < LEVELS[previous]
        if more_verbose:
            self._switch(level)
        self.log.emit(say, "{dbg}: log level {new} (was {previous}); the configured "
                      "{configured} is back at the next start", dbg=dbg or "-", new=level,
                      previous=previous, configured=self.configured)
        if not more_verbose:
            self._switch(level)
        return previous

    def _switch(self, level: str) -> None:
        self.level = level
        self.predicate.setLogLevelForNamespace("", LEVELS[level])


def _check_level(level: str) -> None:
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")


def level_filter(observer: ILogObserver, level: "str | LogLevels") -> ILogObserver:
    """``observer`` behind the ``--log-level`` filter (``level`` and above
    pass; a :class:`LogLevels` can be changed later), with Twisted's port
    and connection chatter demoted to debug first."""
    levels = LogLevels(level) if isinstance(level, str) else level
    return _DemoteChatter(FilteringLogObserver(observer, [levels.predicate]))


@implementer(ILogObserver)
class _Lazy:
    """Builds the real observer on the first event, when twistd starts
    logging, so that building the service opens no file and no socket."""

    def __init__(self, make: Callable[[], ILogObserver]) -> None:
        self._make = make
        self._observer: ILogObserver | None = None

    def __call__(self, event: LogEvent) -> None:
        if self._observer is None:
            self._observer = self._make()
        self._observer(event)


def _file_observer(path: str, call_from_thread: Callable[..., Any]) -> ILogObserver:
    """twistd's own file logging: a LogFile (rotated at 1 MB) and SIGUSR1
    to rotate it now, unless something else handles SIGUSR1."""
    log_file = LogFile.fromFullPath(path)
    if not signal.getsignal(signal.SIGUSR1):
        def rotate(signum: int, frame: object) -> None:
            call_from_thread(log_file.rotate)

        signal.signal(signal.SIGUSR1, rotate)
    return textFileLogObserver(log_file)


def _stdout_observer(stream: IO[str], environ: Mapping[str, str]) -> ILogObserver:
    if stream_is_journal(stream, environ):
        return JournalStreamObserver(stream)
    return textFileLogObserver(stream)


def observer_for(twistd: Mapping[str, Any], level: "str | LogLevels", *,
                 call_from_thread: Callable[..., Any],
                 environ: Mapping[str, str] = os.environ,
                 stdout: IO[str] | None = None,
                 syslog_address: str = SYSLOG_SOCKET) -> ILogObserver | None:
    """The log observer for twistd's options ``twistd`` (its ServerOptions)
    at ``level`` (a :class:`LogLevels` to change it later), or None where
    twistd's own choice must stand (it refuses ``--logfile -`` for a
    daemon, with its own message).

    Nothing is opened here: the file or socket is opened at the first event.
    ``stdout`` is taken now, before twistd redirects ``sys.stdout`` into the
    log (writing the log there would loop).

    :param call_from_thread: the reactor's ``callFromThread``, for the
        SIGUSR1 rotation of a log file.
    """
    make: Callable[[], ILogObserver]
    if twistd.get("syslog"):
        prefix = twistd.get("prefix") or _TWISTD_PREFIX
        tag = "xguard" if prefix == _TWISTD_PREFIX else prefix
        make = lambda: SyslogObserver(tag, address=syslog_address)  # noqa: E731
    else:
        logfile = twistd.get("logfile")
        nodaemon = twistd.get("nodaemon")
        if logfile == "-" and not nodaemon:
            return None
        if logfile == "-" or (nodaemon and not logfile):
            stream = stdout if stdout is not None else sys.stdout
            make = lambda: _stdout_observer(stream, environ)  # noqa: E731
        else:
            path = logfile or "twistd.log"
            make = lambda: _file_observer(path, call_from_thread)  # noqa: E731
    return level_filter(_Lazy(make), level)


def attach(application: object, observer: ILogObserver) -> None:
    """Make ``observer`` the log observer twistd starts logging to: twistd
    reads the application's ILogObserver component (``twistd`` docs,
    "Customizing twistd logging"). Anything but an application is left
    alone (a service run outside twistd logs wherever it was told)."""
    if isinstance(application, Componentized):
        application.setComponent(ILogObserver, observer)

