"""xguard benchmarks: ``python bench/run.py [--quick] [--json FILE]``.

Starts the xapi simulator, a bare Twisted server and the daemon as real
processes, runs the scenarios of doc/performance.md (and bench/flood.py's) and prints each
xguard figure next to its floor measured in the same run. ``--quick``
scales everything down (under 3 minutes); ``--plots DIR`` writes the PNGs;
``--profile DIR`` also records the daemon with py-spy (separate, unmeasured
passes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the repository's code, whatever is installed

from bench import flood, report, scenarios  # noqa: E402
from bench.procs import UPSTREAM_DESIGN, export_tree  # noqa: E402

ALL = ("latency", "flood", "storm", "footprint", "drain")
#: Drain configurations: xguard, the upstream design, then each knob alone.
DRAINS = {"xguard": (), "upstream": UPSTREAM_DESIGN, "serial": ("serial",),
          "no-coalesce": ("no-coalesce",), "no-handle-cache": ("no-handle-cache",)}


def machine() -> dict[str, Any]:
    import twisted

    def sh(*argv: str) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
        except OSError:
            return ""

    model = next((line.split(":", 1)[1].strip() for line in sh("lscpu").splitlines()
                  if line.startswith("Model name")), platform.processor())
    mem = next((line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal")),
               "0")
    fs = sh("df", "-T", tempfile.gettempdir()).splitlines()[-1:]
    return {"nproc": os.cpu_count(), "cpu": model, "mem_gib": round(int(mem) / 2**20, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "twisted": twisted.__version__, "tmp_fs": fs[0].split()[1] if fs else "?",
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "commit": sh("git", "-C", REPO, "rev-parse", "--short", "HEAD").strip(),
            "uncommitted_files": len(sh("git", "-C", REPO, "status", "--porcelain").splitlines())}


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, under 3 minutes")
    p.add_argument("--json", metavar="FILE", help="write every result to FILE")
    p.add_argument("--plots", metavar="DIR", help="write perf-*.png into DIR")
    p.add_argument("--profile", metavar="DIR", help="py-spy the daemon; stacks into DIR")
    p.add_argument("--only", action="append", choices=ALL, help="run only these scenarios")
    p.add_argument("--sizes", help="boot-storm Ns, comma-separated (default 250,500,1000)")
    p.add_argument("--samples", type=int, help="latency samples per series")
    p.add_argument("--daemon-args", default="",
                   help="extra options for every daemon, e.g. '--direct-deadline 30'")
    p.add_argument("--baseline", metavar="REV",
                   help="also run each storm with commit REV's daemon, just before the "
                        "checkout's (daemon CPU per VM is compared with it)")
    p.add_argument("--drains",
                   help="drain configurations, comma-separated (default: all; with "
                        "--quick, xguard and upstream)")
    return p.parse_args()


async def main(reactor: Any, args: argparse.Namespace) -> None:
    from xguard.testing.simclient import SimProcess

    only = set(args.only or ALL)
    sizes = ([int(x) for x in args.sizes.split(",")] if args.sizes
             else [50, 100, 200] if args.quick else [250, 500, 1000, 2000])
    samples = args.samples or (300 if args.quick else 2000)
    nmax = max(sizes)
    # The daemon the footprint, drains and back-in-service use: the storm of
    # 1000 VMs (2000 sockets, the footprint targets' size) when it ran.
    nkeep = max([n for n in sizes if n <= 1000] or [nmax])
    drain_timeout = 120.0 if args.quick else 300.0
    tmp = tempfile.mkdtemp(prefix="xb")
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    results: dict[str, Any] = {
        "command": "python bench/run.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "machine": machine(), "quick": args.quick, "sizes": sizes, "samples": samples,
    }
    t_start = time.perf_counter()

    def save() -> None:
        results["wall_s"] = time.perf_counter() - t_start
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)

    sim = SimProcess(os.path.join(tmp, "xapi"), os.path.join(tmp, "adm"),
                     log_file=os.path.join(tmp, "sim.log"))
    sim.start()
    ctx = scenarios.Ctx(reactor, tmp, sim, args.quick, args.profile)
    keep = None
    try:
        ctx.seed(nmax)
        log(f"seeded {nmax} VMs in the simulator")
        if "latency" in only:
            results["latency"] = await scenarios.latency(ctx, samples)
            report.print_latency(results["latency"])
            save()
        if "flood" in only:
            # Its own daemon on the embedded store (bench/flood.py), blocking.
            from twisted.internet.threads import deferToThread

            results["flood"] = await deferToThread(flood.measure, ctx.root("flood"),
                                                   probes=100 if args.quick else 300)
            flood.print_flood(results["flood"])
            save()
        if only & {"storm", "footprint", "drain"}:
            results["storm"] = []
            # Each storm's daemon stays up, idle, so that the footprint can
            # read the RSS of every size after one idle period (RSS vs
            # sockets); idle daemons cost no CPU (the trimmer's check only).
            idle: list[tuple[int, Any]] = []
            baseline = None
            if args.baseline and "storm" in only:
                tree = os.path.join(tmp, "baseline")
                baseline = (export_tree(args.baseline, tree), tree)
                log(f"baseline: commit {baseline[0]} in {tree}")
            for n in sizes:
                if baseline is not None:  # side by side, just before ours
                    r, _ = await scenarios.boot_storm(ctx, n, baseline=baseline)
                    results["storm"].append(r)
                    report.print_storm(r)
                    save()
                r, d = await scenarios.boot_storm(ctx, n, keep=True)
                assert d is not None
                if n == nkeep:
                    keep = d
                else:
                    idle.append((n, d))
                results["storm"].append(r)
                report.print_storm(r)
                save()
            if "storm" in only:
                # The upstream design's storm: every size, or the largest
                # with --quick (its time budget).
                for n in sizes[-1:] if args.quick else sizes:
                    r, _ = await scenarios.boot_storm(ctx, n, UPSTREAM_DESIGN)
                    results["storm"].append(r)
                    report.print_storm(r)
                    save()
                if args.profile:
                    n = sizes[len(sizes) // 2]
                    r, _ = await scenarios.boot_storm(
                        ctx, n, profile=os.path.join(args.profile, "boot-storm.txt"))
                    results["storm_profile"] = {"n": n, "file": r["profile"],
                                                "total_s": r["total_s"]}
            assert keep is not None
            if "footprint" in only:
                results["footprint"] = await scenarios.footprint(ctx, keep, others=idle)
                report.print_footprint(results["footprint"])
                save()
            for _, d in idle:
                d.stop()
                d.cleanup()
            if "drain" in only:
                results["drain"] = []
                drains = args.drains or ("xguard,upstream" if args.quick else ",".join(DRAINS))
                for name in drains.split(","):
                    design = DRAINS[name]
                    try:
                        r = await scenarios.drain(ctx, keep, nkeep, design, timeout=drain_timeout)
                    except scenarios.DrainStuck as e:
                        log(f"drain [{name}] FAILED: {e}")
                        results.setdefault("drain_failures", []).append(
                            {"design": list(design), "error": str(e)[:2000]})
                        continue
                    results["drain"].append(r)
                    report.print_drain(r)
                    save()
                    if not design:
                        results["drain_floor"] = await scenarios.drain_floor(
                            ctx, nkeep, r["upstream_calls"])
                        report.print_drain_floor(results["drain_floor"])
                        save()
                if args.profile:  # a separate pass: its times are not used
                    await scenarios.drain(ctx, keep, nkeep, (), timeout=drain_timeout,
                                          profile=os.path.join(args.profile, "drain.txt"))
                # Drain time and calls against N (the scaling curve).
                results["drain_scaling"] = []
                for n in [n for n in sizes if n <= nkeep]:
                    r = await scenarios.drain(ctx, keep, n, (), timeout=drain_timeout)
                    r["floor"] = await scenarios.drain_floor(ctx, n, r["upstream_calls"])
                    r.pop("curve")
                    results["drain_scaling"].append(r)
                    report.print_drain_scaling(r)
                    save()
                # Time back in service: 100 VMs x 3 keys after an outage.
                n_back = min(100, nkeep)
                r = await scenarios.drain(ctx, keep, n_back, (), timeout=drain_timeout,
                                          outage_s=20.0 if args.quick else 120.0)
                r["floor"] = await scenarios.drain_floor(ctx, n_back, r["upstream_calls"])
                results["back_in_service"] = r
                report.print_back_in_service(r)
                save()
    finally:
        if keep is not None:
            keep.stop()
            keep.cleanup()
        sim.stop()
        save()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.plots:
        try:
            for path in report.plots(results, args.plots):
                log(f"wrote {path}")
        except ImportError as e:
            log(f"no plots: {e} (pip install '.[bench]')")
    if args.profile:
        for name in ("direct-write", "cached-write", "boot-storm", "drain"):
            path = os.path.join(args.profile, name + ".txt")
            if os.path.exists(path):
                print(f"\n== profile {name} (daemon, py-spy) ==")
                print(report.profile_summary(path))
    print()
    print(report.targets_table(results))
    log(f"done in {time.perf_counter() - t_start:.0f} s")


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


if __name__ == "__main__":
    raise_nofile()
    arguments = parse()
    import shlex

    from bench import procs

    procs.DAEMON_ARGS[:] = shlex.split(arguments.daemon_args)
    procs.compile_tree()
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.task import react

    react(lambda reactor: ensureDeferred(main(reactor, arguments)))
