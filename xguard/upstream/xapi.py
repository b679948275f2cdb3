# -*- test-case-name: tests.unit.test_xapi -*-
"""The xapi upstream: JSON-RPC over a kept-alive treq client.

One session is cached for every call; a login in flight is shared by all
callers; ``SESSION_INVALID`` (xapi restarted) costs one fresh login and one
retry. VM and vTPM references are cached by uuid — they cannot change while
the VM runs — and a ``HANDLE_INVALID`` on a cached one drops it (a VM ref is
resolved afresh once here; a vTPM ref, the handle callers lock on, is
resolved afresh by the caller). Each HTTP exchange (request *and* body) has its own deadline on
the injected clock. Nothing here ever logs a call's parameters or results:
they carry NVRAM and TPM state.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Coroutine
from typing import Any

from hyperlink import EncodedURL
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, DeferredSemaphore, succeed
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import _newclient
from twisted.web.client import HTTPConnectionPool
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from xguard.errors import NoVtpm, TransientUpstreamError, UpstreamError
from xguard.interfaces import IUpstream
from xguard.status import UpstreamStatus
from xguard.upstream.agent import MAX_PERSISTENT_PER_HOST, make_client, make_pool
from xguard.upstream.jsonrpc import (
    classify_exception,
    classify_http_status,
    decode_response,
    encode_call,
)
from xguard.upstream.reachability import Reachability

__all__ = ["XapiUpstream", "xapi_upstream", "MAX_RESPONSE_BYTES"]

#: Bigger answers are refused (the largest real one, a vTPM's contents, is
#: a few hundred KiB).
MAX_RESPONSE_BYTES = 32 * 1024 * 1024

_HEADERS = {b"Content-Type": [b"application/json"], b"Accept": [b"application/json"]}

# A kept-alive connection that xapi closed while idle fails this way before
# anything reached xapi; such a call is safely sent once more.
_STALE_CONNECTION = (_newclient.ResponseNeverReceived, _newclient.RequestTransmissionFailed)

# Calls that must not be repeated blindly (the first may have taken effect).
_NOT_IDEMPOTENT = frozenset({"message.create"})


@implementer(IBodyProducer)
class _Payload:
    """A request body written in one go: it is small and already in memory,
    and treq's default producer would pace it through the global reactor's
    cooperator."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Body(Protocol):
    """Collects a response body; cancelling it drops the connection, so a
    stalled body never pins a pooled connection."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.done: Deferred[bytes] = Deferred(lambda _: self._stop())

    def _stop(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > MAX_RESPONSE_BYTES:
            self._stop()
            self.done.errback(TransientUpstreamError(["MALFORMED_RESPONSE", "too large"]))
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self.done.called:
            return
        if reason.check(_newclient.ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)


@implementer(IUpstream)
class XapiUpstream:
    """IUpstream on xapi's JSON-RPC API (SPEC §5)."""

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        client: HTTPClient,
        url: str,
        *,
        timeout: float,
        version: str = "2.21",
        pool: HTTPConnectionPool | None = None,
        description: str | None = None,
        max_concurrent: int = MAX_PERSISTENT_PER_HOST,
        cache_handles: bool = True,
    ) -> None:
        self._reactor = reactor
        self._client = client
        self._url = _ParsedURL.from_text(url)
        self._timeout = timeout
        self._version = version
        self._pool = pool
        # Calls beyond the pool's kept-alive connections wait their turn (on
        # their own deadline) rather than open throw-away connections that
        # overflow xapi's listen backlog under bursts.
        self._slots = DeferredSemaphore(max_concurrent)
        self.description = description or f"xapi {url}"
        self._ids = itertools.count(1)
        self._session: str | None = None
        self._login_waiters: list[Deferred[str]] | None = None
        # False only for the benchmarks' upstream-design comparison: resolve
        # the VM and its vTPM again for every operation, as xapi-guard does.
        self._cache_handles = cache_handles
        self._vm_refs: dict[str, str] = {}
        self._vtpm_of_vm: dict[str, str] = {}
        self._vtpm_refs: dict[str, str] = {}
        self._resolving: dict[tuple[int, str], list[Deferred[str]]] = {}
        self._calls = 0
        self.reachability = Reachability(reactor, self.description)

    # -- one HTTP exchange ---------------------------------------------------
    def _rpc(self, method: str, *params: Any) -> Deferred[Any]:
        """Call ``method`` once, within the deadline; failures are always
        Transient/PermanentUpstreamError."""
        self._calls += 1
        call_id = next(self._ids)
        body = encode_call(method, params, call_id)
        timed_out: list[bool] = []
        retry = method not in _NOT_IDEMPOTENT
        d = Deferred.fromCoroutine(self._exchange(body, call_id, lambda: retry and not timed_out))

        def expire() -> None:
            timed_out.append(True)
            d.cancel()

        timer = self._reactor.callLater(self._timeout, expire)

        def finish(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            if not isinstance(result, Failure):
                self._note(None)
                return result
            if timed_out:
                error: UpstreamError | None = TransientUpstreamError(
                    ["TIMEOUT", method], f"{method}: no answer within {self._timeout}s")
            else:
                error = classify_exception(result.value)
            if error is None:
                self._log.failure("Unexpected failure calling xapi {method}", result,
                                  method=method)
                error = TransientUpstreamError(["INTERNAL_ERROR", type(result.value).__name__])
            self._note(error)
            raise error

        return d.addBoth(finish)

    async def _exchange(self, body: bytes, call_id: int, may_retry: Callable[[], bool]) -> Any:
        for attempt in (1, 2):
            await self._slots.acquire()
            try:
                response = await self._client.post(
                    self._url, data=_Payload(body), headers=_HEADERS, allow_redirects=False,
                    unbuffered=True, reactor=self._reactor)
                reader = _Body()
                response.deliverBody(reader)
                payload = await reader.done
            except _STALE_CONNECTION:
                if attempt == 1 and may_retry():
                    continue
                raise
            finally:
                self._slots.release()
            error = classify_http_status(response.code)
            if error is not None:
                raise error
            return decode_response(payload, call_id)
        raise AssertionError("unreachable")  # pragma: no cover

    def _note(self, error: UpstreamError | None) -> None:
        """Report reachability: any answer, even an API error, proves xapi
        is there."""
        if error is None or not isinstance(error, TransientUpstreamError):
            self.reachability.answered()
        else:
            self.reachability.failed(" ".join(error.codes))

    # -- the session ---------------------------------------------------------
    def _get_session(self) -> Deferred[str]:
        if self._session is not None:
            return succeed(self._session)
        waiter: Deferred[str] = Deferred()
        if self._login_waiters is not None:
            self._login_waiters.append(waiter)
            return waiter
        self._login_waiters = [waiter]
        d = self._rpc("session.login_with_password", "root", "", self._version, "xguard")
        d.addBoth(self._logged_in)
        return waiter

    def _logged_in(self, result: Any) -> None:
        waiters, self._login_waiters = self._login_waiters or [], None
        if isinstance(result, Failure):
            self._log.warn("Login to {target} failed: {codes}", target=self.description,
                           codes=getattr(result.value, "codes", None))
        else:
            self._session = result
            self._log.info("Logged in to {target}", target=self.description)
        for waiter in waiters:
            if not waiter.called:  # a caller may have given up
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)

    async def _call(self, method: str, *params: Any) -> Any:
        """``method(session, *params)``, with one fresh login and retry when
        xapi forgot the session."""
        session = await self._get_session()
        try:
            return await self._rpc(method, session, *params)
        except UpstreamError as e:
            if e.codes[:1] != ["SESSION_INVALID"]:
                raise
        if self._session == session:  # nobody logged in again meanwhile
            self._session = None
            self._log.info("Session of {target} invalid (xapi restarted?); logging in again",
                           target=self.description)
        session = await self._get_session()
        return await self._rpc(method, session, *params)

    # -- cached handles ------------------------------------------------------
    async def _with_handle(
        self, cache: dict[str, str], uuid: str, resolve: Callable[[], Coroutine[Any, Any, str]],
        method: str, *params: Any,
    ) -> Any:
        """``method(session, ref, *params)`` with ``ref`` resolved from
        ``uuid`` (cached); a HANDLE_INVALID on a cached ref re-resolves once."""
        for attempt in (1, 2):
            ref = cache.get(uuid)
            was_cached = ref is not None
            if ref is None:
                ref = await self._resolve_shared(id(cache), uuid, resolve)
                if self._cache_handles:
                    cache[uuid] = ref
            try:
                return await self._call(method, ref, *params)
            except UpstreamError as e:
                if not (was_cached and attempt == 1 and e.codes[:1] == ["HANDLE_INVALID"]):
                    raise
                if cache.get(uuid) == ref:
                    del cache[uuid]
        raise AssertionError("unreachable")  # pragma: no cover

    def _resolve_shared(self, kind: int, uuid: str,
                        resolve: Callable[[], Coroutine[Any, Any, str]]) -> Deferred[str]:
        """One lookup in flight per handle: a VM booting asks for its ref
        from the vTPM and the NVRAM paths at the same moment."""
        key = (kind, uuid)
        waiters = self._resolving.get(key)
        if waiters is not None:
            waiter: Deferred[str] = Deferred()
            waiters.append(waiter)
            return waiter
        self._resolving[key] = []

        def share(result: Any) -> Any:
            for waiter in self._resolving.pop(key):
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)
            return result

        return Deferred.fromCoroutine(resolve()).addBoth(share)

    def _vm_call(self, vm_uuid: str, method: str, *params: Any) -> Deferred[Any]:
        async def resolve() -> str:
            return str(await self._call("VM.get_by_uuid", vm_uuid))
        return Deferred.fromCoroutine(
            self._with_handle(self._vm_refs, vm_uuid, resolve, method, *params))

    # -- IUpstream -----------------------------------------------------------
    def ensure_vm(self, vm_uuid: str) -> Deferred[None]:
        """xapi owns VM records; nothing to create."""
        return succeed(None)

    def vtpm_for_vm(self, vm_uuid: str) -> Deferred[str]:
        """The VM's first vTPM reference, through VM.get_by_uuid and
        VM.get_VTPMs only (what the upstream daemon uses: an xapi that
        serves those needs nothing more)."""
        async def find() -> str:
            cached = self._vtpm_of_vm.get(vm_uuid) if self._cache_handles else None
            if cached is not None:
                return cached
            refs = await self._vm_call(vm_uuid, "VM.get_VTPMs")
            if not refs:
                raise NoVtpm(vm_uuid)
            ref = str(refs[0])
            if self._cache_handles:
                self._vtpm_of_vm[vm_uuid] = ref
            return ref
        return self._resolve_shared(id(self._vtpm_of_vm), vm_uuid, find)

    def vtpm_by_uuid(self, vtpm_uuid: str) -> Deferred[str]:
        """The vTPM's reference (VTPM.get_by_uuid), cached."""
        async def find() -> str:
            cached = self._vtpm_refs.get(vtpm_uuid) if self._cache_handles else None
            if cached is not None:
                return cached
            ref = str(await self._call("VTPM.get_by_uuid", vtpm_uuid))
            if self._cache_handles:
                self._vtpm_refs[vtpm_uuid] = ref
            return ref
        return Deferred.fromCoroutine(find())

    def get_vtpm_contents(self, vtpm: str) -> Deferred[str]:
        return Deferred.fromCoroutine(self._vtpm_call(vtpm, "VTPM.get_contents"))

    def set_vtpm_contents(self, vtpm: str, contents: str) -> Deferred[None]:
        return Deferred.fromCoroutine(
            self._vtpm_call(vtpm, "VTPM.set_contents", contents)).addCallback(_none)

    async def _vtpm_call(self, vtpm: str, method: str, *params: Any) -> Any:
        """A call on a vTPM reference; if xapi no longer knows it, no cached
        lookup may hand it out again (the caller resolves afresh)."""
        try:
            return await self._call(method, vtpm, *params)
        except UpstreamError as e:
            if e.codes[:1] == ["HANDLE_INVALID"]:
                for cache in (self._vtpm_of_vm, self._vtpm_refs):
                    for key in [k for k, ref in cache.items() if ref == vtpm]:
                        del cache[key]
            raise

    def get_nvram(self, vm_uuid: str) -> Deferred[dict[str, str]]:
        return self._vm_call(vm_uuid, "VM.get_NVRAM").addCallback(
            lambda nvram: dict(nvram or {}))

    def set_nvram_efi_variables(self, vm_uuid: str, value: str, update: str) -> Deferred[None]:
        """xapi's optional 4th parameter is sent only when the client said
        yes or no, so older xapis keep working with older varstoreds."""
        extra = () if update == "unspecified" else (update,)
        return self._vm_call(
            vm_uuid, "VM.set_NVRAM_EFI_variables", value, *extra).addCallback(_none)

    def get_secureboot_certificates_state(self, vm_uuid: str) -> Deferred[str]:
        return self._vm_call(vm_uuid, "VM.get_secureboot_certificates_state")

    def create_message(self, vm_uuid: str, name: str, priority: int, body: str) -> Deferred[str]:
        return Deferred.fromCoroutine(
            self._call("message.create", name, priority, "VM", vm_uuid, body))

    def forget(self, vm_uuid: str) -> None:
        self._vm_refs.pop(vm_uuid, None)
        ref = self._vtpm_of_vm.pop(vm_uuid, None)
        for key in [k for k, r in self._vtpm_refs.items() if r == ref]:
            del self._vtpm_refs[key]

    def status(self) -> UpstreamStatus:
        r = self.reachability
        return UpstreamStatus(kind="xapi", target=self.description, reachable=r.reachable,
                              down_since=r.down_since, last_error=r.last_error,
                              calls=self._calls)

    def close(self) -> Deferred[None]:
        """Close kept-alive connections (the session is left to expire:
        logging out would need xapi, which may be gone)."""
        self.reachability.stop()
        if self._pool is None:
            return succeed(None)
        return self._pool.closeCachedConnections().addCallback(_none)


class _ParsedURL(EncodedURL):
    """The xapi URL, parsed once. treq turns every URL it is given into a
    URI (IDNA-checking the host) on every request, the largest single cost
    of a Direct write in the profile; ours is ASCII already."""

    def to_uri(self, *args: Any, **kwargs: Any) -> "_ParsedURL":
        return self


def _none(_: object) -> None:
    return None


def xapi_upstream(reactor: Any, endpoint: str, timeout: float, *,
                  cache_handles: bool = True) -> XapiUpstream:
    """An XapiUpstream for an endpoint string (``unix:/path``, ``http://…``).

    :raises ValueError: for a malformed endpoint.
    """
    pool = make_pool(reactor)
    client, url = make_client(reactor, endpoint, pool=pool)
    return XapiUpstream(reactor, client, url, timeout=timeout, pool=pool,
                        description=f"xapi {endpoint}", cache_handles=cache_handles)
