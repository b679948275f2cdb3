# -*- test-case-name: tests.unit.test_control -*-
"""The daemon's side of the control channel: AMP responders that validate
the orchestrator's requests and hand them to the socket registry or the
upstream store.

The channel is privileged (anything may be asked of any VM), so it listens
on a root-only UNIX socket: :func:`control_endpoint` forces mode 0600, and
every connection's peer credentials are checked by the kernel's word
(``SO_PEERCRED``): a process that is not uid 0 is disconnected before AMP
sees a byte, whatever the socket file's mode became.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint, ISystemHandle, ITransport
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.protocols import amp

from ..errors import PathInUse
from ..interfaces import IServerReactor, ISocketRegistry
from ..model import Service, check_gid, check_socket_path, check_uuid
from ..state.aside import SetAsideOps
from ..state.contents import VtpmContents
from ..status import DaemonStatus, to_json
from .commands import (
    ERRORS,
    ControlError,
    InvalidLogLevel,
    ListSockets,
    Restart,
    RestartRefused,
    SetAsideExport,
    SetAsideResolve,
    SetLogLevel,
    Status,
    VarstoreCreate,
    VarstoreDestroy,
    VtpmCreate,
    VtpmDestroy,
    VtpmGetContents,
    VtpmSetContents,
)
from .protocol import ControlProtocol

__all__ = ["ControlLocator", "control_factory", "control_endpoint"]

T = TypeVar("T")

#: Sets the log level: (level, dbg) -> (the level it was, the configured one).
SetLevel = Callable[[str, str], tuple[str, str]]

_KNOWN_ERRORS = tuple(ERRORS)


class ControlLocator(amp.CommandLocator):
    """Answers the control commands. One instance serves every connection:
    it holds no per-connection state."""

    log = Logger()

    def __init__(self, registry: ISocketRegistry, vtpms: VtpmContents,
                 status: Callable[[], DaemonStatus],
                 restart: Callable[[str], None] | None = None,
                 aside: SetAsideOps | None = None,
                 set_log_level: SetLevel | None = None) -> None:
        self.registry = registry
        self.vtpms = vtpms
        self.status = status
        self.restart = restart
        self.aside = aside if aside is not None else SetAsideOps(())
        self.set_level = set_log_level

    # -- sockets -----------------------------------------------------------
    @VarstoreCreate.responder
    async def varstore_create(self, dbg: str, vm_uuid: str, gid: int,
                              path: str) -> dict[str, Any]:
        await self._create(Service.VARSTORED, dbg, vm_uuid, gid, path)
        return {}

    @VtpmCreate.responder
    async def vtpm_create(self, dbg: str, vm_uuid: str, gid: int, path: str) -> dict[str, Any]:
        vm_uuid = await self._create(Service.SWTPM, dbg, vm_uuid, gid, path)
        # In the background: the orchestrator's vTPM calls that follow must
        # know this VM's vTPM even if upstream goes away meanwhile.
        self.vtpms.learn(vm_uuid).addErrback(
            lambda f: self.log.failure("learning the vTPM of VM {vm} failed", f, vm=vm_uuid))
        return {}

    @VarstoreDestroy.responder
    async def varstore_destroy(self, dbg: str, gid: int, path: str) -> dict[str, Any]:
        await self._destroy(Service.VARSTORED, dbg, gid, path)
        return {}

    @VtpmDestroy.responder
    async def vtpm_destroy(self, dbg: str, gid: int, path: str) -> dict[str, Any]:
        await self._destroy(Service.SWTPM, dbg, gid, path)
        return {}

    async def _create(self, service: Service, dbg: str, vm_uuid: str, gid: int,
                      path: str) -> str:
        """Serve the socket; returns the VM's uuid in its canonical form."""
        op = f"{service.value}.create"
        self.log.info("{dbg}: {op} vm={vm_uuid} gid={gid} path={path}",
                      dbg=dbg, op=op, vm_uuid=vm_uuid, gid=gid, path=path)
        vm_uuid = check_uuid(vm_uuid, "VM")
        check_gid(gid)
        check_socket_path(path)

        async def create() -> None:
            try:
                await self.registry.create(service, vm_uuid, gid, path)
            except PathInUse as e:
                if path in str(e):
                    raise
                raise PathInUse(f"socket path {path} is already in use ({e})") from e

        await self._run(dbg, op, create)
        return vm_uuid

    async def _destroy(self, service: Service, dbg: str, gid: int, path: str) -> None:
        op = f"{service.value}.destroy"
        self.log.info("{dbg}: {op} gid={gid} path={path}", dbg=dbg, op=op, gid=gid, path=path)
        check_socket_path(path)

        async def destroy() -> None:
            await self.registry.destroy(service, gid, path)

        await self._run(dbg, op, destroy)

    # -- vTPM contents -----------------------------------------------------
    @VtpmSetContents.responder
    async def vtpm_set_contents(self, dbg: str, vtpm_uuid: str,
                                contents: str) -> dict[str, Any]:
        self.log.info("{dbg}: vtpm.set_contents vtpm={vtpm_uuid} size={size}",
                      dbg=dbg, vtpm_uuid=vtpm_uuid, size=len(contents))
        vtpm_uuid = check_uuid(vtpm_uuid, "vTPM")

        async def set_contents() -> None:
            # Ordered with the swtpm socket's writes and the cache (SPEC §6).
            await self.vtpms.set(vtpm_uuid, contents)

        await self._run(dbg, "vtpm.set_contents", set_contents)
        return {}

    @VtpmGetContents.responder
    async def vtpm_get_contents(self, dbg: str, vtpm_uuid: str) -> dict[str, Any]:
        self.log.info("{dbg}: vtpm.get_contents vtpm={vtpm_uuid}", dbg=dbg, vtpm_uuid=vtpm_uuid)
        vtpm_uuid = check_uuid(vtpm_uuid, "vTPM")

        async def get_contents() -> str:
            return await self.vtpms.get(vtpm_uuid)

        contents: str = await self._run(dbg, "vtpm.get_contents", get_contents)
        self.log.debug("{dbg}: vtpm.get_contents vtpm={vtpm_uuid} size={size}",
                       dbg=dbg, vtpm_uuid=vtpm_uuid, size=len(contents))
        return {"contents": contents}

    # -- introspection -----------------------------------------------------
    @ListSockets.responder
    def list_sockets(self) -> dict[str, Any]:
        try:
            entries = [_wire_entry(e) for e in self.registry.entries()]
        except Exception as e:
            self.log.failure("ListSockets failed")
            raise ControlError(f"cannot list sockets: {e}") from e
        return {"sockets": entries}

    @Status.responder
    def status_document(self) -> dict[str, Any]:
        try:
            document = json.dumps(to_json(self.status()), sort_keys=True)
        except Exception as e:
            self.log.failure("Status failed")
            raise ControlError(f"cannot build status: {e}") from e
        return {"status": document}

    # -- writes set aside ------------------------------------------------------
    @SetAsideExport.responder
    async def set_aside_export(self, dbg: str, id: str) -> dict[str, Any]:
        self.log.info("{dbg}: set-aside export {id}", dbg=dbg, id=id)
        document: str = await self._run(dbg, "set-aside export", lambda: self.aside.export(id))
        return {"document": document}

    @SetAsideResolve.responder
    async def set_aside_resolve(self, dbg: str, id: str, action: str) -> dict[str, Any]:
        self.log.info("{dbg}: set-aside resolve {id} {action}", dbg=dbg, id=id, action=action)

        async def resolve() -> None:
            await self.aside.resolve(id, action)

        await self._run(dbg, "set-aside resolve", resolve)
        return {}

    # -- restart -------------------------------------------------------------
    @Restart.responder
    def restart_in_place(self, dbg: str) -> dict[str, Any]:
        """Answered before the restart begins (the stop starts on the next
        reactor turn, so the answer goes out first)."""
        self.log.info("{dbg}: restart", dbg=dbg)
        if self.restart is None:
            raise RestartRefused("this daemon cannot restart in place")
        try:
            self.restart(dbg)
        except RestartRefused as e:
            self.log.warn("{dbg}: restart refused: {error}", dbg=dbg, error=str(e))
            raise
        return {}

    # -- the log level -------------------------------------------------------
    @SetLogLevel.responder
    def set_log_level(self, dbg: str, level: str) -> dict[str, Any]:
        """Until the next start (the change is logged by the levels)."""
        if self.set_level is None:
            raise ControlError("this daemon's log level cannot be changed while it runs")
        try:
            previous, configured = self.set_level(level, dbg)
        except ValueError as e:
            self.log.warn("{dbg}: log-level refused: {error}", dbg=dbg, error=str(e))
            raise InvalidLogLevel(str(e)) from None
        return {"previous": previous, "configured": configured}

    # -- helpers -----------------------------------------------------------
    async def _run(self, dbg: str, op: str, f: Callable[[], Awaitable[T]]) -> T:
        """Run ``f``; log its outcome under ``dbg``. Errors the client knows
        travel as they are; anything else is logged in full and reported as
        ControlError (an unknown error would make AMP drop the connection)."""
        try:
            result = await f()
        except _KNOWN_ERRORS as e:
            self.log.warn("{dbg}: {op} failed: {error}", dbg=dbg, op=op, error=str(e))
            raise
        except Exception as e:
            self.log.failure("{dbg}: {op} failed", dbg=dbg, op=op)
            raise ControlError(f"{op} failed: {type(e).__name__}: {e}") from e
        self.log.debug("{dbg}: {op} done", dbg=dbg, op=op)
        return result


def _wire_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """A registry entry as ListSockets sends it (the service's name)."""
    service = entry.get("service", entry.get("typ"))
    if isinstance(service, Service):
        service = service.value
    return {"path": str(entry["path"]), "vm_uuid": str(entry["vm_uuid"]),
            "gid": int(entry["gid"]), "service": str(service)}


#: struct ucred {pid_t pid; uid_t uid; gid_t gid;} as SO_PEERCRED returns it.
_UCRED = struct.Struct("iII")


def peer_credentials(transport: ITransport) -> tuple[int, int] | None:
    """(pid, uid) of the process at the other end of ``transport``, as the
    kernel recorded them when it connected (``SO_PEERCRED``).

    None when there is no OS socket behind the transport (an in-memory
    transport: the peer is code in this process). A socket that cannot
    report credentials (not AF_UNIX) raises OSError or reports an
    unmapped uid, and is refused either way."""
    if not ISystemHandle.providedBy(transport):
        return None
    handle = ISystemHandle(transport).getHandle()
    getsockopt = getattr(handle, "getsockopt", None)
    if getsockopt is None:
        raise OSError(f"no socket behind the transport ({type(handle).__name__})")
    raw = getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, _gid = _UCRED.unpack(raw)
    return pid, uid


class _RootOnly(Protocol):
    """Stands in front of one AMP connection: connects it only when the
    peer is uid 0, else closes the connection unread. The AMP protocol gets
    the real transport, so it runs exactly as without the gate."""

    def __init__(self, factory: "_ControlFactory", wrapped: Protocol) -> None:
        self.factory = factory
        self.wrapped = wrapped
        self.admitted = False

    def makeConnection(self, transport: ITransport) -> None:
        self.transport = transport
        self.connected = 1
        try:
            creds = self.factory.peer_credentials(transport)
        except OSError as e:
            self.factory.log.warn("control channel: refused a connection whose peer "
                                  "credentials cannot be read ({error})", error=str(e))
            self._refuse()
            return
        if creds is not None and creds[1] != 0:
            pid, uid = creds
            self.factory.log.warn("control channel: refused a connection from uid {uid} "
                                  "(pid {pid}): it serves root only", uid=uid, pid=pid)
            self._refuse()
            return
        self.admitted = True
        self.wrapped.makeConnection(transport)

    def _refuse(self) -> None:
        assert self.transport is not None
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            abort()
        else:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.admitted:
            self.wrapped.dataReceived(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.connected = 0
        if self.admitted:
            self.wrapped.connectionLost(reason)


class _ControlFactory(ServerFactory):
    """Builds one AMP protocol per connection, all sharing the locator, each
    behind a gate that serves root only (SPEC §1.2, §2 ``--control``).

    :param peer_credentials: reads (pid, uid) from a transport; the kernel's
        ``SO_PEERCRED`` unless a test substitutes a fake.
    """

    log = Logger()
    #: "xguard ready" says the channel is up; no "Starting factory" lines.
    noisy = False

    def __init__(self, locator: ControlLocator,
                 peer_credentials: Callable[[ITransport], tuple[int, int] | None]
                 = peer_credentials) -> None:
        self.locator = locator
        self.peer_credentials = peer_credentials

    def buildProtocol(self, addr: object) -> Protocol:
        proto = ControlProtocol(locator=self.locator)
        proto.factory = self
        return _RootOnly(self, proto)


def control_factory(registry: ISocketRegistry, vtpms: VtpmContents,
                    status: Callable[[], DaemonStatus],
                    restart: Callable[[str], None] | None = None,
                    aside: SetAsideOps | None = None,
                    set_log_level: SetLevel | None = None) -> ServerFactory:
    """The control channel's server factory (listen it on a 0600 socket).

    :param restart: begins a restart in place (raises RestartRefused).
    :param aside: the writes set aside (none without a cache).
    :param set_log_level: ``(level, dbg) -> (previous, configured)``: sets
        the log filter's level until the next start (raises ValueError for
        an unknown level)."""
    return _ControlFactory(ControlLocator(registry, vtpms, status, restart, aside,
                                          set_log_level))


def control_endpoint(reactor: IServerReactor, description: str) -> IStreamServerEndpoint:
    """A server endpoint for ``--control``: a UNIX description gets
    ``mode=600`` unless it names a mode itself (root only, SPEC §8)."""
    if description.startswith("unix:") and ":mode=" not in description:
        description += ":mode=600"
    endpoint: IStreamServerEndpoint = serverFromString(reactor, description)
    return endpoint
