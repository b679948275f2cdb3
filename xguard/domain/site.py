# -*- test-case-name: tests.unit.test_site -*-
"""The HTTP server behind every domain socket, hardened for untrusted
clients.

- Bodies over ``max_body`` are refused with 413 before the handler runs:
  from ``Content-Length`` before a byte of the body is read, and by counting
  for chunked bodies. Bodies are kept in memory (they are bounded), so VM
  content never lands in a temporary file.
- ``timeout`` bounds both silence (a client that connects and sends nothing,
  a keep-alive connection left idle, a request stalled mid-way) and the time
  a request may take to arrive in full, so a client trickling a byte at a
  time cannot hold its socket forever. Clients reconnect when an idle
  keep-alive connection is closed (swtpm and the XenAPI SDK do).
- ``Connection: close`` is honoured by Twisted's HTTPChannel; keep-alive too.
- There is no access log of the combined format (it would need a log file and
  a once-a-second timer per socket); each request is logged at debug level
  with its method, path and code only — never a body.
"""

from __future__ import annotations

from collections.abc import Callable
from io import BytesIO

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.web import http
from twisted.web.resource import IResource
from twisted.web.server import Request, Site
from werkzeug.exceptions import HTTPException, MethodNotAllowed

__all__ = ["DomainSite", "MAX_BODY", "DEFAULT_TIMEOUT", "plain_response", "routing_error_response"]

#: SPEC §4: request bodies (and swtpm's states) are limited to 1 MiB.
MAX_BODY = 1024 * 1024
#: Seconds of silence, or of request arrival, before a client is dropped.
DEFAULT_TIMEOUT = 60.0

_TOO_LARGE = (
    b"HTTP/1.1 413 Request Entity Too Large\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: 24\r\n"
    b"Connection: close\r\n\r\n"
    b"request body over limit\n"
)
assert len(b"request body over limit\n") == 24


class _LimitedRequest(Request):
    """Keeps the body in memory and refuses a chunked body over the limit."""

    _received = 0

    def gotLength(self, length: int | None) -> None:
        # The channel already refused a Content-Length over the limit, so the
        # body is bounded: no temporary file holding VM state.
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        channel = self.channel
        if not isinstance(channel, _LimitedChannel) or channel.refused:
            return
        self._received += len(data)
        if self._received > channel.max_body:
            channel.refuse_too_large()
            return
        super().handleContentChunk(data)


class _LimitedChannel(http.HTTPChannel):
    """An HTTPChannel with a body limit and a whole-request deadline."""

    max_body = MAX_BODY
    request_timeout: float | None = DEFAULT_TIMEOUT
    refused = False
    _deadline: IDelayedCall | None = None
    _log = Logger()

    def dataReceived(self, data: bytes) -> None:
        if self.refused:
            return
        if (
            data
            and self._deadline is None
            and not self._handlingRequest
            and self.request_timeout is not None
        ):
            # The first bytes of a request: it must be complete in time.
            self._deadline = self.callLater(self.request_timeout, self._request_too_slow)
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if not self.refused:
            super().lineReceived(line)

    def rawDataReceived(self, data: bytes) -> None:
        if not self.refused:
            super().rawDataReceived(data)

    def allHeadersReceived(self) -> None:
        if self.length is not None and self.length > self.max_body:
            self.refuse_too_large()
            return
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        if self.refused:
            return
        self._cancel_deadline()
        super().allContentReceived()

    def refuse_too_large(self) -> None:
        """Answer 413 and drop the connection without reading the rest."""
        self.refused = True
        self._cancel_deadline()
        self._log.info("Refused a request body over {limit} bytes", limit=self.max_body)
        self.transport.write(_TOO_LARGE)
        self.loseConnection()

    def _request_too_slow(self) -> None:
        self._deadline = None
        self._log.info("Request not received in {seconds}s: dropping the client",
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

    def connectionLost(self, reason: object) -> None:
        self._cancel_deadline()
        super().connectionLost(reason)


class DomainSite(Site):
    """A :class:`Site` for one domain socket.

    :param resource: what requests are served by (a Klein resource).
    :param reactor: drives the timeouts (a ``Clock`` in tests).
    :param max_body: largest accepted request body, in bytes.
    :param timeout: seconds a connection may stay silent, and seconds a
        request may take to arrive in full.
    :param on_connection: called for every accepted connection (the
        daemon's activity count).
    """

    noisy = False
    protocol = _LimitedChannel  # type: ignore[assignment]
    requestFactory = _LimitedRequest
    _log = Logger()

    def __init__(
        self,
        resource: IResource,
        *,
        reactor: IReactorTime,
        max_body: int = MAX_BODY,
        timeout: float = DEFAULT_TIMEOUT,
        on_connection: Callable[[], None] | None = None,
    ) -> None:
        self._on_connection = on_connection
        super().__init__(
            resource,
            requestFactory=_LimitedRequest,
            parsePOSTFormSubmission=False,
            reactor=reactor,
            timeout=timeout,
        )
        self.max_body = max_body

    def buildProtocol(self, addr: object) -> _LimitedChannel:
        if self._on_connection is not None:
            self._on_connection()
        channel = _LimitedChannel()
        channel.factory = self
        channel.site = self
        channel.requestFactory = self.requestFactory
        channel.max_body = self.max_body
        channel.request_timeout = self.timeOut
        channel.timeOut = self.timeOut
        channel.callLater = self.reactor.callLater  # type: ignore[method-assign]
        return channel

    def startFactory(self) -> None:
        """No access-log file and no once-a-second date timer."""

    def stopFactory(self) -> None:
        """Nothing to release (see :meth:`startFactory`)."""

    def log(self, request: http.Request) -> None:
        self._log.debug(
            "{method} {path} -> {code}",
            method=request.method.decode("ascii", "replace"),
            path=request.path.decode("ascii", "replace")[:100],
            code=request.code,
        )


def plain_response(request: http.Request, code: int, text: str) -> bytes:
    """A short text answer with a Content-Length (never chunked): the body
    the Klein apps give for their HTTP errors."""
    body = (text.rstrip("\n") + "\n").encode("utf-8")
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"content-length", b"%d" % len(body))
    return body


def routing_error_response(request: http.Request, error: HTTPException) -> bytes:
    """werkzeug's routing errors as the domain apps answer them: 404 for an
    unknown path, 405 with ``Allow`` for a method the route does not take."""
    if isinstance(error, MethodNotAllowed) and error.valid_methods:
        request.setHeader(b"allow", ", ".join(error.valid_methods).encode("ascii"))
    return plain_response(request, error.code or 500, error.name)
