# -*- test-case-name: tests.unit.test_convert -*-
"""``xguard-cache-convert``: the pending writes of a stopped daemon, in the
format an older xguard or the upstream daemon (xapi-guard) reads.

xguard's version files are checked (a header, the write's base, then the
content: :mod:`xguard.cache.entry`); the upstream daemon and xguard before
0.2 read a version file's bytes as the content itself, and would deliver
the header. Downgrading with writes still pending (xapi down, a crashed
host) therefore needs them converted first::

    systemctl stop xguard
    xguard-cache-convert --state-dir /var/lib/xapi-guard
    # install the older version, start it

Each checked version file is replaced (atomically, durably) by its
content; files already in the old format are left as they are; a damaged
file is reported and left for the operator. The bases are lost, so the
older daemon delivers them without checking for other writers, as it
always did. Upgrading needs nothing: xguard reads both formats. The
instance lock makes sure no daemon runs on the directory meanwhile.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ..cache.entry import Damaged, decode
from ..cache.layout import PRE_SUFFIX, is_vm_dir, parse_key, parse_timestamp, service_dir
from ..model import Service
from ..util.durable import atomic_write
from .process import InstanceLock

__all__ = ["convert", "main"]


def convert(state_dir: str) -> tuple[int, int, list[str]]:
    """Convert every pending version below ``state_dir``: (converted,
    already in the old format, damaged paths)."""
    converted, kept, damaged = 0, 0, []
    for service in Service:
        base = service_dir(state_dir, service)
        if not os.path.isdir(base):
            continue
        for vm in sorted(os.listdir(base)):
            if not is_vm_dir(vm):
                continue
            for key_name in sorted(os.listdir(os.path.join(base, vm))):
                if parse_key(service, key_name) is None:
                    continue
                item = os.path.join(base, vm, key_name)
                for name in sorted(os.listdir(item)):
                    if name.endswith(PRE_SUFFIX) or parse_timestamp(name) is None:
                        continue
                    path = os.path.join(item, name)
                    with open(path, "rb") as f:
                        raw = f.read()
                    try:
                        entry = decode(raw)
                    except Damaged:
                        damaged.append(path)
                        continue
                    if entry.legacy:
                        kept += 1
                        continue
                    atomic_write(path, entry.content, mode=0o600, tmp_suffix=PRE_SUFFIX)
                    converted += 1
    return converted, kept, damaged


def main(argv: Sequence[str] | None = None) -> None:
    """The ``xguard-cache-convert`` command."""
    parser = argparse.ArgumentParser(
        prog="xguard-cache-convert",
        description="Rewrite a stopped xguard's pending writes in the format the upstream "
                    "daemon and older xguards read (before a downgrade).")
    parser.add_argument("--state-dir", default="/var/lib/xapi-guard",
                        help="the daemon's --state-dir [/var/lib/xapi-guard]")
    args = parser.parse_args(argv)
    lock = InstanceLock(os.path.join(args.state_dir, "xguard.lock"))
    try:
        lock.acquire()
    except OSError as e:
        sys.stderr.write(f"xguard-cache-convert: {e}; stop it first\n")
        sys.exit(1)
    try:
        converted, kept, damaged = convert(args.state_dir)
    finally:
        lock.release()
    sys.stdout.write(f"{converted} pending writes converted, {kept} already in the old "
                     f"format\n")
    for path in damaged:
        sys.stderr.write(f"xguard-cache-convert: {path} is damaged (fails its check): left "
                         "as it is; move it away before starting an older daemon\n")
    sys.exit(1 if damaged else 0)


if __name__ == "__main__":
    main()
