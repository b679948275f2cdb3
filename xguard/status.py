# -*- test-case-name: tests.unit.test_status -*-
"""The daemon's status as frozen value classes, serialised in one place.

The control channel's ``Status`` answer, ``xguard-ctl status``, the
Prometheus metrics and the tests all read these classes: a field added here
is added everywhere, and no reader guesses a document's shape. The JSON
form (:func:`to_json`) is the ``Status`` command's document;
:func:`from_json` reads it back, tolerating fields an older or newer daemon
lacks or adds, so one ``xguard-ctl`` can talk to both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import attrs

__all__ = ["UpstreamStatus", "SetAside", "Drain", "CacheStatus", "Reason", "Health",
           "DaemonStatus", "assess", "to_json", "from_json", "HEALTHY", "DEGRADED", "FAILED",
           "VERDICTS", "REASONS", "LOG_LEVELS", "FAULT_FILE"]

T = TypeVar("T")

#: The levels the daemon logs at (``--log-level``, ``xguard-ctl
#: log-level``, :attr:`DaemonStatus.log_level`), most verbose first.
LOG_LEVELS = ("debug", "info", "warn", "error")
#: The upstream daemon's fault switch, ``--fault-file``'s default: while it
#: exists the cache is off (:attr:`DaemonStatus.fault_file`).
FAULT_FILE = "/tmp/fist_disable_xapi_guard_cache"


@attrs.frozen
class UpstreamStatus:
    """How upstream's calls fare (see xguard.upstream.reachability)."""

    kind: str  # "xapi" or "local"
    target: str
    #: None until a call answered or failed.
    reachable: bool | None = None
    #: When the current outage started (epoch seconds); None while reachable.
    down_since: float | None = None
    #: The transient error of the current outage; None once it answers again.
    last_error: str | None = None
    calls: int = 0
    #: When the oldest call still in flight started, if it has been running
    #: longer than the "unresponsive" threshold (a hung upstream).
    unresponsive_since: float | None = None
    #: Calls in flight now, and when the oldest of them started.
    inflight: int = 0
    oldest_inflight_since: float | None = None


@attrs.frozen
class SetAside:
    """A write set aside (see xguard.cache.aside): acknowledged, never
    delivered, waiting for the operator."""

    #: What ``xguard-ctl resolve`` names it by.
    id: str
    service: str
    vm: str
    #: The item's keys it holds (vTPM 0-2, NVRAM 0).
    keys: tuple[int, ...]
    #: conflict (another writer changed upstream), elsewhere (the VM runs
    #: on another host), refused (upstream refused it for good), damaged
    #: (its file failed its check).
    kind: str
    reason: str
    #: When it was set aside (epoch seconds).
    since: float | None
    #: Its VM's sockets read it (set aside while the VM runs here).
    held: bool
    #: Holds the item's whole state (a vTPM's three keys): it can be pushed.
    complete: bool
    file: str


@attrs.frozen
class Drain:
    """A backlog of cached writes being delivered (see xguard.cache.flusher):
    from the start of the first delivery that went through until the cache
    is Direct again."""

    #: When its first successful delivery started (epoch seconds).
    started: float
    #: Writes delivered since.
    delivered: int = 0
    #: Writes still pending.
    left: int = 0
    #: Writes delivered per second since it started (until it ended).
    rate: float = 0.0
    #: When it ended (epoch seconds); None while it lasts.
    ended: float | None = None


@attrs.frozen
class CacheStatus:
    """One service's write-back cache (or its absence, ``cache == "off"``)."""

    service: str
    mode: str = "Direct"
    cache: str = "on"  # "off" with --no-cache
    #: False while the fault switch file exists.
    enabled: bool = True
    queue_depth: int = 0
    #: Pending items per VM.
    pending: Mapping[str, int] = attrs.field(factory=dict)
    #: Writes set aside (the SPEC's "quarantined items").
    quarantined: tuple[SetAside, ...] = ()
    #: VMs whose pending writes have failed for longer than --stuck-after,
    #: and since when (epoch seconds).
    stuck: Mapping[str, float] = attrs.field(factory=dict)
    #: Writes set aside since the daemon started, by kind.
    set_aside_total: Mapping[str, int] = attrs.field(factory=dict)
    #: Why writes are cached now (the last delivery failure, else upstream's
    #: transient error); None once upstream answers again.
    last_error: str | None = None
    #: Epoch seconds; None while upstream answers.
    outage_since: float | None = None
    delivered: int = 0
    #: Why the disk refuses writes now, and since when.
    disk_error: str | None = None
    disk_error_since: float | None = None
    #: When the oldest pending write was acknowledged (epoch seconds).
    oldest_pending_since: float | None = None
    pending_bytes: int = 0
    #: Direct writes upstream did not answer within --direct-deadline.
    deadline_fallbacks: int = 0
    #: The backlog being delivered now, else the last one delivered (ended
    #: set); None before the first.
    drain: Drain | None = None

    @property
    def pending_items(self) -> int:
        return sum(self.pending.values())


#: The health verdicts, best first (doc/operations.md, "Health").
HEALTHY, DEGRADED, FAILED = "healthy", "degraded", "failed"
VERDICTS = (HEALTHY, DEGRADED, FAILED)
#: Every reason :func:`assess` gives, by its code (stable: scripts and the
#: metrics name them) -> the verdict it makes at least. ``disk_error`` is
#: FAILED while the cache needs the disk, DEGRADED otherwise.
REASONS = {
    "not_ready": FAILED,
    "writes_fail": FAILED,
    "disk_error": FAILED,
    "upstream_unreachable": DEGRADED,
    "upstream_unresponsive": DEGRADED,
    "cache_disabled": DEGRADED,
    "set_aside": DEGRADED,
    "stuck": DEGRADED,
}


@attrs.frozen
class Reason:
    """Why the daemon is not healthy."""

    #: One of :data:`REASONS`.
    code: str
    #: What it makes the verdict: DEGRADED or FAILED.
    severity: str
    #: For people: what, where (a service, a count, upstream's error).
    text: str


@attrs.frozen
class Health:
    """The daemon's health: a verdict and why (:func:`assess`)."""

    verdict: str = HEALTHY
    reasons: tuple[Reason, ...] = ()


@attrs.frozen
class DaemonStatus:
    """Everything ``Status`` answers."""

    version: str
    ready: bool
    upstream: UpstreamStatus
    #: Per service name.
    services: Mapping[str, CacheStatus]
    #: Domain sockets per service name.
    sockets: Mapping[str, int]
    #: False with --no-cache, or while the fault switch file exists.
    cache_enabled: bool
    #: VMs whose last known state is kept (live or across an outage).
    known_state_vms: int = 0
    #: The level the log is filtered at now (``xguard-ctl log-level``
    #: changes it until the next start); None from an older daemon.
    log_level: str | None = None
    #: The fault switch file (``--fault-file``): while it exists the cache
    #: is off; None from an older daemon.
    fault_file: str | None = None
    #: Requests received and waiting for their service's admission, per
    #: service name (xguard.domain.admission; empty from an older daemon).
    requests_waiting: Mapping[str, int] = attrs.field(factory=dict)
    #: Computed from the rest (:func:`assess`), never given: the daemon's
    #: document carries it, and a reader computes it again from the document.
    health: Health = attrs.field(init=False)

    @health.default
    def _health(self) -> Health:
        return assess(self)


def assess(status: DaemonStatus) -> Health:
    """The health verdict (the rules are doc/operations.md's "Health"):

    - FAILED: VM requests fail, or may fail, now: not ready (starting,
      stopping, restarting); upstream unreachable while the cache is off;
      the disk refusing cache writes while the cache needs it (upstream
      unreachable, or writes pending).
    - DEGRADED: VMs are served, but something needs a look: upstream
      unreachable (writes are cached) or unresponsive; the cache off
      (``--no-cache``, the fault switch file); writes set aside; VMs whose
      writes keep failing; the disk refused the last cache write.
    - HEALTHY: none of these.
    """
    reasons: list[Reason] = []

    def add(code: str, text: str, severity: str | None = None) -> None:
        reasons.append(Reason(code=code, severity=severity or REASONS[code], text=text))

    up = status.upstream
    services = [status.services[name] for name in sorted(status.services)]
    if not status.ready:
        add("not_ready", "not ready: starting, stopping or restarting")
    no_cache = any(svc.cache == "off" for svc in services)
    cache_off = not status.cache_enabled or any(not svc.enabled for svc in services)
    if up.reachable is False:
        if cache_off:
            add("writes_fail", "upstream unreachable and the cache off: VM writes fail")
        error = f" ({up.last_error})" if up.last_error else ""
        pending = sum(svc.pending_items for svc in services)
        add("upstream_unreachable", f"upstream unreachable{error}" + (
            "" if cache_off else f": {_count(pending, 'write')} cached"))
    if up.unresponsive_since is not None:
        add("upstream_unresponsive",
            "upstream unresponsive: a call has waited longer than --unresponsive-after")
    if cache_off:
        add("cache_disabled", "the cache is off (--no-cache)" if no_cache else
            "the cache is disabled: the fault switch file exists")
    for svc in services:
        if svc.disk_error is not None:
            if up.reachable is False or svc.mode != "Direct" or svc.pending_items > 0:
                add("disk_error", f"{svc.service} cache: the disk refuses writes "
                    f"({svc.disk_error})", FAILED)
            else:  # Direct: the disk is not needed until the next outage
                add("disk_error", f"{svc.service} cache: the disk refused the last cache write "
                    f"({svc.disk_error}): writes would fail in an outage", DEGRADED)
        if svc.quarantined:
            kinds: dict[str, int] = {}
            for item in svc.quarantined:
                kinds[item.kind] = kinds.get(item.kind, 0) + 1
            why = ", ".join(f"{kind} {n}" for kind, n in sorted(kinds.items()))
            add("set_aside", f"{svc.service}: {_count(len(svc.quarantined), 'write')} set aside "
                f"({why}): see xguard-ctl set-aside")
        if svc.stuck:
            add("stuck", f"{svc.service}: the writes of {_count(len(svc.stuck), 'VM')} have "
                "failed for longer than --stuck-after")
    severities = {reason.severity for reason in reasons}
    verdict = FAILED if FAILED in severities else DEGRADED if severities else HEALTHY
    return Health(verdict=verdict, reasons=tuple(reasons))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def to_json(status: DaemonStatus) -> dict[str, Any]:
    """The ``Status`` document (plain JSON types: tuples become lists, so
    the document equals its own JSON round trip)."""
    return _plain(attrs.asdict(status))  # type: ignore[no-any-return]


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def from_json(doc: Mapping[str, Any]) -> DaemonStatus:
    """Read a ``Status`` document back; unknown fields are ignored, missing
    ones take their defaults."""
    upstream = _mapping(doc.get("upstream"))
    services = _mapping(doc.get("services"))
    return DaemonStatus(
        version=str(doc.get("version", "?")),
        ready=bool(doc.get("ready", False)),
        upstream=_build(UpstreamStatus, {"kind": "?", "target": "?", **upstream}),
        services={str(name): _cache(str(name), svc) for name, svc in services.items()
                  if isinstance(svc, Mapping)},
        sockets={str(k): int(v) for k, v in _mapping(doc.get("sockets")).items()
                 if isinstance(v, int)},
        cache_enabled=bool(doc.get("cache_enabled", True)),
        known_state_vms=int(doc.get("known_state_vms", 0) or 0),
        log_level=_text_or_none(doc.get("log_level")),
        fault_file=_text_or_none(doc.get("fault_file")),
        requests_waiting={str(k): int(v) for k, v in _mapping(doc.get("requests_waiting")).items()
                          if isinstance(v, int)},
    )


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _cache(name: str, doc: Mapping[str, Any]) -> CacheStatus:
    fields = dict(doc)
    fields["service"] = name
    fields["pending"] = {str(k): int(v) for k, v in _mapping(doc.get("pending")).items()
                         if isinstance(v, int)}
    quarantined = doc.get("quarantined")
    if not isinstance(quarantined, list):
        quarantined = []
    fields["quarantined"] = tuple(_set_aside(name, q) for q in quarantined
                                  if isinstance(q, Mapping))
    fields["stuck"] = {str(k): float(v) for k, v in _mapping(doc.get("stuck")).items()
                       if isinstance(v, (int, float))}
    fields["set_aside_total"] = {str(k): int(v)
                                 for k, v in _mapping(doc.get("set_aside_total")).items()
                                 if isinstance(v, int)}
    drain = doc.get("drain")
    fields["drain"] = (_build(Drain, {"started": 0.0, **drain})
                       if isinstance(drain, Mapping) else None)
    return _build(CacheStatus, fields)


def _set_aside(service: str, doc: Mapping[str, Any]) -> SetAside:
    fields = {"id": "?", "service": service, "vm": "?", "keys": (), "kind": "?", "reason": "?",
              "since": None, "held": False, "complete": False, "file": "?", **doc}
    if "key" in doc and "keys" not in doc:  # an earlier daemon's document
        fields["keys"] = (doc["key"],)
    fields["keys"] = tuple(k for k in fields["keys"] if isinstance(k, int))
    return _build(SetAside, fields)


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _build(cls: type[T], fields: Mapping[str, Any]) -> T:
    known = {f.name for f in attrs.fields(cls) if f.init}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in fields.items() if k in known})
