"""Soak-fuzz the domain sockets of a real daemon: ``python bench/fuzz.py
[--requests N] [--seed S] [--workers W] [--save DIR] [--json FILE]``.

Runs the generators of xguard/testing/hostile.py (the same ones the test
suite drives through Hypothesis) from a seeded random source: N requests
(default 100,000) on each socket kind of one VM of a daemon on the
embedded store, W client threads per kind, while a bystander VM's state
sits beside it. Prints, per socket kind, the status codes and how each
exchange ended, then the findings of xguard.testing.fuzzbed (a 5xx but
503, a critical log line, VM content in the log, the daemon gone or not
answering, the bystander's state changed), the log volume, and the
daemon's exit status on SIGTERM. Exit status 1 when anything was found.
Not part of the test suite (it takes tens of minutes); the last run's
figures are in doc/security.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the repository's code, whatever is installed

from xguard.testing.daemon import Daemon  # noqa: E402
from xguard.testing.fuzzbed import FuzzBed  # noqa: E402
from xguard.testing.hostile import RandomPick, swtpm_probe, varstored_probe  # noqa: E402

#: Check the daemon is alive every this many requests per worker.
CHECK_EVERY = 2000


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=100_000, help="per socket kind")
    p.add_argument("--seed", type=int, default=8)
    p.add_argument("--workers", type=int, default=2, help="client threads per socket kind")
    p.add_argument("--save", metavar="DIR", help="write unexpected probes there, to replay")
    p.add_argument("--json", metavar="FILE", help="write the figures there")
    return p.parse_args()


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    stop = threading.Event()
    errors: list[str] = []
    with Daemon() as daemon:
        daemon.start()
        bed = FuzzBed(daemon).setup()
        vms = [bed.target, bed.bystander]
        progress = {"swtpm": 0, "varstored": 0}

        def worker(kind: str, seed: int, count: int) -> None:
            pick = RandomPick(seed)
            try:
                for n in range(count):
                    if stop.is_set():
                        return
                    probe = swtpm_probe(pick) if kind == "swtpm" else varstored_probe(pick, vms)
                    bed.send(kind, probe)
                    progress[kind] += 1
                    if n % CHECK_EVERY == CHECK_EVERY - 1 and daemon.proc.poll() is not None:
                        errors.append(f"daemon exited during the {kind} run")
                        stop.set()
            except Exception as e:  # noqa: BLE001 - reported
                errors.append(f"{kind} worker {seed}: {e!r}")
                stop.set()

        threads = []
        for k, kind in enumerate(("swtpm", "varstored")):
            share = [args.requests // args.workers] * args.workers
            share[0] += args.requests - sum(share)
            for w in range(args.workers):
                seed = args.seed * 1000 + k * 100 + w
                threads.append(threading.Thread(target=worker, args=(kind, seed, share[w])))
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            time.sleep(10)
            print(f"[{time.monotonic() - started:6.0f} s] {progress}", flush=True)
        for t in threads:
            t.join()
        fuzz_s = time.monotonic() - started
        findings = errors + bed.findings()
        log_bytes = bed.log_bytes()
        log_lines = bed.log_text().count("\n")
        exit_code = daemon.stop()
        if exit_code != 0:
            findings.append(f"daemon exited {exit_code} on SIGTERM")
        if args.save:
            os.makedirs(args.save, exist_ok=True)
            for kind, tally in bed.tallies.items():
                for n, (code, probe) in enumerate(tally.unexpected):
                    with open(os.path.join(args.save, f"{kind}-{n}-{code}.bin"), "wb") as f:
                        f.write(probe.data)
        figures: dict[str, Any] = {
            "command": "python bench/fuzz.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "commit": subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                                     capture_output=True, text=True).stdout.strip(),
            "machine": f"{os.cpu_count()} cores, Python {platform.python_version()}",
            "seconds": round(fuzz_s, 1),
            "kinds": bed.report(),
            "log_bytes": log_bytes, "log_lines": log_lines,
            "daemon_exit": exit_code, "findings": findings,
        }
    print_figures(figures)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return 1 if findings else 0


def print_figures(figures: dict[str, Any]) -> None:
    print(f"\n{figures['command']}  ({figures['date']}, commit {figures['commit']}, "
          f"{figures['machine']})")
    for kind, r in figures["kinds"].items():
        print(f"{kind:9s} {r['requests']:7d} requests  codes {r['codes']}")
        print(f"{'':9s} ends {r['ends']}  slowest {r['slowest_s']} s, "
              f"unexpected 5xx {r['unexpected']}")
    total = sum(r["requests"] for r in figures["kinds"].values())
    print(f"{total} requests in {figures['seconds']} s ({total / figures['seconds']:.0f}/s); "
          f"daemon log grew {figures['log_bytes']} bytes ({figures['log_lines']} lines); "
          f"SIGTERM -> exit {figures['daemon_exit']}")
    print(f"findings: {len(figures['findings'])}")
    for finding in figures["findings"][:20]:
        print("  - " + finding[:2000])


if __name__ == "__main__":
    sys.exit(run(parse()))
