# -*- test-case-name: tests.unit.test_control_protocol -*-
"""The control channel's AMP protocol, logging what it cannot handle in a
bounded way.

Twisted's AMP lets a box it cannot handle escape as an exception whose text
holds the box: a box without a command (``NoEmptyBoxes``), an answer or
error for a question never asked (``KeyError`` quoting the tag), arguments
that do not parse (``ValueError`` quoting them). The reactor then logs an
"Unhandled Error" with that text, up to 64 KiB per value: 3.3 MB of garbage
sent to the control socket made 13 MB of log. :class:`ControlProtocol`
logs one line per offence with the error's type and at most
:data:`MAX_DETAIL` characters of its text (plus, for a command that failed
in our code, where it failed), then drops the connection — as AMP does for
an unknown error.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

__all__ = ["ControlProtocol", "MAX_DETAIL"]

#: Characters of an error's text (or of a command name) that are logged.
MAX_DETAIL = 200
#: Innermost stack frames logged for a command that failed in our code.
_MAX_FRAMES = 12


def _short(text: str, limit: int = MAX_DETAIL) -> str:
    text = text.encode("unicode_escape").decode("ascii")  # one line, printable
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def describe(failure: Failure) -> str:
    """``Type: text``, the text truncated to :data:`MAX_DETAIL`."""
    return f"{type(failure.value).__name__}: {_short(str(failure.value))}"


def _where(failure: Failure) -> str:
    frames = failure.frames[-_MAX_FRAMES:]
    return " <- ".join(f"{func} ({path.rsplit('/', 1)[-1]}:{line})"
                       for func, path, line, *_ in reversed(frames))


class ControlProtocol(amp.AMP):
    """AMP for the control channel (see the module docstring)."""

    log = Logger()
    _dropped = False

    def __init__(self, locator: object) -> None:
        super().__init__(locator=locator)  # type: ignore[no-untyped-call]  # amp's, untyped

    def dataReceived(self, data: bytes) -> None:
        if self._dropped:
            return
        try:
            super().dataReceived(data)  # type: ignore[no-untyped-call]  # Twisted's, untyped
        except Exception:
            self._drop("sent what AMP cannot read", Failure())

    def dispatchCommand(self, box: amp.AmpBox) -> Any:
        dispatched = super().dispatchCommand(box)  # type: ignore[no-untyped-call]
        return dispatched.addErrback(self._undeclared, box)

    def _undeclared(self, failure: Failure, box: amp.AmpBox) -> Failure:
        """Errors the command declares travel to the client as they are;
        anything else (bad arguments, a bug) is logged here, bounded, and
        ends the connection with AMP's 'Unknown Error'."""
        if failure.check(amp.RemoteAmpError):
            return failure
        command = box.get(amp.COMMAND, b"").decode("utf-8", "replace")
        self.log.error("Control command {command} failed: {error} (in {where})",
                       command=_short(command, 64), error=describe(failure),
                       where=_where(failure))
        return Failure(amp.RemoteAmpError(amp.UNKNOWN_ERROR_CODE, "Unknown Error", fatal=True))

    def unhandledError(self, failure: Failure) -> None:
        self._drop("failed", failure)

    def _drop(self, what: str, failure: Failure) -> None:
        if self._dropped:
            return
        self._dropped = True
        self.log.warn("Dropping a control connection that {what}: {error}",
                      what=what, error=describe(failure))
        if self.transport is not None:
            self.transport.loseConnection()
