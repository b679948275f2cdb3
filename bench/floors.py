"""Floors: the least work each scenario could possibly cost on this
machine, measured in the same run as xguard.

- :class:`BareServer`: a bare ``twisted.web`` server on a UNIX socket that
  reads a PUT body and answers 204 (no routing, validation or storage), run
  as its own process like the daemon. ``python bench/floors.py serve PATH``.
- :func:`durable_write`: one atomic durable write of a file (write ``.pre``,
  fsync, rename, fsync the directory), in the runner.
- :func:`sim_calls_floor`: the time the simulator needs to serve a given
  list of JSON-RPC calls with a given concurrency, over kept-alive
  connections, from the runner.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from typing import Any

if __name__ == "__main__":  # run as a script: use the repository's code
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.clients import RawHTTP, connect, jsonrpc_body  # noqa: E402


class BareServer:
    """``python bench/floors.py serve PATH`` as a child process."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> "BareServer":
        env = dict(os.environ)
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
        argv = [sys.executable, os.path.abspath(__file__), "serve", self.path]
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.path)
                return self
            except OSError:
                time.sleep(0.02)
            finally:
                s.close()
        raise RuntimeError("bare server did not start")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def serve(path: str) -> None:
    """The bare server itself: twisted.web, one leaf resource, 204 on PUT."""
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    class Bare(Resource):
        isLeaf = True

        def render_PUT(self, request: Any) -> bytes:
            request.content.read()
            request.setResponseCode(204)
            return b""

    if os.path.exists(path):
        os.unlink(path)
    site = Site(Bare())
    site.noisy = False
    reactor.listenUNIX(path, site)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


def durable_replace(directory: str, name: str, data: bytes, previous: str | None) -> None:
    """What a cached write of a key must do on disk, and nothing else: the
    new version durable (``.pre``, fsync, rename, directory fsync), then the
    previous version of the key unlinked (no fsync of its own: the newer
    version beside it is durable, see doc/cache.md)."""
    durable_write(directory, name, data)
    if previous is not None:
        os.unlink(os.path.join(directory, previous))


def durable_write(directory: str, name: str, data: bytes) -> None:
    """The durable part of a cached write, nothing else."""
    path = os.path.join(directory, name)
    fd = os.open(path + ".pre", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(path + ".pre", path)
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


async def sim_calls_floor(reactor: Any, sim_socket: str, session: str,
                          jobs: list[list[tuple[str, list[Any]]]], concurrency: int) -> float:
    """Seconds for the simulator to serve ``jobs`` (each a sequence of
    dependent calls, e.g. get then set of one vTPM) with ``concurrency``
    jobs in flight, one kept-alive connection per worker."""
    from twisted.internet.defer import gatherResults

    queue = list(reversed(jobs))

    async def worker() -> None:
        proto: RawHTTP = await connect(reactor, sim_socket)
        ids = 0
        while queue:
            job = queue.pop()
            for method, params in job:
                ids += 1
                status, body = await proto.request(jsonrpc_body(method, [session, *params], ids))
                if status != 200 or b'"error"' in body[:40]:
                    raise RuntimeError(f"{method}: {status} {body[:200]!r}")
        proto.transport.loseConnection()  # type: ignore[union-attr]

    from twisted.internet.defer import ensureDeferred

    t = time.perf_counter()
    await gatherResults([ensureDeferred(worker()) for _ in range(concurrency)])
    return time.perf_counter() - t


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2])
    else:
        sys.exit("usage: floors.py serve PATH")
