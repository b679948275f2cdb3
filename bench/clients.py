"""Load-generating clients, shared by the xguard measurements and their
floors so the client's own cost is the same on both sides of a ratio.

- :func:`blocking_request`: one request on a fresh UNIX connection with
  ``Connection: close``, read until the server closes (varstored's way).
- :class:`KeepAlive`: sequential requests on one kept-alive connection
  (swtpm's way), for the latency scenarios.
- :class:`RawHTTP`: a minimal Twisted HTTP/1.1 client protocol (keep-alive,
  Content-Length or chunked bodies), used where many clients run at once.
- :class:`JsonRpc`: xapi's JSON-RPC over a kept-alive blocking connection,
  for floors made directly against the simulator.
- request builders for the swtpm and varstored wire formats.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.protocols import amp

from xguard.model import TpmKey, TpmState
from xguard.testing.unixhttp import UnixHTTPConnection

KEYS = ("tpm2-00.permall", "tpm2-00.savestate", "tpm2-00.volatilestate")


# -- request bytes ------------------------------------------------------------
def http_request(method: str, path: str, body: bytes = b"", *, close: bool,
                 content_type: str = "application/octet-stream") -> bytes:
    head = [f"{method} {path} HTTP/1.1", "Host: localhost"]
    if body or method in ("PUT", "POST"):
        head += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
    if close:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


def swtpm_put(key: int, body: bytes, *, close: bool = True) -> bytes:
    return http_request("PUT", "/" + KEYS[key], body, close=close)


def swtpm_get(key: int, *, close: bool = False) -> bytes:
    return http_request("GET", "/" + KEYS[key], close=close)


def xmlrpc_call(method: str, *params: str) -> bytes:
    """A varstored-style XML-RPC request (bare ``<value>`` strings, no
    whitespace), on its own connection as varstored sends it."""
    values = "".join(f"<param><value>{p}</value></param>" for p in params)
    body = (f'<?xml version="1.0"?><methodCall><methodName>{method}</methodName>'
            f"<params>{values}</params></methodCall>").encode()
    return http_request("POST", "/", body, close=True, content_type="text/xml")


# -- blocking, one request per connection -------------------------------------
def blocking_request(path: str, data: bytes, timeout: float = 30.0) -> tuple[int, bytes]:
    """Send ``data`` (a whole request with ``Connection: close``) on a new
    connection and read until the server closes: ``(status, raw response)``."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(data)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        s.close()
    raw = b"".join(chunks)
    return int(raw[9:12] or 0), raw


class KeepAlive:
    """Sequential requests on one kept-alive UNIX connection, as swtpm
    makes them (one connection per process, reconnect if closed)."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = b""

    def _connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.path)
        self._sock, self._buf = s, b""
        return s

    def request(self, data: bytes) -> int:
        """Send ``data`` (a whole request without ``Connection: close``)
        and read one answer with a Content-Length; returns its status."""
        s = self._sock or self._connect()
        try:
            s.sendall(data)
            return self._answer(s)
        except (OSError, ConnectionError):
            self.close()
            s = self._connect()  # the server closed an idle connection: retry once
            s.sendall(data)
            return self._answer(s)

    def _answer(self, s: socket.socket) -> int:
        while b"\r\n\r\n" not in self._buf:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("closed before the answer")
            self._buf += chunk
        head, _, rest = self._buf.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("closed mid-body")
            rest += chunk
        self._buf = rest[length:]
        return int(head[9:12])

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def timed(f: Any, *args: Any) -> tuple[float, Any]:
    t = time.perf_counter()
    result = f(*args)
    return time.perf_counter() - t, result


# -- Twisted, keep-alive ----------------------------------------------------------
class RawHTTP(Protocol):
    """Sequential requests on one connection; ``request(bytes)`` fires with
    ``(status, body)``. Just enough HTTP/1.1 for our servers' answers."""

    def __init__(self) -> None:
        self.buf = b""
        self.waiting: Deferred[tuple[int, bytes]] | None = None
        self.closed = False
        self.lost: Deferred[None] = Deferred()

    def request(self, data: bytes) -> "Deferred[tuple[int, bytes]]":
        assert self.waiting is None, "one request at a time"
        self.waiting = Deferred()
        d = self.waiting
        self.transport.write(data)  # type: ignore[union-attr]
        return d

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        self._parse(eof=False)

    def connectionLost(self, reason: Any) -> None:  # type: ignore[override]
        self.closed = True
        self._parse(eof=True)
        if self.waiting is not None:
            d, self.waiting = self.waiting, None
            d.errback(reason)
        self.lost.callback(None)

    def _parse(self, eof: bool) -> None:
        if self.waiting is None:
            return
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buf[:end].split(b"\r\n")
        status = int(head[0][9:12])
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        start = end + 4
        if b"content-length" in headers:
            n = int(headers[b"content-length"])
            if len(self.buf) < start + n:
                return
            body, self.buf = self.buf[start:start + n], self.buf[start + n:]
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            parsed = _dechunk(self.buf, start)
            if parsed is None:
                return
            body, rest = parsed
            self.buf = self.buf[rest:]
        elif status in (204, 304) or status < 200:
            body, self.buf = b"", self.buf[start:]
        elif eof:
            body, self.buf = self.buf[start:], b""
        else:
            return
        d, self.waiting = self.waiting, None
        d.callback((status, body))


def _dechunk(buf: bytes, pos: int) -> tuple[bytes, int] | None:
    out = []
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(buf[pos:eol].split(b";")[0], 16)
        pos = eol + 2
        if size == 0:
            end = buf.find(b"\r\n", pos)  # no trailers from our servers
            return (b"".join(out), end + 2) if end >= 0 else None
        if len(buf) < pos + size + 2:
            return None
        out.append(buf[pos:pos + size])
        pos += size + 2


async def connect(reactor: Any, path: str) -> RawHTTP:
    return await connectProtocol(UNIXClientEndpoint(reactor, path, timeout=60), RawHTTP())


async def one_shot(reactor: Any, path: str, data: bytes) -> tuple[int, bytes]:
    """A request with ``Connection: close`` on its own connection."""
    proto = await connect(reactor, path)
    return await proto.request(data)


async def amp_connect(reactor: Any, path: str) -> amp.AMP:
    return await connectProtocol(UNIXClientEndpoint(reactor, path, timeout=60), amp.AMP())


# -- JSON-RPC against the simulator, blocking -------------------------------------
class JsonRpc:
    """xapi's JSON-RPC on one kept-alive connection (what xguard's treq
    client does, minus Twisted): the floor's upstream half."""

    def __init__(self, path: str) -> None:
        self.conn = UnixHTTPConnection(path, timeout=30)
        self.ids = 0
        self.session = self.call("session.login_with_password", "root", "", "2.21", "bench")

    def call(self, method: str, *params: Any) -> Any:
        self.ids += 1
        body = json.dumps({"jsonrpc": "2.0", "method": method, "params": list(params),
                           "id": self.ids}, separators=(",", ":")).encode()
        self.conn.request("POST", "/jsonrpc", body=body,
                          headers={"Content-Type": "application/json",
                                   "Accept": "application/json"})
        resp = self.conn.getresponse()
        doc = json.loads(resp.read())
        if "error" in doc and doc["error"]:
            raise RuntimeError(f"{method}: {doc['error']}")
        return doc["result"]

    def s(self, method: str, *params: Any) -> Any:
        return self.call(method, self.session, *params)

    def rmw(self, vtpm_ref: str, key: int, value: str) -> None:
        """One key's read-modify-write of a vTPM's contents string."""
        state = TpmState.deserialize(self.s("VTPM.get_contents", vtpm_ref))
        self.s("VTPM.set_contents", vtpm_ref, state.update({TpmKey(key): value}).serialize())

    def close(self) -> None:
        self.conn.close()


def jsonrpc_body(method: str, params: list[Any], call_id: int) -> bytes:
    body = json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": call_id},
                      separators=(",", ":")).encode()
    return http_request("POST", "/jsonrpc", body, close=False, content_type="application/json")
