# -*- test-case-name: tests.unit.test_fdstore -*-
"""systemd's file-descriptor store: the service manager keeps a copy of
each listening socket, so a restart (or a crash and ``Restart=``) hands it
back to the next process (``LISTEN_FDS``, see :mod:`xguard.restart.listenfds`)
instead of closing it. Connections made meanwhile wait in the socket's
backlog instead of being refused.

Each socket is stored when it starts listening (``FDSTORE=1`` with a name,
the descriptor attached with ``SCM_RIGHTS``) and removed when it is
destroyed (``FDSTOREREMOVE=1``), so the store mirrors the live sockets at
every moment, not only at a clean stop. Names are per socket
(:mod:`xguard.restart.handover`), so one message carries one descriptor; messages
with a shared name are split at the kernel's 253 descriptors each.

Messages go out in order from a queue, without ever blocking the reactor:
when systemd's queue is full the rest waits a moment and is tried again.
The store exists when ``$NOTIFY_SOCKET`` is set, unless ``$FDSTORE`` (set
by systemd 254+ to ``FileDescriptorStoreMax=``) says 0; older systemd
does not say, and with ``FileDescriptorStoreMax=0`` it drops what we send
(and logs it): contrib/xguard.service sets it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from ..util.observer import OneShotObserver
from . import sdnotify
from .listenfds import valid_name

__all__ = ["FdStore"]


class FdStore:
    """Stores and removes named descriptors in the service manager.

    :param clock: schedules retries when the manager's queue is full.
    :param environ: where ``NOTIFY_SOCKET`` and ``FDSTORE`` are read
        (``os.environ`` by default), once, here.
    :param retry_delay: seconds before a full queue is tried again.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, *, environ: Mapping[str, str] | None = None,
                 retry_delay: float = 0.02) -> None:
        env = os.environ if environ is None else environ
        self._clock = clock
        self._retry_delay = retry_delay
        try:
            self._target = sdnotify.address(env)
        except ValueError:
            self._target = None  # sdnotify.notify logs it at READY
        limit = env.get("FDSTORE")
        self.limit = int(limit) if limit is not None and limit.isdigit() else None
        #: Whether descriptors go to a store (else every call is a no-op).
        self.enabled = self._target is not None and self.limit != 0
        self._sock: socket.socket | None = None
        self._queue: list[tuple[str, list[int]]] = []
        self._retry: IDelayedCall | None = None
        self._flushed: OneShotObserver[None] | None = None
        self._names: set[str] = set()
        self._over_limit_told = False

    # -- what callers do ------------------------------------------------------
    def add(self, name: str, fds: Sequence[int]) -> None:
        """Store ``fds`` under ``name``. They are duplicated now: the
        caller may close its own at once."""
        if not self.enabled:
            return
        if not valid_name(name):
            raise ValueError(f"invalid fd store name {name!r}")
        for start in range(0, len(fds), sdnotify.MAX_FDS):
            copies = [os.dup(fd) for fd in fds[start:start + sdnotify.MAX_FDS]]
            self._queue.append((f"FDSTORE=1\nFDNAME={name}", copies))
        self._names.add(name)
        if self.limit is not None and len(self._names) > self.limit and not self._over_limit_told:
            self._over_limit_told = True
            self.log.warn("more sockets ({count}) than the fd store keeps "
                          "(FileDescriptorStoreMax={limit}): a restart will refuse "
                          "connections to some", count=len(self._names), limit=self.limit)
        self._pump()

    def remove(self, name: str) -> None:
        """Drop every descriptor stored under ``name``."""
        if not self.enabled:
            return
        self._names.discard(name)
        self._queue.append((f"FDSTOREREMOVE=1\nFDNAME={name}", []))
        self._pump()

    def flushed(self) -> "Deferred[None]":
        """Fires once every message queued so far is sent (or dropped)."""
        if not self._queue:
            return succeed(None)
        if self._flushed is None:
            self._flushed = OneShotObserver()
        return self._flushed.when_fired()

    # -- sending --------------------------------------------------------------
    def _pump(self) -> None:
        if self._retry is not None:
            return  # a retry is due; order is kept by waiting for it
        assert self._target is not None
        while self._queue:
            state, fds = self._queue[0]
            try:
                if self._sock is None:
                    self._sock = socket.socket(
                        socket.AF_UNIX,
                        socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
                sdnotify.send(self._sock, self._target, state, fds)
            except BlockingIOError:
                self._retry = self._clock.callLater(self._retry_delay, self._retried)
                return
            except OSError as e:
                self._give_up(str(e))
                return
            self._queue.pop(0)
            _close(fds)
        self._fire()

    def _retried(self) -> None:
        self._retry = None
        self._pump()

    def _give_up(self, error: str) -> None:
        """The manager cannot be reached: restarts will listen afresh."""
        self.log.warn("cannot use systemd's fd store ({error}): a restart will refuse "
                      "connections until the sockets listen again", error=error)
        self.enabled = False
        for _, fds in self._queue:
            _close(fds)
        self._queue = []
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._fire()

    def _fire(self) -> None:
        if self._flushed is not None:
            flushed, self._flushed = self._flushed, None
            flushed.fire(None)

    def stop(self) -> None:
        """Give up what is still queued (the process is going away)."""
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        for _, fds in self._queue:
            _close(fds)
        self._queue = []
        self._fire()


def _close(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)
