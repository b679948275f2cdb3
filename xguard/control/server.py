# -*- test-case-name: tests.unit.test_control -*-
"""The daemon's side of the control channel: AMP responders that validate
the orchestrator's requests and hand them to the socket registry or the
upstream store.

The channel is privileged (anything may be asked of any VM), so it listens
on a root-only UNIX socket: :func:`control_endpoint` forces mode 0600.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.protocols import amp

from ..errors import InvalidPath, InvalidUUID, PathInUse
from ..interfaces import ISocketRegistry, IUpstream
from ..items import VtpmSink
from ..model import Service, is_valid_uuid
from .commands import (
    ERRORS,
    ControlError,
    ListSockets,
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

_KNOWN_ERRORS = tuple(ERRORS)


class ControlLocator(amp.CommandLocator):
    """Answers the control commands. One instance serves every connection:
    it holds no per-connection state."""

    log = Logger()

    def __init__(self, registry: ISocketRegistry, upstream: IUpstream, sink: VtpmSink,
                 status: Callable[[], dict[str, Any]]) -> None:
        self.registry = registry
        self.upstream = upstream
        self.sink = sink
        self.status = status

    # -- sockets -----------------------------------------------------------
    @VarstoreCreate.responder
    async def varstore_create(self, dbg: str, vm_uuid: str, gid: int,
                              path: str) -> dict[str, Any]:
        await self._create(Service.VARSTORED, dbg, vm_uuid, gid, path)
        return {}

    @VtpmCreate.responder
    async def vtpm_create(self, dbg: str, vm_uuid: str, gid: int, path: str) -> dict[str, Any]:
        await self._create(Service.SWTPM, dbg, vm_uuid, gid, path)
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
                      path: str) -> None:
        op = f"{service.value}.create"
        self.log.info("{dbg}: {op} vm={vm_uuid} gid={gid} path={path}",
                      dbg=dbg, op=op, vm_uuid=vm_uuid, gid=gid, path=path)
        _check_uuid(vm_uuid, "VM")
        _check_path(path)

        async def create() -> None:
            try:
                await self.registry.create(service, vm_uuid, gid, path)
            except PathInUse as e:
                if path in str(e):
                    raise
                raise PathInUse(f"socket path {path} is already in use ({e})") from e

        await self._run(dbg, op, create)

    async def _destroy(self, service: Service, dbg: str, gid: int, path: str) -> None:
        op = f"{service.value}.destroy"
        self.log.info("{dbg}: {op} gid={gid} path={path}", dbg=dbg, op=op, gid=gid, path=path)
        _check_path(path)

        async def destroy() -> None:
            await self.registry.destroy(service, gid, path)

        await self._run(dbg, op, destroy)

    # -- vTPM contents -----------------------------------------------------
    @VtpmSetContents.responder
    async def vtpm_set_contents(self, dbg: str, vtpm_uuid: str,
                                contents: str) -> dict[str, Any]:
        self.log.info("{dbg}: vtpm.set_contents vtpm={vtpm_uuid} size={size}",
                      dbg=dbg, vtpm_uuid=vtpm_uuid, size=len(contents))
        _check_uuid(vtpm_uuid, "vTPM")

        async def set_contents() -> None:
            vtpm = await self.upstream.vtpm_by_uuid(vtpm_uuid)

            async def write() -> None:
                await self.upstream.set_vtpm_contents(vtpm, contents)

            # The same lock as the domain sockets' and the flusher's
            # read-modify-writes, so neither can interleave with this write.
            await self.sink.locks.run(self.sink.lock_key(vtpm), write)

        await self._run(dbg, "vtpm.set_contents", set_contents)
        return {}

    @VtpmGetContents.responder
    async def vtpm_get_contents(self, dbg: str, vtpm_uuid: str) -> dict[str, Any]:
        self.log.info("{dbg}: vtpm.get_contents vtpm={vtpm_uuid}", dbg=dbg, vtpm_uuid=vtpm_uuid)
        _check_uuid(vtpm_uuid, "vTPM")

        async def get_contents() -> str:
            vtpm = await self.upstream.vtpm_by_uuid(vtpm_uuid)

            async def read() -> str:
                return await self.upstream.get_vtpm_contents(vtpm)

            return await self.sink.locks.run(self.sink.lock_key(vtpm), read)

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
            document = json.dumps(self.status(), sort_keys=True, default=str)
        except Exception as e:
            self.log.failure("Status failed")
            raise ControlError(f"cannot build status: {e}") from e
        return {"status": document}

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


def _check_uuid(value: str, what: str) -> None:
    if not is_valid_uuid(value):
        raise InvalidUUID(f"invalid {what} uuid {value!r}")


def _check_path(path: str) -> None:
    if not path or not os.path.isabs(path):
        raise InvalidPath(f"socket path {path!r} is not absolute")
    if "\0" in path:
        raise InvalidPath(f"socket path {path!r} contains a NUL byte")


def _wire_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """A registry entry as ListSockets sends it (the service's name)."""
    service = entry.get("service", entry.get("typ"))
    if isinstance(service, Service):
        service = service.value
    return {"path": str(entry["path"]), "vm_uuid": str(entry["vm_uuid"]),
            "gid": int(entry["gid"]), "service": str(service)}


class _ControlFactory(ServerFactory):
    """Builds one AMP protocol per connection, all sharing the locator."""

    def __init__(self, locator: ControlLocator) -> None:
        self.locator = locator

    def buildProtocol(self, addr: object) -> amp.AMP:
        proto = ControlProtocol(locator=self.locator)
        proto.factory = self
        return proto


def control_factory(registry: ISocketRegistry, upstream: IUpstream, sink: VtpmSink,
                    status: Callable[[], dict[str, Any]]) -> ServerFactory:
    """The control channel's server factory (listen it on a 0600 socket)."""
    return _ControlFactory(ControlLocator(registry, upstream, sink, status))


def control_endpoint(reactor: Any, description: str) -> IStreamServerEndpoint:
    """A server endpoint for ``--control``: a UNIX description gets
    ``mode=600`` unless it names a mode itself (root only, SPEC §8)."""
    if description.startswith("unix:") and ":mode=" not in description:
        description += ":mode=600"
    return serverFromString(reactor, description)
