"""What the integration tests share: a blocking AMP client for the control
channel, the daemon under test with its control client (:class:`Host`),
and the requests real clients make, with values that say which write they
are. Fixtures using these live in ``conftest.py``."""

from __future__ import annotations

import base64
import json
import os
import socket
import tempfile
import time
import uuid
import xmlrpc.client
from typing import Any

from xguard.testing.daemon import Daemon, wait_for
from xguard.testing.simclient import SimProcess
from xguard.testing.unixhttp import request

KEYS = ("/tpm2-00.permall", "/tpm2-00.savestate", "/tpm2-00.volatilestate")
SERVICES = ("Swtpm", "Varstored")
XML = {"Connection": "close", "Content-Type": "text/xml"}
PROMPT = 5.0  # seconds; the direct deadline is 1 s (a correctness bound)
DRAIN = 90.0  # the flusher's backoff may have grown during the outage


# -- the control channel, without an interpreter per command -----------------
def _box(pairs: dict[bytes, bytes]) -> bytes:
    out = bytearray()
    for key, value in pairs.items():
        out += len(key).to_bytes(2, "big") + key + len(value).to_bytes(2, "big") + value
    return bytes(out + b"\0\0")


def _read_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("control channel closed mid-box")
        data += chunk
    return bytes(data)


def _read_box(sock: socket.socket) -> dict[bytes, bytes]:
    box: dict[bytes, bytes] = {}
    while True:
        klen = int.from_bytes(_read_exact(sock, 2), "big")
        if klen == 0:
            return box
        key = _read_exact(sock, klen)
        box[key] = _read_exact(sock, int.from_bytes(_read_exact(sock, 2), "big"))


class Control:
    """The daemon's AMP control channel over a blocking socket: one box out,
    one box back (the wire format of doc/control.md)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def call(self, command: str, **args: object) -> dict[bytes, bytes]:
        box = {b"_command": command.encode(), b"_ask": b"1"}
        box.update({k.encode(): str(v).encode() for k, v in args.items()})
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(self.path)
            s.sendall(_box(box))
            answer = _read_box(s)
        if b"_error" in answer:
            raise AssertionError(f"{command} failed: {answer!r}")
        return answer

    def vtpm_create(self, vm: str, path: str) -> None:
        self.call("VtpmCreate", dbg="t", vm_uuid=vm, gid=0, path=path)

    def varstore_create(self, vm: str, path: str) -> None:
        self.call("VarstoreCreate", dbg="t", vm_uuid=vm, gid=0, path=path)

    def status(self) -> dict[str, Any]:
        answer = self.call("Status")
        pieces, n = [answer[b"status"]], 1
        while f"status.{n}".encode() in answer:
            pieces.append(answer[f"status.{n}".encode()])
            n += 1
        return json.loads(b"".join(pieces))  # type: ignore[no-any-return]


# -- values that say which write they are -------------------------------------
def value(vm: str, key: int | str, rnd: int) -> bytes:
    """The base64 body of write ``rnd`` of ``(vm, key)``."""
    return base64.b64encode(f"{vm}-{key}-{rnd}".encode())


def round_of(field: str | bytes) -> int:
    """Which round a stored value is (0: nothing written yet, -1: a value
    this module did not write, e.g. a seeded one)."""
    if not field:
        return 0
    try:
        return int(base64.b64decode(field, validate=True).decode().rsplit("-", 1)[1])
    except (ValueError, IndexError):
        return -1


def vtpm_fields(contents: str) -> list[str]:
    """xapi's ``permall savestate volatilestate`` string, padded to 3."""
    fields = contents.split(" ") if contents else []
    return (fields + ["", "", ""])[:3]


def backwards(history: list[int], acked: set[int]) -> list[tuple[int, int]]:
    """Steps where upstream went from an acknowledged value to an older
    one: an acknowledged write reordered (or lost) upstream. A step back
    from a value never acknowledged (in flight at a kill) is allowed."""
    bad = []
    high = None  # the newest acknowledged value seen so far
    for rnd in history:
        if high is not None and rnd < high:
            bad.append((high, rnd))
        if rnd in acked and (high is None or rnd > high):
            high = rnd
    return bad


def cache_files(state_dir: str, service: str) -> list[str]:
    """Every file under ``state_dir/service``, relative to it."""
    base = os.path.join(state_dir, service)
    out = []
    for top, _, files in os.walk(base):
        out += [os.path.relpath(os.path.join(top, f), base) for f in files]
    return sorted(out)


# -- requests -----------------------------------------------------------------
def put(path: str, key: int, body: bytes) -> tuple[int, float]:
    started = time.monotonic()
    status, _, _ = request(path, "PUT", KEYS[key], body,
                           {"Connection": "close", "Content-Type": "application/octet-stream"})
    return status, time.monotonic() - started


def get(path: str, key: int) -> tuple[int, bytes]:
    status, _, data = request(path, "GET", KEYS[key], None, {"Connection": "close"})
    return status, data


def rpc(path: str, method: str, *params: object) -> dict[str, Any]:
    body = xmlrpc.client.dumps(params, method).encode()
    status, _, data = request(path, "POST", "/", body, XML)
    assert status == 200, (status, data)
    (answer,), _ = xmlrpc.client.loads(data)
    return answer  # type: ignore[no-any-return]


def set_nvram(path: str, data: bytes, update: str) -> tuple[dict[str, Any], float]:
    started = time.monotonic()
    answer = rpc(path, "VM.set_NVRAM_EFI_variables_v2", "s", "vm", data.decode(), update)
    return answer, time.monotonic() - started


# -- fixtures -------------------------------------------------------------------
class Host:
    """A daemon under test plus its control client; ``vm()`` seeds a VM in
    the simulator and serves both of its sockets."""

    def __init__(self, sim: SimProcess | None, extra: list[str] | None = None) -> None:
        self.root = tempfile.mkdtemp(prefix="xg")
        # Our own fault file: the default one in /tmp is shared by the host.
        self.fault_file = os.path.join(self.root, "fault")
        self.daemon = Daemon(self.root, xapi="unix:" + sim.socket if sim else None,
                             extra=["--fault-file", self.fault_file, *(extra or [])])
        self.sim = sim
        self.control = Control(self.daemon.control)

    @property
    def state_dir(self) -> str:
        return self.daemon.state_dir

    def vm(self, vm_uuid: str | None = None, contents: str | None = None,
           seed: bool = True) -> dict[str, str]:
        vm_uuid = vm_uuid or str(uuid.uuid4())
        ids: dict[str, str] = {"vm_uuid": vm_uuid}
        if seed and self.sim is not None:
            ids = self.sim.client.seed_vm(vm_uuid, contents=contents)
        ids["tpm"] = os.path.join(self.root, vm_uuid[:8] + ".t")
        ids["var"] = os.path.join(self.root, vm_uuid[:8] + ".v")
        self.control.vtpm_create(vm_uuid, ids["tpm"])
        self.control.varstore_create(vm_uuid, ids["var"])
        return ids

    def status(self, service: str = "Swtpm") -> dict[str, Any]:
        return self.control.status()["services"][service]  # type: ignore[no-any-return]

    def drained(self, *services: str) -> bool:
        doc = self.control.status()["services"]
        return all(doc[s]["mode"] == "Direct" and not doc[s]["pending"]
                   and doc[s]["queue_depth"] == 0 for s in services or SERVICES)

    def wait_drained(self, *services: str, timeout: float = DRAIN) -> None:
        try:
            wait_for(lambda: self.drained(*services), timeout=timeout, interval=0.2,
                     what="the cache to drain")
        except AssertionError as e:
            raise AssertionError(f"{e}: {self.control.status()}\n{self.daemon.log()}") from None

    def finish(self) -> None:
        """Teardown: a running daemon must stop cleanly (exit 0)."""
        d = self.daemon
        try:
            if d.proc is not None and d.proc.poll() is None:
                code = d.stop()
                assert code == 0, f"xguard exited {code}:\n{d.log()}"
        finally:
            d.cleanup()


def finish_all(hosts: list[Host]) -> None:
    """Teardown of a fixture's daemons: every one is finished (stopped,
    exit 0 checked, removed), then any failure is reported."""
    errors = []
    for host in hosts:
        try:
            host.finish()
        except AssertionError as e:
            errors.append(str(e))
    assert not errors, errors


def only_latest_left(item: str) -> list[str]:
    """The item directory once superseded versions are gone: they are
    deleted after the new version is durable (after its acknowledgement),
    so allow the daemon a moment."""
    names: list[str] = []

    def one() -> bool:
        names[:] = os.listdir(item)
        return len(names) == 1

    wait_for(one, timeout=10, interval=0.05, what=f"one version left in {item}")
    return names


