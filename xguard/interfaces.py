"""The seams between xguard's components, in one module (zope and mypy get
along best that way). Every method returning a Deferred says so."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import (
    IReactorCore,
    IReactorFDSet,
    IReactorFromThreads,
    IReactorPluggableNameResolver,
    IReactorProcess,
    IReactorSocket,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
    IReactorUNIX,
)
from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from ._internals.treq import TreqReactor
    from .model import Base, Outcome, Residence, Service, TpmKey
    from .status import UpstreamStatus

__all__ = ["IUpstream", "IItemSink", "IVtpmSink", "INvramSink", "IItemWriter", "ISetAsideSource",
           "ISocketRegistry",
           "IStatusSource", "IClientReactor", "IServerReactor", "IProcessReactor",
           "IDaemonReactor"]


# -- the reactors, by what is asked of them --------------------------------------
# One reactor provides all of these; each component is typed with the
# intersection it uses, as treq's _ITreqReactor does (an interface
# inheriting the ones it needs: mypy-zope checks calls against all of them).

if TYPE_CHECKING:
    class IClientReactor(TreqReactor, IReactorUNIX):
        """What an HTTP client needs: treq's own reactor type (TCP with
        name resolution, and time for its timeouts and connection pool),
        and UNIX for xapi's local socket."""
else:
    # At run time, the same interfaces without importing treq: treq pulls
    # in twisted.web.client, TLS and OpenSSL (~0.1 s), which the daemon
    # does not need on the local store nor xguard-ctl ever
    # (tests/unit/test_internals.py checks the two stay the same).
    class IClientReactor(IReactorTCP, IReactorTime, IReactorPluggableNameResolver,
                         IReactorUNIX):
        """What an HTTP client needs: treq's own reactor type (TCP with
        name resolution, and time for its timeouts and connection pool),
        and UNIX for xapi's local socket."""


class IServerReactor(IReactorTCP, IReactorTime, IReactorUNIX, IReactorSocket, IReactorFDSet):
    """What a listener needs: UNIX (and TCP, for --metrics) ports, adopting
    a handed-over listening socket (its descriptor joins the reactor's
    set), and time for its timeouts."""


class IProcessReactor(IReactorCore, IReactorFromThreads):
    """What the process's exit status needs: shutdown triggers, stopping,
    and calls from signal handlers (threads)."""


class IDaemonReactor(IClientReactor, IServerReactor, IProcessReactor, IReactorThreads,
                     IReactorProcess):
    """Everything the daemon asks of its reactor (the composition root's
    type): the above, plus the I/O threads and spawning (the re-exec)."""


class IUpstream(Interface):
    """The store VM state lives in: xapi, or the embedded SQLite store.

    Every call is about one VM or vTPM named by uuid; callers are trusted
    (the domain sockets already pinned the VM). Failures are
    :class:`xguard.errors.TransientUpstreamError` or
    :class:`xguard.errors.PermanentUpstreamError`.
    """

    description = Attribute("Human readable target, e.g. 'xapi unix:/var/lib/xcp/xapi'")
    reachability = Attribute(
        "xguard.upstream.reachability.Reachability fed by every call's outcome")

    def ensure_vm(vm_uuid: str) -> "Deferred[None]":
        """Deferred[None]: make sure the VM's record exists (the local store
        creates it; xapi needs nothing)."""

    def vtpm_for_vm(vm_uuid: str) -> "Deferred[str]":
        """Deferred[str]: an opaque handle of the VM's (first) vTPM (xapi: its
        reference, found by VM.get_by_uuid and VM.get_VTPMs only); NoVtpm if
        it has none. The local store creates one on first use. A handle a
        call reported HANDLE_INVALID for is never returned again (it is
        looked up afresh)."""

    def vtpm_by_uuid(vtpm_uuid: str) -> "Deferred[str]":
        """Deferred[str]: the handle of the vTPM with that uuid (the same
        handle vtpm_for_vm gives, so both paths share one lock);
        UUID_INVALID if unknown."""

    def get_vtpm_contents(vtpm: str) -> "Deferred[str]":
        """Deferred[str]: the whole contents string of the vTPM ``vtpm``
        (a handle)."""

    def set_vtpm_contents(vtpm: str, contents: str) -> "Deferred[None]":
        """Deferred[None]: replace the whole contents string of ``vtpm``."""

    def get_nvram(vm_uuid: str) -> "Deferred[dict[str, str]]":
        """Deferred[dict[str, str]]: the VM's NVRAM map ({} on first boot)."""

    def set_nvram_efi_variables(vm_uuid: str, value: str, update: str) -> "Deferred[None]":
        """Deferred[None]: set NVRAM's EFI-variables. ``update`` is 'yes',
        'no' or 'unspecified' (then xapi's 3-argument call is used)."""

    def get_secureboot_certificates_state(vm_uuid: str) -> "Deferred[str]":
        """Deferred[str]: 'ok', 'update_available' or 'update_on_boot'."""

    def create_message(vm_uuid: str, name: str, priority: int, body: str) -> "Deferred[str]":
        """Deferred[str]: create a message of class VM about the VM; its ref."""

    def confirm(vm_uuid: str) -> "Deferred[None]":
        """Deferred[None]: one cheap call about the VM whose answer, whatever
        it says, proves upstream answers calls made from now on (reported
        to ``reachability`` like any call's)."""

    def vm_residence(vm_uuid: str) -> "Deferred[Residence | None]":
        """Deferred: where xapi says the VM runs now (its power state, the
        host it is resident on, whether that is this host); None for a
        store with no other host (the embedded one)."""

    def forget(vm_uuid: str) -> None:
        """Drop cached handles of a VM: its sockets were destroyed, so they
        may change now (it stopped; it may be re-created)."""

    def probe() -> "Deferred[None]":
        """Deferred[None]: one cheap call telling whether upstream answers
        (its outcome is reported to ``reachability``, like any call's)."""

    def status() -> UpstreamStatus:
        """What the upstream is and whether it answers."""

    def close() -> "Deferred[None]":
        """Deferred[None]: release connections/threads; no call after it."""


class IItemSink(Interface):
    """How one service's items reach upstream: the seam the write-back cache
    delivers through. An item is (vm_uuid, key); its content is bytes exactly
    as the cache stores it."""

    service = Attribute("xguard.model.Service this sink delivers for")

    def deliver(vm_uuid: str, items: Mapping[int, bytes], base: Base) -> "Deferred[Outcome]":
        """Deferred[Outcome]: write ``items`` of one VM upstream in one
        serialized read-modify-write, if upstream still holds a state
        ``base`` allows (xguard.model.Base); else leave upstream alone and
        say why (a conflict, the VM running elsewhere)."""

    def last_seen(vm_uuid: str) -> "Deferred[Mapping[int, str] | None]":
        """Deferred: per key of the service, the digest of the value the
        VM's last known state holds (what upstream last showed); None when
        none is kept."""


class IVtpmSink(IItemSink):
    """The vTPM sink: every upstream call about a vTPM, serialized per vTPM
    (a handle) with its read-modify-writes."""

    def read(vm_uuid: str, key: TpmKey) -> "Deferred[bytes]":
        """Deferred[bytes]: one key of the VM's vTPM as upstream has it."""

    def read_contents(vm_uuid: str) -> "Deferred[str]":
        """Deferred[str]: the VM's whole vTPM contents string as upstream has it."""

    def find_vm(vtpm_uuid: str, candidates: Iterable[str],
                pending: Iterable[str]) -> "Deferred[tuple[str | None, str]]":
        """Deferred[(vm or None, handle)]: which of ``candidates`` or
        ``pending`` owns the vTPM ``vtpm_uuid`` (None: neither)."""

    def read_unserved(vtpm: str) -> "Deferred[str]":
        """Deferred[str]: the contents of a vTPM (handle) of a VM xguard
        neither serves nor holds writes for."""

    def write_unserved(vtpm: str, contents: str) -> "Deferred[None]":
        """Deferred[None]: replace the contents of such a vTPM."""

    def learn(vm_uuid: str) -> "Deferred[None]":
        """Deferred[None]: look the VM's vTPM handle up now (best effort)."""

    def forget(vm_uuid: str) -> None:
        """The VM's sockets are gone: upstream may change its vTPM now."""


class INvramSink(IItemSink):
    """The NVRAM sink: upstream's NVRAM, secure-boot state and alerts of a VM."""

    def read(vm_uuid: str) -> "Deferred[dict[str, str]]":
        """Deferred[dict[str, str]]: the VM's NVRAM map as upstream has it."""

    def secureboot_state(vm_uuid: str) -> "Deferred[str]":
        """Deferred[str]: the VM's secure-boot certificates state."""

    def create_message(vm_uuid: str, name: str, priority: int, body: str) -> "Deferred[str]":
        """Deferred[str]: raise a message of class VM about the VM."""


class IItemWriter(Interface):
    """What domain sockets and the orchestrator write through: straight
    upstream (no cache) or the durable write-back cache."""

    service = Attribute("xguard.model.Service")

    def write(vm_uuid: str, key: int, content: bytes) -> "Deferred[None]":
        """Deferred[None]: fires once the write is durable (upstream or disk);
        fails with PermanentUpstreamError, or TransientUpstreamError when no
        cache is in use or the cache's disk refuses it (CacheUnavailable)."""

    def write_many(vm_uuid: str, changes: Mapping[int, bytes]) -> "Deferred[None]":
        """Deferred[None]: like write, for several keys of one VM
        (Mapping[int, bytes]) acknowledged together, newer than every write
        acknowledged before."""

    def pending(vm_uuid: str, key: int) -> "Deferred[bytes | None]":
        """Deferred[bytes | None]: the latest acknowledged version not yet
        delivered upstream, or None."""

    def has_pending(vm_uuid: str) -> bool:
        """bool: whether any write of the VM awaits delivery (or a delivered
        one may still come back after a crash)."""

    def pending_vms() -> set[str]:
        """set[str]: the VMs with writes awaiting delivery."""


class ISetAsideSource(Interface):
    """Writes a service's cache set aside, for the operator."""

    service = Attribute("xguard.model.Service")

    def set_aside() -> list[Any]:
        """list[xguard.status.SetAside]: what is set aside now."""

    def set_aside_values(item_id: str) -> "Deferred[dict[int, bytes]]":
        """Deferred: our values of the item, per key (NotSetAside: unknown id)."""

    def resolve(item_id: str, action: str) -> "Deferred[None]":
        """Deferred[None]: ``push`` ours, ``keep`` upstream's, or
        ``exported`` (keep upstream's, ours saved elsewhere);
        ResolutionRefused saying why when it cannot be done as asked."""


class ISocketRegistry(Interface):
    """The per-VM domain sockets and the active-sockets file."""

    def create(service: Service, vm_uuid: str, gid: int, path: str) -> "Deferred[None]":
        """Deferred[None]: listen on ``path`` (0660 root:gid) and record it.
        PathInUse, InvalidUUID, InvalidPath on bad input."""

    def destroy(service: Service, gid: int, path: str) -> "Deferred[None]":
        """Deferred[None]: stop serving ``path`` and unlink it; unknown
        paths succeed with a warning."""

    def entries() -> list[dict[str, Any]]:
        """list[dict]: {path, vm_uuid, gid, service} for every socket."""

    def resume() -> "Deferred[None]":
        """Deferred[None]: listen again on every socket of the active file."""

    def stop_accepting() -> "Deferred[None]":
        """Deferred[None]: stop listening on every socket (files stay)."""


class IStatusSource(Interface):
    """Something that contributes to the control channel's Status."""

    def status() -> object:
        """A value class of xguard.status."""
