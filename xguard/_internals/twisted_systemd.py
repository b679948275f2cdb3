"""twisted.internet.endpoints internals xguard relies on.

When ``twisted.internet.endpoints`` is imported, its ``systemd:`` endpoint
parser reads the descriptors systemd hands the process (``LISTEN_PID``,
``LISTEN_FDS``, ``LISTEN_FDNAMES``) into a class attribute and deletes
``LISTEN_PID`` and ``LISTEN_FDS`` from the environment. xguard is handed
its listening sockets the same way (xguard/handover.py), and that import
always comes first (twistd's plugin scan imports it, so does xguard), so
what was handed over is read back from there.
"""

from __future__ import annotations

from twisted.internet import endpoints

__all__ = ["handed_to_twisted"]


def handed_to_twisted() -> list[tuple[int, str]]:
    """(descriptor, name) of what systemd's variables handed this process,
    as Twisted read them at import."""
    listen = endpoints._SystemdParser._sddaemon
    return list(zip(listen.inheritedDescriptors(), listen._names))
