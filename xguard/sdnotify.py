# -*- test-case-name: tests.unit.test_sdnotify -*-
"""systemd's readiness protocol (``Type=notify``), without libsystemd: one
datagram such as ``READY=1`` to the socket named by ``$NOTIFY_SOCKET``. A
name starting with ``@`` is in the abstract namespace. Without the variable
(not under systemd, or in tests) this does nothing."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from twisted.logger import Logger

__all__ = ["notify", "READY", "STOPPING"]

log = Logger(namespace="xguard.sdnotify")

READY = "READY=1"
STOPPING = "STOPPING=1"


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to the service manager. True when
    sent; False when there is no manager or sending failed (logged: a
    missed notification must not stop the daemon, systemd times it out)."""
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.warn("ignoring NOTIFY_SOCKET {address!r}: not a UNIX socket path",
                 address=address)
        return False
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        # Never block the reactor on a stuck manager.
        sock.setblocking(False)
        sock.sendto(state.encode("utf-8"), address)
    except OSError as e:
        log.warn("cannot notify the service manager of {state}: {error}",
                 state=state, error=str(e))
        return False
    finally:
        sock.close()
    log.debug("notified the service manager: {state}", state=state)
    return True
