# -*- test-case-name: tests.unit.test_tap -*-
"""The daemon's configuration as one frozen value, validated once.

Built from twistd's parsed options by :func:`Config.from_options`; every
component gets the parts it needs from here instead of reading options."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import attrs

__all__ = ["Config", "LOG_LEVELS", "FAULT_FILE"]

LOG_LEVELS = ("debug", "info", "warn", "error")
#: The upstream daemon's fault switch: while it exists the cache is off.
FAULT_FILE = "/tmp/fist_disable_xapi_guard_cache"
DEFAULT_STATE_DIR = "/var/lib/xapi-guard"
#: Environment variable holding comma-separated internal knobs.
KNOBS_ENV = "XGUARD_INTERNAL_KNOBS"
#: serial: one delivery at a time; no-coalesce: one upstream read-modify-write
#: per cached item; no-handle-cache: resolve VM/vTPM references on every call.
KNOBS = frozenset({"serial", "no-coalesce", "no-handle-cache"})
DEFAULT_SOCKETS_FILE = "/run/nonpersistent/varstored-guard-active.json"
DEFAULT_CONTROL = "unix:/run/xguard/control.sock"


def _positive(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise ValueError(f"--{attribute.name.replace('_', '-')} must be positive, got {value}")


def _upstream_target(_: object, __: attrs.Attribute[Any], value: str | None) -> None:
    if value is None:
        return
    if value.startswith("unix:"):
        if not os.path.isabs(value[len("unix:"):]):
            raise ValueError(f"--xapi unix: needs an absolute socket path, got {value!r}")
    elif not value.startswith(("http://", "https://")):
        raise ValueError("--xapi must be unix:PATH, http://HOST[:PORT] or https://…, "
                         f"got {value!r}")


@attrs.frozen(kw_only=True)
class Config:
    """Everything the daemon needs to know at start-up."""

    xapi: str | None = attrs.field(default=None, validator=_upstream_target)
    local_store: str | None = None
    state_dir: str = DEFAULT_STATE_DIR
    sockets_file: str = DEFAULT_SOCKETS_FILE
    control: str = DEFAULT_CONTROL
    queue_size: int = attrs.field(default=512, validator=_positive)
    xapi_timeout: float = attrs.field(default=120.0, validator=_positive)
    log_level: str = attrs.field(default="info", validator=attrs.validators.in_(LOG_LEVELS))
    no_cache: bool = False
    #: How long a guest waits for a Direct write before it goes to disk.
    direct_deadline: float = attrs.field(default=3.0, validator=_positive)
    #: A domain client idle (or stalled mid-request) this long is dropped.
    request_timeout: float = attrs.field(default=60.0, validator=_positive)
    fault_file: str = FAULT_FILE
    #: Deliveries the flusher runs at once (different VMs).
    flush_concurrency: int = attrs.field(default=8, validator=_positive)
    #: Listen backlog of each domain socket (capped by SOMAXCONN).
    listen_backlog: int = attrs.field(default=128, validator=_positive)
    #: Internal knobs reproducing the upstream daemon's design, for the
    #: benchmarks' comparison only (see :data:`KNOBS`); not an operator option.
    knobs: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)

    @knobs.validator
    def _known_knobs(self, _: attrs.Attribute[Any], value: frozenset[str]) -> None:
        unknown = value - KNOBS
        if unknown:
            raise ValueError(f"unknown {KNOBS_ENV} knobs: {', '.join(sorted(unknown))}")

    def __attrs_post_init__(self) -> None:
        if self.xapi is not None and self.local_store is not None:
            raise ValueError("--xapi and --local-store are mutually exclusive")

    @property
    def control_path(self) -> str | None:
        """The control socket's file when ``--control`` is a UNIX endpoint."""
        if not self.control.startswith("unix:"):
            return None
        return self.control[len("unix:"):].split(":")[0]

    @property
    def store_path(self) -> str | None:
        """The SQLite file when the embedded store is the upstream."""
        if self.xapi is not None:
            return None
        return self.local_store or os.path.join(self.state_dir, "local-store.sqlite")

    @classmethod
    def from_options(cls, options: Mapping[str, Any],
                     environ: Mapping[str, str] = os.environ) -> "Config":
        """Build from twistd options (``xguard.tap.Options``)."""
        knobs = [k for k in environ.get(KNOBS_ENV, "").split(",") if k]
        return cls(
            knobs=knobs,
            xapi=options["xapi"],
            local_store=options["local-store"],
            state_dir=options["state-dir"],
            sockets_file=options["sockets-file"],
            control=options["control"],
            queue_size=int(options["queue-size"]),
            xapi_timeout=float(options["xapi-timeout"]),
            log_level=options["log-level"],
            no_cache=bool(options["no-cache"]),
            direct_deadline=float(options["direct-deadline"]),
            request_timeout=float(options["request-timeout"]),
            fault_file=options["fault-file"],
            flush_concurrency=int(options["flush-concurrency"]),
            listen_backlog=int(options.get("listen-backlog", 128)),
        )
