"""Start-up imports only what the configuration uses (issue 19): the
metrics library without --metrics, the xapi client (treq, and with it
twisted.web.client) on the local store, SQLite with xapi, and none of them
in xguard-ctl. Each case runs in a fresh interpreter, where nothing else
imported them first."""

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
