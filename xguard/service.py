# -*- test-case-name: tests.unit.test_service -*-
"""The daemon as one service with an explicit start and stop order.

Start: raise the open-files limit, recover the disk cache (before anything
listens), build the upstream, resume every domain socket of the active
file, open the control channel, then tell systemd READY=1.

Stop: stop accepting (control, domain sockets; socket files stay so a
restart resumes them), let in-flight writes finish or persist, stop the
flushers, close upstream. ``MultiService`` stops children concurrently,
which is why the order is written out here.
"""

from __future__ import annotations

import fcntl
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IListeningPort, IReactorCore
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger, globalLogPublisher
from twisted.python.threadpool import ThreadPool
from twisted.web.server import Site

from . import __version__, rlimits, sdnotify
from .cache.cache import WriteBackCache
from .config import Config
from .control.server import control_endpoint, control_factory
from .domain.site import DomainSite
from .domain.sockets import SocketRegistry
from .domain.swtpm import SwtpmSocket
from .domain.varstored import VarstoredSocket
from .durable import makedirs
from .interfaces import IItemSink, IItemWriter, IUpstream
from .items import DirectWriter, NvramSink, NvramStore, TpmStore, VtpmSink
from .locks import KeyedLocks
from .logconfig import apply_log_level
from .memory import IdleTrimmer
from .model import Service as Kind
from .upstream.local import local_store
from .upstream.xapi import xapi_upstream

__all__ = ["XguardService", "build_service"]


def build_service(config: Config, reactor: Any) -> "XguardService":
    """The daemon for ``config`` on ``reactor`` (nothing starts yet)."""
    return XguardService(config, reactor)


class XguardService(Service):
    """Owns the components and their start/stop order."""

    log = Logger()
    name = "xguard"

    def __init__(self, config: Config, reactor: Any,
                 monotonic_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self.config = config
        self.reactor = reactor
        self.monotonic_ns = monotonic_ns
        self.upstream: IUpstream | None = None
        self.caches: dict[Kind, WriteBackCache] = {}
        self.registry: SocketRegistry | None = None
        self.control_port: IListeningPort | None = None
        self._pool: ThreadPool | None = None
        self._undo_log_level: Callable[[], None] | None = None
        self._instance_lock: int | None = None
        self._started: Deferred[None] | None = None
        self.ready = False
        self.connections = 0
        self._trimmer: IdleTrimmer | None = None

    # -- start ---------------------------------------------------------------
    def privilegedStartService(self) -> None:
        self._undo_log_level = apply_log_level(globalLogPublisher, self.config.log_level)
        rlimits.raise_nofile()
        super().privilegedStartService()

    def startService(self) -> None:
        super().startService()
        self.reactor.callWhenRunning(self._handle_signals)
        self._started = ensureDeferred(self._start())
        self._started.addErrback(self._start_failed)

    async def _start(self) -> None:
        cfg = self.config
        self.log.info("xguard {version} starting", version=__version__)
        makedirs(cfg.state_dir, 0o700)
        # Before anything else: a second daemon on the same state would
        # fight over the cache, the sockets and the active-sockets file.
        self._instance_lock = _lock_instance(os.path.join(cfg.state_dir, "xguard.lock"))
        if cfg.control_path is not None:
            _remove_stale_socket(cfg.control_path)
        self._pool = ThreadPool(minthreads=1, maxthreads=4, name="xguard-io")
        self._pool.start()
        self.upstream = await self._make_upstream()
        self.log.info("upstream: {target}", target=self.upstream.description)
        if cfg.knobs:
            self.log.warn("internal benchmark knobs in force: {knobs}",
                          knobs=",".join(sorted(cfg.knobs)))
        locks = KeyedLocks()
        vtpm_sink = VtpmSink(self.upstream, locks)
        nvram_sink = NvramSink(self.upstream, locks)
        swtpm_writer = self._writer(vtpm_sink)
        nvram_writer = self._writer(nvram_sink)
        for cache in self.caches.values():
            await cache.recover()
        tpm_store = TpmStore(swtpm_writer, vtpm_sink)
        nvram_store = NvramStore(nvram_writer, self.upstream)
        upstream = self.upstream

        def site_for(kind: Kind, vm_uuid: str) -> Site:
            if kind is Kind.SWTPM:
                resource = SwtpmSocket(vm_uuid, tpm_store).resource()
            else:
                resource = VarstoredSocket(vm_uuid, upstream, nvram_store).resource()
            return DomainSite(resource, reactor=self.reactor, timeout=cfg.request_timeout,
                              on_connection=self._count_connection)

        self.registry = SocketRegistry(
            self.reactor, cfg.sockets_file, site_for, on_forget=upstream.forget,
            runner=self._run_blocking, backlog=cfg.listen_backlog,
        )
        await self.registry.resume()
        for cache in self.caches.values():
            cache.start()
        self.control_port = await self._listen_control(
            control_factory(
                registry=self.registry, upstream=upstream, sink=vtpm_sink, status=self.status,
            )
        )
        self._trimmer = IdleTrimmer(self.reactor, lambda: self.connections)
        self._trimmer.start()
        self.ready = True
        sdnotify.notify("READY=1")
        self.log.info("xguard ready: {sockets} domain sockets, cache {cache}",
                      sockets=len(self.registry.entries()),
                      cache="off" if cfg.no_cache else "on")

    async def _make_upstream(self) -> IUpstream:
        """xapi when --xapi is given (start-up never waits for it), else
        the embedded store, opened now so a broken database fails start-up."""
        cfg = self.config
        if cfg.xapi is not None:
            return xapi_upstream(self.reactor, cfg.xapi, cfg.xapi_timeout,
                                 cache_handles="no-handle-cache" not in cfg.knobs)
        path = cfg.store_path
        assert path is not None
        makedirs(os.path.dirname(os.path.abspath(path)), 0o700)
        store = local_store(self.reactor, path)
        await store.open()
        return store

    def _writer(self, sink: IItemSink) -> IItemWriter:
        cfg = self.config
        if cfg.no_cache:
            return DirectWriter(sink)
        cache = WriteBackCache(
            sink,
            cfg.state_dir,
            clock=self.reactor,
            runner=self._run_blocking,
            monotonic_ns=self.monotonic_ns,
            queue_size=cfg.queue_size,
            direct_deadline=cfg.direct_deadline,
            max_concurrency=1 if "serial" in cfg.knobs else cfg.flush_concurrency,
            coalesce="no-coalesce" not in cfg.knobs,
            enabled=lambda: not os.path.exists(cfg.fault_file),
        )
        self.caches[sink.service] = cache
        return cache

    def _count_connection(self) -> None:
        self.connections += 1

    def _run_blocking(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        """Blocking file I/O (fsyncs) off the reactor thread."""
        assert self._pool is not None
        return deferToThreadPool(self.reactor, self._pool, f, *args, **kwargs)

    async def _listen_control(self, factory: Any) -> IListeningPort:
        # A stale file at the path was removed (a live one refused) before
        # anything started: see _start.
        path = self.config.control_path
        if path is not None:
            makedirs(os.path.dirname(path), 0o755)
        port: IListeningPort = await control_endpoint(
            self.reactor, self.config.control).listen(factory)
        if path is not None:
            os.chmod(path, 0o600)
        return port

    def _start_failed(self, failure: Any) -> None:
        self.log.failure("xguard failed to start", failure)
        # twistd has no way to set an exit status: leave with 1 once the
        # reactor has shut down so systemd sees the failure.
        self.reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
        assert IReactorCore.providedBy(self.reactor)
        # The failure may come before the reactor runs (startService is
        # called first): stop it once it does.
        self.reactor.callWhenRunning(self.reactor.stop)

    def _handle_signals(self) -> None:
        """SIGTERM/SIGINT shut down cleanly and exit 0 (SPEC §2). Twisted's
        own handlers make twistd re-raise the signal after shutdown, which
        systemd and the orchestrator would see as a crash."""

        def stop(signum: int, frame: object) -> None:
            self.log.info("received signal {signum}, shutting down", signum=signum)
            self.reactor.callFromThread(self.reactor.stop)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

    # -- status --------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The control channel's Status document."""
        assert self.upstream is not None and self.registry is not None
        return {
            "version": __version__,
            "ready": self.ready,
            "cache_enabled": not self.config.no_cache
            and not os.path.exists(self.config.fault_file),
            "upstream": self.upstream.status(),
            "sockets": self.registry.count_by_service(),
            "services": {
                kind.value: (self.caches[kind].status() if kind in self.caches
                             else {"mode": "Direct", "cache": "off"})
                for kind in Kind
            },
        }

    # -- stop ----------------------------------------------------------------
    def stopService(self) -> Deferred[None]:
        super().stopService()
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        self.log.info("xguard stopping")
        sdnotify.notify("STOPPING=1")
        if self._started is not None and not self._started.called:
            self._started.cancel()
        if self._trimmer is not None:
            self._trimmer.stop()
        if self.control_port is not None:
            await self.control_port.stopListening()
        if self.registry is not None:
            await self.registry.stop_accepting()
        for cache in self.caches.values():
            await cache.stop()
        if self.upstream is not None:
            await self.upstream.close()
        if self._pool is not None:
            self._pool.stop()
        if self._instance_lock is not None:
            os.close(self._instance_lock)  # releases the flock
            self._instance_lock = None
        self.log.info("xguard stopped")
        if self._undo_log_level is not None:
            self._undo_log_level()


def _lock_instance(path: str) -> int:
    """Hold an exclusive flock on ``path`` for the daemon's lifetime (the
    kernel drops it if the process dies, so a crash never leaves it stale)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OSError(f"another xguard is running on {os.path.dirname(path)} "
                      f"(it holds {path})") from None
    os.ftruncate(fd, 0)
    os.write(fd, b"%d\n" % os.getpid())
    return fd


def _remove_stale_socket(path: str) -> None:
    """A control socket left by a previous run would make listen fail."""
    import socket

    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
    else:
        raise OSError(f"control socket {path} is in use by another process")
    finally:
        probe.close()
