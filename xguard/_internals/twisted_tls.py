# -*- test-case-name: tests.unit.test_lazy_imports -*-
"""Starting Twisted's reactor without its TLS support.

``twisted.internet.tcp`` imports its TLS transport (``twisted.protocols.tls``,
and with it pyOpenSSL and cryptography) whenever pyOpenSSL is importable,
which it always is here (treq requires it). In a daemon whose endpoints are
UNIX sockets and plain HTTP that is 0.1 s of every start-up, on the path of
a restart where the guests' requests wait, and 12 MB of resident memory for
the daemon's whole life (measured: importing the reactor and xguard's
composition root, 58.4 MB and 0.62 s with TLS, 46.2 MB and 0.49 s without).

:func:`leave_tls_out` makes ``OpenSSL`` unimportable (``None`` in
``sys.modules``, the import system's documented way to refuse a module)
before the reactor is imported; tcp.py then takes its own ImportError
branch (TCP without ``startTLS``) and nothing else changes. It relies on
that branch (``tests/unit/test_lazy_imports.py`` checks it), and it is
only done when no configured endpoint needs TLS.
"""

from __future__ import annotations

import sys

__all__ = ["leave_tls_out"]


def leave_tls_out() -> bool:
    """Keep pyOpenSSL out of this process: True when done; False when
    it is too late (pyOpenSSL, or the reactor's TCP support that imports
    it, is loaded already), which changes nothing."""
    if "OpenSSL" in sys.modules or "twisted.internet.tcp" in sys.modules:
        return False
    sys.modules["OpenSSL"] = None  # type: ignore[assignment]
    return True
