"""Blocking helpers to drive the xapi simulator from tests and benchmarks.

- :class:`SimClient` wraps the simulator's admin API (doc/xapisim.md).
- :class:`SimProcess` runs ``python -m xguard.testing.xapisim`` as a child
  process, so a test can stop, kill and restart "xapi" for real::

      with SimProcess(sock, admin, state_file=state) as sim:
          ids = sim.client.seed_vm(vtpm=True, contents="a b c")
          sim.client.set_mode("refuse")
          sim.kill(); sim.start()          # state survives thanks to state_file
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import IO, Any

from xguard.testing.unixhttp import request

__all__ = ["SimClient", "SimProcess", "SimAdminError", "PeerHost"]


class SimAdminError(Exception):
    """The admin API refused a request (status and its error message)."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(f"{status}: {message}")


class SimClient:
    """The admin API of one simulator, over its admin UNIX socket."""

    def __init__(self, admin_socket: str, timeout: float = 10.0) -> None:
        self.admin_socket = admin_socket
        self.timeout = timeout

    def _call(self, method: str, url: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        status, _, payload = request(self.admin_socket, method, url, data, headers,
                                     timeout=self.timeout)
        doc = json.loads(payload) if payload else None
        if status != 200:
            raise SimAdminError(status, (doc or {}).get("error", ""))
        return doc

    # -- state --------------------------------------------------------------
    def seed_vm(self, vm_uuid: str | None = None, *, vtpm: bool = True,
                vtpm_uuid: str | None = None, contents: str | None = None,
                nvram: dict[str, str] | None = None, sb_state: str | None = None,
                name_label: str | None = None, power_state: str | None = None,
                resident_on: str | None = None) -> dict[str, Any]:
        """Create (or update) a VM; ``{vm_uuid, vm_ref, vtpm_uuid, vtpm_ref}``.
        ``power_state`` and ``resident_on`` (a host's name; ``""``: none)
        say where it runs (a seeded VM is Halted, resident nowhere)."""
        body: dict[str, Any] = {"vtpm": vtpm}
        for key, value in (("vm_uuid", vm_uuid), ("vtpm_uuid", vtpm_uuid),
                           ("contents", contents), ("nvram", nvram),
                           ("sb_state", sb_state), ("name_label", name_label),
                           ("power_state", power_state), ("resident_on", resident_on)):
            if value is not None:
                body[key] = value
        return self._call("POST", "/vms", body)  # type: ignore[no-any-return]

    def vm_state(self, vm_uuid: str) -> dict[str, Any]:
        """NVRAM, last update flag, secure-boot state, vTPMs (with contents)
        and messages of one VM."""
        return self._call("GET", f"/vms/{vm_uuid}")  # type: ignore[no-any-return]

    def vtpm_state(self, vtpm_uuid: str) -> dict[str, Any]:
        return self._call("GET", f"/vtpms/{vtpm_uuid}")  # type: ignore[no-any-return]

    def vms(self) -> list[str]:
        return self._call("GET", "/vms")  # type: ignore[no-any-return]

    def messages(self) -> list[dict[str, Any]]:
        return self._call("GET", "/messages")  # type: ignore[no-any-return]

    def expire_sessions(self) -> int:
        """Invalidate every session (the next call gets SESSION_INVALID)."""
        return self._call("POST", "/sessions/expire", {})["expired"]  # type: ignore[no-any-return]

    # -- faults and counters ------------------------------------------------
    def status(self) -> dict[str, Any]:
        return self._call("GET", "/status")  # type: ignore[no-any-return]

    def set_mode(self, mode: str) -> dict[str, Any]:
        """``up``, ``refuse`` or ``hang``; returns once the mode is in force."""
        return self._call("POST", "/mode", {"mode": mode})  # type: ignore[no-any-return]

    def set_delay(self, seconds: float) -> dict[str, Any]:
        return self._call("POST", "/delay", {"seconds": seconds})  # type: ignore[no-any-return]

    def fail_next(self, n: int, codes: Sequence[str] = ("HOST_STILL_BOOTING",)) -> dict[str, Any]:
        return self._call("POST", "/fail_next",  # type: ignore[no-any-return]
                          {"n": n, "codes": list(codes)})

    def fail_method(self, method: str,
                    codes: Sequence[str] | None = ("HOST_STILL_BOOTING",),
                    n: int | None = None) -> dict[str, Any]:
        """Every call of ``method`` fails with ``codes`` — only the next ``n``
        when given (None codes: stop failing it)."""
        body: dict[str, Any] = {"method": method}
        if codes is None:
            body["clear"] = True
        else:
            body["codes"] = list(codes)
            if n is not None:
                body["n"] = n
        return self._call("POST", "/fail_method", body)  # type: ignore[no-any-return]

    def peer_counters(self) -> dict[str, int]:
        """Calls another host made (the peer socket)."""
        return self._call("GET", "/peer_counters")  # type: ignore[no-any-return]

    def http_500_next(self, n: int) -> dict[str, Any]:
        return self._call("POST", "/http_500_next", {"n": n})  # type: ignore[no-any-return]

    def counters(self) -> dict[str, int]:
        return self._call("GET", "/counters")  # type: ignore[no-any-return]

    def reset_counters(self) -> dict[str, int]:
        """Zero the counters; returns their values before the reset."""
        return self._call("POST", "/counters/reset", {})  # type: ignore[no-any-return]

    def reset(self) -> dict[str, Any]:
        """Clear delay, pending failures and counters (the mode is kept)."""
        return self._call("POST", "/reset", {})  # type: ignore[no-any-return]


class PeerHost:
    """Another host's guard, writing a VM's state through the simulator's
    peer socket as xapi-guard does (JSON-RPC): HA restarted the VM there,
    or it migrated. No mode or fault of the simulator affects it."""

    def __init__(self, peer_socket: str, timeout: float = 10.0) -> None:
        self.socket = peer_socket
        self.timeout = timeout
        self._session: str | None = None
        self._ids = 0

    def call(self, method: str, *params: Any) -> Any:
        """One JSON-RPC call; raises SimAdminError with xapi's codes on failure."""
        self._ids += 1
        body = json.dumps({"jsonrpc": "2.0", "method": method, "params": list(params),
                           "id": self._ids}).encode()
        status, _, payload = request(self.socket, "POST", "/jsonrpc", body,
                                     {"Content-Type": "application/json"},
                                     timeout=self.timeout)
        doc = json.loads(payload)
        if status != 200 or doc.get("error"):
            error = doc.get("error") or {}
            raise SimAdminError(status, " ".join([error.get("message", "")]
                                                 + [str(d) for d in error.get("data", [])]))
        return doc["result"]

    def _logged_in(self) -> str:
        if self._session is None:
            self._session = str(self.call("session.login_with_password", "root", "", "2.21",
                                          "peer-host"))
        return self._session

    def set_vtpm_contents(self, vm_uuid: str, contents: str) -> None:
        session = self._logged_in()
        vm = self.call("VM.get_by_uuid", session, vm_uuid)
        (vtpm, *_) = self.call("VM.get_VTPMs", session, vm)
        self.call("VTPM.set_contents", session, vtpm, contents)

    def set_efi_variables(self, vm_uuid: str, value: str) -> None:
        session = self._logged_in()
        vm = self.call("VM.get_by_uuid", session, vm_uuid)
        self.call("VM.set_NVRAM_EFI_variables", session, vm, value)


class SimProcess:
    """The simulator as a child process (``sys.executable -m
    xguard.testing.xapisim``). ``start()`` returns once the admin API
    answers; ``log_file`` (a path) receives the simulator's log."""

    def __init__(self, socket: str, admin_socket: str, state_file: str | None = None, *,
                 tcp_port: int | None = None, log_file: str | None = None,
                 start_timeout: float = 15.0, extra_args: Sequence[str] = (),
                 peer_socket: str | None = None) -> None:
        self.socket = socket
        self.peer_socket = peer_socket
        #: Another host writing through the peer socket (with ``peer_socket``).
        self.peer = PeerHost(peer_socket) if peer_socket else None
        self.admin_socket = admin_socket
        self.state_file = state_file
        self.tcp_port = tcp_port
        self.log_file = log_file
        self.start_timeout = start_timeout
        self.extra_args = list(extra_args)
        self.client = SimClient(admin_socket)
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "xguard.testing.xapisim",
                "--socket", self.socket, "--admin-socket", self.admin_socket]
        if self.state_file:
            argv += ["--state", self.state_file]
        if self.tcp_port is not None:
            argv += ["--tcp", str(self.tcp_port)]
        if self.peer_socket:
            argv += ["--peer-socket", self.peer_socket]
        return argv + self.extra_args

    def start(self) -> SimProcess:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("simulator already running")
        if os.path.exists(self.admin_socket):
            os.unlink(self.admin_socket)  # so readiness is not a stale file's
        self._log = open(self.log_file, "ab") if self.log_file else None  # noqa: SIM115
        self.process = subprocess.Popen(
            self.argv(), stdin=subprocess.DEVNULL,
            stdout=self._log or subprocess.DEVNULL, stderr=self._log or subprocess.DEVNULL)
        deadline = time.monotonic() + self.start_timeout
        while True:
            code = self.process.poll()
            if code is not None:
                self._close_log()
                raise RuntimeError(f"simulator exited with {code} while starting")
            try:
                self.client.status()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise TimeoutError("simulator did not answer in time") from None
                time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM and wait (SIGKILL after ``timeout``); the exit code."""
        return self._end(signal.SIGTERM, timeout)

    def kill(self) -> int | None:
        """SIGKILL and wait: nothing is saved beyond what already was."""
        return self._end(signal.SIGKILL, 10.0)

    def restart(self) -> SimProcess:
        self.stop()
        return self.start()

    def _end(self, sig: int, timeout: float) -> int | None:
        proc, code = self.process, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(sig)
                try:
                    code = proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    code = proc.wait()
            else:
                code = proc.returncode
        self.process = None
        self._close_log()
        return code

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> SimProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
