"""Exceptions that cross module boundaries. Upstream errors fall in two
classes, because the cache retries one and sets the other aside."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "UpstreamError",
    "TransientUpstreamError",
    "PermanentUpstreamError",
    "PathInUse",
    "InvalidUUID",
    "InvalidPath",
    "InvalidGid",
    "SocketMismatch",
    "InvalidContents",
    "CacheUnavailable",
    "NoVtpm",
    "RestartRefused",
    "NotSetAside",
    "ResolutionRefused",
]


class UpstreamError(Exception):
    """The upstream store did not do what was asked. ``codes`` is xapi's
    ErrorDescription list (first item the error code)."""

    def __init__(self, codes: Sequence[str], message: str = "") -> None:
        self.codes = [str(c) for c in codes]
        super().__init__(message or " ".join(self.codes))


class TransientUpstreamError(UpstreamError):
    """Anything that does not prove the call can never succeed: upstream
    unreachable or not ready (refused, reset, timed out, HTTP 5xx,
    HOST_STILL_BOOTING), INTERNAL_ERROR, an unknown code. Retrying later may
    succeed."""


class PermanentUpstreamError(UpstreamError):
    """Proof that the call can never succeed: the VM or vTPM no longer
    exists (UUID_INVALID, HANDLE_INVALID after a fresh lookup), or upstream
    refuses the content itself (INVALID_VALUE …)."""


class CacheUnavailable(TransientUpstreamError):
    """The disk cache cannot take a write now (disk full, I/O error): nothing
    was acknowledged, so the client retries later (swtpm: HTTP 503)."""

    def __init__(self, reason: str) -> None:
        super().__init__(["CACHE_UNAVAILABLE", reason])


class NoVtpm(PermanentUpstreamError):
    """The VM has no vTPM."""

    def __init__(self, vm_uuid: str) -> None:
        super().__init__(["VM_HAS_NO_VTPM", vm_uuid])


class PathInUse(Exception):
    """A domain socket path is already served (by us or a live listener)."""


class InvalidUUID(ValueError):
    """Not a canonical UUID."""


class InvalidPath(ValueError):
    """A socket path that is not absolute (or otherwise unusable)."""


class InvalidGid(ValueError):
    """Not a group id (0 to 2**32 - 2)."""


class SocketMismatch(ValueError):
    """A destroy names a socket by a service or gid it was not created
    with: refused, the socket is left alone (the message says what it
    serves)."""


class InvalidContents(ValueError):
    """vTPM contents that are not xapi's format (one field, or three
    separated by single spaces; ASCII)."""


class RestartRefused(Exception):
    """A restart in place cannot be done now (the message says why)."""


class NotSetAside(LookupError):
    """No write is set aside under that id."""


class ResolutionRefused(ValueError):
    """A set-aside write cannot be resolved as asked (the message says why
    and what can be done instead)."""
