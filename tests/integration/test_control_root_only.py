"""The control channel as a non-root process meets it: the 0600 socket
refuses the connect, and should the file's mode be relaxed, the daemon
itself closes the connection after reading the peer's credentials."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
from collections.abc import Iterator

import pytest

from xguard.testing.daemon import Daemon

pytestmark = pytest.mark.integration

NOBODY = 65534
#: An AMP ``Status`` request, as xguard-ctl sends it.
STATUS_BOX = (b"\x00\x04_ask\x00\x011" b"\x00\x08_command\x00\x06Status" b"\x00\x00")


def _as_uid(uid: int, path: str) -> str:
    """Connect to ``path`` from a child process running as ``uid``, send a
    Status request and report what happened: the child is forked, not
    exec'd, so it needs no Python installation readable by ``uid``."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        outcome = "?"
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            try:
                s.connect(path)
            except PermissionError:
                outcome = "EACCES"
            else:
                data = b""
                try:
                    s.sendall(STATUS_BOX)
                    while chunk := s.recv(65536):
                        data += chunk
                        if b"_answer" in data:
                            break
                except (BrokenPipeError, ConnectionResetError):
                    # Closed before or after the request was sent; unread
                    # data makes the kernel reset instead of a FIN.
                    pass
                outcome = "answered" if b"_answer" in data else f"closed after {len(data)} bytes"
        except BaseException as e:  # report, never return into pytest
            outcome = f"error {e!r}"
        finally:
            os.write(write_end, outcome.encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        result = f.read().decode()
    os.waitpid(pid, 0)
    return result


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    d = Daemon()
    d.start()
    yield d
    try:
        assert d.stop() == 0, d.log()
    finally:
        d.cleanup()


def test_non_root_is_refused(daemon: Daemon) -> None:
    assert stat.S_IMODE(os.stat(daemon.control).st_mode) == 0o600
    # Let nobody reach the socket file's directory (mkdtemp made it 0700).
    os.chmod(daemon.root, 0o711)
    assert _as_uid(NOBODY, daemon.control) == "EACCES"

    # Whatever the file's mode becomes, the daemon itself checks who it is.
    os.chmod(daemon.control, 0o666)
    assert _as_uid(NOBODY, daemon.control) == "closed after 0 bytes"
    assert _as_uid(0, daemon.control) == "answered"

    refused = [line for line in daemon.log().splitlines() if "refused a connection" in line]
    assert len(refused) == 1, daemon.log()
    assert f"uid {NOBODY}" in refused[0]


def test_tcp_control_refused_at_start_up() -> None:
    with Daemon() as d:
        d.extra = ["--control", "tcp:0:interface=127.0.0.1"]
        proc = subprocess.run(d.argv(), capture_output=True, text=True, timeout=60,
                              env=d.environment(), cwd=d.root)
        assert proc.returncode != 0
        assert "--control must be a UNIX socket endpoint" in proc.stdout + proc.stderr
        assert not os.path.exists(d.state_dir)  # refused before anything started
