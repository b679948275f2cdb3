"""treq internals xguard relies on.

treq turns the URL of every request into a URI (``EncodedURL.to_uri()``,
IDNA-checking the host) on every call: the largest single cost of a
Direct write in the profile. The xapi URL is ASCII already and never
changes, so :class:`FixedURL` is parsed once and is its own URI. This
relies on treq's ``HTTPClient.request`` accepting an ``EncodedURL`` and
calling ``to_uri()`` on it (treq/client.py); the test checks both.
"""

from __future__ import annotations

from typing import Any

from hyperlink import EncodedURL

__all__ = ["FixedURL"]


class FixedURL(EncodedURL):  # type: ignore[misc]
    """An ASCII URL, parsed once; its URI is itself."""

    def to_uri(self, *args: Any, **kwargs: Any) -> "FixedURL":
        return self
