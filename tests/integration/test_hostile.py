"""Hostile guests against a real daemon (issue 8): generated raw HTTP and
XML-RPC on both socket kinds, oversized bodies, bursts of connections,
floods of bad requests.

Every fuzz test checks, besides its own assertions, what FuzzBed.findings
lists: no 5xx but 503, no critical log line, no VM content in the log, the
daemon alive and answering, the other VM's state untouched. The generators
live in xguard.testing.hostile; bench/fuzz.py runs them for 10^5 requests
per socket kind.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_xmlrpc import WIRE
from xguard.control.commands import VarstoreCreate, VarstoreDestroy
from xguard.testing.daemon import Daemon
from xguard.testing.fuzzbed import FuzzBed, control_call
from xguard.testing.hostile import (
    HypothesisPick,
    Probe,
    apply_edits,
    exchange,
    status_codes,
    swtpm_probe,
    varstored_probe,
)
from xguard.testing.unixhttp import UnixHTTPConnection, request

pytestmark = pytest.mark.integration

FUZZ = settings(max_examples=250, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def bed() -> Iterator[FuzzBed]:
    """A daemon on the embedded store, with a target and a bystander VM."""
    with Daemon() as daemon:
        daemon.start()
        yield FuzzBed(daemon).setup()
        assert daemon.stop() == 0, daemon.log()


def assert_deliberate(codes: list[int], probe: Probe) -> None:
    unexpected = [c for c in codes if c >= 500 and c != 503]
    assert not unexpected, f"HTTP {unexpected} for {probe.data[:500]!r}"


def assert_clean(bed: FuzzBed) -> None:
    findings = bed.findings()
    assert not findings, "\n\n".join(findings)


# -- generated requests ---------------------------------------------------------

@FUZZ
@given(data=st.data())
def test_fuzz_swtpm_socket(bed: FuzzBed, data: st.DataObject) -> None:
    probe = swtpm_probe(HypothesisPick(data))
    _, codes = bed.send("swtpm", probe)
    assert_deliberate(codes, probe)


@FUZZ
@given(data=st.data())
def test_fuzz_varstored_socket(bed: FuzzBed, data: st.DataObject) -> None:
    probe = varstored_probe(HypothesisPick(data), [bed.target, bed.bystander])
    _, codes = bed.send("varstored", probe)
    assert_deliberate(codes, probe)


def _samples() -> list[bytes]:
    folder = os.path.join(WIRE, "requests")
    return [open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))]


@FUZZ
@given(sample=st.sampled_from(_samples()),
       edits=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 3), st.binary(max_size=4)),
                      min_size=1, max_size=6))
def test_fuzz_mutated_real_requests(bed: FuzzBed, sample: bytes,
                                    edits: list[tuple[int, int, bytes]]) -> None:
    """varstored's own requests, damaged byte by byte, on both sockets."""
    body = apply_edits(sample, edits)
    raw = (b"POST / HTTP/1.1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
           + body)
    for kind in ("varstored", "swtpm"):
        probe = Probe(raw, (b"POST",), True, "mutated-sample")
        _, codes = bed.send(kind, probe)
        assert_deliberate(codes, probe)
        assert codes, f"no answer on {kind}"


def test_fuzzing_left_everything_clean(bed: FuzzBed) -> None:
    """Runs after the fuzz tests above (same module daemon): the log, the
    daemon and the other VM."""
    assert_clean(bed)
    # A rate-limited trickle: a few lines per socket and minute at most.
    assert bed.log_bytes() < 40_000, bed.log_text()[-3000:]


# -- the regressions, on the real stack ----------------------------------

def test_requests_without_host_are_served(bed: FuzzBed) -> None:
    for version in (b"HTTP/1.0", b"HTTP/1.1"):
        probe = Probe(b"GET /tpm2-00.permall " + version + b"\r\nConnection: close\r\n\r\n",
                      (b"GET",), True, "no-host")
        assert status_codes(exchange(bed.sockets["swtpm"], probe).data) == [200]
        body = open(os.path.join(WIRE, "requests", "VM.get_NVRAM.request.0"), "rb").read()
        probe = Probe(b"POST / " + version + b"\r\nConnection: close\r\nContent-Length: %d\r\n"
                      b"\r\n" % len(body) + body, (b"POST",), True, "no-host")
        assert status_codes(exchange(bed.sockets["varstored"], probe).data) == [200]
    assert_clean(bed)


def test_crashing_targets_get_deliberate_answers(bed: FuzzBed) -> None:
    expected = {b"/tpm2-00%2Epermall": 200, b"//tpm2-00.permall": 200,
                b"xtpm2-00.permall": 400, b"/tpm2-00\x80permall": 400, b"/%ff": 400,
                b"http://x/tpm2-00.permall": 200}
    for target, code in expected.items():
        probe = Probe(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                      (b"GET",), True, "target")
        assert status_codes(exchange(bed.sockets["swtpm"], probe).data) == [code], target
    assert_clean(bed)


def test_smuggling_framing_is_400_and_stores_nothing(bed: FuzzBed) -> None:
    before = request(bed.sockets["swtpm"], "GET", "/tpm2-00.savestate")[2]
    for framing in (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
                    b"Content-Length: 8\r\nTransfer-Encoding: identity\r\n",
                    b"Content-Length: 8\r\nTransfer-Encoding: chunked\r\n"):
        raw = (b"PUT /tpm2-00.savestate HTTP/1.1\r\n" + framing
               + b"\r\n8\r\nU01VR0dMRQ==\r\n0\r\n\r\n")
        probe = Probe(raw, (b"PUT",), True, "smuggle")
        assert status_codes(exchange(bed.sockets["swtpm"], probe).data) == [400]
    assert request(bed.sockets["swtpm"], "GET", "/tpm2-00.savestate")[2] == before


def test_oversized_body_gets_its_413_not_a_broken_pipe(bed: FuzzBed) -> None:
    # Python's http.client sends the whole body before reading: the server
    # must read (and drop) it to be heard.
    for path, method in ((bed.sockets["swtpm"], "PUT"), (bed.sockets["varstored"], "POST")):
        conn = UnixHTTPConnection(path, timeout=30)
        try:
            conn.request(method, "/tpm2-00.permall", body=b"QUJD" * (700 * 1024))
            response = conn.getresponse()
            assert response.status == 413
            response.read()
        finally:
            conn.close()
    assert_clean(bed)


def test_bad_requests_flood_writes_a_bounded_log(bed: FuzzBed) -> None:
    before = bed.log_bytes()
    refused = Probe(b"POST / HTTP/1.1\r\nConnection: close\r\nContent-Length: 4\r\n\r\n<x/>",
                    (b"POST",), True, "flood")
    framing = Probe(b"PUT /tpm2-00.permall HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\nxyz",
                    (b"PUT",), True, "flood")
    for _ in range(300):
        assert status_codes(exchange(bed.sockets["varstored"], refused).data) == [400]
        assert status_codes(exchange(bed.sockets["swtpm"], framing).data) == [400]
    # 600 refusals: a burst of lines per socket (and a summary later).
    assert bed.log_bytes() - before < 3_000, bed.log_text()[-3000:]


def test_boot_storm_of_connections_needs_no_retry(bed: FuzzBed) -> None:
    """2,000 connections opened at once (16 sockets, 125 each) while the
    daemon cannot accept: every connect succeeds and is answered."""
    daemon = bed.daemon
    paths = [os.path.join(daemon.root, f"storm{n}.var") for n in range(16)]
    for path in paths:
        control_call(daemon.control, VarstoreCreate, dbg="storm", vm_uuid=str(uuid.uuid4()),
                     gid=0, path=path)
    body = open(os.path.join(WIRE, "requests", "session.login_with_password.request.0"),
                "rb").read()
    raw = (b"POST / HTTP/1.1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
           + body)
    assert daemon.proc is not None
    clients: list[socket.socket] = []
    refused = 0
    daemon.proc.send_signal(signal.SIGSTOP)
    try:
        for path in paths:
            for _ in range(125):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.setblocking(False)
                try:
                    s.connect(path)
                    s.send(raw)
                    clients.append(s)
                except BlockingIOError:
                    refused += 1
                    s.close()
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
    try:
        assert refused == 0
        answered = 0
        deadline = time.monotonic() + 60
        for s in clients:
            s.setblocking(True)
            s.settimeout(max(1.0, deadline - time.monotonic()))
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            answered += status_codes(data) == [200]
        assert answered == 2000
    finally:
        for s in clients:
            s.close()
        for path in paths:
            control_call(daemon.control, VarstoreDestroy, dbg="storm", gid=0, path=path)
    assert_clean(bed)


def test_http_client_keep_alive_still_works(bed: FuzzBed) -> None:
    """The SDK's way (one connection, many calls) after all the above."""
    conn = UnixHTTPConnection(bed.sockets["swtpm"], timeout=10)
    try:
        for _ in range(3):
            conn.request("PUT", "/tpm2-00.volatilestate", body=b"QUJD")
            response = conn.getresponse()
            response.read()
            assert response.status == 204
    finally:
        conn.close()
