# -*- test-case-name: tests.unit.test_xapisim -*-
"""The xapi simulator's model, dispatcher and wire codecs: pure,
synchronous, no I/O.

The wire layer (:mod:`xguard.testing.xapisim`) decodes a call into
``(method, params)`` and hands it to :meth:`Dispatcher.call`, which answers
with a value or raises :class:`XapiError` carrying xapi's ErrorDescription
list. Keeping this free of Twisted lets tests drive it directly.

Errors follow xapi: ``MESSAGE_PARAMETER_COUNT_MISMATCH`` (method, expected,
received), ``MESSAGE_METHOD_UNKNOWN`` (method), ``SESSION_INVALID`` (ref),
``HANDLE_INVALID`` (class, ref), ``UUID_INVALID`` (class, uuid),
``FIELD_TYPE_ERROR`` (parameter name). Checks run in that order: count,
session, types, handles.
"""

from __future__ import annotations

import collections
import json
import time
import uuid as _uuid
import xmlrpc.client
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from xml.sax.saxutils import escape

__all__ = ["Codec", "XapiError", "SimState", "Dispatcher", "SB_STATES", "new_ref", "Call", "XMLRPC",
           "JSONRPC", "CODECS"]

SB_STATES = ("ok", "update_available", "update_on_boot")
# Classes message.create accepts (xapi's cls enum); only VM objects are checked.
MESSAGE_CLASSES = ("VM", "Host", "SR", "Pool", "VMPP", "VMSS", "PVS_proxy", "VDI", "Certificate")
HISTORY = 32  # values kept per item so tests can check delivery order


class XapiError(Exception):
    """An xapi API error: ``codes`` is the ErrorDescription list."""

    def __init__(self, *codes: Any) -> None:
        self.codes = [str(c) for c in codes]
        super().__init__(" ".join(self.codes))


def new_ref() -> str:
    return "OpaqueRef:" + str(_uuid.uuid4())


def _canonical_uuid(value: str) -> str:
    return str(_uuid.UUID(value))


def _history() -> collections.deque[str]:
    return collections.deque(maxlen=HISTORY)


@dataclass
class Vm:
    uuid: str
    ref: str
    name_label: str
    nvram: dict[str, str] = field(default_factory=dict)
    sb_state: str = "ok"
    vtpms: list[str] = field(default_factory=list)
    last_update: str | None = None
    nvram_writes: int = 0
    history: collections.deque[str] = field(default_factory=lambda: _history())
    #: xapi's power state; a seeded VM is Halted unless said otherwise.
    power_state: str = "Halted"
    #: The host it runs on (a host ref), None when it runs nowhere.
    resident_on: str | None = None


POWER_STATES = ("Halted", "Paused", "Running", "Suspended")


@dataclass
class Vtpm:
    uuid: str
    ref: str
    vm: str
    contents: str = ""
    writes: int = 0
    history: collections.deque[str] = field(default_factory=lambda: _history())


class SimState:
    """VMs, vTPMs, messages and sessions. ``on_change`` runs after every
    mutation of what :meth:`to_json` saves (sessions are not saved: a
    restarted simulator invalidates them, like a fresh xapi would)."""

    def __init__(self) -> None:
        self.vms: dict[str, Vm] = {}
        self.vm_refs: dict[str, str] = {}  # uuid -> ref
        self.vtpms: dict[str, Vtpm] = {}
        self.vtpm_refs: dict[str, str] = {}
        self.messages: dict[str, dict[str, Any]] = {}
        self.sessions: dict[str, str] = {}  # ref -> originator
        self.hosts: dict[str, str] = {}  # ref -> name label
        #: The host the API's sessions are on (session.get_this_host): the
        #: host xguard runs on.
        self.this_host = "host-a"
        self.on_change: Callable[[], None] = lambda: None

    # -- seeding and reading back (tests, admin API) -------------------------
    def seed_vm(self, vm_uuid: str | None = None, *, vtpm: bool = True,
                vtpm_uuid: str | None = None, contents: str | None = None,
                nvram: dict[str, str] | None = None, sb_state: str | None = None,
                name_label: str | None = None, power_state: str | None = None,
                resident_on: str | None = None) -> dict[str, Any]:
        """Create or update a VM (and its vTPM). Returns its uuids and refs.

        ``resident_on`` names the host the VM runs on (a host of that name
        label is created if there is none); ``""`` makes it run nowhere."""
        vm_uuid = _canonical_uuid(vm_uuid) if vm_uuid else str(_uuid.uuid4())
        if sb_state is not None and sb_state not in SB_STATES:
            raise ValueError(f"sb_state must be one of {SB_STATES}")
        if power_state is not None and power_state not in POWER_STATES:
            raise ValueError(f"power_state must be one of {POWER_STATES}")
        if resident_on is not None and not isinstance(resident_on, str):
            raise ValueError("resident_on must be a host's name")
        if nvram is not None and not all(
                isinstance(k, str) and isinstance(v, str) for k, v in nvram.items()):
            raise ValueError("nvram must map strings to strings")
        if contents is not None and not isinstance(contents, str):
            raise ValueError("contents must be a string")
        ref = self.vm_refs.get(vm_uuid)
        if ref is None:
            ref = new_ref()
            self.vms[ref] = Vm(vm_uuid, ref, name_label or f"vm-{vm_uuid[:8]}")
            self.vm_refs[vm_uuid] = ref
        vm = self.vms[ref]
        if name_label is not None:
            vm.name_label = name_label
        if nvram is not None:
            vm.nvram = dict(nvram)
        if sb_state is not None:
            vm.sb_state = sb_state
        if power_state is not None:
            vm.power_state = power_state
        if resident_on is not None:
            vm.resident_on = self.host(resident_on) if resident_on else None
        if (vtpm or vtpm_uuid or contents is not None) and not vm.vtpms:
            t_uuid = _canonical_uuid(vtpm_uuid) if vtpm_uuid else str(_uuid.uuid4())
            if t_uuid in self.vtpm_refs:
                raise ValueError(f"vTPM {t_uuid} belongs to another VM")
            t_ref = new_ref()
            self.vtpms[t_ref] = Vtpm(t_uuid, t_ref, ref)
            self.vtpm_refs[t_uuid] = t_ref
            vm.vtpms.append(t_ref)
        if contents is not None:
            self.vtpms[vm.vtpms[0]].contents = contents
        self.on_change()
        first = self.vtpms[vm.vtpms[0]] if vm.vtpms else None
        return {"vm_uuid": vm_uuid, "vm_ref": ref,
                "vtpm_uuid": first.uuid if first else None,
                "vtpm_ref": first.ref if first else None}

    def host(self, name_label: str) -> str:
        """The ref of the host with that name label (created if new)."""
        for ref, name in self.hosts.items():
            if name == name_label:
                return ref
        ref = new_ref()
        self.hosts[ref] = name_label
        return ref

    def vm_state(self, vm_uuid: str) -> dict[str, Any]:
        """Everything a test may assert about a VM; KeyError if unknown."""
        vm = self.vms[self.vm_refs[vm_uuid]]
        return {"uuid": vm.uuid, "ref": vm.ref, "name_label": vm.name_label,
                "nvram": dict(vm.nvram), "sb_state": vm.sb_state,
                "last_update": vm.last_update, "nvram_writes": vm.nvram_writes,
                "nvram_history": list(vm.history), "power_state": vm.power_state,
                "resident_on": None if vm.resident_on is None else self.hosts[vm.resident_on],
                "vtpms": [self.vtpm_state(self.vtpms[r].uuid) for r in vm.vtpms],
                "messages": [dict(m, ref=r) for r, m in self.messages.items()
                             if m["obj_uuid"] == vm.uuid]}

    def vtpm_state(self, vtpm_uuid: str) -> dict[str, Any]:
        t = self.vtpms[self.vtpm_refs[vtpm_uuid]]
        return {"uuid": t.uuid, "ref": t.ref, "vm_uuid": self.vms[t.vm].uuid,
                "contents": t.contents, "writes": t.writes, "history": list(t.history)}

    # -- persistence ----------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"version": 1,
                "vms": [{"uuid": v.uuid, "ref": v.ref, "name_label": v.name_label,
                         "nvram": v.nvram, "sb_state": v.sb_state, "vtpms": v.vtpms,
                         "last_update": v.last_update, "nvram_writes": v.nvram_writes,
                         "power_state": v.power_state, "resident_on": v.resident_on}
                        for v in self.vms.values()],
                "hosts": dict(self.hosts),
                "vtpms": [{"uuid": t.uuid, "ref": t.ref, "vm": t.vm, "contents": t.contents,
                           "writes": t.writes} for t in self.vtpms.values()],
                "messages": [dict(m, ref=r) for r, m in self.messages.items()]}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> SimState:
        state = cls()
        for v in doc.get("vms", []):
            vm = Vm(v["uuid"], v["ref"], v["name_label"], dict(v["nvram"]), v["sb_state"],
                    list(v["vtpms"]), v.get("last_update"), v.get("nvram_writes", 0),
                    power_state=v.get("power_state", "Halted"),
                    resident_on=v.get("resident_on"))
            state.vms[vm.ref] = vm
            state.vm_refs[vm.uuid] = vm.ref
        state.hosts = dict(doc.get("hosts", {}))
        for t in doc.get("vtpms", []):
            vtpm = Vtpm(t["uuid"], t["ref"], t["vm"], t["contents"], t.get("writes", 0))
            state.vtpms[vtpm.ref] = vtpm
            state.vtpm_refs[vtpm.uuid] = vtpm.ref
        for m in doc.get("messages", []):
            m = dict(m)
            state.messages[m.pop("ref")] = m
        return state


def _by_uuid(refs: dict[str, str], cls: str, uuid: str) -> str:
    ref = refs.get(uuid)
    if ref is None:
        raise XapiError("UUID_INVALID", cls, uuid)
    return ref


def _str(params: list[Any], i: int, name: str) -> str:
    value = params[i]
    if not isinstance(value, str):
        raise XapiError("FIELD_TYPE_ERROR", name)
    return value


class Dispatcher:
    """Runs xapi calls against a :class:`SimState`. ``now`` gives the wall
    clock in seconds (message timestamps) so tests can fix it."""

    def __init__(self, state: SimState, now: Callable[[], float] = lambda: 0.0) -> None:
        self.state = state
        self._now = now
        # method -> (handler, min params, max params, needs session)
        self._methods: dict[str, tuple[Callable[[list[Any]], Any], int, int, bool]] = {
            "session.login_with_password": (self._login, 2, 4, False),
            "session.logout": (self._logout, 1, 1, True),
            "VM.get_all": (lambda p: list(self.state.vms), 1, 1, True),
            "VM.get_by_uuid": (self._vm_by_uuid, 2, 2, True),
            "VM.get_uuid": (lambda p: self._vm(p, 1).uuid, 2, 2, True),
            "VM.get_VTPMs": (lambda p: list(self._vm(p, 1).vtpms), 2, 2, True),
            "VM.get_NVRAM": (lambda p: dict(self._vm(p, 1).nvram), 2, 2, True),
            "VM.set_NVRAM_EFI_variables": (self._set_nvram, 3, 4, True),
            "VM.get_secureboot_certificates_state": (
                lambda p: self._vm(p, 1).sb_state, 2, 2, True),
            "VM.get_record": (self._vm_record, 2, 2, True),
            "VM.get_power_state": (lambda p: self._vm(p, 1).power_state, 2, 2, True),
            "VM.get_resident_on": (
                lambda p: self._vm(p, 1).resident_on or "OpaqueRef:NULL", 2, 2, True),
            "host.get_name_label": (self._host_name, 2, 2, True),
            "session.get_this_host": (lambda p: self.state.host(self.state.this_host), 2, 2,
                                      True),
            "VTPM.get_by_uuid": (self._vtpm_by_uuid, 2, 2, True),
            "VTPM.get_uuid": (lambda p: self._vtpm(p, 1).uuid, 2, 2, True),
            "VTPM.get_VM": (lambda p: self._vtpm(p, 1).vm, 2, 2, True),
            "VTPM.get_contents": (lambda p: self._vtpm(p, 1).contents, 2, 2, True),
            "VTPM.set_contents": (self._set_contents, 3, 3, True),
            "message.create": (self._message_create, 6, 6, True),
            "message.get_all_records": (lambda p: {r: dict(m) for r, m in
                                                   self.state.messages.items()}, 1, 1, True),
        }

    @property
    def methods(self) -> list[str]:
        return sorted(self._methods)

    def call(self, method: str, params: list[Any]) -> Any:
        """Answer one call or raise :class:`XapiError`."""
        entry = self._methods.get(method)
        if entry is None:
            raise XapiError("MESSAGE_METHOD_UNKNOWN", method)
        handler, lo, hi, needs_session = entry
        if not lo <= len(params) <= hi:
            raise XapiError("MESSAGE_PARAMETER_COUNT_MISMATCH", method, hi, len(params))
        if needs_session and (not isinstance(params[0], str)
                              or params[0] not in self.state.sessions):
            raise XapiError("SESSION_INVALID", params[0])
        return handler(params)

    # -- lookups --------------------------------------------------------------
    def _vm(self, params: list[Any], i: int) -> Vm:
        ref = _str(params, i, "self")
        vm = self.state.vms.get(ref)
        if vm is None:
            raise XapiError("HANDLE_INVALID", "VM", ref)
        return vm

    def _vtpm(self, params: list[Any], i: int) -> Vtpm:
        ref = _str(params, i, "self")
        vtpm = self.state.vtpms.get(ref)
        if vtpm is None:
            raise XapiError("HANDLE_INVALID", "VTPM", ref)
        return vtpm

    def _host_name(self, params: list[Any]) -> str:
        ref = _str(params, 1, "self")
        if ref not in self.state.hosts:
            raise XapiError("HANDLE_INVALID", "host", ref)
        return self.state.hosts[ref]

    def _vm_by_uuid(self, params: list[Any]) -> str:
        return _by_uuid(self.state.vm_refs, "VM", _str(params, 1, "uuid"))

    def _vtpm_by_uuid(self, params: list[Any]) -> str:
        return _by_uuid(self.state.vtpm_refs, "VTPM", _str(params, 1, "uuid"))

    # -- calls ----------------------------------------------------------------
    def _login(self, params: list[Any]) -> str:
        for i, name in enumerate(("uname", "pwd", "version", "originator")[:len(params)]):
            _str(params, i, name)
        ref = new_ref()
        self.state.sessions[ref] = params[3] if len(params) > 3 else ""
        return ref

    def _logout(self, params: list[Any]) -> str:
        del self.state.sessions[params[0]]
        return ""

    def _vm_record(self, params: list[Any]) -> dict[str, Any]:
        vm = self._vm(params, 1)
        return {"uuid": vm.uuid, "name_label": vm.name_label, "power_state": vm.power_state,
                "is_a_template": False, "NVRAM": dict(vm.nvram), "VTPMs": list(vm.vtpms)}

    def _set_nvram(self, params: list[Any]) -> str:
        value = _str(params, 2, "value")
        update = _str(params, 3, "update") if len(params) > 3 else None
        vm = self._vm(params, 1)
        vm.nvram["EFI-variables"] = value
        vm.last_update = update
        vm.nvram_writes += 1
        vm.history.append(value)
        self.state.on_change()
        return ""

    def _set_contents(self, params: list[Any]) -> str:
        contents = _str(params, 2, "contents")
        vtpm = self._vtpm(params, 1)
        vtpm.contents = contents
        vtpm.writes += 1
        vtpm.history.append(contents)
        self.state.on_change()
        return ""

    def _message_create(self, params: list[Any]) -> str:
        name = _str(params, 1, "name")
        priority = params[2]
        if isinstance(priority, str) and priority.lstrip("-").isdigit():
            priority = int(priority)  # XML-RPC carries xapi ints as strings
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise XapiError("FIELD_TYPE_ERROR", "priority")
        cls = _str(params, 3, "cls")
        obj_uuid = _str(params, 4, "obj_uuid")
        body = _str(params, 5, "body")
        if cls not in MESSAGE_CLASSES:
            raise XapiError("FIELD_TYPE_ERROR", "cls")
        if cls == "VM" and obj_uuid not in self.state.vm_refs:
            raise XapiError("UUID_INVALID", "VM", obj_uuid)
        ref = new_ref()
        self.state.messages[ref] = {
            "uuid": str(_uuid.uuid4()), "name": name, "priority": priority,
            "cls": cls, "obj_uuid": obj_uuid, "timestamp": self._timestamp(), "body": body}
        self.state.on_change()
        return ref

    def _timestamp(self) -> str:
        return time.strftime("%Y%m%dT%H:%M:%SZ", time.gmtime(self._now()))


# -- wire codecs ---------------------------------------------------------------
@dataclass(frozen=True)
class Call:
    """One decoded API call; ``id``/``v2`` only matter to JSON-RPC."""

    method: str
    params: list[Any]
    id: Any = None
    v2: bool = True


def _xml(value: Any, out: list[str]) -> None:
    if isinstance(value, str):
        out.append(f"<value>{escape(value)}</value>")
    elif isinstance(value, bool):
        out.append(f"<value><boolean>{int(value)}</boolean></value>")
    elif isinstance(value, int):
        out.append(f"<value>{value}</value>")  # xapi: int64 as decimal string
    elif isinstance(value, float):
        out.append(f"<value><double>{value!r}</double></value>")
    elif isinstance(value, dict):
        out.append("<value><struct>")
        for k, v in value.items():
            out.append(f"<member><name>{escape(str(k))}</name>")
            _xml(v, out)
            out.append("</member>")
        out.append("</struct></value>")
    elif isinstance(value, (list, tuple)):
        out.append("<value><array><data>")
        for v in value:
            _xml(v, out)
        out.append("</data></array></value>")
    elif value is None:
        out.append("<value></value>")
    else:
        raise TypeError(f"cannot encode {type(value).__name__}")


class Codec(Protocol):
    """How one of xapi's wire formats reads a call and writes its answer."""

    content_type: bytes

    def decode(self, body: bytes) -> Call: ...

    def success(self, call: Call, value: Any) -> bytes: ...

    def failure(self, call: Call, codes: list[str]) -> bytes: ...


class _XmlRpc:
    content_type = b"text/xml"

    def decode(self, body: bytes) -> Call:
        try:
            params, method = xmlrpc.client.loads(body, use_builtin_types=True)
        except Exception as e:  # noqa: BLE001 - expat and xmlrpc raise many kinds
            raise ValueError(f"malformed XML-RPC: {type(e).__name__}") from None
        if not method:
            raise ValueError("not a methodCall")
        return Call(method, list(params))

    def _envelope(self, struct: dict[str, Any]) -> bytes:
        out = ['<?xml version="1.0"?><methodResponse><params><param>']
        _xml(struct, out)
        out.append("</param></params></methodResponse>")
        return "".join(out).encode("utf-8")

    def success(self, call: Call, value: Any) -> bytes:
        return self._envelope({"Status": "Success", "Value": value})

    def failure(self, call: Call, codes: list[str]) -> bytes:
        return self._envelope({"Status": "Failure", "ErrorDescription": codes})


class _JsonRpc:
    content_type = b"application/json"

    def decode(self, body: bytes) -> Call:
        try:
            doc = json.loads(body)
        except ValueError:
            raise ValueError("malformed JSON") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("method"), str):
            raise ValueError("not a JSON-RPC request")
        params = doc.get("params", [])
        if not isinstance(params, list):
            raise ValueError("params must be an array")
        return Call(doc["method"], params, doc.get("id"), doc.get("jsonrpc") == "2.0")

    def _dump(self, doc: dict[str, Any]) -> bytes:
        return json.dumps(doc, separators=(",", ":")).encode("utf-8")

    def success(self, call: Call, value: Any) -> bytes:
        if call.v2:
            return self._dump({"jsonrpc": "2.0", "result": value, "id": call.id})
        return self._dump({"result": value, "error": None, "id": call.id})

    def failure(self, call: Call, codes: list[str]) -> bytes:
        if call.v2:
            error = {"code": 1, "message": codes[0], "data": codes[1:]}
            return self._dump({"jsonrpc": "2.0", "error": error, "id": call.id})
        return self._dump({"result": None, "error": codes, "id": call.id})


XMLRPC = _XmlRpc()
JSONRPC = _JsonRpc()
CODECS: dict[bytes, Codec] = {b"/": XMLRPC, b"/RPC2": XMLRPC, b"/jsonrpc": JSONRPC}
