# -*- test-case-name: tests.unit.test_layout -*-
"""Where the cache keeps things, compatible with the upstream daemon:
``STATE_DIR/<Service>/<vm-uuid>/<key>/<timestamp>`` where the timestamp is
``CLOCK_MONOTONIC`` in nanoseconds, decimal. A Swtpm file holds the key's
content exactly as received; a Varstored file holds
:meth:`xguard.model.NvramWrite.encode` (the value with its ``update`` flag).
Permanently refused versions move to
``STATE_DIR/quarantine/<Service>/<vm-uuid>/<key>/<timestamp>``.

Pure: the cache's value types, and encoding, parsing and classifying names;
no I/O.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import attrs

from ..model import Service, is_valid_uuid

__all__ = [
    "Item", "Version", "Batch", "QUARANTINE", "PRE_SUFFIX", "KEYS",
    "service_dir", "item_dir", "version_path", "quarantine_path",
    "parse_timestamp", "parse_key",
    "Latest", "Outdated", "Invalid", "Pending", "classify",
]

QUARANTINE = "quarantine"
PRE_SUFFIX = ".pre"
KEYS = {Service.SWTPM: frozenset({0, 1, 2}), Service.VARSTORED: frozenset({0})}


@attrs.frozen(order=True)
class Item:
    """One thing the cache versions: a VM's key (vTPM key 0-2, NVRAM 0)."""

    vm: str
    key: int


@attrs.frozen(order=True)
class Version:
    """One acknowledged write of an item, named by its timestamp."""

    item: Item
    ts: int


# Sort keys in the order attrs gives Item and Version. attrs compares by
# building both objects' field tuples on every comparison; a flusher round
# sorts thousands of versions (6% of a drain's reactor time went there).
def item_order(item: Item) -> tuple[str, int]:
    return item.vm, item.key


def version_order(version: Version) -> tuple[str, int, int]:
    return version.item.vm, version.item.key, version.ts


@attrs.frozen
class Batch:
    """One write, acknowledged as a whole: new versions of items of one VM
    (a domain write is one item; the orchestrator's VtpmSetContents is the
    vTPM's three keys)."""

    vm: str
    entries: tuple[tuple[Version, bytes], ...]

    @property
    def versions(self) -> list[Version]:
        return [version for version, _ in self.entries]

    def contents(self) -> dict[int, bytes]:
        """Key -> content, as a sink delivers them."""
        return {version.item.key: content for version, content in self.entries}


def service_dir(root: str, service: Service) -> str:
    return os.path.join(root, service.value)


def item_dir(root: str, service: Service, item: Item) -> str:
    return os.path.join(root, service.value, item.vm, str(item.key))


def version_path(root: str, service: Service, version: Version) -> str:
    return os.path.join(item_dir(root, service, version.item), str(version.ts))


def quarantine_path(root: str, service: Service, version: Version) -> str:
    return os.path.join(root, QUARANTINE, service.value, version.item.vm,
                        str(version.item.key), str(version.ts))


def parse_timestamp(name: str) -> int | None:
    """The timestamp a file name encodes, or None. Only canonical decimal
    (no sign, no leading zero) is accepted, so two names never collide."""
    if not name.isascii() or not name.isdigit():
        return None
    if str(int(name)) != name:
        return None
    return int(name)


def parse_key(service: Service, name: str) -> int | None:
    """The key a directory name encodes for ``service``, or None."""
    ts = parse_timestamp(name)
    return ts if ts is not None and ts in KEYS[service] else None


def is_vm_dir(name: str) -> bool:
    return is_valid_uuid(name)


@attrs.frozen
class Latest:
    """The newest acknowledged version of an item: the one to deliver."""

    name: str
    ts: int


@attrs.frozen
class Outdated:
    """An acknowledged version superseded by a newer one."""

    name: str
    ts: int


@attrs.frozen
class Invalid:
    """A file the layout does not recognise."""

    name: str


@attrs.frozen
class Pending:
    """A ``<ts>.pre`` file: a write never acknowledged (crash mid-write)."""

    name: str


Classified = Latest | Outdated | Invalid | Pending


def classify(names: Iterable[str]) -> list[Classified]:
    """Sort the file names of one item directory. Timestamps compare as
    numbers, never as strings (the upstream daemon once got that wrong)."""
    out: list[Classified] = []
    versions: list[tuple[int, str]] = []
    for name in names:
        if name.endswith(PRE_SUFFIX):
            out.append(Pending(name))
            continue
        ts = parse_timestamp(name)
        if ts is None:
            out.append(Invalid(name))
        else:
            versions.append((ts, name))
    versions.sort()
    for i, (ts, name) in enumerate(versions):
        out.append(Latest(name, ts) if i == len(versions) - 1 else Outdated(name, ts))
    return out
