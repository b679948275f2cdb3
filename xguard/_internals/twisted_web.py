"""twisted.web internals xguard relies on.

Client side (xapi's JSON-RPC): how a request failed decides whether xapi
must be considered unreachable (retry later) or whether a call may be sent
once more on a fresh connection. ``twisted.web.client`` re-exports some of
these names; ``RequestNotSent``, ``ConnectionAborted`` and ``ParseError``
exist only in the private ``_newclient``.
"""

from __future__ import annotations

from twisted.web import _newclient

__all__ = ["NO_ANSWER", "STALE_CONNECTION", "ResponseDone"]

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
