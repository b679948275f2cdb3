"""A service manager for tests and benchmarks: what systemd does for a
``Type=notify`` unit with ``FileDescriptorStoreMax=``, for one daemon.

- It binds the notification socket once and keeps it across restarts, and
  receives on it in a thread, as PID 1 does: ``READY=1``, ``RELOADING=1``,
  ``STOPPING=1`` (with the sender's pid, from ``SCM_CREDENTIALS``), and the
  fd store's ``FDSTORE=1``/``FDNAME=`` (descriptors from ``SCM_RIGHTS``;
  a second copy of a socket already stored is dropped, as systemd does)
  and ``FDSTOREREMOVE=1``.
- :meth:`FakeSystemd.start` starts the daemon with the stored descriptors
  at 3, 4 … and ``LISTEN_FDS``/``LISTEN_FDNAMES``/``LISTEN_PID``. The pid
  is the daemon's own, known only in the child: the daemon is started
  through a tiny launcher (:mod:`xguard.testing.sdexec`), which places the
  descriptors, sets ``LISTEN_PID`` to its pid and execs the daemon's
  command line, as systemd's child does before ``execve``.
- :meth:`FakeSystemd.restart` is ``systemctl restart`` (SIGTERM, wait for
  the exit, start again: the store is kept); :meth:`FakeSystemd.reload`
  is ``systemctl reload`` with ``ExecReload=kill -HUP $MAINPID``.

``fdstore_max=0`` is a unit without the store (every FDSTORE=1 dropped,
and ``$FDSTORE=0`` announced as systemd 254+ would); ``announce=False``
leaves ``$FDSTORE`` unset, as older systemd does.
"""

from __future__ import annotations

import array
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

from xguard.testing.daemon import Daemon

__all__ = ["FakeSystemd", "Message", "receive"]

_UCRED = struct.Struct("iII")
_ANCILLARY = socket.CMSG_SPACE(253 * 4) + socket.CMSG_SPACE(_UCRED.size)


class Message(NamedTuple):
    """One notification: its ``KEY=value`` lines, the descriptors it
    carried, and the sender's pid (when the socket has SO_PASSCRED)."""

    fields: dict[str, str]
    fds: list[int]
    pid: int | None


def receive(sock: socket.socket, timeout: float) -> Message:
    """The next notification on ``sock``; TimeoutError if none comes."""
    ready, _, _ = select.select([sock], [], [], timeout)
    if not ready:
        raise TimeoutError
    data, ancillary, _, _ = sock.recvmsg(65536, _ANCILLARY, socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    pid = None
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(payload[:len(payload) - len(payload) % a.itemsize])
            fds.extend(a)
        elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid = _UCRED.unpack(payload[:_UCRED.size])[0]
    fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
    return Message(fields, fds, pid)


def _same_socket(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


class FakeSystemd:
    """Runs ``daemon`` as systemd runs xguard.service (see the module)."""

    def __init__(self, daemon: Daemon, *, fdstore_max: int = 16384,
                 announce: bool = True) -> None:
        self.daemon = daemon
        self.fdstore_max = fdstore_max
        self.announce = announce
        self.path = os.path.join(daemon.root, "notify.sd")
        if os.path.exists(self.path):
            os.unlink(self.path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(self.path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        #: (name, descriptor) in the order stored.
        self.store: list[tuple[str, int]] = []
        #: (pid, state) of every READY=1 / RELOADING=1 / STOPPING=1.
        self.states: list[tuple[int | None, str]] = []
        self.messages = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._receive_loop, name="fake-systemd",
                                        daemon=True)
        self._thread.start()

    # -- the notification socket ---------------------------------------------------
    def _receive_loop(self) -> None:
        while not self._closed:
            try:
                message = receive(self.sock, 0.1)
            except TimeoutError:
                continue
            except OSError:
                if self._closed:
                    return
                raise
            with self._cond:
                self._handle(message)
                self.messages += 1
                self._cond.notify_all()

    def _handle(self, message: Message) -> None:
        fields = message.fields
        if fields.get("FDSTORE") == "1":
            name = fields.get("FDNAME") or "stored"
            for fd in message.fds:
                if (len(self.store) >= self.fdstore_max
                        or any(_same_socket(fd, kept) for _, kept in self.store)):
                    os.close(fd)
                else:
                    self.store.append((name, fd))
            return
        for fd in message.fds:
            os.close(fd)
        if fields.get("FDSTOREREMOVE") == "1":
            removed = fields.get("FDNAME")
            for kept_name, fd in self.store:
                if kept_name == removed:
                    os.close(fd)
            self.store = [(n, fd) for n, fd in self.store if n != removed]
        for state in ("READY", "RELOADING", "STOPPING"):
            if fields.get(state) == "1":
                self.states.append((message.pid, state))

    def sync(self, timeout: float = 10.0) -> None:
        """Wait until every notification sent so far is handled (systemd
        handles a dead process's messages before its exit)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._cond:
                if not select.select([self.sock], [], [], 0)[0]:
                    return
            time.sleep(0.005)
        raise AssertionError("the fake systemd did not keep up with notifications")

    def wait_state(self, state: str, pid: int, since: int, timeout: float) -> None:
        """Wait for ``state`` from ``pid`` after ``states[since:]``."""
        def seen() -> bool:
            return (pid, state) in self.states[since:]
        self._wait(seen, timeout, f"{state}=1 from pid {pid}")

    def _wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                proc = self.daemon.proc
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"xguard exited {proc.returncode} before {what}:\n"
                                       f"{self.daemon.log()}\n{self._stderr()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"no {what} after {timeout}s:\n{self.daemon.log()}")
                self._cond.wait(min(left, 0.1))

    def _stderr(self) -> str:
        try:
            with open(os.path.join(self.daemon.root, "stderr.txt"), errors="replace") as f:
                return f.read()[-3000:]
        except OSError:
            return ""

    # -- the unit --------------------------------------------------------------------
    def names(self) -> list[str]:
        with self._cond:
            return [name for name, _ in self.store]

    def start(self, timeout: float = 60.0) -> "FakeSystemd":
        """Start the daemon with the store handed over; wait for READY=1."""
        d = self.daemon
        assert d.proc is None or d.proc.poll() is not None
        with self._cond:
            stored = list(self.store)
            since = len(self.states)
        env = d.environment()
        env["NOTIFY_SOCKET"] = self.path
        if self.announce:
            env["FDSTORE"] = str(self.fdstore_max)
        fds = [fd for _, fd in stored]
        launcher = [sys.executable, "-S", "-m", "xguard.testing.sdexec",
                    ",".join(map(str, fds)), ":".join(n for n, _ in stored), "--", *d.argv()]
        started = time.monotonic()
        with open(os.path.join(d.root, "stderr.txt"), "ab") as err:
            d.proc = subprocess.Popen(launcher, env=env, cwd=d.root, pass_fds=fds,
                                      stdout=subprocess.DEVNULL, stderr=err)
        self.wait_state("READY", d.proc.pid, since, timeout)
        d.last_start = time.monotonic() - started
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Signal the daemon and wait for its exit; the store is kept."""
        code = self.daemon.stop(sig, timeout)
        self.sync()
        return code

    def restart(self, timeout: float = 60.0) -> "FakeSystemd":
        """``systemctl restart``: stop, then start with the store."""
        self.stop()
        return self.start(timeout)

    def reload(self, timeout: float = 60.0) -> "FakeSystemd":
        """``systemctl reload`` (SIGHUP): the daemon re-executes itself in
        place; wait for its RELOADING=1, then READY=1."""
        proc = self.daemon.proc
        assert proc is not None and proc.poll() is None
        since = len(self.states)
        proc.send_signal(signal.SIGHUP)
        self.wait_state("RELOADING", proc.pid, since, timeout)
        self.wait_state("READY", proc.pid, since, timeout)
        return self

    def flush(self) -> None:
        """The unit went inactive: the store is closed."""
        with self._cond:
            for _, fd in self.store:
                os.close(fd)
            self.store = []

    def close(self) -> None:
        self._closed = True
        self._thread.join(5)
        self.flush()
        self.sock.close()
        if os.path.exists(self.path):
            os.unlink(self.path)
