# -*- test-case-name: tests.unit.test_recovery -*-
"""Start-up recovery of one service's cache tree (SPEC §6, last bullet).

Classify, then act: :func:`plan` is pure (a listing and ``now`` in, a list
of actions out) so it can be property-tested; :func:`apply` executes a plan
and :func:`scan` produces a listing, both blocking (run them through the
injected runner). Rules, per item directory ``<vm>/<key>/``:

- keep only the latest valid version; delete outdated and unrecognised
  files (and files anywhere else in the tree). A version is valid when its
  file passes its check (:mod:`xguard.cache.entry`); one that fails is
  set aside (moved to the quarantine, with the reason), never delivered,
  and the version before it is the latest valid one — :func:`check` reads
  each item's versions newest first until one passes;
- delete ``*.pre`` files: they were never acknowledged, and the instance
  lock guarantees no other writer (the upstream daemon leaves them, and
  they pile up on a host that crashes often);
- a latest version stamped later than ``now`` (the monotonic clock restarted
  with a reboot) is renamed to ``now``, so later writes sort after it;
- remove directories left empty.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable, Mapping, Sequence

import attrs

from ..model import Service
from ..util.durable import fsync_dir, safe_unlink
from .entry import Damaged, Entry
from .layout import (
    PRE_SUFFIX,
    Invalid,
    Item,
    Latest,
    Outdated,
    Pending,
    Version,
    classify,
    is_vm_dir,
    parse_key,
    parse_timestamp,
)

__all__ = ["Listing", "Keep", "Delete", "Move", "SetAside", "RemoveDir", "plan", "apply",
           "scan", "check", "kept_versions", "NEVER_ACKNOWLEDGED"]

#: The reason given for deleting a ``.pre`` file.
NEVER_ACKNOWLEDGED = "temporary file of a write never acknowledged"

Path = tuple[str, ...]


@attrs.frozen
class Listing:
    """A service directory's contents, as paths relative to it."""

    files: Sequence[Path] = ()
    dirs: Sequence[Path] = ()


@attrs.frozen
class Keep:
    path: Path
    version: Version


@attrs.frozen
class Delete:
    path: Path
    reason: str


@attrs.frozen
class Move:
    src: Path
    dst: Path
    version: Version


@attrs.frozen
class SetAside:
    """A version whose file fails its check: moved to the quarantine."""

    path: Path
    version: Version
    reason: str


@attrs.frozen
class RemoveDir:
    path: Path


Action = Keep | Delete | Move | SetAside | RemoveDir


def plan(service: Service, listing: Listing, now: int,
         damaged: Mapping[Path, str] | None = None) -> list[Action]:
    """What to do with every entry of ``listing``. Files come first, then
    empty directories deepest first. ``damaged`` names the version files
    that failed their check (see :func:`check`), with why."""
    damaged = damaged or {}
    actions: list[Action] = []
    groups: dict[Path, list[str]] = {}
    for path in listing.files:
        if path[-1].endswith(PRE_SUFFIX):
            actions.append(Delete(path, NEVER_ACKNOWLEDGED))
        elif (len(path) == 3 and is_vm_dir(path[0])
                and parse_key(service, path[1]) is not None):
            groups.setdefault(path[:2], []).append(path[2])
        else:
            actions.append(Delete(path, "not part of the cache layout"))
    for dir_path, names in sorted(groups.items()):
        item = Item(dir_path[0], int(dir_path[1]))
        for name in [n for n in names if dir_path + (n,) in damaged]:
            ts = parse_timestamp(name)
            if ts is not None:
                names.remove(name)
                actions.append(SetAside(dir_path + (name,), Version(item, ts),
                                        damaged[dir_path + (name,)]))
        for entry in classify(names):
            path = dir_path + (entry.name,)
            if isinstance(entry, Latest):
                if entry.ts > now:
                    actions.append(Move(path, dir_path + (str(now),), Version(item, now)))
                else:
                    actions.append(Keep(path, Version(item, entry.ts)))
            elif isinstance(entry, Outdated):
                actions.append(Delete(path, "outdated version"))
            elif isinstance(entry, Invalid):  # pragma: no cover - grouped names parse
                actions.append(Delete(path, "unrecognised file"))
            elif isinstance(entry, Pending):  # pragma: no cover - .pre handled above
                actions.append(Delete(path, NEVER_ACKNOWLEDGED))
    remaining = [a.path for a in actions if isinstance(a, Keep)]
    remaining += [a.dst for a in actions if isinstance(a, Move)]
    occupied = {p[:i] for p in remaining for i in range(1, len(p))}
    for d in sorted(listing.dirs, key=lambda p: (-len(p), p)):
        if d and d not in occupied:
            actions.append(RemoveDir(d))
    return actions


def kept_versions(actions: Iterable[Action]) -> list[Version]:
    """The versions pending delivery once ``actions`` are applied."""
    out = [a.version for a in actions if isinstance(a, (Keep, Move))]
    return sorted(out)


def check(base: str, listing: Listing, read: Callable[[str], Entry]) -> tuple[
        dict[Path, str], dict[Path, Entry]]:
    """Read each item's versions newest first until one passes its check
    (``read`` decodes a file, raising Damaged). Returns the damaged files
    with why, and the entry of each item's latest valid version. Blocking.
    """
    groups: dict[Path, list[tuple[int, Path]]] = {}
    for path in listing.files:
        ts = parse_timestamp(path[-1])
        if len(path) == 3 and ts is not None:
            groups.setdefault(path[:2], []).append((ts, path))
    damaged: dict[Path, str] = {}
    valid: dict[Path, Entry] = {}
    for versions in groups.values():
        for _ts, path in sorted(versions, reverse=True):
            try:
                valid[path] = read(os.path.join(base, *path))
                break
            except Damaged as e:
                damaged[path] = str(e)
    return damaged, valid


def scan(base: str) -> Listing:
    """List ``base`` (a service directory); a missing one is empty."""
    files: list[Path] = []
    dirs: list[Path] = []
    if not os.path.isdir(base):
        return Listing()
    for top, dirnames, filenames in os.walk(base):
        rel = os.path.relpath(top, base)
        prefix: Path = () if rel == "." else tuple(rel.split(os.sep))
        dirs.extend(prefix + (d,) for d in dirnames)
        files.extend(prefix + (f,) for f in filenames)
    return Listing(files=sorted(files), dirs=sorted(dirs))


def apply(base: str, actions: Iterable[Action],
          set_aside: Callable[[SetAside], None] | None = None) -> None:
    """Execute a plan below ``base``. Renames and deletions are made durable
    (directory fsync) before recovery is declared done. ``set_aside`` moves
    a damaged file out of the cache (durably)."""
    touched: set[str] = set()
    for action in actions:
        if isinstance(action, Delete):
            full = os.path.join(base, *action.path)
            safe_unlink(full)
            touched.add(os.path.dirname(full))
        elif isinstance(action, Move):
            src = os.path.join(base, *action.src)
            os.rename(src, os.path.join(base, *action.dst))
            touched.add(os.path.dirname(src))
        elif isinstance(action, SetAside):
            if set_aside is None:
                raise ValueError("a plan with damaged files needs set_aside")
            set_aside(action)
            touched.add(os.path.dirname(os.path.join(base, *action.path)))
        elif isinstance(action, RemoveDir):
            full = os.path.join(base, *action.path)
            try:
                os.rmdir(full)
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.ENOTEMPTY):
                    raise
            touched.discard(full)
            touched.add(os.path.dirname(full))
    for d in sorted(touched, key=len, reverse=True):
        if os.path.isdir(d):
            fsync_dir(d)
