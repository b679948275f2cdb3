# -*- test-case-name: tests.unit.test_listenfds -*-
"""systemd's convention for handing file descriptors to a new process,
both ways, without libsystemd.

A service manager (systemd starting the unit with its fd store, or xguard
re-executing itself) puts the descriptors at 3, 4, 5 … and says so in the
environment: ``LISTEN_FDS`` (how many), ``LISTEN_FDNAMES`` (their names,
``:``-separated) and ``LISTEN_PID`` (which process they are for: a variable
inherited by a child is not meant for it). :func:`take` reads that, as
``sd_listen_fds_with_names(1, …)`` does; :func:`place` and
:func:`environment` prepare the same for an ``exec``.

Deliberately light (only ``os``): the fake service manager of the tests
runs :func:`place` in a tiny launcher before it execs the daemon.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Mapping, MutableMapping, Sequence
from typing import NamedTuple

__all__ = ["FIRST_FD", "VARIABLES", "Passed", "parse", "take", "place", "environment",
           "valid_name", "MAX_NAME"]

#: SD_LISTEN_FDS_START: the first handed-over descriptor.
FIRST_FD = 3
VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
#: FDNAME_MAX of systemd.
MAX_NAME = 255


class Passed(NamedTuple):
    """One handed-over descriptor and the name it was stored under."""

    fd: int
    name: str


def valid_name(name: str) -> bool:
    """Whether systemd accepts ``name`` as an FDNAME: printable ASCII
    without ``:`` (the separator of LISTEN_FDNAMES), at most 255 chars."""
    return (len(name) <= MAX_NAME and name.isascii() and name.isprintable()
            and ":" not in name)


def parse(environ: Mapping[str, str], pid: int) -> list[Passed]:
    """The descriptors ``environ`` hands to process ``pid``.

    Empty when nothing was handed over or it was handed to another process
    (``LISTEN_PID`` differs: we inherited a variable meant for a parent).

    :raises ValueError: when the variables are malformed (the caller logs
        it and treats the descriptors as unknown).
    """
    if "LISTEN_PID" not in environ and "LISTEN_FDS" not in environ:
        return []
    try:
        for_pid = int(environ.get("LISTEN_PID", ""))
        count = int(environ.get("LISTEN_FDS", ""))
    except ValueError:
        raise ValueError(f"LISTEN_PID={environ.get('LISTEN_PID')!r} "
                         f"LISTEN_FDS={environ.get('LISTEN_FDS')!r} are not numbers") from None
    if for_pid != pid:
        return []
    if count < 0:
        raise ValueError(f"LISTEN_FDS={count} is negative")
    if count == 0:
        return []
    raw = environ.get("LISTEN_FDNAMES")
    names = raw.split(":") if raw is not None else ["unknown"] * count
    if len(names) != count:
        raise ValueError(f"LISTEN_FDNAMES has {len(names)} names for {count} descriptors")
    return [Passed(FIRST_FD + i, name) for i, name in enumerate(names)]


def take(environ: MutableMapping[str, str] | None = None,
         pid: int | None = None) -> list[Passed]:
    """:func:`parse` the process environment, then remove the variables
    (our children, and a later re-exec, must not see them) and make the
    descriptors close-on-exec (they are only passed on deliberately).

    :raises ValueError: as :func:`parse`; the variables are removed anyway.
    """
    env = os.environ if environ is None else environ
    try:
        passed = parse(env, os.getpid() if pid is None else pid)
    finally:
        for name in VARIABLES:
            env.pop(name, None)
    for p in passed:
        try:
            os.set_inheritable(p.fd, False)
        except OSError:
            pass  # not open: the caller's inspection reports it
    return passed


def environment(names: Sequence[str], pid: int) -> dict[str, str]:
    """The variables handing ``names`` (at 3, 4 …) to process ``pid``."""
    return {"LISTEN_PID": str(pid), "LISTEN_FDS": str(len(names)),
            "LISTEN_FDNAMES": ":".join(names)}


def place(fds: Sequence[int]) -> None:
    """Move ``fds`` to 3, 4 … in order, inheritable, for an ``exec``.

    Every descriptor is first copied above both ranges, so placing one
    never overwrites another still to be placed. Whatever used 3 … before
    is replaced: call this only right before exec (our own descriptors
    are close-on-exec, so nothing else leaks into the new image)."""
    if not fds:
        return
    floor = max(max(fds), FIRST_FD + len(fds)) + 1
    copies = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor) for fd in fds]
    for i, copy in enumerate(copies):
        os.dup2(copy, FIRST_FD + i, inheritable=True)
        os.close(copy)
