# -*- test-case-name: tests.unit.test_xapi -*-
"""The xapi upstream: JSON-RPC over a kept-alive treq client.

One session is cached for every call; a login in flight is shared by all
callers; ``SESSION_INVALID`` (xapi restarted) costs one fresh login and one
retry. VM and vTPM references are cached by uuid in a :class:`HandleCache`
— they cannot change while the VM runs — and a ``HANDLE_INVALID`` drops the
reference from it (a VM reference is looked up afresh once here; a vTPM
reference, the handle callers lock on, is looked up afresh by the caller).
Each HTTP exchange (request *and* body) has its own deadline on the injected
clock. Nothing here ever logs a call's parameters or results: they carry
NVRAM and TPM state.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Coroutine
from typing import Any, cast

from treq.client import HTTPClient
from twisted.internet.defer import Deferred, DeferredSemaphore, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from xguard._internals.treq import FixedURL
from xguard._internals.twisted_web import STALE_CONNECTION, ResponseDone
from xguard.errors import NoVtpm, TransientUpstreamError, UpstreamError
from xguard.interfaces import IClientReactor, IUpstream
from xguard.model import Residence
from xguard.status import UpstreamStatus
from xguard.upstream.agent import MAX_PERSISTENT_PER_HOST, make_client, make_pool
from xguard.upstream.calls import CallMonitor
from xguard.upstream.jsonrpc import (
    NO_ANSWER_CODES,
    classify_exception,
    classify_http_status,
    decode_response,
    encode_call,
)
from xguard.upstream.reachability import Reachability
from xguard.util.observer import OneShotObserver

__all__ = ["XapiUpstream", "xapi_upstream", "MAX_RESPONSE_BYTES"]

#: Bigger answers are refused (the largest real one, a vTPM's contents, is
#: a few hundred KiB).
MAX_RESPONSE_BYTES = 32 * 1024 * 1024

#: Built once: treq takes a Headers object as it is (a dict is converted on
#: every request).
_HEADERS = Headers({b"Content-Type": [b"application/json"], b"Accept": [b"application/json"]})

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
            # A response body's transport is its connection's producer.
            cast(IPushProducer, self.transport).stopProducing()

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
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)


class HandleCache:
    """xapi references that cannot change while a VM runs, by the uuid
    they were looked up with: a VM's reference, its (first) vTPM's, a
    vTPM's. A reference xapi reports as ``HANDLE_INVALID`` is dropped
    everywhere, so no lookup hands it out again."""

    VM = "vm"
    VTPM_OF_VM = "vtpm-of-vm"
    VTPM = "vtpm"

    def __init__(self) -> None:
        self._refs: dict[tuple[str, str], str] = {}

    def get(self, kind: str, uuid: str) -> str | None:
        return self._refs.get((kind, uuid))

    def put(self, kind: str, uuid: str, ref: str) -> None:
        self._refs[(kind, uuid)] = ref

    def invalid(self, ref: str) -> None:
        """xapi no longer knows ``ref``."""
        for key in [k for k, r in self._refs.items() if r == ref]:
            del self._refs[key]

    def forget_vm(self, vm_uuid: str) -> None:
        """The VM's sockets are gone: its references may change now."""
        self._refs.pop((self.VM, vm_uuid), None)
        vtpm = self._refs.pop((self.VTPM_OF_VM, vm_uuid), None)
        if vtpm is not None:
            self.invalid(vtpm)


class NoHandleCache(HandleCache):
    """Every operation looks its references up again, as the upstream
    daemon does (the benchmarks' comparison of designs)."""

    def put(self, kind: str, uuid: str, ref: str) -> None:
        pass


@implementer(IUpstream)
class XapiUpstream:
    """IUpstream on xapi's JSON-RPC API (SPEC §5)."""

    log = Logger()

    def __init__(
        self,
        reactor: IClientReactor,
        client: HTTPClient,
        url: str,
        *,
        timeout: float,
        version: str = "2.21",
        pool: HTTPConnectionPool | None = None,
        description: str | None = None,
        max_concurrent: int = MAX_PERSISTENT_PER_HOST,
        handles: HandleCache | None = None,
        unresponsive_after: float = 5.0,
    ) -> None:
        self._reactor = reactor
        self._client = client
        self._url = FixedURL.from_text(url)
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
        self._login: OneShotObserver[str] | None = None
        #: The codes of the last refused login, logged once (None: none).
        self._login_refused: str | None = None
        self._handles = handles if handles is not None else HandleCache()
        self._lookups: dict[tuple[str, str], OneShotObserver[str]] = {}
        self._this: str | None = None  # this host's reference, once known
        self._calls = 0
        self.reachability = Reachability(reactor, self.description)
        self.calls = CallMonitor(reactor, self.description,
                                 unresponsive_after=unresponsive_after)

    # -- one HTTP exchange ---------------------------------------------------
    def _rpc(self, method: str, *params: Any) -> Deferred[Any]:
        """Call ``method`` once, within the deadline; failures are always
        Transient/PermanentUpstreamError."""
        self._calls += 1
        ticket = self.reachability.call_started()
        token = self.calls.started(method)
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
                self._note(None, ticket)
                self.calls.finished(token, "ok")
                return result
            if timed_out:
                error: UpstreamError | None = TransientUpstreamError(
                    ["TIMEOUT", method], f"{method}: no answer within {self._timeout}s")
            else:
                error = classify_exception(result.value) if result.value is not None else None
            if error is None:
                self.log.failure("Unexpected failure calling xapi {method}", result,
                                  method=method)
                error = TransientUpstreamError(["INTERNAL_ERROR", type(result.value).__name__])
            self._note(error, ticket)
            self.calls.finished(token, "transient" if isinstance(error, TransientUpstreamError)
                                else "permanent")
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
            except STALE_CONNECTION:
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

    def _note(self, error: UpstreamError | None, ticket: int) -> None:
        """Report reachability: any answer, even an API error, proves xapi
        is there."""
        if error is None or not isinstance(error, TransientUpstreamError):
            self.reachability.answered(ticket)
        else:
            self.reachability.failed(" ".join(error.codes),
                                     answered=error.codes[0] not in NO_ANSWER_CODES)

    # -- the session ---------------------------------------------------------
    def _get_session(self) -> Deferred[str]:
        """The cached session, or a login shared by every caller waiting."""
        if self._session is not None:
            return succeed(self._session)
        login = self._login
        if login is None:
            login = self._login = OneShotObserver()
            d = self._rpc("session.login_with_password", "root", "", self._version, "xguard")
            d.addBoth(self._logged_in, login)
        return login.when_fired()

    def _logged_in(self, result: Any, login: OneShotObserver[str]) -> None:
        """One line per session, not per attempt: a login that fails
        transiently (xapi down, restarting, still booting) is one retry of
        an outage the reachability logs at its start and end, so it is
        debug; a refusal (an API error) is a warning, once until a login
        succeeds or it changes."""
        self._login = None
        if isinstance(result, Failure):
            codes = getattr(result.value, "codes", None)
            if isinstance(result.value, TransientUpstreamError) or codes is None:
                self.log.debug("Login to {target} failed: {codes}", target=self.description,
                               codes=codes)
            else:
                refusal = " ".join(codes)
                if refusal != self._login_refused:
                    self._login_refused = refusal
                    self.log.warn("Login to {target} refused: {codes}",
                                  target=self.description, codes=codes)
        else:
            self._session = result
            self._login_refused = None
            self.log.info("Logged in to {target}", target=self.description)
        login.fire(result)

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
            self.log.info("Session of {target} invalid (xapi restarted?); logging in again",
                           target=self.description)
        session = await self._get_session()
        return await self._rpc(method, session, *params)

    # -- cached handles ------------------------------------------------------
    def _handle(self, kind: str, uuid: str,
                lookup: Callable[[], Coroutine[Any, Any, str]]) -> Deferred[str]:
        """The reference of ``kind`` for ``uuid``: cached, or looked up once
        for every caller waiting (a VM booting asks for its reference from
        the vTPM and the NVRAM paths at the same moment)."""
        ref = self._handles.get(kind, uuid)
        if ref is not None:
            return succeed(ref)
        key = (kind, uuid)
        shared = self._lookups.get(key)
        if shared is None:
            shared = self._lookups[key] = OneShotObserver()

            def found(result: Any) -> None:
                del self._lookups[key]
                if not isinstance(result, Failure):
                    self._handles.put(kind, uuid, result)
                shared.fire(result)

            Deferred.fromCoroutine(lookup()).addBoth(found)
        return shared.when_fired()

    def _vm_call(self, vm_uuid: str, method: str, *params: Any) -> Deferred[Any]:
        """``method(session, vm_ref, *params)``; a cached reference xapi no
        longer knows (HANDLE_INVALID) is looked up once more (a fresh one
        is not: no loop)."""
        return Deferred.fromCoroutine(self._vm_call_retrying(vm_uuid, method, *params))

    async def _vm_call_retrying(self, vm_uuid: str, method: str, *params: Any) -> Any:
        async def lookup() -> str:
            return str(await self._call("VM.get_by_uuid", vm_uuid))

        for attempt in (1, 2):
            cached = self._handles.get(HandleCache.VM, vm_uuid) is not None
            ref = await self._handle(HandleCache.VM, vm_uuid, lookup)
            try:
                return await self._call(method, ref, *params)
            except UpstreamError as e:
                if e.codes[:1] != ["HANDLE_INVALID"]:
                    raise
                self._handles.invalid(ref)
                if attempt == 2 or not cached:
                    raise  # a reference just looked up: no loop
        raise AssertionError("unreachable")  # pragma: no cover

    # -- IUpstream -----------------------------------------------------------
    def ensure_vm(self, vm_uuid: str) -> Deferred[None]:
        """xapi owns VM records; nothing to create."""
        return succeed(None)

    def vtpm_for_vm(self, vm_uuid: str) -> Deferred[str]:
        """The VM's first vTPM reference, through VM.get_by_uuid and
        VM.get_VTPMs only (what the upstream daemon uses: an xapi that
        serves those needs nothing more)."""
        async def lookup() -> str:
            refs = await self._vm_call(vm_uuid, "VM.get_VTPMs")
            if not refs:
                raise NoVtpm(vm_uuid)
            return str(refs[0])
        return self._handle(HandleCache.VTPM_OF_VM, vm_uuid, lookup)

    def vtpm_by_uuid(self, vtpm_uuid: str) -> Deferred[str]:
        """The vTPM's reference (VTPM.get_by_uuid), cached."""
        async def lookup() -> str:
            return str(await self._call("VTPM.get_by_uuid", vtpm_uuid))
        return self._handle(HandleCache.VTPM, vtpm_uuid, lookup)

    def get_vtpm_contents(self, vtpm: str) -> Deferred[str]:
        return Deferred.fromCoroutine(self._vtpm_call(vtpm, "VTPM.get_contents"))

    def set_vtpm_contents(self, vtpm: str, contents: str) -> Deferred[None]:
        return Deferred.fromCoroutine(
            self._vtpm_call(vtpm, "VTPM.set_contents", contents)).addCallback(_none)

    async def _vtpm_call(self, vtpm: str, method: str, *params: Any) -> Any:
        """A call on a vTPM reference; if xapi no longer knows it, no lookup
        hands it out again (the caller, which locks on the reference, looks
        the vTPM up afresh: see IUpstream.vtpm_for_vm)."""
        try:
            return await self._call(method, vtpm, *params)
        except UpstreamError as e:
            if e.codes[:1] == ["HANDLE_INVALID"]:
                self._handles.invalid(vtpm)
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

    def vm_residence(self, vm_uuid: str) -> Deferred[Residence | None]:
        """VM.get_power_state and VM.get_resident_on; the host is named by
        its name label when xapi gives it, and compared with this host
        (``session.get_this_host``: the host of xguard's own session)."""
        async def ask() -> Residence:
            power_state = str(await self._vm_call(vm_uuid, "VM.get_power_state"))
            host = str(await self._vm_call(vm_uuid, "VM.get_resident_on"))
            if host in ("", "OpaqueRef:NULL"):
                return Residence(power_state)
            this = await self._this_host()
            try:
                name = f"{await self._call('host.get_name_label', host)} ({host})"
            except UpstreamError as e:
                if _no_answer(e):
                    raise
                name = host
            return Residence(power_state, name, None if this is None else this == host)
        return Deferred.fromCoroutine(ask())

    async def _this_host(self) -> str | None:
        """The reference of the host xguard runs on (cached): its session's
        host. None when this xapi cannot tell (it answered an error)."""
        if self._this is None:
            session = await self._get_session()
            try:
                self._this = str(await self._rpc("session.get_this_host", session, session))
            except UpstreamError as e:
                if _no_answer(e):
                    raise
                return None
        return self._this

    def confirm(self, vm_uuid: str) -> Deferred[None]:
        """VM.get_by_uuid, whose answer (even UUID_INVALID) proves xapi
        answers calls made from now on."""
        return Deferred.fromCoroutine(self._call("VM.get_by_uuid", vm_uuid)).addCallback(_none)

    def forget(self, vm_uuid: str) -> None:
        self._handles.forget_vm(vm_uuid)

    def probe(self) -> Deferred[None]:
        """Is xapi back? One fresh login (the one call that needs nothing;
        its session then serves everyone): at most one extra session per
        outage, since probing stops once xapi answers."""
        self._session = None
        return self._get_session().addCallback(_none)

    def status(self) -> UpstreamStatus:
        r = self.reachability
        return UpstreamStatus(kind="xapi", target=self.description, reachable=r.reachable,
                              down_since=r.down_since, last_error=r.last_error,
                              calls=self._calls, unresponsive_since=self.calls.unresponsive_since,
                              inflight=self.calls.inflight,
                              oldest_inflight_since=self.calls.oldest_inflight_start)

    def close(self) -> Deferred[None]:
        """Close kept-alive connections (the session is left to expire:
        logging out would need xapi, which may be gone)."""
        self.reachability.stop()
        self.calls.stop()
        if self._pool is None:
            return succeed(None)
        closed: Deferred[object] = self._pool.closeCachedConnections()
        return closed.addCallback(_none)


def _none(_: object) -> None:
    return None


def _no_answer(error: UpstreamError) -> bool:
    """xapi did not answer (as opposed to answering an API error)."""
    return error.codes[0] in NO_ANSWER_CODES or error.codes[0] == "HTTP_ERROR"


def xapi_upstream(reactor: IClientReactor, endpoint: str, timeout: float, *,
                  handles: HandleCache | None = None,
                  unresponsive_after: float = 5.0) -> XapiUpstream:
    """An XapiUpstream for an endpoint string (``unix:/path``, ``http://…``).

    :raises ValueError: for a malformed endpoint.
    """
    pool = make_pool(reactor)
    client, url = make_client(reactor, endpoint, pool=pool)
    return XapiUpstream(reactor, client, url, timeout=timeout, pool=pool,
                        description=f"xapi {endpoint}", handles=handles,
                        unresponsive_after=unresponsive_after)
