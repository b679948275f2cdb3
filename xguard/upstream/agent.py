# -*- test-case-name: tests.unit.test_xapi -*-
"""HTTP clients for xapi's JSON-RPC endpoint.

An endpoint string names where xapi listens: ``unix:/var/lib/xcp/xapi``
(HTTP over that UNIX socket, xapi's local superuser channel),
``http://host[:port]`` or ``https://host[:port]``. Every client keeps its
connections alive in an :class:`HTTPConnectionPool`: the domain sockets make
many small calls, and a TCP/TLS handshake per call would dominate them.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from treq.client import HTTPClient
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IReactorTime, IReactorUNIX, IStreamClientEndpoint
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from xguard.interfaces import IClientReactor

try:  # treq 25 types its jar as its own CookieJar subclass
    from treq.cookies import IndexableCookieJar as _TreqJar
except ImportError:  # pragma: no cover - treq 24 takes any CookieJar
    from http.cookiejar import CookieJar as _TreqJar  # type: ignore[assignment]

__all__ = ["MAX_PERSISTENT_PER_HOST", "NoCookies", "make_pool", "make_client",
           "parse_endpoint"]

#: Keep-alive connections per target; benchmarks run dozens of concurrent
#: calls and xapi serves each connection on its own thread.
MAX_PERSISTENT_PER_HOST = 24

#: Seconds an idle kept-alive connection stays cached (xapi closes idle
#: connections on its side after a while anyway).
CACHED_CONNECTION_TIMEOUT = 60

#: Seconds allowed to establish a connection; each call's own deadline
#: (``--xapi-timeout``) still applies on top of it.
CONNECT_TIMEOUT = 30

# The Host of a UNIX-socket request is meaningless; xapi ignores it.
_UNIX_URL = "http://localhost/jsonrpc"


class NoCookies(_TreqJar):
    """A cookie jar that keeps nothing: xapi's JSON-RPC carries its session
    in the call, never in a cookie, so treq's cookie handling (a jar
    consulted and fed on every call) is work for nothing."""

    def add_cookie_header(self, request: Any) -> None:
        pass

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass


@implementer(IAgentEndpointFactory)
class _UnixEndpointFactory:
    """Every URI goes to the one UNIX socket (the URI only names the path)."""

    def __init__(self, reactor: IReactorUNIX, path: str) -> None:
        self._reactor = reactor
        self._path = path

    def endpointForURI(self, uri: Any) -> UNIXClientEndpoint:
        return UNIXClientEndpoint(self._reactor, self._path, timeout=CONNECT_TIMEOUT)


def parse_endpoint(endpoint: str) -> tuple[str, str]:
    """Split an endpoint string into (kind, target): ``("unix", path)`` or
    ``("http"|"https", "host[:port]")``.

    :raises ValueError: with a message naming the accepted forms.
    """
    forms = "expected unix:/path/to/socket, http://host[:port] or https://host[:port]"
    if not isinstance(endpoint, str) or not endpoint:
        raise ValueError(f"empty xapi endpoint; {forms}")
    if "\x00" in endpoint or any(c.isspace() for c in endpoint):
        raise ValueError(f"invalid xapi endpoint {endpoint!r}; {forms}")
    if endpoint.startswith("unix:"):
        path = endpoint[len("unix:"):]
        if not path.startswith("/"):
            raise ValueError(f"xapi endpoint {endpoint!r}: the socket path must be absolute")
        return "unix", path
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"unsupported xapi endpoint {endpoint!r}; {forms}")
    try:
        parts.port  # noqa: B018 - validates the port (raises ValueError)
    except ValueError as e:
        raise ValueError(f"xapi endpoint {endpoint!r}: {e}") from None
    if (not parts.hostname or parts.username is not None or parts.password is not None
            or parts.path not in ("", "/") or parts.query or parts.fragment):
        raise ValueError(f"invalid xapi endpoint {endpoint!r}; {forms}")
    return parts.scheme, parts.netloc


@implementer(IStreamClientEndpoint)
class _QuietEndpoint:
    """Connects with the factory made quiet: the pool makes a new client
    factory per connection, and Twisted's factories log "Starting factory"
    and "Stopping factory" for each, which during an outage is two lines
    per retry."""

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint

    def connect(self, protocolFactory: Any) -> Any:
        protocolFactory.noisy = False
        return self._endpoint.connect(protocolFactory)


class _QuietPool(HTTPConnectionPool):
    """An HTTPConnectionPool whose connections do not log (see
    :class:`_QuietEndpoint`); the pool's public ``getConnection`` is the one
    place every new connection's endpoint passes through."""

    def getConnection(self, key: Any, endpoint: IStreamClientEndpoint) -> Any:
        return super().getConnection(key, _QuietEndpoint(endpoint))


def make_pool(reactor: IReactorTime) -> HTTPConnectionPool:
    """A keep-alive pool sized for many concurrent calls to one xapi, whose
    connections log nothing of their own."""
    pool = _QuietPool(reactor, persistent=True)  # type: ignore[no-untyped-call]  # Twisted's
    pool.maxPersistentPerHost = MAX_PERSISTENT_PER_HOST
    pool.cachedConnectionTimeout = CACHED_CONNECTION_TIMEOUT
    return pool


def make_client(
    reactor: IClientReactor,
    endpoint: str,
    *,
    pool: HTTPConnectionPool | None = None,
    tls_policy: IPolicyForHTTPS | None = None,
) -> tuple[HTTPClient, str]:
    """A treq client for ``endpoint`` and the URL of its ``/jsonrpc``.

    :param pool: the connection pool to use; pass one you keep when you need
        to close its connections later (a fresh one is made otherwise).
    :param tls_policy: for ``https``; Twisted's browser-like certificate
        verification by default.
    :raises ValueError: for a malformed endpoint string.
    """
    kind, target = parse_endpoint(endpoint)
    if pool is None:
        pool = make_pool(reactor)
    if kind == "unix":
        agent = Agent.usingEndpointFactory(
            reactor, _UnixEndpointFactory(reactor, target), pool=pool)
        return HTTPClient(agent, cookiejar=NoCookies()), _UNIX_URL
    kwargs: dict[str, Any] = {"pool": pool, "connectTimeout": CONNECT_TIMEOUT}
    if tls_policy is not None:
        kwargs["contextFactory"] = tls_policy
    return (HTTPClient(Agent(reactor, **kwargs), cookiejar=NoCookies()),
            f"{kind}://{target}/jsonrpc")
