# -*- test-case-name: tests.unit.test_handover -*-
"""Listening sockets handed from one daemon process to the next (issue 12).

A restart used to close every domain socket and listen again a second or
two later; varstored does not retry, so a guest's UEFI write in that
window failed. Now the listening descriptors outlive the process: systemd
keeps a copy of each in its fd store (:mod:`xguard.restart.fdstore`), or the
daemon re-executes itself with them inherited (:mod:`xguard.restart.reexec`); the
next process finds them as ``LISTEN_FDS`` (:mod:`xguard.restart.listenfds`) and
serves them again. Connections made meanwhile wait in the kernel's
backlog.

Handed-over state is only a hint; the active-sockets file is the truth
(SPEC §7). A descriptor is adopted for an entry of the file only when

- it is a listening AF_UNIX stream socket bound to the entry's path
  (``getsockname``), and
- its name says xguard stored it for that path, and the file at the path
  is still the one created when it was bound: the name records the
  socket file's device and inode (``fstat`` of a socket gives the socket's
  own inode, not its file's, so the file's identity travels in the name).

Anything else is closed, dropped from the fd store, and logged, one line
per descriptor: a stale or foreign descriptor, a socket whose file was
removed or replaced during the handover (that entry listens afresh), a
socket whose entry is no longer in the file. Files are left alone (a
socket file nobody serves is refused by the kernel, as after a crash):
an unreadable active file must not cost every VM its socket file.

The identity check relies on inode numbers not being reused for another
socket file at the same path between two processes: on tmpfs (``/run``,
where the sockets live) inode numbers only grow.
"""

from __future__ import annotations

import hashlib
import os
import select
import socket
import stat
from collections import Counter
from collections.abc import Callable, Iterable
from typing import NamedTuple

from twisted.logger import Logger

from . import listenfds
from .fdstore import FdStore

__all__ = ["Handover", "Claimed", "DOMAIN", "CONTROL", "fd_name", "parse_name", "inspect",
           "handed_over"]

DOMAIN = "d"
CONTROL = "c"


class Claimed(NamedTuple):
    """A handed-over descriptor adopted for a path: the caller adopts it
    (and closes ``fd`` after: adoption works on a duplicate)."""

    fd: int
    name: str


class _Name(NamedTuple):
    kind: str
    dev: int
    ino: int
    digest: str


class _Inherited(NamedTuple):
    fd: int
    name: str
    path: str


def _digest(path: str) -> str:
    return hashlib.sha256(os.fsencode(path)).hexdigest()[:16]


def fd_name(kind: str, path: str, st: os.stat_result) -> str:
    """The fd store name of the socket of ``kind`` bound to ``path``, whose
    file ``st`` describes (a valid FDNAME: no ``:``, under 255 chars)."""
    return f"xg{kind}-{st.st_dev:x}-{st.st_ino:x}-{_digest(path)}"


def parse_name(name: str) -> _Name | None:
    parts = name.split("-")
    if len(parts) != 4 or not parts[0].startswith("xg") or len(parts[0]) != 3:
        return None
    try:
        return _Name(parts[0][2], int(parts[1], 16), int(parts[2], 16), parts[3])
    except ValueError:
        return None


def handed_over() -> list[listenfds.Passed]:
    """What ``LISTEN_*`` hands this process. Twisted's endpoints module
    reads (and removes) the variables when it is imported, which happens
    before xguard looks: then what it read is used."""
    from .._internals.twisted_systemd import handed_to_twisted

    passed = listenfds.take()
    if passed:
        return passed
    passed = [listenfds.Passed(fd, name) for fd, name in handed_to_twisted()]
    for p in passed:
        try:
            os.set_inheritable(p.fd, False)
        except OSError:
            pass  # not open: inspect() reports it
    return passed


def inspect(fd: int) -> tuple[str | None, str | None]:
    """(path, None) for a listening AF_UNIX stream socket bound to a file
    path; else (path or None, why it cannot be one of ours)."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        return None, f"not an open descriptor ({e.strerror})"
    if not stat.S_ISSOCK(st.st_mode):
        return None, "not a socket"
    with socket.socket(fileno=os.dup(fd)) as s:
        if s.family != socket.AF_UNIX:
            return None, f"not a UNIX socket ({s.family.name})"
        if s.type != socket.SOCK_STREAM:
            return None, f"not a stream socket ({s.type.name})"
        bound = s.getsockname()
        path = bound if isinstance(bound, str) and bound.startswith("/") else None
        if not s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return path, "not listening"
    if path is None:
        return None, "not bound to a file path"
    return path, None


class Handover:
    """What this process was handed at start, and how it hands on its own
    listening sockets: to the fd store as they open, or to a re-exec.

    :param fdstore: systemd's fd store (disabled when not under systemd).
    :param take: what was handed over (:func:`handed_over`).
    """

    log = Logger()

    def __init__(self, fdstore: FdStore, *,
                 take: Callable[[], list[listenfds.Passed]] = handed_over,
                 inspect: Callable[[int], tuple[str | None, str | None]] = inspect,
                 lstat: Callable[[str], os.stat_result] = os.lstat,
                 close: Callable[[int], None] = os.close) -> None:
        self.fdstore = fdstore
        self._take = take
        self._inspect = inspect
        self._lstat = lstat
        self._close = close
        #: Handed-over sockets not claimed yet, by the path they are bound to.
        self._inherited: dict[str, list[_Inherited]] = {}
        self._pending_names: Counter[str] = Counter()
        self._claimed: set[str] = set()
        #: Set when this process is about to re-execute itself.
        self.reexec_pending = False
        #: How many descriptors were handed over, adopted and refused.
        self.handed = self.adopted = self.refused = 0

    def keep_open(self) -> bool:
        """Whether stopping must leave the listening sockets open (a
        successor gets them): they are in the fd store, or a re-exec
        passes them."""
        return self.reexec_pending or self.fdstore.enabled

    # -- start -------------------------------------------------------------------
    def inherit(self) -> None:
        """Take what ``LISTEN_FDS`` hands us; refuse what cannot be a
        socket of ours at once. Call it first (before anything opens a
        descriptor or probes a socket path)."""
        try:
            passed = self._take()
        except ValueError as e:
            self.log.error("ignoring handed-over descriptors: {error}", error=str(e))
            return
        self.handed = len(passed)
        inspected = [(fd, name, *self._inspect(fd)) for fd, name in passed]
        # Every good descriptor is counted before any bad one is refused: a
        # refusal removes its name from the store, with every descriptor
        # stored under it, unless a good one of that name is still pending.
        bad = []
        for fd, name, path, problem in inspected:
            if problem is not None or path is None:
                bad.append((fd, name, path, problem or "not bound to a path"))
            else:
                self._inherited.setdefault(path, []).append(_Inherited(fd, name, path))
                self._pending_names[name] += 1
        for fd, name, path, reason in bad:
            self._refuse(fd, name, path, reason)
        if passed:
            self.log.info("handed over: {count} listening sockets ({refused} refused)",
                          count=len(passed), refused=self.refused)

    def waiting(self, paths: Iterable[str]) -> set[str]:
        """Which of ``paths`` have connections waiting in a handed-over
        socket's backlog: they are adopted first, so the VMs writing
        during the restart wait least."""
        wanted = set(paths)
        poller = select.poll()
        by_fd: dict[int, str] = {}
        for path, candidates in self._inherited.items():
            if path in wanted:
                for inherited in candidates:
                    poller.register(inherited.fd, select.POLLIN)
                    by_fd[inherited.fd] = path
        return {by_fd[fd] for fd, _ in poller.poll(0)} if by_fd else set()

    def claim(self, kind: str, path: str) -> Claimed | None:
        """The handed-over socket to serve ``path`` with, if one is valid;
        the other descriptors bound to ``path`` are refused (closed,
        logged). None: listen afresh."""
        chosen: Claimed | None = None
        refused = []
        candidates = self._inherited.pop(path, [])
        for inherited in candidates:
            self._pending_names[inherited.name] -= 1
        for inherited in candidates:
            problem = self._mismatch(kind, inherited) if chosen is None else "a duplicate"
            if problem is None:
                chosen = Claimed(inherited.fd, inherited.name)
                self._claimed.add(chosen.name)
            else:
                refused.append((inherited, problem))
        for inherited, problem in refused:
            self._refuse(inherited.fd, inherited.name, path, problem)
        if chosen is not None:
            self.adopted += 1
        return chosen

    def _mismatch(self, kind: str, inherited: _Inherited) -> str | None:
        """Why ``inherited`` is not the socket of ``kind`` at its path."""
        name = parse_name(inherited.name)
        if name is None or name.kind != kind or name.digest != _digest(inherited.path):
            return f"named {inherited.name!r}, not as xguard names this socket"
        try:
            st = self._lstat(inherited.path)
        except FileNotFoundError:
            return "its socket file is gone"
        except OSError as e:
            return f"its socket file cannot be checked ({e.strerror})"
        if not stat.S_ISSOCK(st.st_mode):
            return "its path is no longer a socket"
        if (st.st_dev, st.st_ino) != (name.dev, name.ino):
            return "its socket file was replaced"
        return None

    def release_unclaimed(self) -> None:
        """Once every socket of the file was resumed: refuse the rest
        (their entries are gone from the file)."""
        rest, self._inherited = self._inherited, {}
        self._pending_names.clear()
        for inherited in (i for candidates in rest.values() for i in candidates):
            self._refuse(inherited.fd, inherited.name, inherited.path,
                         "not in the active sockets file")

    def _refuse(self, fd: int, name: str, path: str | None, reason: str) -> None:
        self.refused += 1
        self.log.warn("not adopting handed-over socket {name} (fd {fd}, {path}): {reason}",
                      name=name, fd=fd, path=path or "no path", reason=reason)
        try:
            self._close(fd)
        except OSError:
            pass
        if name not in self._claimed and self._pending_names[name] <= 0:
            self.fdstore.remove(name)

    # -- while running -------------------------------------------------------------
    def stored(self, kind: str, path: str, fd: int) -> str:
        """Name the socket now listening at ``path`` (descriptor ``fd``)
        and give the fd store a copy; returns the name."""
        name = fd_name(kind, path, self._lstat(path))
        self.fdstore.add(name, [fd])
        return name

    def dropped(self, name: str | None) -> None:
        """The socket named ``name`` is gone for good (destroyed)."""
        if name is not None:
            self.fdstore.remove(name)
