# -*- test-case-name: tests.unit.test_cache -*-
"""The disk side of one service's cache. Every method is blocking and is
meant to be called through the injected runner (a thread pool in
production, inline in tests)."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from ..model import Service
from ..util.durable import atomic_write, fsync_dir, makedirs, safe_unlink
from .entry import Entry, encode
from .layout import (
    PRE_SUFFIX,
    Item,
    Latest,
    Outdated,
    Version,
    classify,
    is_vm_dir,
    item_dir,
    parse_key,
    quarantine_path,
    service_dir,
    version_path,
)

__all__ = ["VersionFiles", "BatchWriteError", "sync_removal"]

REASON_SUFFIX = ".reason"


def sync_removal(directory: str, root: str) -> None:
    """Make the removal of an entry of ``directory`` durable.

    Deletions run concurrently in the thread pool: another one may have
    pruned ``directory`` (empty once our entry went) before we sync it. Its
    removal from the parent then carries ours, so the nearest ancestor
    that still exists is synced instead (up to ``root``)."""
    while True:
        try:
            fsync_dir(directory)
            return
        except FileNotFoundError:
            if os.path.normpath(directory) == os.path.normpath(root):
                raise
            directory = os.path.dirname(directory)


def _nearest_standing(directory: str, root: str) -> str:
    """``directory``, or its nearest ancestor that exists (up to ``root``)."""
    while not os.path.isdir(directory) and os.path.normpath(directory) != os.path.normpath(root):
        directory = os.path.dirname(directory)
    return directory


class BatchWriteError(Exception):
    """A batch's write failed after ``written`` of its versions were made
    durable (``error`` says why)."""

    def __init__(self, error: OSError, written: int) -> None:
        super().__init__(str(error))
        self.error = error
        self.written = written


class VersionFiles:
    """Durable versions of one service's items below ``root``."""

    def __init__(self, root: str, service: Service) -> None:
        self.root = root
        self.service = service
        self.base = service_dir(root, service)

    def write(self, version: Version, entry: Entry) -> None:
        """Durable once this returns: ``.pre``, fsync, rename, fsync dir;
        the file is checked (:mod:`xguard.cache.entry`)."""
        path = version_path(self.root, self.service, version)
        content = encode(entry)
        for _ in range(3):
            makedirs(os.path.dirname(path), 0o700)
            try:
                atomic_write(path, content, mode=0o600, tmp_suffix=PRE_SUFFIX)
                return
            except FileNotFoundError:
                continue  # a concurrent prune removed the empty directory
        atomic_write(path, content, mode=0o600, tmp_suffix=PRE_SUFFIX)

    def write_all(self, entries: list[tuple[Version, Entry]], superseded: list[Version], *,
                  acknowledge: Callable[[], None] = lambda: None) -> None:
        """A write's versions, each durable (:meth:`write`), then
        ``acknowledge()`` (the write may be acknowledged: see
        :func:`xguard.util.threads.run_acknowledging`), then the older
        versions they supersede removed (:meth:`discard`: no fsync of their
        own, see there) — one job, one trip to the I/O threads per write,
        and the unlinks off the acknowledgement's path.

        :raises BatchWriteError: with how many versions are durable.
        """
        for done, (version, entry) in enumerate(entries):
            try:
                self.write(version, entry)
            except OSError as e:
                raise BatchWriteError(e, done) from e
        acknowledge()
        for version in superseded:
            try:
                self.discard(version)
            except OSError:
                pass  # still beside the newer one: recovery keeps the newest

    def read(self, version: Version) -> bytes | None:
        """The bytes of ``version``'s file, or None when it is gone (decode
        them with :func:`xguard.cache.entry.decode`)."""
        try:
            with open(version_path(self.root, self.service, version), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def read_many(self, versions: list[Version]) -> dict[Version, bytes]:
        """The contents of ``versions`` still on disk."""
        out = {}
        for version in versions:
            data = self.read(version)
            if data is not None:
                out[version] = data
        return out

    def delete(self, version: Version) -> None:
        """Remove ``version`` durably and prune the directories it leaves
        empty."""
        path = version_path(self.root, self.service, version)
        if safe_unlink(path):
            sync_removal(os.path.dirname(path), self.root)
        self._prune(item_dir(self.root, self.service, version.item))

    def discard(self, version: Version) -> None:
        """Remove ``version``, superseded by a newer version of its item
        that is already durable, without an fsync: the two live in the same
        directory, so a crash may bring this one back only beside the newer
        one, and recovery keeps the newest; the next durable change of the
        directory (the next write's, or a delivery's) persists the removal."""
        safe_unlink(version_path(self.root, self.service, version))

    def delete_many(self, versions: list[Version]) -> None:
        """Remove ``versions`` (a flusher round's deliveries) and the
        directories they leave empty, then make it all durable with one
        fsync per directory still standing — instead of one or two per
        version: a drain of 300 items made ~600 fsyncs."""
        touched: set[str] = set()
        for version in versions:
            path = version_path(self.root, self.service, version)
            if safe_unlink(path):
                touched.add(os.path.dirname(path))
        parents: set[str] = set()
        for directory in sorted(touched, key=len, reverse=True):
            for d in (directory, os.path.dirname(directory)):
                try:
                    os.rmdir(d)
                except OSError as e:
                    if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                        parents.add(d)  # still there: its entries changed
                        break
                    raise
                parents.add(os.path.dirname(d))
        # A directory this removed is recorded in its parent (also synced):
        # the nearest one still standing stands for it, synced once. A
        # drain of 1000 VMs made 1000 fsyncs of the service directory here.
        standing = {_nearest_standing(d, self.root) for d in parents}
        for d in sorted(standing, key=len, reverse=True):
            sync_removal(d, self.root)

    def _prune(self, directory: str) -> None:
        for d in (directory, os.path.dirname(directory)):
            try:
                os.rmdir(d)
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                    return
                raise

    def scan(self) -> dict[Item, list[int]]:
        """Acknowledged versions per item, ascending; ``.pre`` and
        unrecognised files are not versions."""
        found: dict[Item, list[int]] = {}
        if not os.path.isdir(self.base):
            return found
        for vm in os.listdir(self.base):
            vm_dir = os.path.join(self.base, vm)
            if not is_vm_dir(vm) or not os.path.isdir(vm_dir):
                continue
            for key_name in os.listdir(vm_dir):
                key = parse_key(self.service, key_name)
                if key is None:
                    continue
                try:
                    names = os.listdir(os.path.join(vm_dir, key_name))
                except (FileNotFoundError, NotADirectoryError):
                    continue
                ts = sorted(e.ts for e in classify(names) if isinstance(e, (Latest, Outdated)))
                if ts:
                    found[Item(vm, key)] = ts
        return found

    def quarantine(self, version: Version, reason: str) -> str:
        """Move ``version``'s file out of the cache as it is (a damaged
        one), durably, with its reason next to it. Returns its new path."""
        src = version_path(self.root, self.service, version)
        dst = quarantine_path(self.root, self.service, version)
        makedirs(os.path.dirname(dst), 0o700)
        atomic_write(dst + REASON_SUFFIX, reason.encode("utf-8", "replace"), mode=0o600)
        os.rename(src, dst)
        fsync_dir(os.path.dirname(dst))
        sync_removal(os.path.dirname(src), self.root)
        self._prune(os.path.dirname(src))
        return dst

    def sizes(self, versions: list[Version]) -> dict[Version, int]:
        """The size of each version's file (0 when it is gone)."""
        out = {}
        for version in versions:
            try:
                out[version] = os.stat(version_path(self.root, self.service, version)).st_size
            except FileNotFoundError:
                out[version] = 0
        return out
