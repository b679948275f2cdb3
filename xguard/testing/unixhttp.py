"""Blocking HTTP over a UNIX socket, for tests and benchmarks.

The standard library speaks HTTP over TCP only; xguard's sockets, the xapi
simulator and xapi itself listen on UNIX sockets. These helpers let plain
blocking clients (``http.client``, ``xmlrpc.client``, the XenAPI SDK) reach
them::

    status, headers, body = request("/tmp/x/sock", "GET", "/tpm2-00.permall")
    proxy = xmlrpc.client.ServerProxy("http://localhost/", transport=UnixTransport(path))
    session = XenAPI.Session("http://localhost/", transport=UnixTransport(path))

:class:`UnixTransport` keeps its connection alive across calls, as the
XenAPI SDK's own transport does, so many calls share one connection.
"""

from __future__ import annotations

import http.client
import socket
import xmlrpc.client
from collections.abc import Mapping
from typing import Any

__all__ = ["UnixHTTPConnection", "UnixTransport", "request"]


class UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTPConnection whose ``connect()`` opens ``path`` (AF_UNIX).
    The ``Host`` header says ``localhost``; servers on UNIX sockets ignore it."""

    def __init__(self, path: str, timeout: float | None = None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def request(path: str, method: str, url: str, body: bytes | None = None,
            headers: Mapping[str, str] | None = None,
            timeout: float | None = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection: ``(status, headers, body)``.
    Header names are lower-cased."""
    conn = UnixHTTPConnection(path, timeout=timeout)
    try:
        conn.request(method, url, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


class UnixTransport(xmlrpc.client.Transport):
    """An xmlrpc Transport that reaches ``path`` whatever host the URL names.

    It reuses one keep-alive connection (the base class reconnects once if
    the server closed it between calls).
    """

    def __init__(self, path: str, timeout: float | None = None) -> None:
        super().__init__()
        self.unix_path = path
        self.timeout = timeout

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        kept = self._connection
        if kept and kept[1] is not None and host == kept[0]:
            return kept[1]
        connection = UnixHTTPConnection(self.unix_path, timeout=self.timeout)
        self._connection = host, connection
        return connection
