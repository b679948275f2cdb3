"""Drains of two commits side by side, on one storm's daemon.

A change to the delivery path moves a drain by a few percent, less than
two runs of ``bench/run.py`` differ. This compares it with another commit
the way the storm's ``--baseline`` does, but alternating: one boot storm
leaves a daemon serving N VMs; then, round after round, that daemon is
restarted with commit REV's files and drains 3 keys of every VM, then
restarted with the checkout's files and drains them again. Alternation
spreads the machine's drift over both, and each drain is timed from the
simulator's return to an empty cache in Direct, as in ``run.py``::

    python bench/drain_ab.py HEAD^                 # 1000 VMs, 3 rounds
    python bench/drain_ab.py HEAD^ --vms 250 --rounds 5 --json out.json

Both commits' daemons use the same state directory, one after the other:
compare commits whose files on disk agree (a change to the delivery path,
not to the cache's layout). Reported per drain: delivery time (first call
to Direct), daemon CPU, upstream calls; then each side's mean, and the
drain floor, measured once after the rounds. One drain of each side, not
measured, comes before them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the repository's code, whatever is installed

from twisted.internet import task  # noqa: E402
from twisted.internet.defer import ensureDeferred  # noqa: E402

from bench import scenarios  # noqa: E402
from bench.procs import compile_tree, export_tree  # noqa: E402
from bench.report import progress  # noqa: E402
from xguard.testing.simclient import SimProcess  # noqa: E402

#: What each drain reports here (see bench.scenarios.drain).
FIELDS = ("deliver_s", "time_to_direct_s", "daemon_cpu_s", "upstream_calls")


async def compare(reactor: Any, rev: str, vms: int, rounds: int) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="xb")
    sim = SimProcess(os.path.join(tmp, "xapi"), os.path.join(tmp, "adm"),
                     log_file=os.path.join(tmp, "sim.log"))
    sim.start()
    ctx = scenarios.Ctx(reactor, tmp, sim, False, None)
    daemon = None
    try:
        compile_tree()
        tree = os.path.join(tmp, "baseline")
        commit = export_tree(rev, tree)
        progress(f"baseline: commit {commit} in {tree}")
        ctx.seed(vms)
        _, daemon = await scenarios.boot_storm(ctx, vms, keep=True)
        assert daemon is not None
        sides: dict[str, list[dict[str, Any]]] = {commit: [], "checkout": []}
        order = ((commit, tree), ("checkout", None))
        # Not measured: one drain of each side first. In trials the first
        # drain after the storm, and the first of each commit's daemon,
        # were the slowest of their series, whichever the code.
        for _, files in order:
            daemon.tree = files
            await scenarios.drain(ctx, daemon, vms, ())
        for i in range(rounds):
            for side, files in order:
                daemon.tree = files
                r = await scenarios.drain(ctx, daemon, vms, ())
                sides[side].append({k: r[k] for k in FIELDS})
                print(f"round {i + 1} {side[:10]:>10}: delivery {r['deliver_s']:.3f} s, "
                      f"Direct after {r['time_to_direct_s']:.3f} s, daemon CPU "
                      f"{r['daemon_cpu_s']:.2f} s, {r['upstream_calls']} calls", flush=True)
        floor = await scenarios.drain_floor(ctx, vms, 2 * vms)
        means = {side: {k: statistics.mean(r[k] for r in runs) for k in FIELDS}
                 for side, runs in sides.items()}
        for side, m in means.items():
            print(f"mean {side[:10]:>10}: delivery {m['deliver_s']:.3f} s "
                  f"({m['deliver_s'] / floor['total_s']:.2f}x the floor), daemon CPU "
                  f"{m['daemon_cpu_s']:.2f} s", flush=True)
        print(f"floor: {floor['total_s']:.3f} s (simulator {floor['upstream_s']:.3f} s + "
              f"files {floor['files_s']:.3f} s)", flush=True)
        return {"baseline": commit, "vms": vms, "rounds": sides, "means": means,
                "floor": floor}
    finally:
        if daemon is not None:
            daemon.stop()
            daemon.cleanup()
        sim.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rev", help="the commit to compare the checkout with")
    p.add_argument("--vms", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)

    async def run(reactor: Any) -> None:
        result = await compare(reactor, args.rev, args.vms, args.rounds)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)

    task.react(lambda reactor: ensureDeferred(run(reactor)))


if __name__ == "__main__":
    main()
