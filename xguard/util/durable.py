# -*- test-case-name: tests.unit.test_durable -*-
"""Durable file writes. Twisted's FilePath.setContent does not fsync, so an
acknowledged write could vanish in a crash; this module is the one place
that gets it right: ``<name>.pre``, write, fsync, rename, fsync directory."""

from __future__ import annotations

import errno
import os

__all__ = ["atomic_write", "fsync_dir", "safe_unlink", "makedirs"]


def fsync_dir(path: str) -> None:
    """Make a directory's entries (a rename, an unlink) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes, *, mode: int = 0o600, tmp_suffix: str = ".pre") -> None:
    """Replace ``path`` with ``data`` so that after a crash it holds either
    the old or the new content, and once this returns, the new one.

    The temporary file is ``path + tmp_suffix`` (the upstream cache layout
    names it ``<timestamp>.pre``).
    """
    tmp = path + tmp_suffix
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        safe_unlink(tmp)
        raise
    os.close(fd)
    os.rename(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def safe_unlink(path: str) -> bool:
    """Unlink ``path``; a file already gone is not an error. True if removed."""
    try:
        os.unlink(path)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def makedirs(path: str, mode: int = 0o700) -> None:
    """``mkdir -p`` with ``mode`` on every directory created (umask-proof),
    each creation made durable in its parent.

    A parent this call created may be removed by a concurrent prune of
    empty directories (the cache deletes delivered versions while new ones
    are written, e.g. right after a restart) before the next level is
    made: that is retried, a few times."""
    for attempt in range(3):
        try:
            _makedirs(path, mode)
            return
        except FileNotFoundError:
            if attempt == 2:
                raise


def _makedirs(path: str, mode: int) -> None:
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path.rstrip("/"))
    if parent and parent != path:
        _makedirs(parent, mode)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        return
    os.chmod(path, mode)
    # A new directory's entry lives in its parent: without this, a file
    # made durable inside it could vanish with the directory in a crash.
    fsync_dir(parent or ".")
