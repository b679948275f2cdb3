# -*- test-case-name: tests.unit.test_aside_ops -*-
"""The operator's view of the writes set aside, across services: list
them, export one, resolve one (push ours, keep upstream's). What is set
aside, and why, is the caches' (:mod:`xguard.cache.aside`); this module
routes an item to its service's cache by its id and writes the export
document.

An export is a JSON document an operator can act on later by hand:

- a vTPM's whole state as xapi's contents string (``contents``), ready for
  ``xguard-ctl vtpm_set_contents DBG VTPM_UUID - < …`` or xapi;
- an NVRAM write's ``EFI-variables`` and its ``update`` flag;
- the keys' values one by one (``keys``), and for a damaged file its raw
  bytes in base64 (``raw``), since they may be anything.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred

from ..errors import NotSetAside
from ..interfaces import ISetAsideSource
from ..model import NvramWrite, Service, TpmKey, TpmState
from ..status import SetAside

__all__ = ["SetAsideOps", "export_document"]


class SetAsideOps:
    """Routes the operator's set-aside commands to the services' caches."""

    def __init__(self, sources: Iterable[ISetAsideSource]) -> None:
        self._sources = {source.service.value: source for source in sources}

    def items(self) -> list[SetAside]:
        return sorted((item for source in self._sources.values()
                       for item in source.set_aside()), key=lambda item: item.id)

    def _find(self, item_id: str) -> tuple[ISetAsideSource, SetAside]:
        source = self._sources.get(item_id.split("/", 1)[0])
        item = None if source is None else next(
            (i for i in source.set_aside() if i.id == item_id), None)
        if source is None or item is None:
            raise NotSetAside(f"no write is set aside as {item_id!r} (see xguard-ctl set-aside)")
        return source, item

    def export(self, item_id: str) -> "Deferred[str]":
        """The export document of one item (JSON)."""
        async def run() -> str:
            source, item = self._find(item_id)
            values = await source.set_aside_values(item_id)
            return json.dumps(export_document(item, values), indent=2, sort_keys=True)
        return ensureDeferred(run())

    def resolve(self, item_id: str, action: str) -> "Deferred[None]":
        async def run() -> None:
            source, _ = self._find(item_id)
            await source.resolve(item_id, action)
        return ensureDeferred(run())


def export_document(item: SetAside, values: Mapping[int, bytes]) -> dict[str, Any]:
    """What an export file holds (see the module docstring)."""
    doc: dict[str, Any] = {
        "id": item.id, "service": item.service, "vm_uuid": item.vm, "kind": item.kind,
        "reason": item.reason, "since": item.since, "complete": item.complete,
    }
    if item.kind == "damaged" or not _text(values):
        doc["raw"] = {str(k): base64.b64encode(v).decode("ascii") for k, v in values.items()}
        return doc
    if item.service == Service.VARSTORED.value:
        try:
            write = NvramWrite.decode(values[0])
        except (KeyError, ValueError):
            doc["raw"] = {str(k): base64.b64encode(v).decode("ascii")
                          for k, v in values.items()}
            return doc
        doc["EFI-variables"] = write.value
        doc["update"] = write.update
        return doc
    doc["keys"] = {TpmKey(k).name.lower(): v.decode("ascii") for k, v in sorted(values.items())}
    if item.complete and set(values) >= set(TpmKey):
        doc["contents"] = TpmState(*(values[k].decode("ascii") for k in TpmKey)).serialize()
    return doc


def _text(values: Mapping[int, bytes]) -> bool:
    return all(v.isascii() for v in values.values())
