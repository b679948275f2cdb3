"""Restart under load (issue 12): a daemon serving 2,000 domain sockets is
restarted while 50 VMs write continuously (each VM through both of its
sockets: a varstored-style client opening a connection per request, no
retry, and a swtpm-style client on one kept-alive connection), for each
way a restart can happen:

- ``fd-store``: ``systemctl restart`` with the unit's fd store (the fake
  systemd of xguard/testing/fakesystemd.py keeps the sockets and starts the
  next process with them);
- ``re-exec``: ``systemctl reload``/SIGHUP, the daemon re-executes itself
  with its sockets inherited (a unit without the fd store);
- ``no-handover``: what a restart did before issue 12 (the unit without
  the store, stopped and started), for comparison.

Reported per way: connections refused (target 0), failed requests
(target 0), kept-alive requests sent again because the server closed the
idle connection in between (what swtpm does on its own), the worst
request latency across the restarts (target <= 1 s) against the steady
state before them, the restart's own duration (signal to READY=1), and
whether upstream ended with every acknowledged write::

    python bench/restart.py                 # 2,000 sockets, 50 writing VMs, 3 restarts each
    python bench/restart.py --quick         # 200 sockets, 10 VMs, 2 restarts
    python bench/restart.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the repository's code, whatever is installed

from bench.procs import BenchDaemon, compile_tree, rss_mb  # noqa: E402
from bench.report import progress  # noqa: E402
from xguard.control.commands import Status, VarstoreCreate, VtpmCreate  # noqa: E402
from xguard.testing.daemon import wait_for  # noqa: E402
from xguard.testing.fakesystemd import FakeSystemd  # noqa: E402
from xguard.testing.fuzzbed import control_call  # noqa: E402
from xguard.testing.restartload import Load, nvram_value, totals, tpm_value  # noqa: E402
from xguard.testing.simclient import SimProcess  # noqa: E402

#: way -> (fd store size of the unit, what restarts it)
WAYS = {"fd-store": (16384, "restart"), "re-exec": (0, "reload"),
        "no-handover": (0, "restart")}


def status(control: str) -> dict[str, Any]:
    answer = control_call(control, Status)
    pieces, n = [answer[b"status"]], 1
    while f"status.{n}".encode() in answer:
        pieces.append(answer[f"status.{n}".encode()])
        n += 1
    return json.loads(b"".join(pieces))  # type: ignore[no-any-return]


def drained(control: str) -> bool:
    services = status(control)["services"].values()
    return all(s["mode"] == "Direct" and not s["pending"] and not s["queue_depth"]
               for s in services)


def one_way(way: str, sim: SimProcess, vms: list[dict[str, Any]], tmp: str, *,
            writers: int, restarts: int, pause: float, settle: float,
            keep: bool = False) -> dict[str, Any]:
    fdstore_max, action = WAYS[way]
    root = os.path.join(tmp, way)
    os.makedirs(root)
    daemon = BenchDaemon(root, "unix:" + sim.socket)
    sd = FakeSystemd(daemon, fdstore_max=fdstore_max)
    try:
        sd.start(timeout=120)
        sockdir = daemon.sockets_dir
        t0 = time.perf_counter()
        for i, vm in enumerate(vms):
            vm["tpm"], vm["var"] = os.path.join(sockdir, f"{i}.t"), os.path.join(sockdir, f"{i}.v")
            control_call(daemon.control, VtpmCreate, dbg="bench", vm_uuid=vm["vm_uuid"], gid=0,
                         path=vm["tpm"])
            control_call(daemon.control, VarstoreCreate, dbg="bench", vm_uuid=vm["vm_uuid"],
                         gid=0, path=vm["var"])
        created = time.perf_counter() - t0
        sd.sync()
        progress(f"{way}: {2 * len(vms)} sockets created in {created:.1f}s, "
            f"{len(sd.names())} in the fd store")
        writing = vms[:writers]
        load = Load([("varstored", vm["var"], vm["vm_uuid"]) for vm in writing]
                    + [("swtpm", vm["tpm"], vm["vm_uuid"]) for vm in writing],
                    pause=pause).start()
        time.sleep(settle)
        first = time.perf_counter()
        durations = []
        for n in range(restarts):
            started = time.perf_counter()
            if action == "reload":
                sd.reload(timeout=120)
            else:
                sd.restart(timeout=120)
            durations.append(time.perf_counter() - started)
            progress(f"{way}: restart {n + 1}/{restarts} took {durations[-1]:.2f}s "
                f"(signal to READY=1)")
            time.sleep(settle)
        last = time.perf_counter()
        stats = load.stop()
        before = totals(stats, until=first)
        across = totals(stats, since=first, until=last)
        wait_for(lambda: drained(daemon.control), timeout=300, interval=0.5,
                 what="the caches to drain")
        lost = 0
        for s in stats:
            if not s.acked:
                continue
            if s.kind == "swtpm":
                vtpm = sim.client.vtpm_state(vm_of(writing, s.vm)["vtpm_uuid"])
                lost += vtpm["contents"].split(" ")[0] != tpm_value(s.vm, s.acked).decode()
            else:
                nvram = sim.client.vm_state(s.vm)["nvram"]
                lost += nvram.get("EFI-variables") != nvram_value(s.vm, s.acked)
        sockets = sum(status(daemon.control)["sockets"].values())
        rss = rss_mb(daemon.pid)
        return {
            "way": way, "sockets": sockets, "writing_vms": len(writing),
            "clients": len(stats), "restarts": restarts,
            "restart_s": durations, "create_s": created, "rss_mb": rss,
            "steady": before,
            "across_restarts": across,
            "total": totals(stats),
            "acknowledged_not_delivered": lost,
        }
    finally:
        try:
            if daemon.proc is not None and daemon.proc.poll() is None:
                sd.stop()
        finally:
            sd.close()
            if not keep:
                daemon.cleanup()


def vm_of(vms: list[dict[str, Any]], uuid: str) -> dict[str, Any]:
    return next(vm for vm in vms if vm["vm_uuid"] == uuid)


def table(results: list[dict[str, Any]]) -> str:
    head = ["way", "sockets", "restarts", "requests", "refused", "failed", "resent",
            "p50 ms", "p99 ms", "worst ms", "steady worst ms", "restart s", "lost"]
    rows = []
    for r in results:
        a = r["across_restarts"]
        rows.append([r["way"], str(r["sockets"]), str(r["restarts"]), str(a["requests"]),
                     str(a["refused"]), str(a["failed"]), str(a["retried_keepalive"]),
                     f"{a['p50_latency_s'] * 1e3:.0f}", f"{a['p99_latency_s'] * 1e3:.0f}",
                     f"{a['worst_latency_s'] * 1e3:.0f}",
                     f"{r['steady']['worst_latency_s'] * 1e3:.0f}",
                     "/".join(f"{d:.2f}" for d in r["restart_s"]),
                     str(r["acknowledged_not_delivered"])])
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                     for row in [head, *rows]) + "\n"


def machine() -> str:
    load = os.getloadavg()
    return (f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
            f"Python {sys.version.split()[0]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sockets", type=int, help="domain sockets served (default 2000)")
    p.add_argument("--writers", type=int, help="VMs writing during the restarts (default 50)")
    p.add_argument("--restarts", type=int, help="restarts per way (default 3)")
    p.add_argument("--pause", type=float, default=0.5,
                   help="seconds each client waits between requests (default 0.5)")
    p.add_argument("--settle", type=float, default=3.0,
                   help="seconds of load before, between and after restarts (default 3)")
    p.add_argument("--ways", default=",".join(WAYS), help="comma-separated: " + ", ".join(WAYS))
    p.add_argument("--quick", action="store_true", help="200 sockets, 10 VMs, 2 restarts")
    p.add_argument("--json", metavar="FILE", help="write the results to FILE")
    p.add_argument("--keep", action="store_true", help="keep the daemons' files and logs")
    args = p.parse_args()
    sockets = args.sockets or (200 if args.quick else 2000)
    writers = args.writers or (10 if args.quick else 50)
    restarts = args.restarts or (2 if args.quick else 3)
    compile_tree()
    tmp = tempfile.mkdtemp(prefix="xr")
    sim = SimProcess(os.path.join(tmp, "xapi"), os.path.join(tmp, "admin"),
                     log_file=os.path.join(tmp, "sim.log"))
    sim.start()
    results = []
    try:
        progress(f"seeding {sockets // 2} VMs in the simulator")
        vms = [sim.client.seed_vm() for _ in range(sockets // 2)]
        for way in args.ways.split(","):
            progress(f"{way}: {sockets} sockets, {writers} VMs writing, {restarts} restarts")
            results.append(one_way(way, sim, [dict(vm) for vm in vms], tmp, writers=writers,
                                   restarts=restarts, pause=args.pause, settle=args.settle,
                                   keep=args.keep))
    finally:
        sim.stop()
        if args.keep:
            progress(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    command = "python bench/restart.py " + " ".join(sys.argv[1:])
    sys.stdout.write(f"$ {command.rstrip()}\n# {machine()}\n{table(results)}")
    for r in results:
        errors = r["across_restarts"]["errors"]
        if errors:
            sys.stdout.write(f"{r['way']}: first errors: {errors}\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "machine": machine(), "results": results}, f,
                      indent=1)


if __name__ == "__main__":
    main()
