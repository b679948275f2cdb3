"""Short temporary directories for UNIX sockets. A socket path is limited to
107 bytes, so these live directly under the system temp directory (trial's
``mktemp`` and pytest's ``tmp_path`` are too deep)."""

from __future__ import annotations

import shutil
import tempfile

from twisted.trial.unittest import SynchronousTestCase


def short_tmp(case: SynchronousTestCase) -> str:
    """A new directory, removed when ``case``'s test ends."""
    d = tempfile.mkdtemp(prefix="xg")
    case.addCleanup(shutil.rmtree, d, True)
    return d
