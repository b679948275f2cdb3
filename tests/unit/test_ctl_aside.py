"""xguard-ctl set-aside / resolve, through the real control locator and a
real cache holding a conflict: what the operator sees and does."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile

from tests.unit.cachehelpers import VM1, VM2, Env
from tests.unit.test_ctl import CtlTestCase
from xguard.control.ctl import format_set_aside
from xguard.control.server import control_factory
from xguard.state.aside import SetAsideOps
from xguard.status import SetAside


class SetAsideCtlTests(CtlTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.env = Env()
        self.addCleanup(self.env.cleanup)
        cache = self.cache = self.env.cache
        self.successResultOf(cache.recover())
        cache.start()
        self.addCleanup(lambda: self.successResultOf(cache.stop()))
        up = self.env.upstream
        self.vtpm_ref = up.vms[VM1]["vtpm"]
        up.vtpms[self.vtpm_ref] = "p s v"
        self.successResultOf(self.env.sink.read_contents(VM1))
        up.down = True
        self.successResultOf(cache.write(VM1, 0, b"p2"))
        up.vtpms[self.vtpm_ref] = "p3 s3 v3"  # another writer
        up.down = False
        self.env.settle()
        self.env.live.discard(VM1)  # the VM stopped
        self.successResultOf(cache.vm_gone(VM1))
        self.factory = control_factory(self.registry, self.factory.locator.vtpms,
                                       lambda: self.status, aside=SetAsideOps([cache]))
        self.status = self.cache_status()
        self.item_id = f"Swtpm/{VM1}"

    def cache_status(self):  # type: ignore[no-untyped-def]
        import attrs
        return attrs.evolve(self.status, services={"Swtpm": self.cache.status()})

    def test_the_list(self) -> None:
        code, out, err = self.ctl("set-aside")
        self.assertEqual((code, err), (0, ""))
        self.assertIn(self.item_id, out)
        self.assertIn("conflict", out)
        self.assertIn("another writer", out)
        code, out, _ = self.ctl("set-aside", "--json")
        (item,) = json.loads(out)
        self.assertEqual((item["id"], item["keys"], item["complete"]),
                         (self.item_id, [0, 1, 2], True))

    def test_export_writes_ours_and_keeps_upstream_s(self) -> None:
        directory = tempfile.mkdtemp(prefix="xgx")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "vm1.json")
        code, out, err = self.ctl("resolve", self.item_id, "export", path)
        self.assertEqual((code, err), (0, ""), out)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with open(path) as f:
            doc = json.load(f)
        self.assertEqual(doc["contents"], "p2 s v")
        self.assertEqual(doc["keys"], {"permall": "p2", "savestate": "s", "volatilestate": "v"})
        self.assertEqual(self.cache.set_aside(), [])
        self.assertEqual(self.env.tpm(VM1), "p3 s3 v3")

    def test_push_ours(self) -> None:
        self.assertEqual(self.ctl("resolve", self.item_id, "push")[0], 0)
        self.assertEqual(self.env.tpm(VM1), "p2 s v")
        self.assertEqual(self.cache.set_aside(), [])

    def test_keep_upstream_s(self) -> None:
        self.assertEqual(self.ctl("resolve", self.item_id, "keep")[0], 0)
        self.assertEqual(self.env.tpm(VM1), "p3 s3 v3")
        self.assertEqual(self.cache.set_aside(), [])

    def test_unknown_ids_and_bad_usage(self) -> None:
        code, _, err = self.ctl("resolve", "Swtpm/nothing", "keep")
        self.assertEqual(code, 1)
        self.assertIn("NOT_SET_ASIDE", err)
        self.assertEqual(self.ctl("resolve", self.item_id, "burn")[0], 2)
        self.assertEqual(self.ctl("resolve", self.item_id, "export")[0], 2)
        self.assertEqual(self.ctl("resolve", self.item_id, "keep", "file")[0], 2)

    def test_a_refusal_says_why(self) -> None:
        """VM2 runs here and conflicts: keeping upstream's would leave it
        writing the lineage that was set aside."""
        up = self.env.upstream
        ref = up.vms[VM2]["vtpm"]
        up.vtpms[ref] = "q r s"
        self.successResultOf(self.env.sink.read_contents(VM2))
        up.down = True
        self.successResultOf(self.cache.write(VM2, 0, b"q2"))
        up.vtpms[ref] = "x y z"
        up.down = False
        self.env.settle()
        self.status = self.cache_status()
        code, _, err = self.ctl("resolve", f"Swtpm/{VM2}", "keep")
        self.assertEqual(code, 1)
        self.assertIn("RESOLUTION_REFUSED", err)
        self.assertIn("runs here", err)


class FormatTests(CtlTestCase):
    def test_empty_and_ages(self) -> None:
        self.assertEqual(format_set_aside([]), "no write is set aside\n")
        item = SetAside(id="Varstored/x", service="Varstored", vm="x", keys=(0,),
                        kind="elsewhere", reason="the VM is running on host b", since=100.0,
                        held=False, complete=True, file="/q")
        text = format_set_aside([item], now=292.0)
        self.assertIn("3m12s", text)
        self.assertIn("Varstored/x: the VM is running on host b", text)
