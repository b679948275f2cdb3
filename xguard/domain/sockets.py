# -*- test-case-name: tests.unit.test_sockets -*-
"""The per-VM domain sockets and the active-sockets file (SPEC §3, §7, §8).

Listeners are created directly (not through StreamServerEndpointService) so
the control channel sees "path in use" as an error rather than a log line,
and so shutdown can stop accepting while keeping the socket files and the
active list: a restart resumes exactly what was served (SPEC §2).

Restarts hand the listening sockets over (:mod:`xguard.restart.handover`): each
socket is given to systemd's fd store as it opens and dropped from it when
destroyed; resume adopts what the previous process handed over for each
entry of the file and listens afresh only where nothing valid was handed
over. Stopping with a successor (the fd store, or a re-exec) only stops
reading from the sockets: they stay open, with their files, until the
process exits or execs, so connections wait in the kernel's backlog.

Stopping without a successor closes them and keeps their files (the
ports are :class:`xguard._internals.twisted_unix.QuietPort`, which can
close without unlinking); a kept file is stale (nobody listens on it),
which resume replaces. A destroy closes and unlinks.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import (
    Deferred,
    DeferredLock,
    ensureDeferred,
    fail,
    gatherResults,
    maybeDeferred,
    succeed,
)
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .._internals.twisted_unix import QuietPort, adopt_unix_port, listen_unix
from ..errors import InvalidPath, PathInUse, SocketMismatch
from ..interfaces import IServerReactor, ISocketRegistry
from ..model import MAX_SOCKET_PATH_BYTES, Service
from ..restart.handover import DOMAIN, Claimed, Handover
from ..util.durable import safe_unlink
from ..util.observer import OneShotObserver
from ..util.threads import Runner
from ..util.unixsock import Found, probe
from . import activefile
from .activefile import Entry
from .site import DomainSite

__all__ = ["SocketRegistry", "BACKLOG", "SOCKET_MODE", "MAX_PATH_BYTES", "listen_backlog"]

#: Default listen backlog of each domain socket (``--listen-backlog``). The
#: upstream daemon uses 2 ("one client per socket"), but a client that opens
#: a connection per request (varstored does) bursts past that and gets
#: EAGAIN while the reactor is busy with a boot storm: with 16, opening
#: 2,000 connections at once needed ~100 connect retries. Queued
#: connections cost the kernel a few hundred bytes each, nothing to us.
BACKLOG = 128
SOCKET_MODE = 0o660
MAX_PATH_BYTES = MAX_SOCKET_PATH_BYTES
#: Seconds a connection accepted before a stop has to send its request
#: (varstored sends right after connecting, but a loaded host may not run
#: it at once) before it is cut. Short: a guest that connects and stays
#: silent delays every VM's restart by this much, no more.
DRAIN_GRACE = 1.0
#: Seconds requests in flight at a stop may take to finish the ordinary way
#: (most take milliseconds) before the caches' stop persists the rest: that
#: costs fsyncs while every VM's connections wait for the next process.
FINISH_WAIT = 0.25
#: Seconds the answers to requests in flight at a stop have to be flushed
#: once the caches' stop persisted them (fsyncs, on a host that may be
#: busy), before their connections are cut.
ANSWER_GRACE = 5.0
#: Sockets resumed between two turns of the reactor, once the ones with
#: connections waiting are served: a request takes several turns, so the
#: busy sockets' requests progress while the others are adopted.
RESUME_TURN = 25

#: Builds the site serving one socket (from its service and VM uuid); the
#: registry drains its connections when the daemon stops.
SiteFactory = Callable[[Service, str], DomainSite]


def listen_backlog(requested: int) -> int:
    """The backlog to ask for: at least 1, at most SOMAXCONN (the kernel
    would cap it silently to net.core.somaxconn anyway)."""
    return max(1, min(requested, socket.SOMAXCONN))


def _inline_runner(f: Callable[..., Any], *args: Any, **kwargs: Any) -> "Deferred[Any]":
    """Run blocking work in place (the default: the file is small)."""
    return maybeDeferred(f, *args, **kwargs)


@attrs.define(eq=False)
class _Socket:
    """A registry slot. It exists from the moment a create reserves the
    path until a destroy has unlinked the file, so two operations on one
    path can never interleave. Only ``open`` slots are listed and saved."""

    entry: Entry
    port: IListeningPort | None = None
    state: str = "opening"  # opening -> open -> closing
    #: Its name in the fd store / a handover (None: not handed on).
    name: str | None = None
    #: What serves its connections (drained when the daemon stops).
    factory: DomainSite | None = None


@implementer(ISocketRegistry)
class SocketRegistry:
    """Every domain socket this daemon serves, keyed by path.

    :param reactor: an ``IReactorUNIX`` (and time) provider.
    :param active_file: the active-sockets file (SPEC §7).
    :param site_factory: builds the protocol factory serving one socket,
        from its service and VM uuid.
    :param on_forget: called with a VM uuid once its last socket is gone
        (the upstream drops cached handles).
    :param runner: runs blocking file I/O (``runner(f, *args)`` ->
        Deferred); inline by default.
    :param backlog: listen backlog of each socket (capped by SOMAXCONN).
    :param handover: the sockets handed over at start, and where ours go
        (None: nothing is handed over, as in most unit tests).
    :param grace: seconds a connection accepted before a stop has to send
        its request before it is cut.
    :param answer_grace: seconds its answer then has to be flushed.
    """

    log = Logger()

    def __init__(self, reactor: IServerReactor, active_file: str, site_factory: SiteFactory, *,
                 on_forget: Callable[[str], None] | None = None,
                 runner: Runner | None = None, backlog: int = BACKLOG,
                 handover: Handover | None = None, grace: float = DRAIN_GRACE,
                 answer_grace: float = ANSWER_GRACE) -> None:
        self._reactor = reactor
        self._active_file = active_file
        self._site_factory = site_factory
        self._on_forget = on_forget
        self._runner = runner or _inline_runner
        self._backlog = listen_backlog(backlog)
        self._handover = handover
        self._grace = grace
        self._answer_grace = answer_grace
        self._sockets: dict[str, _Socket] = {}
        self._per_vm: dict[str, int] = {}  # reserved slots per VM
        self._file_lock = DeferredLock()
        self._next_save: OneShotObserver[None] | None = None
        self._stopped = False

    # -- queries ---------------------------------------------------------------
    def _open_sockets(self) -> list[_Socket]:
        return [s for s in self._sockets.values() if s.state == "open"]

    def entries(self) -> list[dict[str, Any]]:
        """Every served socket as {path, vm_uuid, gid, service}."""
        return [{"path": s.entry.path, "vm_uuid": s.entry.vm_uuid, "gid": s.entry.gid,
                 "service": s.entry.service.value} for s in self._open_sockets()]

    def serves(self, vm_uuid: str) -> bool:
        """Whether ``vm_uuid`` has a socket (being created, open or closing)."""
        return vm_uuid in self._per_vm

    def vms(self, service: Service | None = None) -> set[str]:
        """The VMs with an open socket (of ``service``, if given)."""
        return {s.entry.vm_uuid for s in self._open_sockets()
                if service is None or s.entry.service is service}

    def count_by_service(self) -> dict[str, int]:
        """Socket count per service value, for Status."""
        counts = {service.value: 0 for service in Service}
        for s in self._open_sockets():
            counts[s.entry.service.value] += 1
        return counts

    # -- create ----------------------------------------------------------------
    def create(self, service: Service, vm_uuid: str, gid: int, path: str) -> "Deferred[None]":
        """Listen on ``path`` for ``vm_uuid``, 0660 root:``gid``, and record
        it. Fails with InvalidUUID, InvalidPath, ValueError (gid) or
        PathInUse; on failure nothing is left listening or on disk."""
        try:
            if self._stopped:
                raise RuntimeError("xguard is shutting down: no new sockets")
            entry = _validate(service, vm_uuid, gid, path)
            if entry.path in self._sockets:
                raise PathInUse(f"socket path {entry.path} is already in use by xguard")
        except Exception:
            return fail()
        # Reserve the path synchronously: a second create of it now fails.
        sock = self._reserve(entry)
        return ensureDeferred(self._create(sock))

    async def _create(self, sock: _Socket) -> None:
        entry = sock.entry
        try:
            await self._open(sock)
            await self._save()
        except BaseException:
            # Mark it closing at once (synchronously, while a failed save
            # still holds the file lock) so no later save records it.
            sock.state = "closing"
            await self._close(sock)
            self._release(sock)
            raise
        self.log.info("created {service} socket {path} for VM {vm_uuid} (gid {gid})",
                      service=entry.service.value, path=entry.path, vm_uuid=entry.vm_uuid,
                      gid=entry.gid)

    async def _open(self, sock: _Socket) -> None:
        """Listen on the slot's path (replacing a stale socket file), with
        its mode and owner set before it listens; nothing is left bound if
        that fails."""
        entry = sock.entry
        found = probe(entry.path)
        if found is Found.LIVE:
            raise PathInUse(f"socket path {entry.path} is in use by a live listener")
        if found is Found.OTHER:
            raise PathInUse(f"socket path {entry.path} exists and is not a socket")
        parent = os.path.dirname(entry.path)
        if not os.path.isdir(parent):
            raise InvalidPath(f"directory {parent} of socket path {entry.path} does not exist")
        if found is Found.STALE:
            # Routine, and not logged: every socket kept across a restart is
            # stale until resumed (2,000 lines, even filtered, cost start-up).
            safe_unlink(entry.path)
        factory = self._site_factory(entry.service, entry.vm_uuid)
        try:
            # Mode and owner are set before it listens: no client ever
            # finds it connectable with other rights.
            sock.port = listen_unix(self._reactor, entry.path, factory, mode=SOCKET_MODE,
                                    backlog=self._backlog,
                                    prepare=lambda path: self._chown(path, entry.gid))
            sock.factory = factory
        except CannotListenError as e:
            if getattr(e.socketError, "errno", None) == errno.EADDRINUSE:
                raise PathInUse(f"socket path {entry.path} is already in use") from e
            raise
        sock.state = "open"
        if self._handover is not None:
            try:
                sock.name = self._handover.stored(DOMAIN, entry.path, _fileno(sock.port))
            except OSError as e:
                self.log.warn("socket {path} will not be handed over on restart: {error}",
                              path=entry.path, error=str(e))

    def _adopt(self, sock: _Socket, claimed: Claimed) -> None:
        """Serve the slot with a handed-over listening socket (already in
        the fd store under its name). Its file keeps its inode; mode and
        group are set again from the entry (the file is the truth)."""
        entry = sock.entry
        factory = self._site_factory(entry.service, entry.vm_uuid)
        try:
            sock.port = adopt_unix_port(self._reactor, claimed.fd, factory,
                                        mode=SOCKET_MODE, backlog=self._backlog)
        finally:
            os.close(claimed.fd)
        sock.name, sock.factory = claimed.name, factory
        self._chown(entry.path, entry.gid)
        sock.state = "open"

    def _chown(self, path: str, gid: int) -> None:
        """root:gid. Unprivileged (development), keep our uid and set the
        group if the kernel lets us; else warn: clients of that group then
        cannot connect."""
        if os.geteuid() == 0:
            os.chown(path, 0, gid)
            return
        try:
            os.chown(path, -1, gid)
        except PermissionError:
            self.log.warn("not root: socket {path} keeps group {current}, not {gid}",
                          path=path, current=os.getegid(), gid=gid)

    # -- destroy ---------------------------------------------------------------
    def destroy(self, service: Service, gid: int, path: str) -> "Deferred[None]":
        """Stop serving ``path``, unlink it and drop it from the file. An
        unknown path succeeds with a warning (the orchestrator retries
        destroys); a known one named with another service or gid than it
        was created with is refused (SocketMismatch) and left alone."""
        key = os.path.normpath(path) if isinstance(path, str) and path else path
        sock = self._sockets.get(key)
        if sock is None or sock.state != "open":
            self.log.warn("destroy of unknown socket {path}: nothing to do", path=path)
            return succeed(None)
        entry = sock.entry
        asked = service.value if isinstance(service, Service) else str(service)
        if asked != entry.service.value or gid != entry.gid:
            return fail(SocketMismatch(
                f"socket {entry.path} serves {entry.service.value} of VM {entry.vm_uuid} with "
                f"gid {entry.gid}, not {asked} with gid {gid}: not destroyed"))
        return ensureDeferred(self._destroy(sock))

    async def _destroy(self, sock: _Socket) -> None:
        entry = sock.entry
        sock.state = "closing"
        try:
            await self._close(sock, unlink=True)
        finally:
            self._release(sock)
            if self._handover is not None:
                self._handover.dropped(sock.name)
        try:
            await self._save()
        finally:
            self.log.info("destroyed {service} socket {path} of VM {vm_uuid}",
                          service=entry.service.value, path=entry.path, vm_uuid=entry.vm_uuid)
            if self._on_forget is not None and not self.serves(entry.vm_uuid):
                try:
                    self._on_forget(entry.vm_uuid)
                except Exception:
                    self.log.failure("forgetting VM {vm_uuid} failed", vm_uuid=entry.vm_uuid)

    async def _close(self, sock: _Socket, *, unlink: bool = False) -> None:
        """Stop listening: the port removes its own file as it closes (and
        if closing fails, the file is removed here). Without a port, the
        file is removed only when asked (``unlink``): a path we never bound
        may be someone else's."""
        port, sock.port = sock.port, None
        if port is not None:
            try:
                await maybeDeferred(port.stopListening)
                return
            except Exception:
                self.log.failure("closing socket {path} failed", path=sock.entry.path)
        elif not unlink:
            return
        try:
            safe_unlink(sock.entry.path)
        except OSError as e:
            self.log.error("cannot remove socket file {path}: {error}",
                           path=sock.entry.path, error=str(e))

    def _reserve(self, entry: Entry) -> _Socket:
        sock = self._sockets[entry.path] = _Socket(entry)
        self._per_vm[entry.vm_uuid] = self._per_vm.get(entry.vm_uuid, 0) + 1
        return sock

    def _release(self, sock: _Socket) -> None:
        if self._sockets.get(sock.entry.path) is sock:
            del self._sockets[sock.entry.path]
            vm = sock.entry.vm_uuid
            self._per_vm[vm] -= 1
            if not self._per_vm[vm]:
                del self._per_vm[vm]

    # -- the file --------------------------------------------------------------
    def _save(self) -> "Deferred[None]":
        """Rewrite the active file with every open socket. Rewrites run one
        at a time; requests made while one waits for the lock share the next
        rewrite (its snapshot is taken when it runs, so it includes them)."""
        if self._next_save is not None:
            return self._next_save.when_fired()
        save = self._next_save = OneShotObserver()

        def write() -> "Deferred[None]":
            self._next_save = None  # later changes need a later snapshot
            entries = [s.entry for s in self._open_sockets()]
            written = maybeDeferred(self._runner, activefile.save, self._active_file, entries)
            # Tell the waiters while the lock is still held, so a create
            # whose save failed is marked closing before the next snapshot.
            return written.addBoth(lambda result: save.fire(
                result if isinstance(result, Failure) else None))

        self._file_lock.run(write)
        return save.when_fired()

    # -- resume / stop -----------------------------------------------------------
    def resume(self) -> "Deferred[None]":
        """Listen again on every socket of the active file. An entry that
        fails is logged and skipped, and the file is rewritten once, at the
        end, without it (so a socket that cannot come back is not retried
        on every restart)."""
        return ensureDeferred(self._resume())

    async def _resume(self) -> None:
        entries: list[Entry] = await self._runner(activefile.load, self._active_file)
        resumed = skipped = adopted = 0
        busy: set[str] = set()
        if self._handover is not None:
            # Sockets with connections waiting first, then a turn for the
            # reactor to serve them while the rest is adopted.
            busy = self._handover.waiting(e.path for e in entries)
            order = [e.path for e in entries]
            entries = sorted(entries, key=lambda e: e.path not in busy)
        for index, loaded in enumerate(entries):
            if busy and (index == len(busy) or (index > len(busy) and not index % RESUME_TURN)):
                await deferLater(self._reactor, 0, lambda: None)
            try:
                entry = loaded  # activefile.load gives checked entries
                if entry.path in self._sockets:
                    raise PathInUse(f"socket path {entry.path} is listed twice")
            except Exception as e:
                skipped += 1
                self.log.error("not resuming socket {path}: {error}", path=loaded.path,
                               error=str(e))
                continue
            sock = self._reserve(entry)
            try:
                adopted += await self._resume_one(sock)
            except Exception as e:
                self._release(sock)
                skipped += 1
                self.log.error("not resuming {service} socket {path} of VM {vm_uuid}: {error}",
                               service=entry.service.value, path=entry.path,
                               vm_uuid=entry.vm_uuid, error=str(e))
                continue
            resumed += 1
        if busy:  # the file's order, for ListSockets and the next save
            rank = {path: i for i, path in enumerate(order)}
            self._sockets = dict(sorted(self._sockets.items(),
                                        key=lambda item: rank.get(item[0], len(rank))))
        if self._handover is not None:
            self._handover.release_unclaimed()
        if skipped:
            try:
                await self._save()
            except Exception:
                self.log.failure("rewriting the active sockets file {path} failed",
                                 path=self._active_file)
        # One line for the whole restart, none per socket: a host with 2,000
        # sockets would otherwise log (or at least build) thousands of lines.
        self.log.info("resumed {resumed} domain sockets ({by_service}), skipped {skipped}; "
                      "{adopted} handed over", resumed=resumed, skipped=skipped,
                      by_service=", ".join(f"{n} {k}" for k, n in self.count_by_service().items()),
                      adopted=adopted)

    async def _resume_one(self, sock: _Socket) -> bool:
        """Adopt the socket handed over for the slot (True), else listen
        afresh (False)."""
        path = sock.entry.path
        claimed = self._handover.claim(DOMAIN, path) if self._handover is not None else None
        if claimed is None:
            await self._open(sock)
            return False
        try:
            self._adopt(sock, claimed)
            return True
        except Exception:
            # It passed every check, so this is unexpected. Its file is
            # ours (checked): replace it rather than lose the entry.
            self.log.failure("adopting the handed-over socket {path} failed; listening afresh",
                             path=path)
            assert self._handover is not None
            self._handover.dropped(claimed.name)
            await self._close(sock, unlink=True)
            await self._open(sock)
            return False

    def stop_accepting(self) -> "Deferred[None]":
        """Stop accepting everywhere, for a stop or a handover; creates are
        refused from now on. Connections already accepted are drained
        (:mod:`xguard.domain.drain`): this fires once every request sent
        before is in the apps' hands and had a moment to finish, so the
        caches' stop that follows persists and answers only the slow ones.

        With a successor (the fd store, a re-exec) the sockets stay open,
        files and all, until the process exits or execs: connections wait
        in their backlog for it. Without one they are closed, and their
        files and the active file stay, so a restart resumes them."""
        return ensureDeferred(self._stop_accepting())

    async def _stop_accepting(self) -> None:
        self._stopped = True
        sockets = [s for s in self._open_sockets() if s.port is not None]
        for sock in sockets:
            sock.port.stopReading()  # type: ignore[union-attr]
        cut = await gatherResults([_drain(s.factory, self._grace) for s in sockets])
        if sum(cut):
            self.log.warn("stopping: cut {count} domain connections that sent no complete "
                          "request in {grace}s", count=sum(cut), grace=self._grace)
        await gatherResults([_closed(s.factory, FINISH_WAIT, cut=False) for s in sockets])
        if self._handover is not None and self._handover.keep_open():
            await self._handover.fdstore.flushed()
            return
        await gatherResults([ensureDeferred(self._stop_keeping_file(s)) for s in sockets],
                            consumeErrors=True)

    def wait_closed(self) -> "Deferred[None]":
        """After the caches' stop answered what was in flight: fires once
        every domain connection is closed (every answer flushed), or cut
        after the grace period. The process must not exit before."""
        async def run() -> None:
            sockets = list(self._sockets.values())
            cut = await gatherResults([_closed(s.factory, self._answer_grace)
                                       for s in sockets])
            if sum(cut):
                self.log.warn("stopping: cut {count} domain connections still answering "
                              "after {grace}s", count=sum(cut), grace=self._answer_grace)
        return ensureDeferred(run())

    def handed_over(self) -> list[tuple[str, int]]:
        """(name, descriptor) of every socket still open, for a re-exec
        (after :meth:`stop_accepting`, with a successor)."""
        return [(s.name, _fileno(s.port)) for s in self._open_sockets()
                if s.port is not None and s.name is not None]

    async def _stop_keeping_file(self, sock: _Socket) -> None:
        port, sock.port = sock.port, None
        if port is None:
            return
        if isinstance(port, QuietPort):
            port.keep_file = True
        try:
            await maybeDeferred(port.stopListening)
        except Exception:
            self.log.failure("closing socket {path} failed", path=sock.entry.path)


def _fileno(port: IListeningPort | None) -> int:
    """The listening descriptor behind a UNIX port."""
    return int(port.fileno())  # type: ignore[union-attr]


def _drain(site: DomainSite | None, grace: float) -> "Deferred[int]":
    """Drain a socket's connections (most sockets have none: a fast path,
    since the sockets stopped accepting, none can arrive)."""
    if site is None or not len(site.connections):
        return succeed(0)
    return site.drain(grace)


def _closed(site: DomainSite | None, grace: float, *, cut: bool = True) -> "Deferred[int]":
    if site is None or not len(site.connections):
        return succeed(0)
    return site.closed(grace, cut=cut)


def _validate(service: Service | str, vm_uuid: str, gid: int, path: str) -> Entry:
    """The entry to serve, with a normalised path, or the error to report
    (InvalidUUID, InvalidPath, ValueError)."""
    try:
        service = Service(service)
    except ValueError:
        raise ValueError(f"unknown service {service!r}") from None
    return Entry(vm_uuid=vm_uuid, path=path, gid=gid, service=service)
