# -*- test-case-name: tests.unit.test_xapisim -*-
"""A protocol-faithful xapi simulator for tests and benchmarks.

Run it as a process::

    python -m xguard.testing.xapisim --socket /tmp/x/xapi --admin-socket /tmp/x/admin \
        [--tcp PORT] [--state FILE]

or build a :class:`Simulator` in-process. The main socket speaks xapi's two
wire formats through one dispatcher (:mod:`xguard.testing._simstate`):

- XML-RPC, ``POST /`` or ``POST /RPC2``: every answer is a struct whose first
  member is ``Status`` (``Success`` + ``Value`` or ``Failure`` +
  ``ErrorDescription``), encoded as xapi does: strings as bare
  ``<value>text</value>``, ints as decimal strings, void as an empty string,
  no whitespace anywhere.
- JSON-RPC, ``POST /jsonrpc``: 2.0 answers ``{"jsonrpc":"2.0","result":…,"id":…}``
  or ``{"jsonrpc":"2.0","error":{"code":1,"message":CODE,"data":[params]},"id":…}``
  (xapi's wire-protocol document); a request without ``"jsonrpc":"2.0"`` gets
  the 1.0 form ``{"result":…,"error":[CODE,…]|null,"id":…}``.

The admin socket (JSON over HTTP, see doc/xapisim.md and
:mod:`xguard.testing.simclient`) seeds state, reads it back, counts calls
and injects faults: ``refuse`` (the main socket stops listening: connect
fails with ECONNREFUSED), ``hang`` (requests are read, never answered until
the mode goes back to ``up``), a delay before each answer, the next N calls
failing with a given xapi error, the next N answered with HTTP 500, one
method failing (always, or its next N calls).

``--peer-socket`` serves the same API to *another host*: no mode or fault
touches it, as a pool's master still serves the other hosts while this
host's xapi restarts. Tests write through it as another host's guard would
(HA restarting a VM elsewhere, a migration), see
:meth:`xguard.testing.simclient.SimProcess.peer_call`.

Nothing of VM contents is logged: only paths, modes and counts.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import socket
import stat
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IListeningPort, IReactorTCP, IReactorTime, IReactorUNIX
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from xguard.testing._simstate import (
    CODECS,
    JSONRPC,
    XMLRPC,
    Call,
    Codec,
    Dispatcher,
    SimState,
    XapiError,
)
from xguard.util.durable import atomic_write

__all__ = ["Simulator", "SimState", "Dispatcher", "XapiError", "Call", "XMLRPC", "JSONRPC",
           "MODES", "load_state", "main"]

MODES = ("up", "refuse", "hang")
log = Logger()


class _Waiting:
    """A call whose answer is deferred (delay, hang); ``gone`` once the
    client went away, so the answer is computed but not written."""

    def __init__(self, request: Request, codec: Codec, call: Call) -> None:
        self.request, self.codec, self.call, self.gone = request, codec, call, False
        request.notifyFinish().addErrback(self._lost)

    def _lost(self, _: object) -> None:
        self.gone = True


def load_state(path: str) -> SimState:
    """The state saved at ``path``, or an empty one if there is none yet."""
    try:
        with open(path, "rb") as f:
            return SimState.from_json(json.load(f))
    except FileNotFoundError:
        return SimState()


class Simulator:
    """The simulated xapi: state, faults, counters and listeners.

    :param reactor: schedules delays; listens (``IReactorUNIX``/``TCP``) when
        :meth:`listen_unix`/:meth:`listen_tcp` are used.
    :param state_file: when given, the state is saved there (atomically) on
        every change, so a killed simulator restarts with what it had.
    """

    def __init__(self, reactor: IReactorTime, state: SimState | None = None,
                 state_file: str | None = None,
                 now: Callable[[], float] | None = None) -> None:
        self._reactor = reactor
        self.state = state if state is not None else SimState()
        self.dispatcher = Dispatcher(self.state, now or reactor.seconds)
        self.state_file = state_file
        if state_file:
            self.state.on_change = self.save
        self.mode = "up"
        self.delay = 0.0
        self.fail_n, self.fail_codes = 0, ["HOST_STILL_BOOTING"]
        self.http_500_n = 0
        #: method -> codes: every call of that method fails so (until cleared),
        #: e.g. only VTPM.set_contents answering HOST_STILL_BOOTING keeps the
        #: "xapi is back but the cache has not drained" window open.
        self.fail_methods: dict[str, list[str]] = {}
        #: method -> how many more calls fail (absent: all, until cleared).
        self.fail_method_left: dict[str, int] = {}
        #: Calls another host made (the peer socket).
        self.peer_counters: collections.Counter[str] = collections.Counter()
        self.counters: collections.Counter[str] = collections.Counter()
        self._parked: list[_Waiting] = []
        self._wrappers: list[WrappingFactory] = []  # one per listener, tracks connections
        self._specs: list[tuple[str, Any]] = []  # ("unix", path) / ("tcp", port)
        self._ports: list[IListeningPort] = []
        self._placeholders: list[socket.socket] = []

    # -- persistence ----------------------------------------------------------
    def save(self) -> None:
        if self.state_file:
            data = json.dumps(self.state.to_json(), separators=(",", ":")).encode()
            atomic_write(self.state_file, data)

    # -- the request path -----------------------------------------------------
    def handle(self, request: Request, codec: Codec, call: Call) -> bytes | int:
        """Answer (bytes) or park (NOT_DONE_YET) one decoded call."""
        self.counters[call.method] += 1
        if self.mode == "hang":
            self._parked.append(_Waiting(request, codec, call))
            return NOT_DONE_YET
        if self.delay > 0:
            self._reactor.callLater(self.delay, self._finish, _Waiting(request, codec, call))
            return NOT_DONE_YET
        return self._answer(request, codec, call)

    def _answer(self, request: Request, codec: Codec, call: Call) -> bytes:
        if self.http_500_n > 0:
            self.http_500_n -= 1
            request.setResponseCode(500)
            request.setHeader(b"content-type", b"text/plain")
            return b"Internal Server Error\n"
        request.setHeader(b"content-type", codec.content_type)
        if self.fail_n > 0:
            self.fail_n -= 1
            return codec.failure(call, list(self.fail_codes))
        if call.method in self.fail_methods:
            codes = self.fail_methods[call.method]
            left = self.fail_method_left.get(call.method)
            if left is not None:
                if left <= 1:
                    self.fail_method(call.method, None)
                else:
                    self.fail_method_left[call.method] = left - 1
            return codec.failure(call, list(codes))
        return self._dispatch(codec, call)

    def _dispatch(self, codec: Codec, call: Call) -> bytes:
        try:
            return codec.success(call, self.dispatcher.call(call.method, call.params))
        except XapiError as e:
            return codec.failure(call, e.codes)
        except Exception:  # noqa: BLE001 - a simulator bug must not kill the connection
            log.failure("internal error in {method}", method=call.method)
            return codec.failure(call, ["INTERNAL_ERROR", call.method])

    def _finish(self, waiting: _Waiting) -> None:
        body = self._answer(waiting.request, waiting.codec, waiting.call)
        if not waiting.gone:
            waiting.request.setHeader(b"content-length", b"%d" % len(body))
            waiting.request.write(body)
            waiting.request.finish()

    # -- faults ---------------------------------------------------------------
    def set_mode(self, mode: str) -> Deferred[None]:
        """Switch mode; fires once the listeners are in the new state.

        Calls parked by ``hang`` run (in arrival order) when the mode goes
        back to ``up``, like a stalled xapi that recovers; ``refuse`` drops
        them along with every open connection, like a crashed one.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        old, self.mode = self.mode, mode
        log.info("xapisim mode {old} -> {new}", old=old, new=mode)
        parked, self._parked = self._parked, []
        if mode == "hang":
            self._parked = parked
        elif mode == "up":
            for waiting in parked:
                self._finish(waiting)
        if mode == "refuse":
            for wrapper in self._wrappers:
                for protocol in list(wrapper.protocols):
                    protocol.transport.abortConnection()
            if old != "refuse":
                return self._stop_listening()
        elif old == "refuse":
            self._start_listening()
        return succeed(None)

    def fail_next(self, n: int, codes: list[str]) -> None:
        if n < 0 or not codes or not all(isinstance(c, str) for c in codes):
            raise ValueError("n >= 0 and a non-empty list of string codes are needed")
        self.fail_n, self.fail_codes = n, list(codes)

    def fail_method(self, method: str, codes: list[str] | None, n: int | None = None) -> None:
        """Fail every call of ``method`` with ``codes`` (only the next ``n``
        when given); None clears it."""
        if not isinstance(method, str) or not method:
            raise ValueError("a method name is needed")
        self.fail_method_left.pop(method, None)
        if codes is None:
            self.fail_methods.pop(method, None)
            return
        if not codes or not all(isinstance(c, str) for c in codes):
            raise ValueError("a non-empty list of string codes is needed")
        if n is not None and n < 1:
            raise ValueError("n must be >= 1")
        self.fail_methods[method] = list(codes)
        if n is not None:
            self.fail_method_left[method] = n

    def handle_peer(self, request: Request, codec: Codec, call: Call) -> bytes:
        """A call from another host: no mode or fault applies."""
        self.peer_counters[call.method] += 1
        request.setHeader(b"content-type", codec.content_type)
        return self._dispatch(codec, call)

    def reset_faults(self) -> None:
        self.delay, self.fail_n, self.http_500_n = 0.0, 0, 0
        self.fail_methods.clear()
        self.fail_method_left.clear()
        self.counters.clear()

    def status(self) -> dict[str, Any]:
        return {"mode": self.mode, "delay": self.delay,
                "fail_next": {"n": self.fail_n, "codes": self.fail_codes},
                "http_500_next": self.http_500_n,
                "fail_methods": {m: list(c) for m, c in self.fail_methods.items()},
                "fail_method_left": dict(self.fail_method_left),
                "parked": len(self._parked),
                "sessions": len(self.state.sessions), "vms": len(self.state.vms),
                "addresses": [f"{kind}:{where}" for kind, where in self._specs]}

    # -- listening --------------------------------------------------------------
    def api_site(self) -> Site:
        return _Site(_ApiResource(self))

    def peer_site(self) -> Site:
        """The API as another host sees it (see the module docstring)."""
        return _Site(_ApiResource(self, peer=True))

    def listen_peer(self, path: str) -> None:
        _remove_stale_socket(path)
        IReactorUNIX(self._reactor).listenUNIX(path, self.peer_site(), mode=0o660)  # type: ignore[arg-type]

    def admin_site(self) -> Site:
        return _Site(_AdminResource(self))

    def listen_unix(self, path: str) -> None:
        self._specs.append(("unix", path))
        self._ports.append(self._listen(("unix", path)))

    def listen_tcp(self, port: int) -> int:
        """Listen on 127.0.0.1 only; returns the port (useful with 0)."""
        listening = self._listen(("tcp", port))
        address = listening.getHost()
        assert isinstance(address, IPv4Address)
        port = address.port
        self._specs.append(("tcp", port))
        self._ports.append(listening)
        return port

    def _listen(self, spec: tuple[str, Any]) -> IListeningPort:
        kind, where = spec
        site = WrappingFactory(self.api_site())  # knows its connections, for refuse
        site.noisy = False
        self._wrappers.append(site)
        if kind == "tcp":
            return IReactorTCP(self._reactor).listenTCP(where, site, interface="127.0.0.1")  # type: ignore[arg-type]  # Twisted's generics
        _remove_stale_socket(where)
        return IReactorUNIX(self._reactor).listenUNIX(where, site, mode=0o660)  # type: ignore[arg-type]

    def _stop_listening(self) -> Deferred[None]:
        ports, self._ports = self._ports, []
        self._wrappers = []
        d = DeferredList([port.stopListening() or succeed(None) for port in ports])

        def placeholders(_: object) -> None:
            # A bound socket nobody listens on: connect() gets ECONNREFUSED,
            # as with a stopped xapi whose socket file is still there.
            for kind, where in self._specs:
                if kind == "unix":
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    _remove_stale_socket(where)
                    s.bind(where)
                    self._placeholders.append(s)

        return d.addCallback(placeholders)

    def _start_listening(self) -> None:
        self._close_placeholders()
        self._ports = [self._listen(spec) for spec in self._specs]

    def _close_placeholders(self) -> None:
        for s in self._placeholders:
            path = s.getsockname()
            s.close()
            _remove_stale_socket(path)
        self._placeholders = []

    def shutdown(self) -> None:
        """Save and remove refuse-mode placeholders (run before exit)."""
        self._close_placeholders()
        self.save()


def _remove_stale_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


class _Site(Site):
    """A quiet Site: no access log, so bodies and URLs stay out of logs."""

    noisy = False

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource)  # type: ignore[no-untyped-call]  # Twisted's, untyped

    def log(self, request: http.Request) -> None:
        pass


class _ApiResource(Resource):
    isLeaf = True

    def __init__(self, sim: Simulator, peer: bool = False) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted's, untyped
        self._sim = sim
        self._peer = peer

    def render(self, request: Request) -> bytes | int:
        if request.method != b"POST":
            request.setResponseCode(405)
            request.setHeader(b"allow", b"POST")
            return b"Method Not Allowed\n"
        codec = CODECS.get(request.path)
        if codec is None:
            request.setResponseCode(404)
            return b"Not Found\n"
        try:
            call = codec.decode(_body(request))
        except ValueError as e:
            request.setResponseCode(400)
            request.setHeader(b"content-type", b"text/plain")
            return str(e).encode() + b"\n"
        if self._peer:
            return self._sim.handle_peer(request, codec, call)
        return self._sim.handle(request, codec, call)


def _body(request: Request) -> bytes:
    return request.content.read() if request.content is not None else b""


class _NotFound(Exception):
    pass


class _AdminResource(Resource):
    """The admin API: JSON in, JSON out (documented in doc/xapisim.md)."""

    isLeaf = True

    def __init__(self, sim: Simulator) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted's, untyped
        self._sim = sim

    def render(self, request: Request) -> bytes | int:
        method, path = request.method.decode(), request.path.decode().rstrip("/")
        try:
            body = json.loads(_body(request) or b"{}") if method == "POST" else {}
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            result = self._route(method, path, body)
        except _NotFound as e:
            return self._json(request, 404, {"error": str(e)})
        except (KeyError, ValueError, TypeError) as e:
            return self._json(request, 400, {"error": f"{type(e).__name__}: {e}"})
        if isinstance(result, Deferred):
            def done(value: Any) -> None:
                request.write(self._json(request, 200, value))
                request.finish()
            result.addCallback(done)
            return NOT_DONE_YET
        return self._json(request, 200, result)

    def _json(self, request: Request, code: int, value: Any) -> bytes:
        body = json.dumps(value).encode()
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", b"%d" % len(body))
        return body

    def _route(self, method: str, path: str, body: dict[str, Any]) -> Any:
        sim, state = self._sim, self._sim.state
        route = (method, path)
        if route == ("GET", "/status"):
            return sim.status()
        if route == ("POST", "/mode"):
            return sim.set_mode(body["mode"]).addCallback(lambda _: sim.status())
        if route == ("POST", "/delay"):
            seconds = float(body["seconds"])
            if seconds < 0:
                raise ValueError("seconds must be >= 0")
            sim.delay = seconds
            return sim.status()
        if route == ("POST", "/fail_next"):
            sim.fail_next(int(body["n"]), body.get("codes", ["HOST_STILL_BOOTING"]))
            return sim.status()
        if route == ("POST", "/fail_method"):
            codes = body.get("codes", ["HOST_STILL_BOOTING"])
            n = body.get("n")
            sim.fail_method(body["method"], None if body.get("clear") else codes,
                            None if n is None else int(n))
            return sim.status()
        if route == ("POST", "/http_500_next"):
            n = int(body["n"])
            if n < 0:
                raise ValueError("n must be >= 0")
            sim.http_500_n = n
            return sim.status()
        if route == ("GET", "/counters"):
            return dict(sim.counters)
        if route == ("GET", "/peer_counters"):
            return dict(sim.peer_counters)
        if route == ("POST", "/counters/reset"):
            old = dict(sim.counters)
            sim.counters.clear()
            return old
        if route == ("POST", "/reset"):
            sim.reset_faults()
            return sim.status()
        if route == ("POST", "/vms"):
            fields = ("vm_uuid", "vtpm", "vtpm_uuid", "contents", "nvram", "sb_state",
                      "name_label", "power_state", "resident_on")
            unknown = set(body) - set(fields)
            if unknown:
                raise ValueError(f"unknown fields {sorted(unknown)}")
            return state.seed_vm(**body)
        if route == ("GET", "/vms"):
            return sorted(state.vm_refs)
        if route == ("GET", "/messages"):
            return [dict(m, ref=r) for r, m in state.messages.items()]
        if route == ("POST", "/sessions/expire"):
            expired = len(state.sessions)
            state.sessions.clear()
            return {"expired": expired}
        if method == "GET" and path.startswith("/vms/"):
            uuid = path[len("/vms/"):]
            if uuid not in state.vm_refs:
                raise _NotFound(f"no VM {uuid}")
            return state.vm_state(uuid)
        if method == "GET" and path.startswith("/vtpms/"):
            uuid = path[len("/vtpms/"):]
            if uuid not in state.vtpm_refs:
                raise _NotFound(f"no vTPM {uuid}")
            return state.vtpm_state(uuid)
        raise _NotFound(f"no route {method} {path}")


def main(argv: list[str] | None = None) -> int:
    """Run the simulator until SIGTERM/SIGINT (the process entry point)."""
    parser = argparse.ArgumentParser(prog="python -m xguard.testing.xapisim",
                                     description="xapi simulator for xguard tests")
    parser.add_argument("--socket", help="UNIX socket for the xapi API")
    parser.add_argument("--tcp", type=int, help="also serve the API on 127.0.0.1:PORT")
    parser.add_argument("--admin-socket", required=True, help="UNIX socket for the admin API")
    parser.add_argument("--peer-socket", help="UNIX socket serving the API to another host "
                        "(no mode or fault applies to it)")
    parser.add_argument("--this-host", default="host-a",
                        help="the name of the host the API's sessions are on "
                        "(session.get_this_host) [host-a]")
    parser.add_argument("--state", help="JSON file the state is loaded from and saved to")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warn", "error"])
    args = parser.parse_args(argv)
    if not args.socket and args.tcp is None:
        parser.error("--socket or --tcp is needed")

    from twisted.internet import reactor
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    predicate = LogLevelFilterPredicate(LogLevel.levelWithName(args.log_level))
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate])],
        redirectStandardIO=False)
    sim = Simulator(reactor, load_state(args.state) if args.state else None, args.state)
    sim.state.this_host = args.this_host
    if args.socket:
        sim.listen_unix(args.socket)
    if args.tcp is not None:
        args.tcp = sim.listen_tcp(args.tcp)
    if args.peer_socket:
        sim.listen_peer(args.peer_socket)
    _remove_stale_socket(args.admin_socket)
    IReactorUNIX(reactor).listenUNIX(args.admin_socket, sim.admin_site(), mode=0o600)  # type: ignore[arg-type]
    reactor.addSystemEventTrigger("before", "shutdown", sim.shutdown)
    log.info("xapisim serving {addresses} (admin {admin}), {vms} VMs loaded",
              addresses=sim.status()["addresses"], admin=args.admin_socket,
              vms=len(sim.state.vms))
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
