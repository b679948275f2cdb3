"""Shared pytest fixtures. Socket paths live directly under the system temp
directory: a UNIX socket path is limited to 107 bytes."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator

import pytest


@pytest.fixture
def short_tmp() -> Iterator[str]:
    """A short directory for UNIX sockets (pytest's tmp_path is too deep)."""
    d = tempfile.mkdtemp(prefix="xg")
    yield d
    shutil.rmtree(d, ignore_errors=True)
