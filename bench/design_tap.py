"""The daemon built with the upstream daemon's design, for the benchmarks'
comparison only (scenarios 3 and 4). It is xguard's composition root with
another :class:`xguard.daemon.compose.Design` — the same seam the daemon is built
through — so the daemon itself has no option or variable for it::

    python -m bench.design_daemon [twistd options] [xguard options] \\
        --design serial,no-coalesce,no-handle-cache
"""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage

from xguard import tap
from xguard.daemon.compose import Design, build_service

#: serial: one delivery at a time; no-coalesce: one upstream read-modify-write
#: per cached item; no-handle-cache: look VM and vTPM references up on every
#: operation (what xapi-guard does).
CHOICES = frozenset({"serial", "no-coalesce", "no-handle-cache"})


def design(names: str) -> Design:
    chosen = {n for n in names.split(",") if n}
    unknown = chosen - CHOICES
    if unknown:
        raise usage.UsageError(f"unknown --design {', '.join(sorted(unknown))}; "
                               f"choose among {', '.join(sorted(CHOICES))}")
    return Design(flush_concurrency=1 if "serial" in chosen else None,
                  coalesce="no-coalesce" not in chosen,
                  cache_handles="no-handle-cache" not in chosen)


class Options(tap.Options):
    optParameters = [*tap.Options.optParameters,
                     ["design", None, "", "Comma-separated: " + ", ".join(sorted(CHOICES))]]

    def postOptions(self) -> None:
        super().postOptions()
        self.design = design(self["design"])


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    return build_service(options.config, reactor, design=options.design)
