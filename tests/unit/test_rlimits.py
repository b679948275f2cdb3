"""The open-files soft limit is raised to the hard limit."""

from __future__ import annotations

import resource

from twisted.trial.unittest import SynchronousTestCase

from xguard.daemon.rlimits import NofileChange, raise_nofile


class RaiseNofileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.original = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, self.original)

    def test_raises_soft_to_hard(self) -> None:
        soft, hard = self.original
        if hard != resource.RLIM_INFINITY and hard < 128:
            self.skipTest("hard limit too low to lower the soft one meaningfully")
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        change = raise_nofile()
        new_soft, new_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.assertEqual(new_hard, hard)
        if hard != resource.RLIM_INFINITY:
            self.assertEqual(new_soft, hard)
        self.assertGreater(new_soft, 64)
        self.assertEqual(change, NofileChange(before=64, after=new_soft, hard=hard))
        self.assertTrue(change.raised)

    def test_already_at_hard_is_unchanged(self) -> None:
        soft, hard = self.original
        if hard == resource.RLIM_INFINITY:
            self.skipTest("unlimited hard limit")
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        change = raise_nofile()
        self.assertFalse(change.raised)
        self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE), (hard, hard))
