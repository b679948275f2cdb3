"""Clients that keep writing through VMs' sockets while xguard restarts,
for the handover tests and bench/restart.py (issue 12).

Each client is a thread writing numbered versions of one item, one request
at a time, and keeps count of what a VM would see:

- :class:`VarstoredClient` behaves like varstored: a new connection per
  request (``Connection: close``), ``VM.set_NVRAM_EFI_variables``, and no
  retry — any failure is a failed guest operation;
- :class:`SwtpmClient` behaves like swtpm: one kept-alive connection, a
  PUT of ``permall`` per request; when the server closed the kept-alive
  connection in between, the request is sent once more on a new one (swtpm
  reconnects on a broken connection; the request never reached the
  server). A refused connection or any other error counts as failed.

``refused`` counts connections refused or finding no socket file (what a
restart did before the handover); ``failed`` every other failure;
``acked`` the last version answered with success (versions go in order, so
it must be the version upstream ends with). Latencies are per request,
retries included.
"""

from __future__ import annotations

import base64
import http.client
import threading
import time
import xmlrpc.client
from collections.abc import Sequence

import attrs

from xguard.testing.unixhttp import UnixHTTPConnection

__all__ = ["Stats", "VarstoredClient", "SwtpmClient", "Load", "totals", "nvram_value",
           "tpm_value"]

REFUSED = (ConnectionRefusedError, FileNotFoundError)
#: A kept-alive connection the server closed while idle fails one of these
#: ways when it is used again, before any answer.
STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


def nvram_value(vm: str, version: int) -> str:
    return base64.b64encode(f"{vm}-nvram-{version}".encode()).decode()


def tpm_value(vm: str, version: int) -> bytes:
    return base64.b64encode(f"{vm}-permall-{version}".encode())


@attrs.define
class Stats:
    kind: str
    vm: str
    ok: int = 0
    refused: int = 0
    failed: int = 0
    retried: int = 0
    acked: int = 0
    #: Per request: perf_counter() when it started, how long it took, and
    #: how it ended ("ok", "refused", "failed").
    starts: list[float] = attrs.Factory(list)
    latencies: list[float] = attrs.Factory(list)
    outcomes: list[str] = attrs.Factory(list)
    errors: list[str] = attrs.Factory(list)

    @property
    def worst(self) -> float:
        return max(self.latencies, default=0.0)


class _Client(threading.Thread):
    kind = ""

    def __init__(self, path: str, vm: str, *, pause: float = 0.0, offset: float = 0.0,
                 timeout: float = 30.0) -> None:
        super().__init__(name=f"{self.kind}-{vm[:8]}", daemon=True)
        self.path = path
        self.vm = vm
        self.pause = pause
        self.offset = offset
        self.timeout = timeout
        self.stats = Stats(self.kind, vm)
        self.stopping = threading.Event()

    def run(self) -> None:
        version = 0
        self.stopping.wait(self.offset)
        while not self.stopping.is_set():
            version += 1
            started = time.perf_counter()
            outcome = "ok"
            retried = self.stats.retried
            try:
                self.request(version)
            except REFUSED as e:
                outcome = "refused"
                self.stats.refused += 1
                self._error(version, e)
            except Exception as e:
                outcome = "failed"
                self.stats.failed += 1
                self._error(version, e)
            else:
                self.stats.ok += 1
                self.stats.acked = version
            self.stats.starts.append(started)
            self.stats.latencies.append(time.perf_counter() - started)
            self.stats.outcomes.append(outcome + ("+resent" if self.stats.retried > retried
                                                  else ""))
            if self.pause:
                self.stopping.wait(self.pause)
        self.close()

    def _error(self, version: int, error: BaseException) -> None:
        if len(self.stats.errors) < 5:
            self.stats.errors.append(f"{self.kind} {self.vm[:8]} #{version}: "
                                     f"{type(error).__name__}: {error}")

    def request(self, version: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class VarstoredClient(_Client):
    kind = "varstored"

    def request(self, version: int) -> None:
        body = xmlrpc.client.dumps(("OpaqueRef:s", "OpaqueRef:vm",
                                    nvram_value(self.vm, version)),
                                   "VM.set_NVRAM_EFI_variables").encode()
        conn = UnixHTTPConnection(self.path, timeout=self.timeout)
        try:
            conn.request("POST", "/", body, {"Connection": "close", "Content-Type": "text/xml"})
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}")
        (answer,), _ = xmlrpc.client.loads(data)
        if not isinstance(answer, dict):
            raise RuntimeError(f"not an xapi answer: {answer!r}")
        if answer.get("Status") != "Success":
            raise RuntimeError(f"Failure {answer.get('ErrorDescription')}")


class SwtpmClient(_Client):
    kind = "swtpm"

    def __init__(self, path: str, vm: str, **kwargs: float) -> None:
        super().__init__(path, vm, **kwargs)
        self.conn: UnixHTTPConnection | None = None

    def request(self, version: int) -> None:
        body = tpm_value(self.vm, version)
        reused = self.conn is not None
        try:
            status = self._put(body)
        except STALE:
            if not reused:
                raise
            self.stats.retried += 1
            self.close()
            status = self._put(body)
        if status != 204:
            raise RuntimeError(f"HTTP {status}")

    def _put(self, body: bytes) -> int:
        if self.conn is None:
            self.conn = UnixHTTPConnection(self.path, timeout=self.timeout)
            self.conn.connect()
        try:
            self.conn.request("PUT", "/tpm2-00.permall", body,
                              {"Content-Type": "application/octet-stream"})
            response = self.conn.getresponse()
            response.read()
        except BaseException:
            self.close()
            raise
        if response.will_close:
            self.close()
        return response.status

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class Load:
    """Clients writing until :meth:`stop`.

    :param targets: ``(kind, socket path, vm uuid)`` with kind ``swtpm`` or
        ``varstored``.
    :param pause: seconds each client waits between two requests; the
        clients' first requests are spread over one pause, so they do not
        all write at the same moment.
    """

    def __init__(self, targets: Sequence[tuple[str, str, str]], *, pause: float = 0.0) -> None:
        kinds = {"swtpm": SwtpmClient, "varstored": VarstoredClient}
        n = len(targets)
        self.clients = [kinds[kind](path, vm, pause=pause, offset=pause * i / max(n, 1))
                        for i, (kind, path, vm) in enumerate(targets)]

    def start(self) -> "Load":
        for c in self.clients:
            c.start()
        return self

    def stop(self) -> list[Stats]:
        for c in self.clients:
            c.stopping.set()
        for c in self.clients:
            c.join(60)
        return [c.stats for c in self.clients]

    def requests(self) -> int:
        return sum(c.stats.ok + c.stats.refused + c.stats.failed for c in self.clients)

    def wait_requests(self, n: int, timeout: float = 30.0) -> None:
        """Wait until ``n`` more requests were made (the load is flowing)."""
        target = self.requests() + n
        deadline = time.monotonic() + timeout
        while self.requests() < target:
            if time.monotonic() > deadline:
                raise AssertionError(f"the load made {self.requests()} requests, "
                                     f"not {target}, in {timeout}s")
            time.sleep(0.02)


def totals(stats: Sequence[Stats], since: float = float("-inf"),
           until: float = float("inf")) -> dict[str, object]:
    """One summary of every client's requests started between ``since``
    and ``until`` (perf_counter() times)."""
    records = [(latency, outcome) for s in stats
               for start, latency, outcome in zip(s.starts, s.latencies, s.outcomes)
               if since <= start < until]
    latencies = sorted(latency for latency, _ in records)
    outcomes = [outcome for _, outcome in records]
    return {
        "requests": len(records),
        "ok": sum(o.startswith("ok") for o in outcomes),
        "refused": sum(o.startswith("refused") for o in outcomes),
        "failed": sum(o.startswith("failed") for o in outcomes),
        "retried_keepalive": sum(o.endswith("+resent") for o in outcomes),
        "worst_latency_s": latencies[-1] if latencies else 0.0,
        "p99_latency_s": latencies[int(0.99 * (len(latencies) - 1))] if latencies else 0.0,
        "p50_latency_s": latencies[len(latencies) // 2] if latencies else 0.0,
        "errors": [e for s in stats for e in s.errors][:5],
    }
