"""Start-up imports only what the configuration uses (issue 19): the
metrics library without --metrics, the xapi client (treq, and with it
twisted.web.client) on the local store, SQLite with xapi, none of them in
xguard-ctl, and TLS (pyOpenSSL, which Twisted's reactor imports whenever it
can) only for an ``https`` xapi. Each case runs in a fresh interpreter,
where nothing else imported them first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap

from twisted.trial.unittest import SynchronousTestCase

#: Modules a configuration may leave unloaded.
WATCHED = ("prometheus_client", "treq", "twisted.web.client", "sqlite3")

_BUILD = textwrap.dedent("""
    import json, os, sys
    from twisted.internet.testing import MemoryReactorClock
    from xguard.daemon.compose import build_service
    from xguard.daemon.config import Config
    root = sys.argv[1]
    options = json.loads(sys.argv[2])
    build_service(Config(state_dir=os.path.join(root, "state"),
                         sockets_file=os.path.join(root, "run", "active.json"),
                         control="unix:" + os.path.join(root, "ctl.sock"), **options),
                  MemoryReactorClock())
    print(json.dumps(sorted(m for m in {watched!r} if m in sys.modules)))
""").format(watched=WATCHED)


def loaded_after(code: str, *args: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code, *args], check=True,
                         capture_output=True, text=True).stdout
    return set(json.loads(out.splitlines()[-1]))


class LazyImportTests(SynchronousTestCase):
    def build(self, **options: object) -> set[str]:
        root = tempfile.mkdtemp(prefix="xgl")
        self.addCleanup(os.rmdir, root)
        return loaded_after(_BUILD, root, json.dumps(options))

    def test_local_store_without_metrics(self) -> None:
        self.assertEqual(self.build(), {"sqlite3"})

    def test_xapi_without_metrics(self) -> None:
        self.assertEqual(self.build(xapi="unix:/nonexistent"), {"treq", "twisted.web.client"})

    def test_metrics_when_asked_for(self) -> None:
        root = tempfile.mkdtemp(prefix="xgl")
        self.addCleanup(os.rmdir, root)
        self.assertIn("prometheus_client",
                      self.build(xapi="unix:/nonexistent",
                                 metrics="unix:" + os.path.join(root, "m.sock")))

    def test_ctl_loads_none(self) -> None:
        code = ("import json, sys; import xguard.control.ctl; "
                f"print(json.dumps(sorted(m for m in {WATCHED!r} if m in sys.modules)))")
        self.assertEqual(loaded_after(code), set())


# Options parsed as twistd parses them (``xguard`` or ``twistd xguard``),
# then what twistd does next: import its reactor; then a call through the
# xapi client to a twisted.web server on a UNIX socket, to show the TCP,
# UNIX and HTTP layers work without TLS.
_TWISTD = textwrap.dedent("""
    import json, os, sys
    from xguard.daemon.run import _ServerOptions, split_argv
    from xguard.tap import Options
    argv = json.loads(sys.argv[1])
    if sys.argv[2] == "twistd":
        _ServerOptions().parseOptions(split_argv(argv))
    else:
        Options().parseOptions(argv)
    from twisted.internet import interfaces, reactor, tcp
    from twisted.web.resource import Resource
    from twisted.web.server import Site
    from xguard.upstream.agent import make_client
    class Answer(Resource):
        isLeaf = True
        def render_POST(self, request):
            return request.content.read()[::-1]
    path = os.path.join(sys.argv[3], "x.sock")
    port = reactor.listenUNIX(path, Site(Answer()))
    client, url = make_client(reactor, "unix:" + path)
    outcome = []
    d = client.post(url, data=b"{}!")
    d.addCallback(lambda response: response.content())
    d.addBoth(outcome.append)
    d.addBoth(lambda _: port.stopListening())
    d.addBoth(lambda _: reactor.stop())
    reactor.run()
    print(json.dumps([repr(outcome[0]), tcp.ITLSTransport is interfaces.ITLSTransport,
                      sorted(m for m in ("OpenSSL", "cryptography")
                             if sys.modules.get(m) is not None)]))
""")


class TlsLeftOutTests(SynchronousTestCase):
    """pyOpenSSL and cryptography cost every start-up 0.1 s and the daemon
    12 MB for its life; only an ``https`` xapi needs them."""

    def start(self, how: str, *argv: str) -> list[object]:
        root = tempfile.mkdtemp(prefix="xgt")
        self.addCleanup(os.rmdir, root)
        state = ["--config=", "--state-dir", os.path.join(root, "state")]
        out = subprocess.run([sys.executable, "-c", _TWISTD, json.dumps([*state, *argv]),
                              how, root], check=True, capture_output=True, text=True).stdout
        result: list[object] = json.loads(out.splitlines()[-1])
        return result

    def test_unix_xapi_starts_without_tls(self) -> None:
        self.assertEqual(self.start("twistd", "--xapi", "unix:/nonexistent/xapi"),
                         ["b'!}{'", False, []])

    def test_http_xapi_and_local_store_start_without_tls(self) -> None:
        self.assertEqual(self.start("twistd", "--xapi", "http://localhost:1")[1:], [False, []])
        self.assertEqual(self.start("twistd")[1:], [False, []])

    def test_https_xapi_keeps_tls(self) -> None:
        self.assertEqual(self.start("twistd", "--xapi", "https://localhost:1")[1:],
                         [True, ["OpenSSL", "cryptography"]])

    def test_options_parsed_outside_twistd_change_nothing(self) -> None:
        """A library user (or a test) parsing the options keeps its TLS."""
        self.assertEqual(self.start("plain", "--xapi", "unix:/nonexistent/xapi")[1:],
                         [True, ["OpenSSL", "cryptography"]])
