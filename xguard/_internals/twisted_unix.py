"""twisted.internet.unix internals xguard relies on: one listening port
class for the domain and control sockets, :class:`QuietPort`.

- **Adopting** an inherited listening socket (a restart's handover, see
  xguard/restart/handover.py). The public ``IReactorSocket.adoptStreamPort(fd,
  AF_UNIX, factory)`` builds a ``unix.Port`` with the class defaults, and
  ``startListening`` then chmods the socket file to 0666 and calls
  ``listen(50)`` again: for a moment any local user could connect to a
  VM's socket (0660 root:gid is the rule), and the backlog shrinks from
  ``--listen-backlog``. The same port, built by the private
  ``_fromListeningDescriptor`` with our mode and backlog, does neither.
- **Listening afresh**: the socket is bound, given its mode and owner and
  only then listens (``reactor.listenUNIX`` chmods after binding and has no
  owner), so no client ever finds it connectable with the wrong rights.
- **No line per socket**: ``unix.Port`` logs "starting on" and "Closed"
  through the legacy ``log.msg`` (a global lock and a conversion to the
  new logger per call): 4,000 events per restart of a 2,000-socket host,
  about half of what starting a socket costs. The registry logs one
  summary line instead.
- **Closing without removing the file** (``keep_file``): a stop that hands
  the sockets over must leave their files in place; ``unix.Port`` always
  unlinks on close.

:class:`QuietPort` replaces ``startListening`` (for a socket already
bound) and ``_logConnectionLostMsg``; the rest (accepting, closing,
``getHost``) is ``unix.Port``'s. tests/unit/test_internals.py pins what it
relies on.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import tcp, unix
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IProtocolFactory, IReactorFDSet
from twisted.python.failure import Failure

__all__ = ["QuietPort", "adopt_unix_port", "listen_unix"]


class QuietPort(unix.Port):
    """A listening UNIX port started on a socket that is already bound,
    logging nothing per socket; ``keep_file`` closes it without removing
    its file."""

    keep_file = False

    def __init__(self, fileName: bytes, *args: Any, **kwargs: Any) -> None:
        super().__init__(fileName, *args, **kwargs)
        # Our own record of the path (``_fromListeningDescriptor`` passes a
        # str): Twisted keeps it as ``port`` up to 25.5, ``_bindPath`` after.
        self._path: str | bytes = fileName

    @property
    def socket_path(self) -> str:
        """The path the socket is bound to."""
        return os.fsdecode(self._path)

    def startListening(self) -> None:
        tcp._reservedFD.reserve()
        assert self.factory is not None and self._preexistingSocket is not None
        self.factory.doStart()
        skt, self._preexistingSocket = self._preexistingSocket, None
        skt.listen(self.backlog)
        self.connected = True
        self.socket = skt
        self.fileno = skt.fileno  # type: ignore[method-assign]  # as unix.Port does
        self.numberAccepts = 100
        self.startReading()  # type: ignore[no-untyped-call]  # Twisted's, untyped

    def _logConnectionLostMsg(self) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        if not self.keep_file:
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass
        tcp.Port.connectionLost(self, reason)


def listen_unix(reactor: IReactorFDSet, path: str, factory: IProtocolFactory, *, mode: int,
                backlog: int, prepare: Callable[[str], None] = lambda path: None) -> QuietPort:
    """Bind ``path``, give it ``mode`` and whatever ``prepare`` sets (its
    owner), then listen with ``backlog`` and serve ``factory``.

    :raises CannotListenError: binding failed (EADDRINUSE: the path
        exists), as ``reactor.listenUNIX`` says it.
    :raises OSError: from ``chmod`` or ``prepare``.

    Nothing is left listening or bound when it raises."""
    skt = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        skt.setblocking(False)
        try:
            skt.bind(path)
        except OSError as e:
            raise CannotListenError(None, path, e) from e
        try:
            os.chmod(path, mode)
            prepare(path)
        except BaseException:
            os.unlink(path)
            raise
    except BaseException:
        skt.close()
        raise
    port = QuietPort(os.fsencode(path), factory, backlog, mode, reactor, wantPID=False)
    port._preexistingSocket = skt
    port.startListening()
    return port


def adopt_unix_port(reactor: IReactorFDSet, fd: int, factory: IProtocolFactory, *, mode: int,
                    backlog: int) -> QuietPort:
    """Serve ``factory`` on the listening AF_UNIX socket ``fd``, keeping
    the file's ``mode`` and listening with ``backlog``. The port works on
    a duplicate: the caller still owns (and closes) ``fd``."""
    os.set_blocking(fd, False)
    port: QuietPort = QuietPort._fromListeningDescriptor(  # type: ignore[no-untyped-call]
        reactor, fd, factory)
    os.chmod(port.socket_path, mode)
    port.mode = mode
    port.backlog = backlog
    port.startListening()
    return port
