# -*- test-case-name: tests.unit.test_tap -*-
"""The daemon's configuration as one frozen value, validated once.

Built from twistd's parsed options by :func:`Config.from_options`; every
component gets the parts it needs from here instead of reading options.

The options can also come from a TOML file (:func:`read_config_file`,
``/etc/xguard/xguard.toml`` unless ``--config`` names another): one key per
long option, with TOML's types (``queue-size = 512``, ``no-cache = true``,
``metrics = "tcp:9101:interface=127.0.0.1"``). The command line wins over
the file. A file that cannot be read, is not TOML, names an unknown option
or gives a value of the wrong type stops the start with a message naming
the file and the key (a usage error)."""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Collection, Mapping
from typing import Any

import attrs

from ..domain import admission
from ..status import FAULT_FILE, LOG_LEVELS

__all__ = ["Config", "LOG_LEVELS", "FAULT_FILE", "DEFAULT_CONFIG_FILE", "DEFAULT_ACTIVE_REQUESTS",
           "INT_OPTIONS", "NUMBER_OPTIONS", "UPSTREAM_OPTIONS", "read_config_file"]

DEFAULT_STATE_DIR = "/var/lib/xapi-guard"
DEFAULT_SOCKETS_FILE = "/run/nonpersistent/varstored-guard-active.json"
DEFAULT_CONTROL = "unix:/run/xguard/control.sock"
#: sun_path holds 108 bytes with the terminating NUL (Linux).
MAX_SOCKET_PATH = 107
#: Read when it exists, unless --config names another file (or none).
DEFAULT_CONFIG_FILE = "/etc/xguard/xguard.toml"
#: Requests of each service's domain sockets in the apps at once.
DEFAULT_ACTIVE_REQUESTS = admission.DEFAULT_LIMIT
#: Options whose value is an integer, and a number (seconds).
INT_OPTIONS = ("queue-size", "flush-concurrency", "listen-backlog", "active-requests")
NUMBER_OPTIONS = ("xapi-timeout", "direct-deadline", "request-timeout", "unresponsive-after",
                  "stuck-after")
#: One choice, the upstream: either on the command line overrides both in
#: the file (--xapi does not clash with a file's local-store).
UPSTREAM_OPTIONS = ("xapi", "local-store")


#: twistd's own options (what twistd does before xguard's options are read:
#: where the log goes, daemonizing), named in the error for such a key.
_TWISTD_OPTIONS = frozenset({"nodaemon", "pidfile", "logfile", "syslog", "prefix", "logger",
                             "reactor", "umask", "uid", "gid", "euid", "chroot", "rundir",
                             "profile", "debug"})


def _toml_type(value: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


def read_config_file(path: str, *, flags: Collection[str],
                     parameters: Collection[str]) -> dict[str, str | int]:
    """The options the TOML file at ``path`` sets, as the command line would
    give them: parameters as strings, flags as 0 or 1.

    :param flags: the long names of the flags (``no-cache``).
    :param parameters: the long names of the options taking a value.
    :raises ValueError: the file cannot be read or parsed, a key is no
        option, or a value has the wrong type; the message names the file
        (and the key).
    """
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except OSError as e:
        raise ValueError(f"cannot read the configuration file {path}: "
                         f"{e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"configuration file {path} is not valid TOML: {e}") from None
    known = set(flags) | set(parameters)
    options: dict[str, str | int] = {}
    for key, value in document.items():
        where = f"configuration file {path}: {key}"
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.8)
            if key in _TWISTD_OPTIONS:
                hint = f": --{key} is twistd's, and stays on the command line"
            elif close:
                hint = f"; did you mean {close[0]}?"
            else:
                hint = ("; the keys are xguard's long options without '--' (twistd's own, "
                        "such as --logfile or --syslog, stay on the command line)")
            raise ValueError(f"{where} is not an option{hint}")
        if key in flags:
            if not isinstance(value, bool):
                raise ValueError(f"{where} must be true or false, not {value!r} "
                                 f"({_toml_type(value)})")
            options[key] = int(value)
        elif key in INT_OPTIONS:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{where} must be an integer, not {value!r} "
                                 f"({_toml_type(value)})")
            options[key] = str(value)
        elif key in NUMBER_OPTIONS:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{where} must be a number of seconds, not {value!r} "
                                 f"({_toml_type(value)})")
            options[key] = str(value)
        else:
            if not isinstance(value, str):
                raise ValueError(f"{where} must be a string, not {value!r} "
                                 f"({_toml_type(value)})")
            options[key] = value
    return options


def _positive(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise ValueError(f"--{attribute.name.replace('_', '-')} must be positive, got {value}")


def _not_negative(_: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if value < 0:
        raise ValueError(f"--{attribute.name.replace('_', '-')} must be 0 or more, got {value}")


def _upstream_target(_: object, __: attrs.Attribute[Any], value: str | None) -> None:
    if value is None:
        return
    if value.startswith("unix:"):
        if not os.path.isabs(value[len("unix:"):]):
            raise ValueError(f"--xapi unix: needs an absolute socket path, got {value!r}")
    elif not value.startswith(("http://", "https://")):
        raise ValueError("--xapi must be unix:PATH, http://HOST[:PORT] or https://…, "
                         f"got {value!r}")


def unix_endpoint_path(description: str) -> str | None:
    """The socket file of a Twisted ``unix:`` server endpoint description
    (``unix:PATH[:mode=…]`` or ``unix:address=PATH[:…]``); None for any
    other kind of endpoint."""
    if not description.startswith("unix:"):
        return None
    first = description[len("unix:"):].split(":")[0]
    return first[len("address="):] if first.startswith("address=") else first


def _control_endpoint(_: object, __: attrs.Attribute[Any], value: str) -> None:
    """The control channel is unrestricted (any VM's sockets and vTPM), so
    it must be root's alone: only a UNIX socket can be made 0600 and tell
    who connects (SO_PEERCRED). A TCP (or any other) endpoint would answer
    every local user, so it is refused here rather than at first use."""
    path = unix_endpoint_path(value)
    if path is None:
        raise ValueError(
            f"--control must be a UNIX socket endpoint such as {DEFAULT_CONTROL} "
            f"(the control channel is unrestricted, so it is root-only), got {value!r}")
    if not os.path.isabs(path):
        raise ValueError(f"--control needs an absolute socket path, got {value!r}")
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ValueError(f"--control socket path {path} is longer than "
                         f"{MAX_SOCKET_PATH} bytes")


def _metrics_endpoint(_: object, __: attrs.Attribute[Any], value: str | None) -> None:
    """Metrics carry no VM content, but a TCP endpoint without an explicit
    interface would listen on every network the host has."""
    if value is None:
        return
    if value.startswith("unix:"):
        path = unix_endpoint_path(value) or ""
        if not os.path.isabs(path):
            raise ValueError(f"--metrics unix: needs an absolute socket path, got {value!r}")
        return
    if value.startswith("tcp:"):
        if ":interface=" not in value:
            raise ValueError("--metrics tcp: needs an explicit interface, e.g. "
                             f"tcp:9101:interface=127.0.0.1, got {value!r}")
        return
    raise ValueError(f"--metrics must be unix:PATH or tcp:PORT:interface=ADDRESS, got {value!r}")


@attrs.frozen(kw_only=True)
class Config:
    """Everything the daemon needs to know at start-up."""

    xapi: str | None = attrs.field(default=None, validator=_upstream_target)
    local_store: str | None = None
    state_dir: str = DEFAULT_STATE_DIR
    sockets_file: str = DEFAULT_SOCKETS_FILE
    control: str = attrs.field(default=DEFAULT_CONTROL, validator=_control_endpoint)
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
    #: Where the Prometheus metrics are served (None: nowhere).
    metrics: str | None = attrs.field(default=None, validator=_metrics_endpoint)
    #: A call in flight this long marks upstream unresponsive.
    unresponsive_after: float = attrs.field(default=5.0, validator=_positive)
    #: Requests of each service's sockets in the apps at once (0: no
    #: limit; see xguard.domain.admission).
    active_requests: int = attrs.field(default=DEFAULT_ACTIVE_REQUESTS, validator=_not_negative)
    #: Listen backlog of each domain socket (capped by SOMAXCONN).
    listen_backlog: int = attrs.field(default=128, validator=_positive)
    #: A VM whose cached writes keep failing this long raises one alert.
    stuck_after: float = attrs.field(default=600.0, validator=_positive)
    #: The configuration file read (None: none), and the options it set.
    config_file: str | None = None
    from_file: tuple[str, ...] = ()

    def __attrs_post_init__(self) -> None:
        if self.xapi is not None and self.local_store is not None:
            raise ValueError("--xapi and --local-store are mutually exclusive")

    @property
    def control_path(self) -> str | None:
        """The control socket's file (``--control`` is always a UNIX endpoint;
        the type stays optional for callers written before that)."""
        return unix_endpoint_path(self.control)

    @property
    def uses_tls(self) -> bool:
        """Whether an endpoint needs TLS (only an ``https`` xapi can)."""
        return self.xapi is not None and self.xapi.startswith("https:")

    @property
    def store_path(self) -> str | None:
        """The SQLite file when the embedded store is the upstream."""
        if self.xapi is not None:
            return None
        return self.local_store or os.path.join(self.state_dir, "local-store.sqlite")

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "Config":
        """Build from twistd options (``xguard.tap.Options``)."""
        return cls(
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
            metrics=options["metrics"],
            unresponsive_after=float(options["unresponsive-after"]),
            listen_backlog=int(options.get("listen-backlog", 128)),
            active_requests=int(options.get("active-requests", DEFAULT_ACTIVE_REQUESTS)),
            stuck_after=float(options.get("stuck-after", 600)),
            config_file=options.get("config") or None,
            from_file=tuple(getattr(options, "from_file", ())),
        )
