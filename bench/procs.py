"""The processes a benchmark runs: the daemon as an operator starts it
(or built with the upstream daemon's design, bench/design_tap.py), and
what we read about a process from /proc."""

from __future__ import annotations

import compileall
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from xguard.testing.daemon import BIN, REPO, Daemon

#: The upstream daemon's design (bench/design_tap.py), compared in the
#: storm and drain scenarios.
UPSTREAM_DESIGN = ("serial", "no-coalesce", "no-handle-cache")
#: Extra daemon options for every BenchDaemon (run.py --daemon-args), for
#: experiments such as a longer --direct-deadline; empty = the defaults.
DAEMON_ARGS: list[str] = []


def _run_base() -> str:
    """Where the benchmarks put what a host keeps in /run (the domain
    sockets, the sockets file): a tmpfs, as on a host. On the disk-backed
    temporary directory every socket's bind is a journaled inode creation
    (0.3-0.8 ms here, 12 us on tmpfs), which would make a 2,000-socket
    resume measure the file system instead of xguard."""
    try:
        with open("/proc/mounts") as f:
            mounts = {fields[1]: fields[2] for fields in (line.split() for line in f)}
    except OSError:
        mounts = {}
    for path in ("/dev/shm", "/run"):
        if mounts.get(path) == "tmpfs" and os.access(path, os.W_OK):
            return path
    return tempfile.gettempdir()


#: See :func:`_run_base`.
RUN_BASE = _run_base()


class BenchDaemon(Daemon):
    """The daemon with its own defaults (the test harness shortens
    deadlines, which would change what we measure); with ``design`` (names
    of bench/design_tap.py), built with the upstream daemon's design."""

    def __init__(self, root: str, xapi: str, *, design: Sequence[str] = (),
                 extra: Sequence[str] = (), tree: str | None = None) -> None:
        os.makedirs(root, exist_ok=True)
        super().__init__(root, xapi=xapi, extra=[*DAEMON_ARGS, *extra])
        self.design = tuple(design)
        #: The host's /run: the sockets file and a directory for the domain
        #: sockets (``sockets_dir``), on tmpfs (:data:`RUN_BASE`); the state
        #: directory stays on disk, where its fsyncs are real.
        self.run_dir = tempfile.mkdtemp(prefix="xbr", dir=RUN_BASE)
        self.sockets_file = os.path.join(self.run_dir, "active.json")
        self.sockets_dir = os.path.join(self.run_dir, "s")
        os.makedirs(self.sockets_dir)
        #: Another commit's code to run (run.py --baseline), or None for
        #: the checkout's.
        self.tree = tree

    def argv(self) -> list[str]:
        if self.tree is not None:
            # Older commits had no ``python -m xguard``: their entry point.
            new = os.path.exists(os.path.join(self.tree, "xguard", "__main__.py"))
            return [sys.executable, "-m", "xguard" if new else "xguard.run", "-n",
                    "--pidfile=", "--logfile", self.log_file, "--state-dir", self.state_dir,
                    "--sockets-file", self.sockets_file, "--control", "unix:" + self.control,
                    "--xapi", str(self.xapi), *self.extra]
        command = [sys.executable, "-m", "bench.design_daemon" if self.design else "xguard"]
        design = ["--design", ",".join(self.design)] if self.design else []
        return [*command, "-n", "--pidfile=", "--logfile", self.log_file,
                "--state-dir", self.state_dir, "--sockets-file", self.sockets_file,
                "--control", "unix:" + self.control, "--xapi", str(self.xapi),
                *design, *self.extra]

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")  # bench.*
        if self.tree is not None:  # its xguard before the checkout's
            env["PYTHONPATH"] = self.tree + os.pathsep + env["PYTHONPATH"]
        return env

    def start(self, timeout: float = 120.0) -> "BenchDaemon":
        """Start and wait for READY=1 (a 2000-socket resume under load may
        take a while)."""
        super().start(timeout)
        return self

    def cleanup(self) -> None:
        super().cleanup()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def export_tree(rev: str, into: str) -> str:
    """The files of commit ``rev`` of this repository, in ``into``; its
    commit id (run.py --baseline: older code measured in the same run)."""
    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--verify", rev + "^{commit}"],
                            check=True, capture_output=True, text=True).stdout.strip()
    os.makedirs(into)
    archive = subprocess.Popen(["git", "-C", REPO, "archive", commit], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", into], stdin=archive.stdout, check=True)
    assert archive.stdout is not None
    archive.stdout.close()
    if archive.wait() != 0:
        raise RuntimeError(f"git archive {commit} failed")
    compile_tree(into)
    return commit


def compile_tree(tree: str = REPO) -> None:
    """Byte-compile the code the daemons run from ``tree``, as an install
    does (pip and distribution packages ship ``.pyc`` files). Run from a
    checkout with ``PYTHONDONTWRITEBYTECODE`` set (as some CI and
    development shells are), every daemon start would compile xguard's
    ~100 modules from source again: ~70-100 ms more of every start, restart
    and resume measured, which no host pays. ``py_compile`` writes the
    caches whatever that variable says; the daemon only reads them."""
    for part in ("xguard", "bench", os.path.join("twisted", "plugins")):
        path = os.path.join(tree, part)
        if os.path.isdir(path) and not compileall.compile_dir(path, quiet=1):
            raise RuntimeError(f"byte-compiling {path} failed")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class PySpy:
    """``py-spy record`` on a pid, in raw (collapsed stacks) format, until
    :meth:`stop`. Absent py-spy, a no-op that says so."""

    def __init__(self, pid: int, out: str, rate: int = 200) -> None:
        self.out = out
        exe = os.path.join(BIN, "py-spy")
        self.available = os.path.exists(exe)
        self.proc: subprocess.Popen[bytes] | None = None
        if self.available:
            self.proc = subprocess.Popen(
                [exe, "record", "--pid", str(pid), "--format", "raw", "--rate", str(rate),
                 "--output", out, "--threads"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)  # let it attach

    def stop(self) -> str | None:
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.out if os.path.exists(self.out) else None
