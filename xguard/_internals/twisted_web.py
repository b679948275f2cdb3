"""twisted.web internals xguard relies on.

Client side (xapi's JSON-RPC): how a request failed decides whether xapi
must be considered unreachable (retry later) or whether a call may be sent
once more on a fresh connection. ``twisted.web.client`` re-exports some of
these names; ``RequestNotSent``, ``ConnectionAborted`` and ``ParseError``
exist only in the private ``_newclient``.

Server side (the domain sockets): :class:`ChannelBase` is HTTPChannel with
public names for the private state and hooks the domain channel reads or
overrides (the request line, the transfer decoder, whether a request is
being handled, the pipelined input it buffers, its bad-request answer, its
logger), so :mod:`xguard.domain.site` uses none of them directly.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.web import _newclient, http

__all__ = ["NO_ANSWER", "STALE_CONNECTION", "ResponseDone", "ChannelBase", "set_logger"]

#: Failures that mean the request got no (complete) answer from the server:
#: connection reset or lost, request not sent, garbled HTTP from a dying
#: server. ``ResponseFailed`` includes ``ResponseNeverReceived``.
NO_ANSWER: tuple[type[BaseException], ...] = (
    _newclient.ResponseFailed,
    _newclient.RequestTransmissionFailed,
    _newclient.RequestNotSent,
    _newclient.ConnectionAborted,
    _newclient.ParseError,
)

#: A kept-alive connection that the server closed while idle fails this way
#: before anything reached the server: such a call is safely sent again.
STALE_CONNECTION: tuple[type[BaseException], ...] = (
    _newclient.ResponseNeverReceived,
    _newclient.RequestTransmissionFailed,
)

#: How a response body's end is reported to its protocol.
ResponseDone = _newclient.ResponseDone


def set_logger(obj: Any, logger: Logger) -> None:
    """Make a twisted.web object (a channel, a request) log through
    ``logger``: both keep their Logger as ``_log``."""
    obj._log = logger


class ChannelBase(http.HTTPChannel):
    """HTTPChannel with public names for what a subclass reads and hooks.

    Hooks a subclass overrides: :meth:`header_received` (each header, for
    the subclass to choose the body's framing) and :meth:`bad_request`
    (Twisted found the request line or a header malformed)."""

    # -- state -------------------------------------------------------------------
    @property
    def log(self) -> Logger:
        """What twisted.web logs about this connection goes here (see
        :func:`set_logger`)."""
        return self._log

    @property
    def handling_request(self) -> bool:
        """A request was received in full and is being answered."""
        return bool(self._handlingRequest)

    @property
    def waiting_for_transport(self) -> bool:
        """The transport's write buffer is full (the channel paused reading)."""
        return bool(self._waitingForTransport)

    @property
    def buffered_bytes(self) -> int:
        """Pipelined input held while a request is being answered."""
        return sum(map(len, self._dataBuffer))

    @property
    def eager_read_limit(self) -> int:
        """Bytes of pipelined input read before the channel pauses."""
        return int(self._optimisticEagerReadSize)

    @property
    def request_version(self) -> bytes:
        """The HTTP version of the request line being received."""
        return bytes(self._version)

    @property
    def request_target(self) -> bytes:
        """The target of the request line being received."""
        return bytes(self._path)

    @request_target.setter
    def request_target(self, target: bytes) -> None:
        self._path = target

    # -- framing -----------------------------------------------------------------
    def use_decoder(self, decoder: Any) -> None:
        """Decode the body with ``decoder`` (given ``finish_body`` as its end)."""
        self._transferDecoder = decoder

    def finish_body(self, rest: bytes) -> None:
        """A decoder's end: the body is complete, ``rest`` is the next request's."""
        self._finishRequestBody(rest)  # type: ignore[no-untyped-call]

    def use_content_length(self, length: int) -> None:
        """Decode a body of ``length`` bytes, the ordinary way."""
        super()._maybeChooseTransferDecoder(  # type: ignore[no-untyped-call]
            b"Content-Length", b"%d" % length)

    def header_received(self, name: bytes, value: bytes) -> bool:
        """A header of the request was received (each one, in order): the
        body's framing is this hook's to choose (by default Twisted's own
        choice; an override calls :meth:`use_content_length` or
        :meth:`use_decoder`). False refuses the request."""
        return bool(super()._maybeChooseTransferDecoder(  # type: ignore[no-untyped-call]
            name, value))

    def bad_request(self) -> None:
        """The request line or a header is malformed (Twisted answers 400
        and closes, unless overridden)."""
        super()._respondToBadRequestAndDisconnect()  # type: ignore[no-untyped-call]

    # -- Twisted's private hooks, routed to the public ones ------------------------
    def _maybeChooseTransferDecoder(self, header: bytes, data: bytes) -> bool:
        return self.header_received(header, data)

    def _respondToBadRequestAndDisconnect(self) -> None:
        self.bad_request()
