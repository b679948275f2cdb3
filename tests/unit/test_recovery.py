from __future__ import annotations

import os
import shutil
import tempfile

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from xguard.cache import recovery
from xguard.cache.recovery import NEVER_ACKNOWLEDGED, Delete, Keep, Listing, Move, RemoveDir, plan
from xguard.model import Service

VM = "11111111-1111-4111-8111-111111111111"
names = st.one_of(st.integers(0, 10**6).map(str), st.sampled_from(["junk", "5.pre", "07"]))


class PlanTests(SynchronousTestCase):
    def test_rules(self) -> None:
        listing = Listing(
            files=[(VM, "0", "5"), (VM, "0", "7"), (VM, "0", "x"), (VM, "1", "9.pre"),
                   (VM, "2", "99"), ("notauuid", "0", "1"), (VM, "7", "1")],
            dirs=[(VM,), (VM, "0"), (VM, "1"), (VM, "2"), ("notauuid",), ("notauuid", "0"),
                  (VM, "7")])
        actions = plan(Service.SWTPM, listing, now=50)
        self.assertIn(Keep((VM, "0", "7"), recovery.Version(recovery.Item(VM, 0), 7)), actions)
        self.assertIn(Delete((VM, "0", "5"), "outdated version"), actions)
        self.assertIn(Move((VM, "2", "99"), (VM, "2", "50"),
                           recovery.Version(recovery.Item(VM, 2), 50)), actions)
        self.assertIn(Delete((VM, "1", "9.pre"), NEVER_ACKNOWLEDGED), actions)
        removed = {a.path for a in actions if isinstance(a, RemoveDir)}
        self.assertEqual(removed, {("notauuid", "0"), ("notauuid",), (VM, "7"), (VM, "1")})

    @given(st.dictionaries(st.sampled_from([0, 1, 2]), st.lists(names, min_size=1, unique=True)),
           st.integers(0, 10**6))
    def test_one_version_per_item_not_in_future(self, tree: dict[int, list[str]], now: int) -> None:
        files = [(VM, str(k), n) for k, ns in tree.items() for n in ns]
        dirs = [(VM,)] + [(VM, str(k)) for k in tree]
        actions = plan(Service.SWTPM, Listing(files=files, dirs=dirs), now)
        kept = recovery.kept_versions(actions)
        self.assertEqual(len({v.item for v in kept}), len(kept))
        self.assertTrue(all(v.ts <= now for v in kept))
        touched = [a.path for a in actions if isinstance(a, (Keep, Delete))]
        touched += [a.src for a in actions if isinstance(a, Move)]
        self.assertEqual(sorted(touched), sorted(files))  # every file has exactly one action
        for a in actions:
            if isinstance(a, Delete) and a.path[-1].endswith(".pre"):
                self.assertEqual(a.reason, NEVER_ACKNOWLEDGED)


class ApplyTests(SynchronousTestCase):
    def test_upstream_daemon_tree(self) -> None:
        root = tempfile.mkdtemp(prefix="xgr")
        self.addCleanup(shutil.rmtree, root)
        base = os.path.join(root, "Swtpm")
        for rel, data in [((VM, "0", "100"), b"old"), ((VM, "0", "200"), b"new"),
                          ((VM, "1", "junk"), b"?"), ((VM, "2", "3.pre"), b"p")]:
            os.makedirs(os.path.join(base, *rel[:-1]), exist_ok=True)
            with open(os.path.join(base, *rel), "wb") as f:
                f.write(data)
        actions = plan(Service.SWTPM, recovery.scan(base), now=150)
        recovery.apply(base, actions)
        self.assertEqual(sorted(os.listdir(os.path.join(base, VM))), ["0"])
        self.assertEqual(os.listdir(os.path.join(base, VM, "0")), ["150"])
        with open(os.path.join(base, VM, "0", "150"), "rb") as f:
            self.assertEqual(f.read(), b"new")
