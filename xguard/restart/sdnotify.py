# -*- test-case-name: tests.unit.test_sdnotify -*-
"""systemd's notification protocol (``Type=notify``), without libsystemd:
one datagram such as ``READY=1`` to the socket named by ``$NOTIFY_SOCKET``,
carrying file descriptors (``SCM_RIGHTS``) for the fd store
(:mod:`xguard.restart.fdstore`). A name starting with ``@`` is in the abstract
namespace. Without the variable (not under systemd, or in tests) nothing
is sent."""

from __future__ import annotations

import array
import os
import socket
from collections.abc import Mapping, Sequence

from twisted.logger import Logger

__all__ = ["notify", "send", "address", "READY", "STOPPING", "RELOADING", "MAX_FDS"]

log = Logger(namespace="xguard.restart.sdnotify")

READY = "READY=1"
STOPPING = "STOPPING=1"
#: An in-place re-exec: READY=1 follows from the new image (STOPPING=1
#: would make systemd wait for the process to exit).
RELOADING = "RELOADING=1"
#: SCM_MAX_FD: the kernel refuses a message carrying more descriptors.
MAX_FDS = 253


def address(environ: Mapping[str, str] | None = None) -> str | None:
    """The manager's socket address from ``$NOTIFY_SOCKET`` (None: no
    manager).

    :raises ValueError: when it is set but is no UNIX socket address.
    """
    value = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if not value.startswith("/"):
        raise ValueError(f"NOTIFY_SOCKET {value!r} is not a UNIX socket path")
    return value


def send(sock: socket.socket, target: str, state: str, fds: Sequence[int] = ()) -> None:
    """One datagram to ``target``, with ``fds`` attached.

    :raises OSError: as ``sendmsg`` (``BlockingIOError`` when ``sock`` is
        non-blocking and the manager's queue is full).
    """
    if len(fds) > MAX_FDS:
        raise ValueError(f"{len(fds)} descriptors in one message (at most {MAX_FDS})")
    ancillary = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                 if fds else [])
    sock.sendmsg([state.encode("utf-8")], ancillary, 0, target)


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to the service manager. True when
    sent; False when there is no manager or sending failed (logged: a
    missed notification must not stop the daemon, systemd times it out)."""
    try:
        target = address(environ)
    except ValueError as e:
        log.warn("ignoring {error}", error=str(e))
        return False
    if target is None:
        return False
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        # Never block the reactor on a stuck manager.
        sock.setblocking(False)
        send(sock, target, state)
    except OSError as e:
        log.warn("cannot notify the service manager of {state}: {error}",
                 state=state, error=str(e))
        return False
    finally:
        sock.close()
    log.debug("notified the service manager: {state}", state=state)
    return True
