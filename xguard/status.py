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

__all__ = ["UpstreamStatus", "SetAside", "CacheStatus", "DaemonStatus", "to_json",
           "from_json"]

T = TypeVar("T")


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

    @property
    def pending_items(self) -> int:
        return sum(self.pending.values())


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
    )


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
    known = {f.name for f in attrs.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in fields.items() if k in known})
