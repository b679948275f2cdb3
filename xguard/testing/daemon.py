"""Real processes for integration tests and benchmarks: ``twistd -n xguard``
and its CLI.

The daemon is started exactly as an operator would, with every path under
one short temp directory (UNIX socket paths are limited to 107 bytes).
Readiness is observed the way systemd observes it: the harness binds a
NOTIFY_SOCKET and waits for READY=1. It is a unit without an fd store
(``FDSTORE=0``, as systemd 254+ says it): restarts listen afresh.
:mod:`xguard.testing.fakesystemd` runs a daemon with the store.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # Run the repository's code (and find its twisted/plugins) whatever is
    # installed in the environment.
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("NOTIFY_SOCKET", None)
    return env


class Daemon:
    """One xguard daemon process and its files."""

    def __init__(self, root: str | None = None, *, xapi: str | None = None,
                 extra: list[str] | None = None) -> None:
        self.root = root or tempfile.mkdtemp(prefix="xg")
        self.state_dir = os.path.join(self.root, "state")
        self.sockets_file = os.path.join(self.root, "run", "active.json")
        self.control = os.path.join(self.root, "ctl.sock")
        self.log_file = os.path.join(self.root, "xguard.log")
        self.xapi = xapi
        self.extra = list(extra or [])
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_codes: list[int] = []
        self.last_start = 0.0

    def argv(self) -> list[str]:
        argv = [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "--logfile", self.log_file,
                "xguard", "--state-dir", self.state_dir, "--sockets-file", self.sockets_file,
                "--control", "unix:" + self.control, "--request-timeout", "5",
                "--direct-deadline", "1"]
        if self.xapi:
            argv += ["--xapi", self.xapi, "--xapi-timeout", "5"]
        return argv + self.extra

    def environment(self) -> dict[str, str]:
        """The daemon's environment (subclasses add to it)."""
        return _env()

    def start(self, timeout: float = 30.0) -> "Daemon":
        """Start and wait for READY=1 (every socket listening again).

        ``last_start`` is the time from exec to READY=1; twistd's own
        errors (before its log starts) go to ``stderr.txt`` in the root."""
        assert self.proc is None or self.proc.poll() is not None
        notify_path = os.path.join(self.root, "notify")
        if os.path.exists(notify_path):
            os.unlink(notify_path)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        notify.settimeout(0.05)
        env = self.environment()
        env["NOTIFY_SOCKET"] = notify_path
        env["FDSTORE"] = "0"  # this socket keeps no descriptors
        errors = os.path.join(self.root, "stderr.txt")
        started = time.monotonic()
        with open(errors, "ab") as err:
            self.proc = subprocess.Popen(self.argv(), env=env, cwd=self.root,
                                         stdout=subprocess.DEVNULL, stderr=err)
        try:
            while time.monotonic() - started < timeout:
                if self.proc.poll() is not None:
                    with open(errors, errors="replace") as f:
                        detail = f.read()[-3000:]
                    raise RuntimeError(f"xguard exited {self.proc.returncode}:\n{self.log()}"
                                       f"\nstderr:\n{detail}")
                try:
                    if b"READY=1" in notify.recv(4096):
                        self.last_start = time.monotonic() - started
                        return self
                except TimeoutError:
                    continue
            raise RuntimeError(f"xguard not ready after {timeout}s:\n{self.log()}")
        finally:
            notify.close()
            os.unlink(notify_path)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the daemon and wait; returns its exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            # The log is gone with the temp directory once the test ends.
            raise AssertionError(f"xguard still running {timeout}s after signal {sig}:\n"
                                 f"{self.log()}") from None
        self.exit_codes.append(code)
        return code

    def kill(self) -> None:
        """kill -9: no chance to clean up."""
        self.stop(signal.SIGKILL)

    def restart(self) -> "Daemon":
        self.stop()
        return self.start()

    def log(self) -> str:
        try:
            with open(self.log_file, encoding="utf-8", errors="replace") as f:
                return f.read()[-6000:]
        except OSError:
            return "(no log)"

    def ctl(self, *args: str, stdin: bytes | None = None,
            check: bool = True) -> subprocess.CompletedProcess[bytes]:
        """Run ``xguard-ctl --control … args``."""
        argv = [sys.executable, "-c", "from xguard.control.ctl import main; main()",
                "--control", self.control, *args]
        result = subprocess.run(argv, input=stdin, capture_output=True, env=_env(), timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"xguard-ctl {args} exited {result.returncode}: "
                                 f"{result.stderr.decode()}")
        return result

    def status(self) -> dict[str, Any]:
        """The Status document, whatever the daemon's health (``status``
        exits 3 when degraded, 4 when failed)."""
        result = self.ctl("status", "--json", check=False)
        if result.returncode not in (0, 3, 4):
            raise AssertionError(f"xguard-ctl status exited {result.returncode}: "
                                 f"{result.stderr.decode()}")
        doc: dict[str, Any] = json.loads(result.stdout)
        return doc

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "Daemon":
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def wait_for(predicate: Any, timeout: float = 30.0, interval: float = 0.1,
             what: str = "condition") -> Any:
    """Poll ``predicate`` until truthy (bounded); returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)
