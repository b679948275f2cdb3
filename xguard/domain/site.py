# -*- test-case-name: tests.unit.test_site -*-
"""The HTTP server behind every domain socket, hardened for untrusted
clients: every request gets a deliberate answer, and no client can make the
reactor work for long on its behalf.

- **Framing** is decided once per request from the whole header section by
  :mod:`xguard.domain.framing` (RFC 9112): a malformed request line or
  header, an unusable request target, a transfer coding other than a single
  ``chunked``, ``Content-Length`` with ``Transfer-Encoding`` → 400. The
  request target is rewritten to origin-form, so absolute-form targets are
  served. ``Host`` is not needed: it means nothing on a UNIX socket.
- **Bodies** over ``max_body`` are refused with 413, from
  ``Content-Length`` before a byte of the body is read, from chunk sizes for
  chunked bodies. Bodies are kept in memory (they are bounded), so VM
  content never lands in a temporary file.
- **Refusals are read to the end** (a lingering close): the answer is
  written, our side of the connection shut, and what the client still
  sends is read and discarded — up to ``linger_bytes`` or
  ``linger_timeout`` — so a client still sending its body reads the answer
  instead of a reset or a broken pipe.
- **Time**: ``timeout`` bounds both silence (a client that connects and
  sends nothing, a keep-alive connection left idle, a request stalled
  mid-way) and the time a request may take to arrive in full, so a client
  trickling a byte at a time cannot hold its socket forever.
- **Log volume**: everything logged about this socket's requests, here and
  in the apps (:func:`request_logger`), goes through one
  :class:`~xguard.domain.loglimit.RateLimitedObserver` per socket. No body
  is ever logged; each request is logged at debug level with its method,
  path and code only.
- **Draining** (a stop or a restart's handover, :mod:`xguard.domain.drain`):
  no new request is taken; idle kept-alive connections close at once, a
  request on its way is received and answered with ``Connection: close``.
- **Fairness**: one connection of a socket parses input per reactor
  iteration (:mod:`xguard.domain.turns`), whatever the number of
  connections; the apps cut their work on large bodies into steps and
  give the reactor a turn between two (:func:`next_turn`).
- **Admission**: a request received in full goes into the apps when its
  service's gate lets it (:mod:`xguard.domain.admission`): a few at a
  time across the service's sockets, one per socket, sockets in turn.

Twisted's ``HTTPChannel`` has no public hook for framing, so the channel
overrides a few of its private methods (``_maybeChooseTransferDecoder``,
``_respondToBadRequestAndDisconnect``) and reads ``_path``/``_version``;
tests/unit/test_site.py pins each of them.
"""

from __future__ import annotations

import fcntl
import termios
from collections.abc import Callable
from io import BytesIO
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.internet.task import deferLater
from twisted.internet.tcp import Connection
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site
from werkzeug.exceptions import MethodNotAllowed

from .._internals.twisted_web import ChannelBase, set_logger
from .admission import Admission
from .drain import Connections
from .framing import ChunkedDecoder, FramingError, body_length, origin_form
from .loglimit import RateLimitedObserver
from .turns import ReadTurns

__all__ = [
    "DomainSite",
    "VmResource",
    "MAX_BODY",
    "DEFAULT_TIMEOUT",
    "LINGER_BYTES",
    "LINGER_TIMEOUT",
    "next_turn",
    "write_in_steps",
    "WRITE_SLICE",
    "request_logger",
    "plain_response",
    "routing_error_response",
]

#: SPEC §4: request bodies (and swtpm's states) are limited to 1 MiB.
MAX_BODY = 1024 * 1024
#: Seconds of silence, or of request arrival, before a client is dropped.
DEFAULT_TIMEOUT = 60.0
#: After a refusal, bytes read and discarded before the connection is closed.
LINGER_BYTES = 8 * MAX_BODY
#: After a refusal, seconds the client has to stop sending.
LINGER_TIMEOUT = 10.0
#: Bytes of a large answer written per step (see write_in_steps).
WRITE_SLICE = 64 * 1024

_REASONS = {400: b"Bad Request", 413: b"Request Entity Too Large"}
_NAMESPACE = "xguard.domain.site"


def _refusal(code: int, text: str) -> bytes:
    body = text.encode("ascii", "replace") + b"\n"
    return (b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s"
            % (code, _REASONS.get(code, b"Error"), len(body), body))


class VmResource(Resource):
    """A domain app's resource, labelled with the VM it serves, so the
    socket's own log lines name the VM."""

    isLeaf = True

    def __init__(self, resource: IResource, vm_uuid: str) -> None:
        super().__init__()
        self.resource = resource
        self.vm_uuid = vm_uuid

    def render(self, request: IRequest) -> Any:
        return self.resource.render(request)


class _LimitedRequest(Request):
    """Keeps the body in memory, refuses one over the limit, ignores Host,
    and logs its processing failures through the socket's limiter."""

    _received = 0
    #: When it was received in full (its site's clock): its latency runs
    #: from here to its answer's last byte (DomainSite.log).
    received_at: float | None = None

    def __init__(self, channel: http.HTTPChannel, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        site = getattr(channel, "site", None)
        if isinstance(site, DomainSite):
            set_logger(self, site.logger("twisted.web.server"))

    def gotLength(self, length: int | None) -> None:
        # The channel already refused a length over the limit, so the body
        # is bounded: no temporary file holding VM state.
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        channel = self.channel
        if not isinstance(channel, _LimitedChannel) or channel.refused:
            return
        self._received += len(data)
        if self._received > channel.max_body:
            channel.refuse(413, "request body over limit")
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        site = getattr(self.channel, "site", None)
        if isinstance(site, DomainSite):
            self.received_at = site.reactor.seconds()
        super().requestReceived(command, path, version)

    def process(self) -> None:
        """Into the apps when the socket's service admits it
        (:mod:`xguard.domain.admission`), at once while the socket drains."""
        site = getattr(self.channel, "site", None)
        if (not isinstance(site, DomainSite) or site.admission is None
                or site.connections.draining):
            super().process()
            return
        site.admission.enter(site, self._admitted)

    def _admitted(self) -> "Deferred[None] | None":
        """Processed now; what fires once the answer is finished (or the
        client gone), or None if it went while it waited."""
        if self.channel is None:
            return None  # the client went while it waited: nothing was promised
        finished = self.notifyFinish()
        super().process()  # its own failures are answered (processingFailed)
        return finished

    def getRequestHostname(self) -> bytes:
        """Host means nothing on a UNIX socket (and HTTP/1.0 has none):
        every request is for the one VM this socket serves."""
        return b"localhost"


class _GatedLogger(Logger):
    """A Logger whose debug lines are not even made unless ``debugging()``:
    a dropped event still costs its dict and the observers' calls, and a
    domain request has a few (about 4% of a cached write's CPU)."""

    def __init__(self, namespace: str, observer: ILogObserver,
                 debugging: Callable[[], bool]) -> None:
        super().__init__(namespace=namespace, observer=observer)
        self._debugging = debugging

    def debug(self, format: str | None = None, **kwargs: object) -> None:
        if self._debugging():
            super().debug(format, **kwargs)


class _LimitedChannel(ChannelBase):
    """An HTTPChannel with strict framing, a body limit, a whole-request
    deadline and lingering refusals."""

    #: The accepted UNIX connection (its flow control and state flags).
    transport: Connection | None
    site: DomainSite | None = None

    max_body = MAX_BODY
    request_timeout: float | None = DEFAULT_TIMEOUT
    linger_bytes = LINGER_BYTES
    linger_timeout = LINGER_TIMEOUT
    refused = False
    turns: ReadTurns | None = None
    connections: Connections | None = None
    #: Taking no new request (see xguard.domain.drain).
    draining = False
    #: Requests answered on this connection.
    served = 0
    _deadline: IDelayedCall | None = None
    _linger: IDelayedCall | None = None
    _discarded = 0

    def isSecure(self) -> bool:
        """Never: a UNIX socket. (Twisted asks the transport whether it
        provides ISSLTransport, an adapter lookup Klein makes on every
        request.)"""
        return False

    def connectionMade(self) -> None:
        super().connectionMade()
        self._lengths: list[bytes] = []
        self._codings: list[bytes] = []
        self._held: list[bytes] = []

    # -- input -----------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        if self.refused:
            self._discard(data)
            return
        if (
            data
            and self._deadline is None
            and not self.handling_request
            and self.request_timeout is not None
        ):
            # The first bytes of a request: it must be complete in time.
            self._deadline = self.callLater(self.request_timeout, self._request_too_slow)
        if self.turns is not None and (self._held or not self.turns.take(self)):
            # Another connection of this socket parsed input in this
            # iteration: keep this and stop reading until our turn.
            self._held.append(data)
            if self.transport is not None:
                self.transport.pauseProducing()
            return
        super().dataReceived(data)

    def resume_reading(self) -> None:
        """Our turn (see :mod:`xguard.domain.turns`)."""
        data, self._held = b"".join(self._held), []
        if self.transport is None or self.transport.disconnected:
            return
        if not self._channel_wants_pause():
            self.transport.resumeProducing()
        if data:
            self.dataReceived(data)

    def _channel_wants_pause(self) -> bool:
        """Would HTTPChannel itself keep reading paused? (Its write buffer
        is full, or it buffers a pipelined request behind the one it
        serves.) Resuming then would let a client that reads nothing make
        us buffer without bound."""
        return self.waiting_for_transport or (
            self.handling_request and self.buffered_bytes > self.eager_read_limit)

    def lineReceived(self, line: bytes) -> None:
        if not self.refused:
            super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.refuse(400, "request line or header field too long")

    def rawDataReceived(self, data: bytes) -> None:
        if self.refused:
            return
        try:
            super().rawDataReceived(data)
        except FramingError as e:
            self.refuse(e.code, str(e))

    # -- framing ---------------------------------------------------------------
    def header_received(self, name: bytes, value: bytes) -> bool:
        # Collected here, decided in allHeadersReceived from all of them.
        if name == b"Content-Length":
            self._lengths.append(value)
        elif name == b"Transfer-Encoding":
            self._codings.append(value)
        return True

    def bad_request(self) -> None:
        # Twisted's answer for a bad request line or header: ours lingers.
        self.refuse(400, "malformed request line or header")

    def allHeadersReceived(self) -> None:
        lengths, codings = self._lengths, self._codings
        self._lengths, self._codings = [], []
        try:
            self.request_target = origin_form(self.request_target)
            length = body_length(self.request_version, lengths, codings)
        except FramingError as e:
            self.refuse(e.code, str(e))
            return
        if length is None:
            self.length = None
            self.use_decoder(ChunkedDecoder(
                self.requests[-1].handleContentChunk, self.finish_body,
                max_body=self.max_body))
        elif length > self.max_body:
            self.refuse(413, "request body over limit")
            return
        elif length:
            self.use_content_length(length)
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        if self.refused:
            return
        self._cancel_deadline()
        super().allContentReceived()
        if self.connections is not None:
            self.connections.changed()

    # -- draining --------------------------------------------------------------
    def checkPersistence(self, request: Any, version: bytes) -> bool:
        if self.draining:
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
            return False
        return bool(super().checkPersistence(request, version))

    def requestDone(self, request: Any) -> None:
        self.served += 1
        super().requestDone(request)

    def drain(self) -> None:
        """Take no new request: answer the one on its way (with
        ``Connection: close``) and close; close now if idle between two
        requests. A connection that has not sent its first request yet is
        left to send it (its client may have sent it already)."""
        self.draining = True
        if self.requests:
            # Not before a request started: a non-persistent channel drops
            # the first line of the next request (checkPersistence decides
            # for that one).
            self.persistent = False
            request = self.requests[-1]
            if self.handling_request and not request.startedWriting:
                request.responseHeaders.setRawHeaders(b"connection", [b"close"])
            return
        if (self.served and not self.refused and not self._held
                and self.transport is not None and not _unread(self.transport)):
            self.loseConnection()

    def settled(self) -> bool:
        return bool(self.refused or self.handling_request or self.transport is None
                    or self.transport.disconnecting)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    # -- refusals --------------------------------------------------------------
    def refuse(self, code: int, reason: str) -> None:
        """Answer ``code``, stop parsing, and linger: shut our side, read
        and discard what the client still sends (bounded), then close."""
        if self.refused or self.transport is None:
            return
        self.refused = True
        self._cancel_deadline()
        self.setTimeout(None)
        self.log.info("Refused a request ({code}): {reason}", code=code, reason=reason)
        if isinstance(self.site, DomainSite):
            self.site.answered(code)
        self.transport.write(_refusal(code, reason))
        shut_write = getattr(self.transport, "loseWriteConnection", None)
        if shut_write is None:
            self.loseConnection()
            return
        shut_write()
        self._linger = self.callLater(self.linger_timeout, self._stop_lingering)

    def _discard(self, data: bytes) -> None:
        self._discarded += len(data)
        if self._discarded > self.linger_bytes:
            self._stop_lingering()

    def _stop_lingering(self) -> None:
        if self._linger is not None:
            if self._linger.active():
                self._linger.cancel()
            self._linger = None
            self.loseConnection()

    # -- time ------------------------------------------------------------------
    def _request_too_slow(self) -> None:
        self._deadline = None
        self.log.info("Request not received in {seconds}s: dropping the client",
                       seconds=self.request_timeout)
        self.timeoutConnection()

    def timeoutConnection(self) -> None:
        # Either timer may fire first; the connection is dropped once.
        self._cancel_deadline()
        self.setTimeout(None)
        if self.transport is None or self.transport.disconnecting:
            return
        super().timeoutConnection()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        self._held = []
        if self.turns is not None:
            self.turns.forget(self)
        if self._linger is not None:
            if self._linger.active():
                self._linger.cancel()
            self._linger = None
        super().connectionLost(reason)
        if self.connections is not None:
            self.connections.lost(self)


# What twisted.web logs about a connection is named like ours; a channel
# built by DomainSite logs through the socket's rate limit instead.
set_logger(_LimitedChannel, Logger(namespace=_NAMESPACE))


def _unread(transport: Any) -> int:
    """Bytes the client sent that were not read yet (FIONREAD); 0 when
    there is no OS socket behind the transport."""
    handle = getattr(transport, "getHandle", None)
    if handle is None:
        return 0
    try:
        raw = fcntl.ioctl(handle().fileno(), termios.FIONREAD, b"\0\0\0\0")
    except (OSError, AttributeError):
        return 0
    return int.from_bytes(raw, "little")


class DomainSite(Site):
    """A :class:`Site` for one domain socket.

    :param resource: what requests are served by (a :class:`VmResource`
        names the VM in the socket's log lines).
    :param reactor: drives the timeouts, the log windows and the turns
        between steps of work (a ``Clock`` in tests).
    :param max_body: largest accepted request body, in bytes.
    :param timeout: seconds a connection may stay silent, and seconds a
        request may take to arrive in full.
    :param on_connection: called for every accepted connection (the
        daemon's activity count).
    :param on_response: called with the status code of every answer (the
        metrics), refusals included, and the seconds from the request's
        arrival in full to its answer's last byte (None for a refusal,
        which answers a request never received in full).
    :param linger_bytes: after a refusal, bytes read and discarded at most.
    :param linger_timeout: after a refusal, seconds before the connection
        is closed anyway.
    :param admission: the gate of this socket's service, shared with its
        other sockets (None: every request goes in at once).
    """

    noisy = False
    protocol = _LimitedChannel  # type: ignore[assignment]
    requestFactory = _LimitedRequest
    #: Every answered request, at debug.
    requests_log = Logger()

    def __init__(
        self,
        resource: IResource,
        *,
        reactor: IReactorTime,
        max_body: int = MAX_BODY,
        timeout: float = DEFAULT_TIMEOUT,
        on_connection: Callable[[], None] | None = None,
        on_response: Callable[[int, float | None], None] | None = None,
        linger_bytes: int = LINGER_BYTES,
        linger_timeout: float = LINGER_TIMEOUT,
        debugging: Callable[[], bool] = lambda: True,
        admission: Admission | None = None,
    ) -> None:
        #: The gate of this socket's service (None: requests go in at once).
        self.admission = admission
        self._on_connection = on_connection
        self._debugging = debugging
        self._on_response = on_response
        super().__init__(
            resource,
            requestFactory=_LimitedRequest,
            parsePOSTFormSubmission=False,
            reactor=reactor,
            timeout=timeout,
        )
        self.max_body = max_body
        self.linger_bytes = linger_bytes
        self.linger_timeout = linger_timeout
        vm = resource.vm_uuid if isinstance(resource, VmResource) else "(unknown)"
        #: The VM this socket serves (named in every line about it).
        self.vm_uuid = vm
        #: Every line about this socket's requests goes through here.
        self.log_observer = RateLimitedObserver(reactor, vm)
        #: One connection parses input per reactor iteration.
        self.turns = ReadTurns(reactor)
        #: The live connections, drained when the daemon stops.
        self.connections = Connections(reactor)

    def logger(self, namespace: str) -> Logger:
        """A Logger writing through this socket's rate limit (its debug
        lines only while ``debugging``)."""
        return _GatedLogger(namespace, self.log_observer, self._debugging)

    def next_turn(self) -> "Deferred[None]":
        """Fires on a later reactor iteration, after pending I/O."""
        return deferLater(self.reactor, 0, lambda: None)

    # A plain HTTP/1.1 channel, not Twisted's wrapper that may switch to
    # HTTP/2 (the domain sockets speak HTTP/1.1 only).
    def buildProtocol(self, addr: object) -> _LimitedChannel:  # type: ignore[override]
        if self._on_connection is not None:
            self._on_connection()
        channel = _LimitedChannel()
        channel.factory = self
        channel.site = self
        channel.requestFactory = self.requestFactory
        channel.max_body = self.max_body
        channel.request_timeout = self.timeOut
        channel.linger_bytes = self.linger_bytes
        channel.linger_timeout = self.linger_timeout
        channel.timeOut = self.timeOut  # type: ignore[assignment]  # a float works: Twisted says int
        channel.callLater = self.reactor.callLater  # type: ignore[method-assign,assignment]
        set_logger(channel, self.logger(_NAMESPACE))
        channel.turns = self.turns
        channel.connections = self.connections
        self.connections.add(channel)
        return channel

    def drain(self, grace: float) -> "Deferred[int]":
        """Take no new request (see :mod:`xguard.domain.drain`); fires
        with how many silent connections were cut after ``grace``. The
        requests waiting for admission go in now: the drain says they are
        in hand, and the caches' stop must find them in the apps."""
        drained = self.connections.drain(grace)
        if self.admission is not None:
            self.admission.release(self)
        return drained

    def closed(self, timeout: float, *, cut: bool = True) -> "Deferred[int]":
        """Fires once every connection is closed (answers flushed); after
        ``timeout`` the rest is cut (or, not ``cut``, left to go on)."""
        return self.connections.closed(timeout, cut=cut)

    def startFactory(self) -> None:
        """No access-log file and no once-a-second date timer."""

    def stopFactory(self) -> None:
        """The socket closed: report any log lines still being counted."""
        self.log_observer.stop()
        self.turns.stop()

    def answered(self, code: int, seconds: float | None = None) -> None:
        if self._on_response is not None:
            self._on_response(code, seconds)

    def log(self, request: http.Request) -> None:
        """Every request Twisted finished answering (refusals: see refuse)."""
        received = getattr(request, "received_at", None)
        self.answered(request.code,
                      None if received is None else self.reactor.seconds() - received)
        if not self._debugging():
            return
        self.requests_log.debug(
            "VM {vm}: {method} {path} -> {code}", vm=self.vm_uuid,
            method=request.method.decode("ascii", "replace"),
            path=request.path.decode("ascii", "replace")[:100],
            code=request.code,
        )


def _domain_site(request: IRequest) -> DomainSite | None:
    site = getattr(request, "site", None)
    return site if isinstance(site, DomainSite) else None


def next_turn(request: IRequest) -> "Deferred[None]":
    """Let the reactor serve others before the next step of ``request``'s
    work; immediate when the request is not served by a DomainSite (an
    in-memory test client)."""
    site = _domain_site(request)
    return site.next_turn() if site is not None else succeed(None)


async def write_in_steps(request: IRequest, pieces: list[bytes],
                         turn: Callable[[], "Deferred[None]"]) -> None:
    """Write an answer's ``pieces`` (its length already set), about
    :data:`WRITE_SLICE` bytes per step. Twisted joins everything written in
    one iteration before sending it, so a 4 MiB answer written at once cost
    a 4 MiB copy (several ms) on the reactor."""
    batch: list[bytes] = []
    size = 0
    started = False
    for piece in pieces:
        batch.append(piece)
        size += len(piece)
        if size >= WRITE_SLICE:
            if started:
                await turn()
            request.write(b"".join(batch))
            started = True
            batch, size = [], 0
    if batch:
        if started:
            await turn()
        request.write(b"".join(batch))


def request_logger(request: IRequest, log: Logger) -> Logger:
    """``log``, writing through the rate limit of the socket ``request``
    came in on."""
    site = _domain_site(request)
    if site is None:
        return log
    return site.logger(log.namespace)


def plain_response(request: IRequest, code: int, text: str) -> bytes:
    """A short text answer with a Content-Length (never chunked): the body
    the Klein apps give for their HTTP errors."""
    body = (text.rstrip("\n") + "\n").encode("utf-8")
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"content-length", b"%d" % len(body))
    return body


def routing_error_response(request: IRequest, error: BaseException | None) -> bytes:
    """werkzeug's routing errors as the domain apps answer them: 405 with
    ``Allow`` for a method the route does not take, 404 for anything else
    (an unknown path, or a path werkzeug would redirect)."""
    if isinstance(error, MethodNotAllowed):
        if error.valid_methods:
            request.setHeader(b"allow", ", ".join(error.valid_methods).encode("ascii"))
        return plain_response(request, 405, "Method Not Allowed")
    return plain_response(request, 404, "Not Found")
