"""What a real daemon's log looks like to the host: journald's priorities
on stdout, syslog datagrams as a syslog daemon receives them, and a restart
that logs one summary line instead of a line per socket."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.integration.conftest import VmSockets
from tests.integration.harness import KEYS
from xguard.testing.daemon import Daemon, wait_for
from xguard.testing.simclient import SimProcess
from xguard.testing.unixhttp import request

pytestmark = pytest.mark.integration

VM = "6a1f1e3c-3d0a-4a8e-9d3c-2b1e7f0c9a11"


def _seed_bad_active_file(daemon: Daemon) -> None:
    """An entry that cannot resume (its directory is gone): an error line."""
    os.makedirs(os.path.dirname(daemon.sockets_file), exist_ok=True)
    with open(daemon.sockets_file, "w") as f:
        json.dump([{"vm_uuid": VM, "path": "/nonexistent-xg/vm.tpm", "gid": 0,
                    "typ": "Swtpm"}], f)


def _exercise(daemon: Daemon) -> None:
    """An info line (create), a warning (destroy of an unknown socket)."""
    daemon.ctl("vtpm_create", "t", VM, "0", os.path.join(daemon.root, "vm.tpm"))
    daemon.ctl("vtpm_destroy", "t", "0", os.path.join(daemon.root, "unknown.tpm"))


class StdoutDaemon(Daemon):
    """``twistd -n xguard`` logging to stdout, stdout being a file that
    $JOURNAL_STREAM names, as systemd runs it with StandardOutput=journal."""

    def __init__(self) -> None:
        super().__init__()
        self.stdout_file = os.path.join(self.root, "stdout.txt")
        open(self.stdout_file, "w").close()

    def argv(self) -> list[str]:
        argv = super().argv()
        i = argv.index("--logfile")
        del argv[i:i + 2]
        return ["sh", "-c", 'exec "$@" >>"$XG_STDOUT"', "sh", *argv]

    def environment(self) -> dict[str, str]:
        st = os.stat(self.stdout_file)
        return {**super().environment(), "XG_STDOUT": self.stdout_file,
                "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}

    def stdout(self) -> str:
        with open(self.stdout_file) as f:
            return f.read()


def test_journald_priorities_on_stdout() -> None:
    with StdoutDaemon() as d:
        _seed_bad_active_file(d)
        d.start()
        _exercise(d)
        assert d.stop() == 0
        lines = d.stdout().splitlines()
    assert lines, "nothing on stdout"
    unprefixed = [line for line in lines if not re.match(r"<[0-7]>", line)]
    assert unprefixed == []
    by_text = {line[3:]: line[:3] for line in lines}
    assert [p for t, p in by_text.items() if t.startswith("xguard ready")] == ["<6>"]
    assert [p for t, p in by_text.items() if t.startswith("destroy of unknown socket")] \
        == ["<4>"]
    assert [p for t, p in by_text.items() if t.startswith("not resuming Swtpm socket")] \
        == ["<3>"]
    # journald timestamps lines itself
    assert not any(re.match(r"<\d>\d{4}-\d\d-\d\d", line) for line in lines)


# -- syslog: /dev/log replaced inside a private mount namespace ---------------
_PRIVATE_DEV = r"""
set -e
mkdir -p "$XG_ROOT/realdev"
mount --bind /dev "$XG_ROOT/realdev"
mount -t tmpfs -o mode=755 xgdev /dev
for n in null zero full random urandom tty; do
    [ -e "$XG_ROOT/realdev/$n" ] || continue
    touch "/dev/$n"; mount --bind "$XG_ROOT/realdev/$n" "/dev/$n"
done
ln -s "$XG_ROOT/devlog" /dev/log
exec "$@"
"""


class SyslogDaemon(Daemon):
    """``twistd -n --syslog xguard`` whose /dev/log is a datagram socket of
    the test's, in a mount namespace of its own (the host's /dev untouched)."""

    def __init__(self) -> None:
        super().__init__()
        self.devlog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.devlog.bind(os.path.join(self.root, "devlog"))
        self.devlog.settimeout(0.2)
        self.messages: list[str] = []
        self.reading = True
        # Read as a syslog daemon does, all along: a datagram socket's queue
        # is short, and xguard drops what does not fit rather than wait.
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while self.reading:
            try:
                self.messages.append(self.devlog.recv(65536).decode())
            except TimeoutError:
                continue

    def argv(self) -> list[str]:
        argv = super().argv()
        argv.insert(argv.index("xguard"), "--syslog")
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", _PRIVATE_DEV,
                "sh", *argv]

    def environment(self) -> dict[str, str]:
        return {**super().environment(), "XG_ROOT": self.root}

    def received(self) -> list[str]:
        self.reading = False
        self.reader.join()
        return self.messages

    def cleanup(self) -> None:
        self.reading = False
        self.reader.join()
        self.devlog.close()
        super().cleanup()


@pytest.fixture
def syslog_daemon() -> Iterator[SyslogDaemon]:
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) is not installed")
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a mount namespace here: {probe.stderr.decode().strip()}")
    d = SyslogDaemon()
    try:
        yield d
    finally:
        d.cleanup()


def test_syslog_severities_facility_and_tag(syslog_daemon: SyslogDaemon) -> None:
    d = syslog_daemon
    _seed_bad_active_file(d)
    d.start()
    _exercise(d)
    pid = d.proc.pid if d.proc else 0
    assert d.stop() == 0
    messages = d.received()
    pattern = re.compile(r"<(\d+)>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d xguard\[(\d+)\]: (.*)")
    parsed = [pattern.fullmatch(m) for m in messages]
    assert messages and all(parsed), messages
    assert {int(m.group(2)) for m in parsed if m} == {pid}

    def pri(prefix: str) -> list[int]:
        return [int(m.group(1)) for m in parsed if m and m.group(3).startswith(prefix)]

    # facility daemon (3 << 3 = 24) + severity: info 6, warning 4, err 3
    assert pri("xguard ready") == [30]
    assert pri("destroy of unknown socket") == [28]
    assert pri("not resuming Swtpm socket") == [27]


# -- restart: one summary line ------------------------------------------------
def test_restart_logs_a_summary_not_a_line_per_socket() -> None:
    with Daemon() as d:
        d.start()
        paths = []
        for i in range(20):
            vm = str(uuid.uuid4())
            paths.append(os.path.join(d.root, f"{i:02d}.tpm"))
            d.ctl("vtpm_create", "t", vm, "0", paths[-1])
        d.restart()
        assert d.stop() == 0
        with open(d.log_file) as f:
            log = f.read()
    # From the stop of the first run to the end of the second.
    restart = log[log.index("received signal"):]
    assert "resumed 20 domain sockets (20 Swtpm, 0 Varstored), skipped 0" in restart
    per_socket = [line for line in restart.splitlines() if any(p in line for p in paths)]
    assert per_socket == []


# -- an xapi restart: two lines, not one per retry (issue 18, item 1) -----------
def test_an_xapi_restart_is_two_warning_lines(sim_up: SimProcess) -> None:
    """xapi stops (connections refused: the prober logs in once a second,
    the flusher retries), comes back answering HOST_STILL_BOOTING for a
    while, then answers: ``journalctl -p warning`` shows the outage's start
    and its end, nothing else."""
    with StdoutDaemon() as d:
        d.xapi = "unix:" + sim_up.socket
        d.start()
        vm = VmSockets(d, sim_up)
        assert request(vm.tpm, "PUT", KEYS[0], b"QUFB")[0] == 204
        sim_up.client.set_mode("refuse")
        for _ in range(6):  # writes cached meanwhile, the flusher retrying
            assert request(vm.tpm, "PUT", KEYS[0], b"QUFC")[0] == 204
            time.sleep(1)
        sim_up.client.fail_next(3)  # back, but still booting (the flusher backs off)
        sim_up.client.set_mode("up")

        def over() -> bool:
            upstream = d.status()["upstream"]
            return upstream["reachable"] is True and upstream["down_since"] is None

        wait_for(over, timeout=30, what="the outage to end")
        assert d.stop() == 0
        lines = d.stdout().splitlines()
    # Up to the stop (the harness is no service manager: STOPPING=1 warns).
    lines = lines[:next(i for i, line in enumerate(lines) if "received signal" in line)]
    serious = [line for line in lines if re.match(r"<[0-4]>", line)]
    assert len(serious) == 2, serious
    assert "unreachable (" in serious[0] and "answers again after" in serious[1], serious
    # The retries are there for whoever asks for debug, not at warning.
    assert not any("Login to" in line for line in serious)
