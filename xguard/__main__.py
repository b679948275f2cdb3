"""``python -m xguard``: the ``xguard`` command (:mod:`xguard.daemon.run`)."""

from xguard.daemon.run import main

main()
