# -*- test-case-name: tests.unit.test_rlimits -*-
"""Raise the open-files limit (SPEC §8): a host runs two domain sockets per
VM plus their connections, far beyond the usual soft limit of 1024. Called
from ``privilegedStartService``, never at import."""

from __future__ import annotations

import resource

import attrs
from twisted.logger import Logger

__all__ = ["NofileChange", "raise_nofile"]

log = Logger(namespace="xguard.daemon.rlimits")

#: Tried in order when the hard limit is unlimited (Linux refuses an
#: unlimited RLIMIT_NOFILE soft limit; fs.nr_open defaults to 1048576).
_FALLBACKS = (1048576, 65536, 16384, 4096)


@attrs.frozen
class NofileChange:
    """What :func:`raise_nofile` did: the soft limit before and after, and
    the hard limit (``resource.RLIM_INFINITY`` when unlimited)."""

    before: int
    after: int
    hard: int

    @property
    def raised(self) -> bool:
        return self.after != self.before


def raise_nofile() -> NofileChange:
    """Set RLIMIT_NOFILE's soft limit to its hard limit (or the largest
    value the kernel accepts below an unlimited one). Never lowers it;
    failures are logged, not raised: the daemon still runs, with fewer
    sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    targets = (hard,) if hard != resource.RLIM_INFINITY else _FALLBACKS
    after = soft
    for target in targets:
        if soft != resource.RLIM_INFINITY and target <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            continue
        after = target
        break
    change = NofileChange(before=soft, after=after, hard=hard)
    if change.raised:
        log.info("open files limit raised from {before} to {after} (hard limit {hard})",
                 before=soft, after=after, hard=_show(hard))
    elif soft == hard:
        log.info("open files limit is {soft} (already the hard limit)", soft=_show(soft))
    else:
        log.warn("cannot raise the open files limit {soft} (hard limit {hard})",
                 soft=_show(soft), hard=_show(hard))
    return change


def _show(limit: int) -> str:
    return "unlimited" if limit == resource.RLIM_INFINITY else str(limit)
