# -*- test-case-name: tests.unit.test_views -*-
"""The no-cache writer (``--no-cache``, the pre-cache behaviour): a write
is acknowledged only once upstream took it, and fails while upstream is
down. The write-back cache (:mod:`xguard.cache`) provides the same
:class:`~xguard.interfaces.IItemWriter` seam."""

from __future__ import annotations

from collections.abc import Mapping

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from ..interfaces import IItemSink, IItemWriter
from ..model import DIRECT

__all__ = ["DirectWriter"]


@implementer(IItemWriter)
class DirectWriter:
    """No cache: a write is acknowledged only once upstream took it."""

    def __init__(self, sink: IItemSink) -> None:
        self.sink = sink
        self.service = sink.service

    def write(self, vm_uuid: str, key: int, content: bytes) -> "Deferred[None]":
        return self.write_many(vm_uuid, {key: content})

    def write_many(self, vm_uuid: str, changes: Mapping[int, bytes]) -> "Deferred[None]":
        return self.sink.deliver(vm_uuid, dict(changes), DIRECT).addCallback(lambda _: None)

    def pending(self, vm_uuid: str, key: int) -> "Deferred[bytes | None]":
        return succeed(None)

    def has_pending(self, vm_uuid: str) -> bool:
        return False

    def pending_vms(self) -> set[str]:
        return set()


