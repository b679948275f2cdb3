"""The six scenarios of the benchmark (doc/performance.md). Each returns a
plain dict of results; the xguard figure and its floor are always measured
in the same call, interleaved where possible, so they see the same machine.
"""

from __future__ import annotations

import base64
import json
import os
import random
import time
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import DeferredSemaphore, ensureDeferred, gatherResults
from twisted.internet.task import deferLater

from bench import clients
from bench.clients import JsonRpc, KeepAlive, swtpm_put, timed
from bench.floors import BareServer, durable_replace, sim_calls_floor
from bench.procs import BenchDaemon, PySpy, cpu_seconds, open_fds, rss_mb
from xguard.control.commands import Status, VarstoreCreate, VtpmCreate
from xguard.testing.simclient import SimProcess


def b64(size: int, rng: random.Random) -> bytes:
    """Base64 text of exactly ``size`` bytes (``size`` a multiple of 4)."""
    return base64.b64encode(rng.randbytes(size * 3 // 4))


def pct(values: Sequence[float], p: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    i = min(len(s) - 1, max(0, int(round(p / 100 * (len(s) - 1)))))
    return s[i]


def summary(values: Sequence[float]) -> dict[str, float]:
    """Milliseconds."""
    return {"n": len(values), "p50_ms": pct(values, 50) * 1e3, "p90_ms": pct(values, 90) * 1e3,
            "p99_ms": pct(values, 99) * 1e3, "max_ms": max(values) * 1e3 if values else 0.0}


class Ctx:
    """What every scenario shares: the reactor, the simulator and its seeded
    VMs, a short temp dir, options."""

    def __init__(self, reactor: Any, tmp: str, sim: SimProcess, quick: bool,
                 profile_dir: str | None) -> None:
        self.reactor = reactor
        self.tmp = tmp
        self.sim = sim
        self.quick = quick
        self.profile_dir = profile_dir
        self.vms: list[dict[str, Any]] = []
        self.rng = random.Random(4)
        self.roots = 0

    @property
    def xapi(self) -> str:
        return "unix:" + self.sim.socket

    def root(self, name: str) -> str:
        self.roots += 1
        return os.path.join(self.tmp, f"{name}{self.roots}")

    def seed(self, n: int) -> None:
        """``n`` VMs with a vTPM (realistic key sizes) and NVRAM."""
        contents = " ".join(b.decode() for b in (b64(4096, self.rng), b64(1024, self.rng),
                                                    b64(12288, self.rng)))
        nvram = {"EFI-variables": b64(32768, self.rng).decode()}
        while len(self.vms) < n:
            self.vms.append(self.sim.client.seed_vm(contents=contents, nvram=nvram))

    def sleep(self, seconds: float) -> Any:
        return deferLater(self.reactor, seconds, lambda: None)

    async def status(self, ctl: Any) -> dict[str, Any]:
        return json.loads((await ctl.callRemote(Status))["status"])


class DrainStuck(Exception):
    """The cache did not drain in time (a daemon problem to report)."""


def sim_calls(counters: dict[str, int]) -> int:
    return sum(counters.values())


# -- 1 and 2: latency of one PUT, direct and cached ----------------------------------
#: Each series is measured in blocks of this many back-to-back requests,
#: xguard's and the floor's alternating (A B A B …): background work one
#: block leaves (xguard deleting superseded files, a GC) lands in that
#: block's own timing, never in the other's, and alternation cancels drift.
BLOCK = 100


def _blocks(samples: int) -> int:
    return max(2, samples // BLOCK)


def _ratio(xg: dict[str, float], floor: dict[str, float]) -> dict[str, float]:
    return {"ratio_p50": xg["p50_ms"] / floor["p50_ms"],
            "ratio_p99": xg["p99_ms"] / floor["p99_ms"]}


async def latency(ctx: Ctx, samples: int) -> dict[str, Any]:
    """Scenarios 1 (xapi up) and 2 (xapi down) on one daemon and one VM,
    as swtpm writes: one kept-alive connection, the same key rewritten back
    to back (each PUT supersedes the previous version)."""
    bare = BareServer(os.path.join(ctx.tmp, "bare.sock")).start()
    d = BenchDaemon(ctx.root("lat"), ctx.xapi).start()
    try:
        ctl = await clients.amp_connect(ctx.reactor, d.control)
        vm = ctx.vms[0]
        sock = os.path.join(ctx.tmp, "lat.tpm")
        await ctl.callRemote(VtpmCreate, dbg="bench", vm_uuid=vm["vm_uuid"], gid=0, path=sock)
        bodies = [b64(16384, ctx.rng) for _ in range(16)]
        reqs = [swtpm_put(0, b, close=False) for b in bodies]
        xguard, floor_put = KeepAlive(sock), KeepAlive(bare.path)
        rpc = JsonRpc(ctx.sim.socket)
        ref = vm["vtpm_ref"]

        def put(client: KeepAlive, i: int, what: str) -> float:
            t, status = timed(client.request, reqs[i % 16])
            if status != 204:
                raise RuntimeError(f"{what}: HTTP {status}")
            return t

        # -- 1. direct -------------------------------------------------------
        for i in range(30):  # warm-up: login, handles, connections
            put(xguard, i, "warm-up PUT")
            put(floor_put, i, "warm-up bare PUT")
            rpc.rmw(ref, 0, bodies[i % 16].decode())
        xg, bare_t, rmw_t = [], [], []
        for _ in range(_blocks(samples)):
            xg += [put(xguard, i, "direct PUT") for i in range(BLOCK)]
            for i in range(BLOCK):
                bare_t.append(put(floor_put, i, "bare PUT"))
                rmw_t.append(timed(rpc.rmw, ref, 0, bodies[i % 16].decode())[0])
        st = await ctx.status(ctl)
        assert st["services"]["Swtpm"]["mode"] == "Direct", st["services"]["Swtpm"]
        profile = None
        if ctx.profile_dir:
            spy = PySpy(d.pid, os.path.join(ctx.profile_dir, "direct-write.txt"))
            for i in range(samples):
                put(xguard, i, "profiled PUT")
            profile = spy.stop()
        floor = [b + r for b, r in zip(bare_t, rmw_t)]
        direct = {
            "xguard": summary(xg), "bare_put": summary(bare_t), "rmw": summary(rmw_t),
            "floor": summary(floor),
            "samples_ms": {"xguard": [x * 1e3 for x in xg], "floor": [f * 1e3 for f in floor]},
            "profile": profile,
        }
        direct.update(_ratio(direct["xguard"], direct["floor"]))
        rpc.close()

        # -- 2. cached -------------------------------------------------------
        ctx.sim.client.set_mode("refuse")
        floor_dir = os.path.join(d.root, "floor-cache")
        os.makedirs(floor_dir, 0o700, exist_ok=True)
        previous: list[str | None] = [None]

        def durable(i: int) -> float:
            name = str(time.monotonic_ns())
            t, _ = timed(durable_replace, floor_dir, name, bodies[i % 16], previous[0])
            previous[0] = name
            return t

        for i in range(30):
            put(xguard, i, "warm-up cached PUT")
            put(floor_put, i, "warm-up bare PUT")
            durable(i)
        st = await ctx.status(ctl)
        mode_before = st["services"]["Swtpm"]["mode"]
        xg, bare_t, disk_t = [], [], []
        for _ in range(_blocks(samples)):
            xg += [put(xguard, i, "cached PUT") for i in range(BLOCK)]
            for i in range(BLOCK):
                bare_t.append(put(floor_put, i, "bare PUT"))
                disk_t.append(durable(i))
        st = await ctx.status(ctl)
        if ctx.profile_dir:
            spy = PySpy(d.pid, os.path.join(ctx.profile_dir, "cached-write.txt"))
            for i in range(samples):
                put(xguard, i, "profiled cached PUT")
            spy.stop()
        floor = [b + w for b, w in zip(bare_t, disk_t)]
        cached = {
            "xguard": summary(xg), "bare_put": summary(bare_t), "durable_write": summary(disk_t),
            "floor": summary(floor),
            "samples_ms": {"xguard": [x * 1e3 for x in xg], "floor": [f * 1e3 for f in floor]},
            "modes": [mode_before, st["services"]["Swtpm"]["mode"]],
        }
        cached.update(_ratio(cached["xguard"], cached["floor"]))
        xguard.close()
        floor_put.close()
        ctl.transport.loseConnection()
        return {"direct": direct, "cached": cached}
    finally:
        ctx.sim.client.set_mode("up")
        d.stop()
        d.cleanup()
        bare.stop()


# -- 4: boot storm ------------------------------------------------------------------
async def boot_storm(ctx: Ctx, n: int, design: Sequence[str] = (), *, keep: bool = False,
                     profile: str | None = None, baseline: tuple[str, str] | None = None,
                     ) -> tuple[dict[str, Any], BenchDaemon | None]:
    """Every VM at once: create both sockets, then swtpm's start-up (3 GETs
    and a PUT on one kept-alive connection) alongside varstored's login,
    get_NVRAM and set_NVRAM (a connection each).

    :param baseline: (commit, its files) to run that commit's daemon
        instead of the checkout's (run.py --baseline).
    """
    reactor = ctx.reactor
    d = BenchDaemon(ctx.root("storm"), ctx.xapi, design=design,
                    tree=baseline[1] if baseline else None).start()
    ctl = await clients.amp_connect(reactor, d.control)
    sockdir = d.sockets_dir
    permall = b64(4096, ctx.rng)
    nvram = b64(32768, ctx.rng).decode()
    lat: dict[str, list[float]] = {"create": [], "swtpm_get": [], "swtpm_put": [],
                                   "varstored": []}
    errors: list[str] = []
    ctx.sim.client.reset_counters()
    cpu0 = cpu_seconds(d.pid)
    spy = PySpy(d.pid, profile) if profile else None

    async def timed_req(kind: str, coro: Any, ok: Any) -> None:
        t = time.perf_counter()
        status, body = await coro
        lat[kind].append(time.perf_counter() - t)
        if not ok(status, body):
            errors.append(f"{kind}: HTTP {status} {body[:120]!r}")

    async def swtpm(path: str) -> None:
        proto = await clients.connect(reactor, path)
        for key in range(3):
            await timed_req("swtpm_get", proto.request(clients.swtpm_get(key)),
                            lambda s, b: s == 200)
        await timed_req("swtpm_put", proto.request(swtpm_put(0, permall, close=False)),
                        lambda s, b: s == 204)
        proto.transport.loseConnection()

    async def varstored(path: str) -> None:
        calls = [("session.login_with_password", "root", "", "1.0", "varstored"),
                 ("VM.get_NVRAM", "OpaqueRef:s", "OpaqueRef:vm"),
                 ("VM.set_NVRAM_EFI_variables", "OpaqueRef:s", "OpaqueRef:vm", nvram)]
        for call in calls:
            request = clients.xmlrpc_call(*call)
            await timed_req("varstored", clients.one_shot(reactor, path, request),
                            lambda s, b: s == 200 and b"<value>Success</value>" in b)

    async def one(i: int, vm: dict[str, Any]) -> None:
        tpm, efi = os.path.join(sockdir, f"{i}.t"), os.path.join(sockdir, f"{i}.v")
        t = time.perf_counter()
        try:
            await gatherResults([
                ctl.callRemote(VtpmCreate, dbg="storm", vm_uuid=vm["vm_uuid"], gid=0, path=tpm),
                ctl.callRemote(VarstoreCreate, dbg="storm", vm_uuid=vm["vm_uuid"], gid=0, path=efi),
            ], consumeErrors=True)
            lat["create"].append(time.perf_counter() - t)
            await gatherResults([ensureDeferred(swtpm(tpm)), ensureDeferred(varstored(efi))],
                                consumeErrors=True)
        except Exception as e:  # keep going: the report counts them
            errors.append(f"VM {i}: {getattr(e, 'subFailure', e)!r}")

    t0 = time.perf_counter()
    await gatherResults([ensureDeferred(one(i, vm)) for i, vm in enumerate(ctx.vms[:n])])
    total = time.perf_counter() - t0
    profile_out = spy.stop() if spy else None
    cpu = cpu_seconds(d.pid) - cpu0
    counters = ctx.sim.client.counters()
    st = await ctx.status(ctl)
    ctl.transport.loseConnection()
    requests = lat["swtpm_get"] + lat["swtpm_put"] + lat["varstored"]
    result = {
        "n": n, "design": list(design), "total_s": total, "daemon_cpu_s": cpu,
        "baseline": baseline[0] if baseline else None,
        "requests": summary(requests), "per_kind": {k: summary(v) for k, v in lat.items()},
        "errors": len(errors), "error_samples": errors[:5],
        "upstream_calls": sim_calls(counters), "upstream_calls_per_vm": sim_calls(counters) / n,
        "counters": counters, "sockets": st["sockets"],
        "modes": {k: v["mode"] for k, v in st["services"].items()},
        "profile": profile_out,
    }
    if keep:
        return result, d
    d.stop()
    d.cleanup()
    return result, None


# -- 5: footprint ---------------------------------------------------------------------
#: Long enough for the daemon's idle trimmer (xguard/memory.py) to run.
IDLE_S = 25.0


async def footprint(ctx: Ctx, d: BenchDaemon, restarts: int = 3,
                    others: Sequence[tuple[int, BenchDaemon]] = ()) -> dict[str, Any]:
    """Idle RSS and fds of ``d`` (which serves the boot storm's sockets),
    then its start-up time resuming them, against an empty daemon's; with
    ``others`` (N, daemon of the storm of N VMs), their idle RSS too.

    "Idle" means after the daemon's idle trimmer had its quiet period (it
    returns a burst's freed memory after ~10-20 s without connections)."""
    await ctx.sleep(IDLE_S)
    rss_by_sockets = [(2 * n, rss_mb(o.pid)) for n, o in others]
    ctl = await clients.amp_connect(ctx.reactor, d.control)
    st = await ctx.status(ctl)
    ctl.transport.loseConnection()
    await ctx.sleep(0.5)
    sockets = sum(st["sockets"].values())
    out: dict[str, Any] = {"sockets": sockets, "rss_mb": rss_mb(d.pid), "fds": open_fds(d.pid)}
    out["rss_by_sockets"] = [*rss_by_sockets, (sockets, out["rss_mb"])]
    resume = []
    for _ in range(restarts):
        d.stop()
        d.start()
        resume.append(d.last_start)
    ctl = await clients.amp_connect(ctx.reactor, d.control)
    st = await ctx.status(ctl)
    ctl.transport.loseConnection()
    out["resumed_sockets"] = sum(st["sockets"].values())
    out["rss_after_resume_mb"] = rss_mb(d.pid)
    empty = BenchDaemon(ctx.root("empty"), ctx.xapi)
    empty_start, empty_rss = [], 0.0
    for _ in range(restarts):
        empty.start()
        empty_start.append(empty.last_start)
        await ctx.sleep(0.5)
        empty_rss = rss_mb(empty.pid)
        empty_fds = open_fds(empty.pid)
        empty.stop()
    empty.cleanup()
    out.update({"resume_s": resume, "resume_median_s": sorted(resume)[len(resume) // 2],
                "empty_start_s": empty_start,
                "empty_start_median_s": sorted(empty_start)[len(empty_start) // 2],
                "empty_rss_mb": empty_rss, "empty_fds": empty_fds})
    out["rss_by_sockets"].insert(0, (0, empty_rss))
    return out


# -- 3 and 6: drain -------------------------------------------------------------------
async def _put_all(ctx: Ctx, d: BenchDaemon, paths: list[str], keys: Sequence[int],
                   bodies: dict[int, bytes], concurrency: int = 32) -> int:
    sem = DeferredSemaphore(concurrency)
    failures = []

    async def one(path: str) -> None:
        proto = await clients.connect(ctx.reactor, path)
        for key in keys:
            status, body = await proto.request(swtpm_put(key, bodies[key], close=False))
            if status != 204:
                failures.append(status)
        proto.transport.loseConnection()

    await gatherResults([sem.run(lambda p=p: ensureDeferred(one(p))) for p in paths])
    return len(failures)


async def drain(ctx: Ctx, d: BenchDaemon, n: int, design: Sequence[str],
                poll: float = 0.05, timeout: float = 600.0,
                outage_s: float = 0.0, profile: str | None = None) -> dict[str, Any]:
    """Restart ``d`` with ``design``; 3 keys of every VM cached while the
    simulator refuses; the outage lasts ``outage_s`` more (the flushers'
    backoff grows); the simulator comes back: time from then until the
    cache is empty and Direct (the time back in service). With
    ``profile``, py-spy records the daemon from the simulator's return to
    the end of the drain (a pass whose times are not to be used)."""
    sim = ctx.sim.client
    d.stop()
    d.design = tuple(design)
    d.start()
    ctl = await clients.amp_connect(ctx.reactor, d.control)
    paths = [os.path.join(d.sockets_dir, f"{i}.t") for i in range(n)]
    sim.set_mode("up")
    # What an earlier scenario left cached (a storm's writes past the
    # direct deadline, in either service) is delivered first: a backlog of
    # its own in the measured drain made it ~1 s longer and 0.86 calls/item.
    settled = time.perf_counter()
    while not all(s["mode"] == "Direct" and not s["pending"]
                  for s in (await ctx.status(ctl))["services"].values()):
        if time.perf_counter() - settled > timeout:
            raise DrainStuck(f"the earlier backlog is not delivered after {timeout:.0f} s")
        await ctx.sleep(0.2)
    warm = await _put_all(ctx, d, paths, [0], {0: b64(4096, ctx.rng)})
    sim.set_mode("refuse")
    bodies = {0: b64(4096, ctx.rng), 1: b64(1024, ctx.rng), 2: b64(12288, ctx.rng)}
    t = time.perf_counter()
    failed = await _put_all(ctx, d, paths, [0, 1, 2], bodies)
    cache_time = time.perf_counter() - t
    st = (await ctx.status(ctl))["services"]["Swtpm"]
    pending0 = sum(st["pending"].values())
    mode0 = st["mode"]
    sim.reset_counters()
    outage_start = time.perf_counter()
    while time.perf_counter() - outage_start < outage_s - cache_time:
        await ctx.sleep(0.5)
    outage_calls = sim_calls(sim.counters())  # what the outage cost xapi (refused: 0)
    sim.reset_counters()
    spy = PySpy(d.pid, profile) if profile else None
    cpu0 = cpu_seconds(d.pid)
    t0 = time.perf_counter()
    sim.set_mode("up")
    first = None
    curve = []
    last_calls = -1
    while True:
        await ctx.sleep(poll)
        now = time.perf_counter() - t0
        calls = sim_calls(sim.counters())
        curve.append((now, calls))
        if first is None and calls > 0:
            first = now
        if calls != last_calls and now <= timeout:
            # Still delivering: the daemon's Status (every VM's pending
            # map, at 20 Hz) would cost it ~10% of its reactor's time, a
            # cost the floor does not pay and no operator imposes. It is
            # asked once the simulator sees no new call for a poll.
            last_calls = calls
            continue
        st = (await ctx.status(ctl))["services"]["Swtpm"]
        pending = sum(st["pending"].values())
        if st["mode"] == "Direct" and pending == 0:
            break
        if now > timeout:
            brief = {k: v for k, v in st.items() if k != "pending"}
            raise DrainStuck(f"not finished after {timeout:.0f} s: {pending} items pending in "
                             f"{len(st['pending'])} VMs, simulator counters {sim.counters()}, "
                             f"Swtpm status {brief}; daemon log tail:\n{d.log()[-1500:]}")
    total = time.perf_counter() - t0
    cpu = cpu_seconds(d.pid) - cpu0
    if spy is not None:
        spy.stop()
    counters = sim.counters()
    # The last delivered values must be the ones upstream holds.
    want = " ".join(bodies[k].decode() for k in range(3))
    wrong = sum(1 for vm in ctx.vms[:n:max(1, n // 20)]
                if sim.vtpm_state(vm["vtpm_uuid"])["contents"] != want)
    ctl.transport.loseConnection()
    calls = sim_calls(counters)
    return {
        "n": n, "design": list(design), "items": pending0, "mode_when_cached": mode0,
        "warm_failures": warm, "cache_failures": failed, "cache_time_s": cache_time,
        "time_to_direct_s": total, "first_call_s": first,
        "deliver_s": total - (first or 0.0), "upstream_calls": calls,
        "calls_per_item": calls / pending0 if pending0 else float("nan"),
        "counters": counters, "daemon_cpu_s": cpu, "wrong_contents": wrong,
        "curve": curve, "outage_s": max(outage_s, cache_time),
        "outage_calls_per_min": outage_calls / max(outage_s, cache_time) * 60,
    }


async def drain_floor(ctx: Ctx, n: int, calls: int, concurrency: int = 8) -> dict[str, float]:
    """What a drain of ``n`` VMs x 3 keys cannot avoid, done back to back:
    the simulator serving the same number of calls (``calls``: one
    VTPM.set_contents per vTPM when every key is pending) with the same
    concurrency, and the same file operations (each delivered file
    unlinked, the emptied directories removed, one fsync)."""
    rpc = JsonRpc(ctx.sim.socket)
    session = rpc.session
    rpc.close()
    contents = " ".join(b64(s, ctx.rng).decode() for s in (4096, 1024, 12288))
    per_vm = max(1, round(calls / n))
    jobs = [[("VTPM.set_contents", [vm["vtpm_ref"], contents])] * per_vm
            for vm in ctx.vms[:n]]
    upstream = await sim_calls_floor(ctx.reactor, ctx.sim.socket, session, jobs, concurrency)
    base = os.path.join(ctx.tmp, "drain-floor", "Swtpm")
    files = []
    for vm in ctx.vms[:n]:
        for key in range(3):
            directory = os.path.join(base, vm["vm_uuid"], str(key))
            os.makedirs(directory, 0o700, exist_ok=True)
            path = os.path.join(directory, str(time.monotonic_ns()))
            with open(path, "wb") as f:
                f.write(b"x" * 4096)
            files.append(path)
    os.sync()
    t = time.perf_counter()
    for path in files:
        os.unlink(path)
        for d in (os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
            try:
                os.rmdir(d)
            except OSError:
                break
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    disk = time.perf_counter() - t
    return {"upstream_s": upstream, "files_s": disk, "total_s": upstream + disk,
            "calls": per_vm * n}
