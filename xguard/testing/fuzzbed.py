"""A real daemon set up to be fuzzed, and the checks every fuzz run makes:
shared by tests/integration/test_hostile.py and bench/fuzz.py.

:class:`FuzzBed` creates, on a running :class:`~xguard.testing.daemon.Daemon`,
a *target* VM whose two sockets receive the hostile requests and a
*bystander* VM whose state is written through its own sockets first. After
(or during) a run, :meth:`FuzzBed.findings` lists what went wrong:

- an answer with a 5xx other than 503;
- a critical line (a traceback, an unhandled error) in the daemon's log;
- VM content (the generators' markers) in the daemon's log;
- the daemon gone, or not answering a well-formed request;
- the bystander VM's state changed.
"""

from __future__ import annotations

import base64
import os
import socket
import uuid
import xmlrpc.client
from collections import Counter
from typing import Any

import attrs
from twisted.protocols import amp

from ..control.commands import VarstoreCreate, VtpmCreate
from .daemon import Daemon
from .hostile import MARKER, MARKER_B64, Answer, Probe, exchange, status_codes
from .unixhttp import request

__all__ = ["FuzzBed", "CRITICAL_SIGNS", "control_call"]

#: Text that only a critical log event (an unhandled failure) writes.
CRITICAL_SIGNS = ("Traceback (most recent call last)", "Unhandled Error", "Processing Failed")
_KEYS = ("/tpm2-00.permall", "/tpm2-00.savestate", "/tpm2-00.volatilestate")


@attrs.define
class _Tally:
    """Per socket kind: how answers ended and which codes they carried."""

    requests: int = 0
    codes: Counter[int] = attrs.Factory(Counter)
    ends: Counter[str] = attrs.Factory(Counter)
    unexpected: list[tuple[int, Probe]] = attrs.Factory(list)
    slowest: float = 0.0


def control_call(control: str, command: type[amp.Command], **kwargs: Any) -> dict[bytes, bytes]:
    """One control command over a blocking connection to the daemon's
    control socket (a fraction of xguard-ctl's start-up time); the answer
    box, or AssertionError with the daemon's error."""
    box = command.makeArguments(kwargs, None)
    box[b"_command"] = command.commandName
    box[b"_ask"] = b"1"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(60)
        s.connect(control)
        s.sendall(box.serialize())
        stream = s.makefile("rb")
        answer: dict[bytes, bytes] = {}
        while True:
            key = stream.read(int.from_bytes(stream.read(2), "big"))
            if not key:
                break
            answer[key] = stream.read(int.from_bytes(stream.read(2), "big"))
    if b"_error" in answer:
        raise AssertionError(f"{command.__name__}: {answer.get(b'_error_description')!r}")
    return answer


def _rpc(path: str, method: str, *params: Any) -> Any:
    body = xmlrpc.client.dumps(params, method).encode()
    status, _, data = request(path, "POST", "/", body, {"Connection": "close"})
    if status != 200:
        raise AssertionError(f"{method}: HTTP {status}")
    (answer,), _ = xmlrpc.client.loads(data)
    return answer


class FuzzBed:
    """The fuzzed VM, the bystander VM and the checks, on ``daemon``.

    :param keep: how many unexpected answers to keep (with their probe) per
        socket kind, for the report.
    """

    def __init__(self, daemon: Daemon, *, keep: int = 20) -> None:
        self.daemon = daemon
        self.keep = keep
        self.target = str(uuid.uuid4())
        self.bystander = str(uuid.uuid4())
        root = daemon.root
        self.sockets = {
            "swtpm": os.path.join(root, "t.tpm"), "varstored": os.path.join(root, "t.var"),
        }
        self.bystander_tpm = os.path.join(root, "b.tpm")
        self.bystander_var = os.path.join(root, "b.var")
        self.tallies = {"swtpm": _Tally(), "varstored": _Tally()}
        self._log_start = 0
        self._bystander_state: dict[str, Any] = {}

    def setup(self) -> "FuzzBed":
        """Create both VMs' sockets and write the bystander's state."""
        for command, vm, path in ((VtpmCreate, self.target, self.sockets["swtpm"]),
                                  (VarstoreCreate, self.target, self.sockets["varstored"]),
                                  (VtpmCreate, self.bystander, self.bystander_tpm),
                                  (VarstoreCreate, self.bystander, self.bystander_var)):
            control_call(self.daemon.control, command, dbg="fuzz", vm_uuid=vm, gid=0,
                         path=path)
        for n, key in enumerate(_KEYS):
            content = base64.b64encode(b"bystander %d " % n + MARKER_B64.encode())
            status, _, _ = request(self.bystander_tpm, "PUT", key, content)
            assert status == 204, status
        answer = _rpc(self.bystander_var, "VM.set_NVRAM_EFI_variables", "s", "v",
                      "bystander " + MARKER)
        assert answer["Status"] == "Success", answer
        self._bystander_state = self.bystander_state()
        self._log_start = os.path.getsize(self.daemon.log_file)
        return self

    def bystander_state(self) -> dict[str, Any]:
        """The bystander VM's state, read through its own sockets."""
        state: dict[str, Any] = {}
        for key in _KEYS:
            state[key] = request(self.bystander_tpm, "GET", key)[::2]
        state["nvram"] = _rpc(self.bystander_var, "VM.get_NVRAM", "s", "v")
        return state

    def send(self, kind: str, probe: Probe, **kwargs: Any) -> tuple[Answer, list[int]]:
        """One probe on the target VM's ``kind`` socket, tallied."""
        answer = exchange(self.sockets[kind], probe, **kwargs)
        codes = status_codes(answer.data, probe.methods)
        tally = self.tallies[kind]
        tally.requests += 1
        tally.ends[answer.end] += 1
        tally.slowest = max(tally.slowest, answer.seconds)
        for code in codes:
            tally.codes[code] += 1
            if code >= 500 and code != 503 and len(tally.unexpected) < self.keep:
                tally.unexpected.append((code, probe))
        return answer, codes

    def log_text(self) -> str:
        with open(self.daemon.log_file, "rb") as f:
            f.seek(self._log_start)
            return f.read().decode("utf-8", "replace")

    def log_bytes(self) -> int:
        """Bytes the daemon logged since :meth:`setup`."""
        return os.path.getsize(self.daemon.log_file) - self._log_start

    def findings(self) -> list[str]:
        """Everything that went wrong (empty when all is well)."""
        found = []
        for kind, tally in self.tallies.items():
            for code, probe in tally.unexpected:
                found.append(f"{kind}: HTTP {code} for {probe.kind} probe {probe.data[:300]!r}")
        text = self.log_text()
        for sign in CRITICAL_SIGNS:
            if sign in text:
                at = text.index(sign)
                found.append(f"critical log line: {text[max(0, at - 300):at + 1500]}")
                break
        for marker in (MARKER, MARKER_B64):
            if marker in text:
                at = text.index(marker)
                found.append(f"VM content in the log: {text[max(0, at - 300):at + 100]!r}")
        proc = self.daemon.proc
        if proc is None or proc.poll() is not None:
            found.append("the daemon is gone")
            return found
        try:
            state = self.bystander_state()
        except Exception as e:  # noqa: BLE001 - reported, not raised
            found.append(f"the daemon does not answer a well-formed request: {e!r}")
            return found
        if state != self._bystander_state:
            found.append(f"the bystander VM's state changed: {state!r}")
        return found

    def report(self) -> dict[str, Any]:
        """Figures per socket kind, for printing."""
        return {kind: {"requests": t.requests, "codes": dict(sorted(t.codes.items())),
                       "ends": dict(t.ends), "slowest_s": round(t.slowest, 3),
                       "unexpected": len(t.unexpected)}
                for kind, t in self.tallies.items()}
