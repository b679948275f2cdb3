"""``python -m bench.design_daemon``: xguard built with the upstream
daemon's design (see :mod:`bench.design_tap`), run like ``xguard``."""

from twisted.application.service import ServiceMaker

from xguard.daemon.run import main

PLUGIN = ServiceMaker("xguard", "bench.design_tap",
                      "xguard with the upstream daemon's design (benchmarks only)", "xguard")

if __name__ == "__main__":
    main(plugin=PLUGIN)
