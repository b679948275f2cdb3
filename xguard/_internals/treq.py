"""treq internals xguard relies on.

treq turns the URL of every request into a URI (``EncodedURL.to_uri()``,
IDNA-checking the host) and back into text on every call: the largest
single cost of a Direct write in the profile. The xapi URL is ASCII
already and never changes, so :class:`FixedURL` is parsed once, is its own
URI and keeps its text. This relies on treq's ``HTTPClient.request``
accepting an ``EncodedURL`` and calling ``to_uri().to_text()`` on it
(treq/client.py); the test checks it.

:data:`TreqReactor` is the reactor type treq's client annotates itself
with (``treq._types._ITreqReactor``): xguard's client reactor type extends
it, so passing one to treq type-checks.
"""

from __future__ import annotations

from typing import Any

from hyperlink import EncodedURL
from treq._types import _ITreqReactor as TreqReactor

__all__ = ["FixedURL", "TreqReactor"]


class FixedURL(EncodedURL):
    """An ASCII URL, parsed once; its URI is itself, and its text is
    computed once (``to_text`` costs ~20 µs, every request)."""

    def to_uri(self, *args: Any, **kwargs: Any) -> "FixedURL":
        return self

    def to_text(self, with_password: bool = False) -> str:
        key = "_xguard_text_with_password" if with_password else "_xguard_text"
        text = self.__dict__.get(key)
        if text is None:
            text = self.__dict__[key] = super().to_text(with_password)
        return text
