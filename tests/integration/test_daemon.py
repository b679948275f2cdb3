"""The daemon end to end: twistd -n xguard as a process, xguard-ctl, real
UNIX sockets, the xapi simulator as upstream."""

from __future__ import annotations

import json
import os
import re
import stat
import uuid
import xmlrpc.client

import pytest
import XenAPI

from tests.integration.conftest import VmSockets
from tests.unit.test_xmlrpc import WIRE, sample
from xguard.testing.daemon import Daemon
from xguard.testing.simclient import SimProcess
from xguard.testing.unixhttp import UnixHTTPConnection, UnixTransport, request

pytestmark = pytest.mark.integration

KEYS = ("/tpm2-00.permall", "/tpm2-00.savestate", "/tpm2-00.volatilestate")
CLOSE = {"Connection": "close", "Content-Type": "text/xml"}


def rpc(path: str, method: str, *params: object) -> dict:
    body = xmlrpc.client.dumps(params, method).encode()
    status, _, data = request(path, "POST", "/", body, CLOSE)
    assert status == 200, (status, data)
    (answer,), _ = xmlrpc.client.loads(data)
    return answer


def test_create_list_destroy_with_permissions(daemon: Daemon, sim: SimProcess) -> None:
    vm = VmSockets(daemon, sim, gid=4242)
    for path in (vm.tpm, vm.var):
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert (st.st_uid, st.st_gid) == (0, 4242)
    listed = json.loads(daemon.ctl("list", "--json").stdout)
    mine = {(e["path"], e["service"]) for e in listed if e["vm_uuid"] == vm.vm_uuid}
    assert mine == {(vm.tpm, "Swtpm"), (vm.var, "Varstored")}
    with open(daemon.sockets_file) as f:
        assert {e["path"] for e in json.load(f)} >= {vm.tpm, vm.var}
    daemon.ctl("vtpm_destroy", "t", "4242", vm.tpm)
    daemon.ctl("varstore_destroy", "t", "4242", vm.var)
    assert not os.path.exists(vm.tpm) and not os.path.exists(vm.var)
    listed = json.loads(daemon.ctl("list", "--json").stdout)
    assert vm.vm_uuid not in {e["vm_uuid"] for e in listed}
    # Destroying an unknown path succeeds (with a warning in the log).
    daemon.ctl("vtpm_destroy", "t", "0", vm.tpm)


def test_control_errors_are_clear(daemon: Daemon, sim: SimProcess) -> None:
    vm = VmSockets(daemon, sim)
    in_use = daemon.ctl("vtpm_create", "t", str(uuid.uuid4()), "0", vm.tpm, check=False)
    assert in_use.returncode == 1 and vm.tpm in in_use.stderr.decode()
    bad_uuid = daemon.ctl("vtpm_create", "t", "not-a-uuid", "0", vm.tpm + "x", check=False)
    assert bad_uuid.returncode == 1 and "not-a-uuid" in bad_uuid.stderr.decode()
    relative = daemon.ctl("vtpm_create", "t", vm.vm_uuid, "0", "rel.sock", check=False)
    assert relative.returncode == 1 and "rel.sock" in relative.stderr.decode()
    usage = daemon.ctl("vtpm_create", "t", vm.vm_uuid, check=False)
    assert usage.returncode == 2
    assert daemon.ctl("no_such_command", check=False).returncode == 2


def test_vtpm_contents_over_control_channel(daemon: Daemon, sim: SimProcess) -> None:
    vm = VmSockets(daemon, sim)
    blob = ("A" * (4 * 1024 * 1024 - 3)) + "B=="  # 4 MiB: far beyond AMP's 64 KiB
    daemon.ctl("vtpm_set_contents", "t", vm.vtpm_uuid, "-", stdin=blob.encode())
    assert sim.client.vtpm_state(vm.vtpm_uuid)["contents"] == blob
    out = daemon.ctl("vtpm_get_contents", "t", vm.vtpm_uuid).stdout.decode()
    assert out.rstrip("\n") == blob


def test_varstored_wire_samples(daemon: Daemon, sim: SimProcess) -> None:
    vm = VmSockets(daemon, sim)
    for name in sorted(os.listdir(os.path.join(WIRE, "requests"))):
        method = name.split(".request")[0]
        status, headers, data = request(vm.var, "POST", "/",
                                        sample("requests", name), CLOSE)
        assert status == 200, (name, status)
        # varstored reads the answer by position: Status first, then Value.
        assert re.match(rb'<\?xml version="1.0"\?><methodResponse><params><param><value><struct>'
                        rb"<member><name>Status</name><value>Success</value></member>"
                        rb"<member><name>Value</name>", data), (name, data)
        (answer,), _ = xmlrpc.client.loads(data)
        (expected,), _ = xmlrpc.client.loads(sample("responses", method + ".response.0"))
        assert type(answer["Value"]) is type(expected["Value"]) or expected["Value"] == "", name
    # message.create always names the socket's VM with the fixed alert.
    messages = sim.client.vm_state(vm.vm_uuid)["messages"]
    assert [m["name"] for m in messages] == ["VM_SECURE_BOOT_FAILED"]
    assert sim.client.vm_state(vm.vm_uuid)["nvram"] == {"EFI-variables": "string"}


def test_xenapi_sdk_as_varstored(daemon: Daemon, sim: SimProcess) -> None:
    vm = VmSockets(daemon, sim)
    session = XenAPI.Session("http://localhost/", transport=UnixTransport(vm.var))
    session.xenapi.login_with_password("root", "", "1.0", "varstored")
    ref = session.xenapi.VM.get_by_uuid(vm.vm_uuid)
    assert session.xenapi.VM.get_NVRAM(ref) == {}
    session.xenapi.VM.set_NVRAM_EFI_variables(ref, "dmFycw==")
    assert session.xenapi.VM.get_NVRAM(ref) == {"EFI-variables": "dmFycw=="}
    session.xenapi.VM.set_NVRAM_EFI_variables_v2(ref, "djI=", "yes")
    state = sim.client.vm_state(vm.vm_uuid)
    assert state["nvram"]["EFI-variables"] == "djI=" and state["last_update"] == "yes"
    session.xenapi.session.logout()


def check_swtpm_cycle(tpm: str, send: object) -> None:
    for n, key in enumerate(KEYS):
        content = b"AAAA" * (n + 1)
        assert send("HEAD", key, None)[0] == 404
        assert send("GET", key, None)[:2] == (200, b"")
        assert send("PUT", key, content)[0] == 204
        assert send("HEAD", key, None)[0] == 200
        assert send("GET", key, None)[:2] == (200, content)
    for key in KEYS:
        assert send("DELETE", key, None)[0] == 204
        assert send("HEAD", key, None)[0] == 404
        assert send("DELETE", key, None)[0] == 204  # deleting nothing is fine


def test_swtpm_one_connection_per_request(daemon: Daemon, sim: SimProcess) -> None:
    vm = VmSockets(daemon, sim)

    def send(method: str, key: str, body: bytes | None) -> tuple[int, bytes]:
        status, _, data = request(vm.tpm, method, key, body, {"Connection": "close"})
        return status, data

    check_swtpm_cycle(vm.tpm, send)


def test_swtpm_keep_alive(daemon: Daemon, sim: SimProcess) -> None:
    vm = VmSockets(daemon, sim)
    conn = UnixHTTPConnection(vm.tpm, timeout=10)

    def send(method: str, key: str, body: bytes | None) -> tuple[int, bytes]:
        conn.request(method, key, body=body,
                     headers={"Content-Type": "application/octet-stream"})
        resp = conn.getresponse()
        return resp.status, resp.read()

    check_swtpm_cycle(vm.tpm, send)
    conn.request("PUT", KEYS[0], body=b"UEVSTQ==")
    assert conn.getresponse().status == 204
    conn.close()
    contents = sim.client.vtpm_state(vm.vtpm_uuid)["contents"]
    assert contents.split(" ")[0] == "UEVSTQ=="
    # Only the calls the upstream daemon makes: an xapi serving those suffices.
    used = {m for m, n in sim.client.counters().items() if n and m.startswith("VTPM.")}
    assert used <= {"VTPM.get_contents", "VTPM.set_contents", "VTPM.get_by_uuid"}, used


def test_serves_without_loading_tls(daemon: Daemon, sim: SimProcess) -> None:
    """twistd's reactor would load pyOpenSSL and cryptography (0.1 s of each
    start-up, 12 MB for the daemon's life); an xapi on a UNIX socket needs
    neither, and every request kind is served without them."""
    vm = VmSockets(daemon, sim)
    assert request(vm.tpm, "PUT", KEYS[0], b"UEVSTQ==", {"Connection": "close"})[0] == 204
    assert rpc(vm.var, "VM.get_NVRAM", "s", "OpaqueRef:vm")["Status"] == "Success"
    assert daemon.proc is not None
    with open(f"/proc/{daemon.proc.pid}/maps") as maps:
        mapped = {line.split()[-1] for line in maps if "/" in line}
    assert not [m for m in mapped if "OpenSSL" in m or "cryptography" in m], mapped


def test_other_vms_handles_only_touch_own_vm(daemon: Daemon, sim: SimProcess) -> None:
    a, b = VmSockets(daemon, sim), VmSockets(daemon, sim)
    assert rpc(a.var, "VM.get_by_uuid", "s", b.vm_uuid)["Status"] == "Success"
    assert rpc(a.var, "VM.set_NVRAM_EFI_variables", "s", b.vm_ref, "QQ==")["Status"] == "Success"
    assert sim.client.vm_state(a.vm_uuid)["nvram"] == {"EFI-variables": "QQ=="}
    assert sim.client.vm_state(b.vm_uuid)["nvram"] == {}
    assert rpc(b.var, "VM.get_NVRAM", "s", a.vm_ref)["Value"] == {}
    assert request(a.tpm, "PUT", KEYS[0], b"QUFB")[0] == 204
    assert request(b.tpm, "GET", KEYS[0])[2] == b""
    assert sim.client.vtpm_state(b.vtpm_uuid)["contents"] == ""


def oversized(path: str, method: str, url: str) -> int:
    """Announce a body over 1 MiB: the daemon answers 413 without reading
    it (a client writing the whole body would see its pipe closed)."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(f"{method} {url} HTTP/1.1\r\nHost: x\r\n"
                  f"Content-Length: {1024 * 1024 + 4}\r\n\r\n".encode() + b"A" * 4096)
        head = s.recv(4096)
    return int(head.split(b" ")[1])


BAD_VARSTORED = [
    ("malformed", b"<methodCall><methodName>VM.get_NVRAM</methodName><params>", 400),
    ("bomb", b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa">'
             b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>'
             b"<methodCall><methodName>&b;</methodName></methodCall>", 400),
    ("xxe", b'<?xml version="1.0"?><!DOCTYPE m [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
            b"<methodCall><methodName>&x;</methodName></methodCall>", 400),
]


def test_bad_input_gets_clear_answers_and_others_keep_working(daemon: Daemon,
                                                               sim: SimProcess) -> None:
    victim, bystander = VmSockets(daemon, sim), VmSockets(daemon, sim)
    for name, body, code in BAD_VARSTORED:
        assert request(victim.var, "POST", "/", body, CLOSE)[0] == code, name
    arity = rpc(victim.var, "VM.get_NVRAM", "s")
    assert arity["Status"] == "Failure"
    assert arity["ErrorDescription"][0] == "MESSAGE_PARAMETER_COUNT_MISMATCH"
    unknown = rpc(victim.var, "VM.destroy", "s", "vm")
    assert unknown["ErrorDescription"][0] == "MESSAGE_METHOD_UNKNOWN"
    assert request(victim.var, "GET", "/")[0] == 405
    assert oversized(victim.var, "POST", "/") == 413
    assert request(victim.tpm, "PUT", KEYS[0], b"not base64!")[0] == 400
    assert request(victim.tpm, "PUT", KEYS[0], b"QUFB\n")[0] == 400
    assert request(victim.tpm, "GET", "/tpm2-00.other")[0] == 404
    assert request(victim.tpm, "POST", KEYS[0], b"QUFB")[0] == 405
    assert oversized(victim.tpm, "PUT", KEYS[0]) == 413
    # A client that connects and says nothing is dropped; others are served.
    import socket
    import time

    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(victim.tpm)
    silent.settimeout(20)
    started = time.monotonic()
    assert rpc(bystander.var, "VM.get_NVRAM", "s", "x")["Status"] == "Success"
    assert request(bystander.tpm, "PUT", KEYS[1], b"QUFB")[0] == 204
    assert silent.recv(1) == b""  # closed by the daemon after --request-timeout
    assert time.monotonic() - started < 15
    silent.close()
    assert request(victim.tpm, "GET", KEYS[0])[0] == 200


def test_restart_resumes_every_socket(sim: SimProcess) -> None:
    with Daemon(xapi="unix:" + sim.socket) as d:
        d.start()
        vms = [VmSockets(d, sim) for _ in range(3)]
        for vm in vms:
            assert request(vm.tpm, "PUT", KEYS[0], b"QUFB")[0] == 204
        assert d.stop() == 0  # SIGTERM: clean exit
        for vm in vms:  # files are kept for the restart
            assert os.path.exists(vm.tpm) and os.path.exists(vm.var)
        d.start()
        for vm in vms:
            assert request(vm.tpm, "GET", KEYS[0])[:3:2] == (200, b"QUFB")
            assert rpc(vm.var, "VM.get_NVRAM", "s", "x")["Status"] == "Success"
        assert len(json.loads(d.ctl("list", "--json").stdout)) == 6
        assert d.stop() == 0


def test_embedded_store_without_xapi() -> None:
    with Daemon() as d:
        d.start()
        vm = VmSockets(d, None, gid=0)

        def send(method: str, key: str, body: bytes | None) -> tuple[int, bytes]:
            status, _, data = request(vm.tpm, method, key, body)
            return status, data

        check_swtpm_cycle(vm.tpm, send)
        assert request(vm.tpm, "PUT", KEYS[2], b"Vk9M")[0] == 204
        assert rpc(vm.var, "VM.get_NVRAM", "s", "x")["Value"] == {}
        assert rpc(vm.var, "VM.set_NVRAM_EFI_variables", "s", "x", "RUZJ")["Status"] == "Success"
        assert rpc(vm.var, "VM.get_secureboot_certificates_state", "s", "x")["Value"] == "ok"
        assert rpc(vm.var, "message.create", "s", "n", 1, "VM", "u", "b")["Status"] == "Success"
        status = d.status()
        assert status["upstream"]["kind"] == "local"
        assert d.stop() == 0
        d.start()  # durable across restarts
        assert request(vm.tpm, "GET", KEYS[2])[2] == b"Vk9M"
        assert rpc(vm.var, "VM.get_NVRAM", "s", "x")["Value"] == {"EFI-variables": "RUZJ"}
        out = d.ctl("vtpm_get_contents", "t", _local_vtpm(d, vm.vm_uuid)).stdout.decode()
        assert out.rstrip("\n").split(" ") == ["", "", "Vk9M"]
        assert d.stop() == 0


def _local_vtpm(d: Daemon, vm_uuid: str) -> str:
    import sqlite3

    db = sqlite3.connect(os.path.join(d.state_dir, "local-store.sqlite"))
    try:
        rows = db.execute("select * from sqlite_master where type='table'").fetchall()
        tables = {r[1] for r in rows}
        assert "vtpm" in tables, tables
        (vtpm,) = db.execute("select uuid from vtpm where vm_uuid = ?", (vm_uuid,)).fetchone()
        return vtpm
    finally:
        db.close()


def test_second_daemon_on_same_state_refuses_and_harms_nothing(sim: SimProcess) -> None:
    with Daemon(xapi="unix:" + sim.socket) as first:
        first.start()
        vm = VmSockets(first, sim)
        with open(first.sockets_file, "rb") as f:
            before = f.read()
        second = Daemon(first.root, xapi="unix:" + sim.socket)
        second.log_file = os.path.join(first.root, "second.log")
        with pytest.raises(RuntimeError, match="exited 75"):
            second.start()
        # Issue 18, item 2: the reason on one error line, no traceback.
        (line,) = [line for line in second.log().splitlines() if "cannot start" in line]
        assert "another xguard is running on" in line and "(exit status 75)" in line
        assert "Traceback" not in second.log()
        with open(first.sockets_file, "rb") as f:
            assert f.read() == before
        assert request(vm.tpm, "PUT", KEYS[0], b"QUFB")[0] == 204
        assert first.stop() == 0
