"""twisted.internet.unix internals xguard relies on.

Adopting an inherited listening UNIX socket (a restart's handover, see
xguard/handover.py). The public ``IReactorSocket.adoptStreamPort(fd,
AF_UNIX, factory)`` builds a ``unix.Port`` with the class defaults, and
``startListening`` then chmods the socket file to 0666 and calls
``listen(50)`` again: for a moment any local user could connect to a VM's
socket (0660 root:gid is the rule), and the backlog shrinks from
``--listen-backlog``. The same ``Port``, built by its private
``_fromListeningDescriptor`` with our mode and backlog set before
``startListening``, does neither.
"""

from __future__ import annotations

import os

from twisted.internet import unix
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IReactorFDSet

__all__ = ["adopt_unix_port"]


def adopt_unix_port(reactor: IReactorFDSet, fd: int, factory: IProtocolFactory, *, mode: int,
                    backlog: int) -> IListeningPort:
    """Serve ``factory`` on the listening AF_UNIX socket ``fd``, keeping
    the file's ``mode`` and listening with ``backlog``. The port works on
    a duplicate: the caller still owns (and closes) ``fd``."""
    os.set_blocking(fd, False)
    port = unix.Port._fromListeningDescriptor(reactor, fd, factory)
    port.mode = mode
    port.backlog = backlog
    port.startListening()
    return port  # type: ignore[no-any-return]
