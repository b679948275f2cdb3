# -*- test-case-name: tests.unit.test_unixsock -*-
"""What is at a UNIX socket path, without blocking.

A daemon killed with ``kill -9`` leaves its socket files behind; listening
again needs them gone, but a path a live process serves must never be
taken over. One probe answers that for the domain sockets, the control
socket and the test simulator: a non-blocking ``connect``, which on a UNIX
socket answers at once (refused: stale; accepted or backlog full: live).
"""

from __future__ import annotations

import enum
import errno
import os
import socket
import stat

from .durable import safe_unlink

__all__ = ["Found", "probe", "remove_stale"]


class Found(enum.Enum):
    ABSENT = "absent"
    STALE = "stale"    # a socket file nobody listens on
    LIVE = "live"      # a listener accepts, or its backlog is full
    OTHER = "other"    # not a socket


def probe(path: str) -> Found:
    """What is at ``path``; never blocks."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return Found.ABSENT
    if not stat.S_ISSOCK(st.st_mode):
        return Found.OTHER
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setblocking(False)
        sock.connect(path)
    except ConnectionRefusedError:
        return Found.STALE
    except FileNotFoundError:
        return Found.ABSENT
    except OSError:
        # EAGAIN (backlog full), EACCES …: someone owns it; never steal it.
        return Found.LIVE
    finally:
        sock.close()
    return Found.LIVE


def remove_stale(path: str, what: str = "socket") -> bool:
    """Remove a stale socket file at ``path``; True if one was removed.

    :raises OSError: when a live process serves ``path``, or it is not a
        socket (both name the path).
    """
    found = probe(path)
    if found is Found.LIVE:
        raise OSError(errno.EADDRINUSE, f"{what} {path} is in use by another process")
    if found is Found.OTHER:
        raise OSError(errno.EEXIST, f"{what} {path} exists and is not a socket")
    if found is Found.STALE:
        return safe_unlink(path)
    return False
