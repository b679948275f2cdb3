# -*- test-case-name: tests.unit.test_control -*-
"""The control channel's AMP commands (SPEC §3), shared by the daemon and
xguard-ctl. Argument names and types are the contract."""

from __future__ import annotations

from twisted.protocols.amp import Command, Integer, Unicode

from ..errors import (
    InvalidContents,
    InvalidGid,
    InvalidPath,
    InvalidUUID,
    NotSetAside,
    PathInUse,
    PermanentUpstreamError,
    ResolutionRefused,
    RestartRefused,
    SocketMismatch,
    TransientUpstreamError,
)
from ..status import LOG_LEVELS
from .bigvalue import BigAmpList, BigUnicode

__all__ = [
    "VarstoreCreate", "VarstoreDestroy", "VtpmCreate", "VtpmDestroy",
    "VtpmSetContents", "VtpmGetContents", "ListSockets", "Status", "Restart",
    "SetAsideExport", "SetAsideResolve", "SetLogLevel",
    "ControlError", "InvalidLogLevel", "LOG_LEVELS", "RestartRefused",
    "RemotePermanentUpstreamError", "RemoteTransientUpstreamError", "ERRORS", "error_code",
]


class ControlError(Exception):
    """The daemon failed in a way no other error names (details in its log)."""


class InvalidLogLevel(ValueError):
    """Not a log level (debug, info, warn, error)."""


class RemotePermanentUpstreamError(PermanentUpstreamError):
    """A PermanentUpstreamError rebuilt by the client from its description."""

    def __init__(self, description: str) -> None:
        super().__init__(description.split() or ["UPSTREAM_ERROR"], description)


class RemoteTransientUpstreamError(TransientUpstreamError):
    """A TransientUpstreamError rebuilt by the client from its description."""

    def __init__(self, description: str) -> None:
        super().__init__(description.split() or ["UPSTREAM_UNAVAILABLE"], description)


# The server traps the first class that matches (so upstream errors and
# their subclasses, e.g. NoVtpm); the client builds the *last* class given
# for a code: upstream errors take a code list, not a message, hence the
# Remote* classes.
ERRORS: dict[type[Exception], bytes] = {
    PathInUse: b"PATH_IN_USE",
    InvalidUUID: b"INVALID_UUID",
    InvalidPath: b"INVALID_PATH",
    InvalidGid: b"INVALID_GID",
    SocketMismatch: b"SOCKET_MISMATCH",
    InvalidContents: b"INVALID_CONTENTS",
    PermanentUpstreamError: b"UPSTREAM_ERROR",
    TransientUpstreamError: b"UPSTREAM_UNAVAILABLE",
    RemotePermanentUpstreamError: b"UPSTREAM_ERROR",
    RemoteTransientUpstreamError: b"UPSTREAM_UNAVAILABLE",
    ControlError: b"INTERNAL_ERROR",
    RestartRefused: b"RESTART_REFUSED",
    NotSetAside: b"NOT_SET_ASIDE",
    ResolutionRefused: b"RESOLUTION_REFUSED",
    InvalidLogLevel: b"INVALID_LOG_LEVEL",
}


def error_code(error: BaseException) -> str | None:
    """The wire code of a control error, for messages; None if unknown."""
    for cls, code in ERRORS.items():
        if isinstance(error, cls):
            return code.decode("ascii")
    return None


class VarstoreCreate(Command):
    """Serve a varstored socket for a VM at path (0660 root:gid)."""

    arguments = [(b"dbg", Unicode()), (b"vm_uuid", Unicode()), (b"gid", Integer()),
                 (b"path", Unicode())]
    response = []
    errors = ERRORS


class VarstoreDestroy(Command):
    """Stop serving a varstored socket and remove it."""

    arguments = [(b"dbg", Unicode()), (b"gid", Integer()), (b"path", Unicode())]
    response = []
    errors = ERRORS


class VtpmCreate(Command):
    """Serve a swtpm socket for a VM at path (0660 root:gid)."""

    arguments = [(b"dbg", Unicode()), (b"vm_uuid", Unicode()), (b"gid", Integer()),
                 (b"path", Unicode())]
    response = []
    errors = ERRORS


class VtpmDestroy(Command):
    """Stop serving a swtpm socket and remove it."""

    arguments = [(b"dbg", Unicode()), (b"gid", Integer()), (b"path", Unicode())]
    response = []
    errors = ERRORS


class VtpmSetContents(Command):
    """Replace a vTPM's whole contents (cached in order while upstream is away)."""

    arguments = [(b"dbg", Unicode()), (b"vtpm_uuid", Unicode()), (b"contents", BigUnicode())]
    response = []
    errors = ERRORS


class VtpmGetContents(Command):
    """A vTPM's whole contents: upstream's, with pending writes overlaid."""

    arguments = [(b"dbg", Unicode()), (b"vtpm_uuid", Unicode())]
    response = [(b"contents", BigUnicode())]
    errors = ERRORS


class ListSockets(Command):
    """Every domain socket served: path, vm_uuid, gid, service."""

    arguments = []
    response = [(b"sockets", BigAmpList([(b"path", Unicode()), (b"vm_uuid", Unicode()),
                                         (b"gid", Integer()), (b"service", Unicode())]))]
    errors = ERRORS


class Status(Command):
    """The daemon's status as a JSON document."""

    arguments = []
    response = [(b"status", BigUnicode())]
    errors = ERRORS


class Restart(Command):
    """Restart in place (re-exec) handing every listening socket over."""

    arguments = [(b"dbg", Unicode())]
    response = []
    errors = ERRORS


class SetAsideExport(Command):
    """One write set aside, as an export document (JSON; see xguard.state.aside)."""

    arguments = [(b"dbg", Unicode()), (b"id", Unicode())]
    response = [(b"document", BigUnicode())]
    errors = ERRORS


class SetAsideResolve(Command):
    """Resolve a write set aside: push ours, keep upstream's, or exported."""

    arguments = [(b"dbg", Unicode()), (b"id", Unicode()), (b"action", Unicode())]
    response = []
    errors = ERRORS


class SetLogLevel(Command):
    """Log at ``level`` (one of :data:`LOG_LEVELS`) from now on, until the
    next start; answers the level it was and the configured one."""

    arguments = [(b"dbg", Unicode()), (b"level", Unicode())]
    response = [(b"previous", Unicode()), (b"configured", Unicode())]
    errors = ERRORS
