# -*- test-case-name: tests.unit.test_compose -*-
"""The composition root: every part of the daemon built from the
configuration, wired, and handed to :class:`~xguard.daemon.service.XguardService`
as stages in start order. Nothing here has side effects: building opens no
file and no socket; the stages do, when the service starts them.

Who talks to whom (doc/architecture.md draws it):

- domain sockets (``DomainSite`` per socket) → ``TpmKeys``/``VmNvram``
  → a writer per service (the write-back cache, or ``DirectWriter`` with
  ``--no-cache``) → a sink per service → the upstream;
- reads fall back to the last known state (``KnownState``), which the sinks
  record;
- the control channel → the socket registry, and the orchestrator's vTPM
  calls (``VtpmContents``) → the swtpm writer;
- the upstream's reachability → the caches (retry now) and the last known
  state (sweep stopped VMs).

:class:`Design` is the one seam through which the benchmarks run the
upstream daemon's design (serial deliveries, no coalescing, no handle
cache) for comparison: the daemon itself has no option or variable for it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import attrs
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.logger import Logger

from .. import __version__
from ..cache.cache import WriteBackCache
from ..control.listener import ControlListener
from ..control.server import control_factory
from ..domain.admission import Admission
from ..domain.site import DomainSite
from ..domain.sockets import SocketRegistry
from ..domain.swtpm import SwtpmSocket
from ..domain.varstored import VarstoredSocket
from ..interfaces import IDaemonReactor, IItemSink, IItemWriter, IUpstream
from ..model import Service as Kind
from ..restart import sdnotify
from ..restart.fdstore import FdStore
from ..restart.handover import Handover
from ..restart.reexec import Launch, Reexec
from ..state.aside import SetAsideOps
from ..state.contents import VtpmContents
from ..state.direct import DirectWriter
from ..state.known import KnownState, ServiceRecords
from ..state.sinks import NvramSink, VtpmSink
from ..state.views import TpmKeys, VmNvram
from ..status import CacheStatus, DaemonStatus
from ..upstream.calls import CallMonitor
from ..upstream.probe import Prober
from ..util.durable import makedirs
from ..util.locks import KeyedLocks
from ..util.threads import ThreadPoolRunner
from . import rlimits
from .config import Config
from .logconfig import LogLevels
from .memory import Activity, IdleTrimmer, freeze_startup, tune_collector
from .process import ExitStatus, InstanceLock
from .service import Stage, XguardService

__all__ = ["Design", "build_service"]

log = Logger(namespace="xguard.daemon.compose")


@attrs.frozen
class Design:
    """How deliveries and lookups are made. The defaults are xguard's."""

    #: Deliveries the flusher runs at once (None: ``--flush-concurrency``).
    flush_concurrency: int | None = None
    #: All pending keys of a VM in one upstream read-modify-write.
    coalesce: bool = True
    #: Cache VM and vTPM references (they cannot change while a VM runs).
    cache_handles: bool = True


def build_service(config: Config, reactor: IDaemonReactor, *, design: Design = Design(),
                  monotonic_ns: Callable[[], int] = time.monotonic_ns,
                  launch: Launch | None = None) -> XguardService:
    """The daemon for ``config`` on ``reactor`` (nothing starts yet).

    :param launch: how the process was started (twistd's options), for a
        restart in place.
    """
    cfg = config
    # Restarts hand the listening sockets over (xguard/handover.py).
    handover = Handover(FdStore(reactor))
    io = ThreadPoolRunner(reactor, "xguard-io", maxthreads=4)
    lock = InstanceLock(os.path.join(cfg.state_dir, "xguard.lock"))
    upstream, upstream_stage, calls = _upstream(cfg, reactor, design)

    registry: SocketRegistry  # built below; the closures run only once it is
    known = KnownState(cfg.state_dir, runner=io,
                       # --no-cache is the pre-cache behaviour: nothing of a
                       # VM is kept locally, so reads fail while upstream is
                       # down, like writes.
                       is_live=lambda vm: not cfg.no_cache and registry.serves(vm))
    locks = KeyedLocks()
    vtpm_sink = VtpmSink(upstream, locks, known)
    nvram_sink = NvramSink(upstream, locks, known)

    def writer(sink: IItemSink) -> IItemWriter:
        if cfg.no_cache:
            return DirectWriter(sink)
        return WriteBackCache(
            sink, cfg.state_dir, clock=reactor, runner=io, monotonic_ns=monotonic_ns,
            queue_size=cfg.queue_size, direct_deadline=cfg.direct_deadline,
            max_concurrency=design.flush_concurrency or cfg.flush_concurrency,
            coalesce=design.coalesce, enabled=lambda: not os.path.exists(cfg.fault_file),
            is_live=lambda vm: registry.serves(vm), stuck_after=cfg.stuck_after,
            # A full disk: pending writes come first, copies are a read cache.
            make_room=known.make_room,
            # What a write in flight may leave upstream holding, and when a
            # VM's life here ended: across a kill.
            records=ServiceRecords(known, sink.service.value))

    swtpm_writer, nvram_writer = writer(vtpm_sink), writer(nvram_sink)
    writers = {Kind.SWTPM: swtpm_writer, Kind.VARSTORED: nvram_writer}
    caches = {kind: w for kind, w in writers.items() if isinstance(w, WriteBackCache)}
    tpm = TpmKeys(swtpm_writer, vtpm_sink, known, clock=reactor, deadline=cfg.direct_deadline)
    nvram = VmNvram(nvram_writer, nvram_sink, known, clock=reactor,
                       deadline=cfg.direct_deadline)

    # The log filter's level: --log-level, changed by xguard-ctl log-level
    # until the next start (tap.py puts the filter in front of the log).
    log_levels = LogLevels(cfg.log_level)

    activity = Activity()

    #: One gate per service: a storm of one does not wait for the other.
    admissions = {kind: Admission(reactor, cfg.active_requests) for kind in Kind}

    def site_for(kind: Kind, vm_uuid: str) -> DomainSite:
        if kind is Kind.SWTPM:
            resource = SwtpmSocket(vm_uuid, tpm).resource()
        else:
            resource = VarstoredSocket(vm_uuid, nvram).resource()
        return DomainSite(resource, reactor=reactor, timeout=cfg.request_timeout,
                          on_connection=activity.connection,
                          on_response=lambda code, seconds: answered(kind, code, seconds),
                          debugging=log_levels.debugging,
                          admission=admissions[kind] if cfg.active_requests else None)

    #: What hears of every answered domain request (the metrics, if any).
    domain_requests: list[Callable[[str, int, float | None], None]] = []

    def answered(kind: Kind, code: int, seconds: float | None) -> None:
        activity.answer()
        for hear in domain_requests:
            hear(kind.value, code, seconds)

    def vm_gone(vm_uuid: str) -> None:
        """The VM's last socket was destroyed (it stopped, or reboots): its
        copies go once upstream answers a call made from now on, so one is
        made (the prober takes over if it gets no answer)."""
        upstream.forget(vm_uuid)
        vtpm_sink.forget(vm_uuid)
        known.vm_gone(vm_uuid, after=upstream.reachability.last_ticket)
        for cache in caches.values():
            cache.vm_gone(vm_uuid).addErrback(
                lambda f: log.failure("releasing what is set aside for {vm} failed", f,
                                      vm=vm_uuid))
        upstream.confirm(vm_uuid).addErrback(lambda f: None)  # its answer is what counts

    registry = SocketRegistry(reactor, cfg.sockets_file, site_for, on_forget=vm_gone,
                              runner=io, backlog=cfg.listen_backlog, handover=handover)
    vtpms = VtpmContents(vtpm_sink, swtpm_writer, known,
                         candidates=lambda: registry.vms(Kind.SWTPM), clock=reactor,
                         deadline=cfg.direct_deadline)

    def reachable(up: bool) -> None:
        """Upstream answers again: cached writes go now."""
        if up:
            upstream_answers()

    upstream.reachability.subscribe(reachable)

    def answered_call(ticket: int) -> None:
        """Facts, not beliefs: upstream answered a call; copies of VMs that
        stopped before it started may go."""
        known.upstream_answered(ticket, lambda vm: any(w.has_pending(vm)
                                                       for w in writers.values()))

    upstream.reachability.subscribe_answered_call(answered_call)

    def sockets_resumed() -> "Deferred[None]":
        """Every socket of the active file is served again: what VMs that
        did not come back (a host crash lost /run, or they stopped while
        xguard was down) left behind is treated as a stopped VM's."""
        known.unserved_at_start(after=upstream.reachability.last_ticket)
        return gatherResults([cache.sockets_resumed() for cache in caches.values()],
                             consumeErrors=True).addCallback(lambda _: None)
    # The first answer after a silence: cached writes go now (the outage's
    # end is declared a second later, once nothing failed meanwhile).
    def upstream_answers() -> None:
        for cache in caches.values():
            cache.upstream_answers()

    upstream.reachability.subscribe_answer(upstream_answers)
    prober = Prober(reactor, upstream.reachability, upstream.probe)

    def status() -> DaemonStatus:
        services = {}
        for kind in Kind:
            cache = caches.get(kind)
            svc = (cache.status() if cache is not None
                   else CacheStatus(service=kind.value, cache="off", enabled=False))
            services[kind.value] = attrs.evolve(
                svc, outage_since=upstream.reachability.down_since,
                # Why writes are cached: the flusher's last failure, else
                # what made upstream unreachable; cleared when it answers.
                last_error=svc.last_error or upstream.reachability.last_error)
        return DaemonStatus(
            version=__version__, ready=service.ready,
            cache_enabled=not cfg.no_cache and not os.path.exists(cfg.fault_file),
            upstream=upstream.status(), sockets=registry.count_by_service(),
            services=services, known_state_vms=len(known.kept()),
            log_level=log_levels.level, fault_file=cfg.fault_file,
            requests_waiting={kind.value: gate.waiting for kind, gate in admissions.items()})

    def set_log_level(level: str, dbg: str) -> tuple[str, str]:
        return log_levels.set(level, dbg), log_levels.configured

    reexec = Reexec(reactor, handover,
                    lambda: registry.handed_over() + control.handed_over(),
                    launch=launch or Launch(), is_ready=lambda: service.ready)
    control = ControlListener(reactor, cfg.control, cfg.control_path or "",
                              control_factory(registry=registry, vtpms=vtpms, status=status,
                                              restart=reexec.request,
                                              aside=SetAsideOps(caches.values()),
                                              set_log_level=set_log_level),
                              handover)
    metrics_listener = None
    if cfg.metrics:
        # Imported here: without --metrics nothing is counted, and
        # prometheus_client is not even loaded (start-up time).
        from .metrics import Metrics, MetricsListener

        metrics = Metrics(status, reactor)
        domain_requests.append(metrics.domain_request)
        if calls is not None:
            calls.subscribe(metrics.upstream_call)
        metrics_listener = MetricsListener(reactor, cfg.metrics, metrics)
    trimmer = IdleTrimmer(reactor, activity)

    def ready() -> None:
        freeze_startup()
        tune_collector()
        sdnotify.notify(sdnotify.READY)
        log.info("xguard ready: {sockets} domain sockets, cache {cache}",
                 sockets=len(registry.entries()), cache="off" if cfg.no_cache else "on")

    def prepare() -> None:
        if cfg.config_file is None:
            log.info("xguard {version} starting", version=__version__)
        else:
            log.info("xguard {version} starting; configuration file {path} sets {keys}",
                     version=__version__, path=cfg.config_file,
                     keys=", ".join(cfg.from_file) or "nothing the command line does not")
        makedirs(cfg.state_dir, 0o700)
        lock.acquire()
        handover.inherit()
        control.check()

    def stopping() -> None:
        sdnotify.notify(sdnotify.RELOADING if handover.reexec_pending else sdnotify.STOPPING)
        if handover.fdstore.enabled and not handover.reexec_pending:
            # systemd starts the next process once this one has exited;
            # VMs' connections wait in the stored sockets' backlog meanwhile.
            exit_status.exit_after_shutdown(0)

    stages = [
        Stage("the instance lock", prepare, lock.release),
        Stage("the I/O threads", io.start, io.stop),
        upstream_stage,
        Stage("the last known state", lambda: None if cfg.no_cache else known.open(),
              None if cfg.no_cache else known.close),
        # Stops after the caches answered what was in flight: every answer
        # is flushed before the process exits (or execs).
        Stage("the domain connections", lambda: None, registry.wait_closed),
        # Recovery before anything listens (SPEC §6, "Start-up").
        *[Stage(f"the {kind.value} cache", cache.recover, cache.stop)
          for kind, cache in caches.items()],
        Stage("the domain sockets", registry.resume, registry.stop_accepting),
        Stage("what stopped VMs left", sockets_resumed, None),
        # Deliveries only once every VM of the active file is served again:
        # whether a VM runs here decides what becomes of its recovered
        # writes (a base nobody recorded, a residence to ask). They stop
        # with their cache.
        *[Stage(f"the {kind.value} deliveries", cache.start, None)
          for kind, cache in caches.items()],
        Stage("the control channel", control.listen, control.stop),
        *([Stage("the metrics endpoint", metrics_listener.listen, metrics_listener.stop)]
          if metrics_listener is not None else []),
        Stage("the memory trimmer", trimmer.start, trimmer.stop),
        Stage("the upstream prober", lambda: None, prober.stop),
        Stage("readiness", lambda: None, stopping),
    ]
    exit_status = ExitStatus(reactor, on_hangup=reexec.on_signal, on_stop=reexec.cancel)
    service = XguardService(stages, clock=reactor, ready=ready, status=status,
                            exit_status=exit_status, privileged=rlimits.raise_nofile,
                            log_levels=log_levels)
    return service


def _upstream(cfg: Config, reactor: IDaemonReactor,
              design: Design) -> tuple[IUpstream, Stage, CallMonitor | None]:
    """xapi when --xapi is given (start-up never waits for it), else the
    embedded store, opened at start so a broken database fails it; and
    xapi's call monitor (the metrics of its calls). Each is imported only
    when used: treq brings TLS along, the store SQLite."""
    if cfg.xapi is not None:
        from ..upstream.xapi import HandleCache, NoHandleCache, xapi_upstream

        handles = HandleCache() if design.cache_handles else NoHandleCache()
        xapi = xapi_upstream(reactor, cfg.xapi, cfg.xapi_timeout, handles=handles,
                             unresponsive_after=cfg.unresponsive_after)

        def connected() -> None:
            log.info("upstream: {target}", target=xapi.description)

        return xapi, Stage("the upstream", connected, xapi.close), xapi.calls
    from ..upstream.local import LocalStore

    path = cfg.store_path
    assert path is not None
    runner = ThreadPoolRunner(reactor, "xguard-local-store", maxthreads=1)
    store = LocalStore(path, runner, clock=reactor)

    def open_store() -> "Deferred[None]":
        async def run() -> None:
            log.info("upstream: {target}", target=store.description)
            makedirs(os.path.dirname(os.path.abspath(path)), 0o700)
            runner.start()
            await store.open()
        return ensureDeferred(run())

    def close_store() -> "Deferred[None]":
        async def run() -> None:
            try:
                await store.close()
            finally:
                runner.stop()
        return ensureDeferred(run())

    return store, Stage("the upstream", open_store, close_store), None
