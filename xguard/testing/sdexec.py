"""What systemd's child does before ``execve``, as a launcher for the
fake systemd (:mod:`xguard.testing.fakesystemd`)::

    python -S -m xguard.testing.sdexec FD,FD,... NAME:NAME:... -- COMMAND [ARGS...]

It moves the descriptors (inherited at any number) to 3, 4 …, sets
``LISTEN_FDS``/``LISTEN_FDNAMES`` and ``LISTEN_PID`` to its own pid — the
pid the command keeps after the exec — and execs the command. It imports
nothing but :mod:`xguard.restart.listenfds`, so it costs about what systemd's own
fork and exec do.
"""

from __future__ import annotations

import os
import sys

from xguard.restart.listenfds import environment, place


def launch(argv: list[str]) -> None:
    fds_arg, names_arg, dash, *command = argv
    if dash != "--" or not command:
        raise SystemExit("usage: sdexec FD,FD,... NAME:NAME:... -- COMMAND [ARGS...]")
    fds = [int(fd) for fd in fds_arg.split(",") if fd]
    names = names_arg.split(":") if fds else []
    place(fds)
    env = dict(os.environ)
    if fds:
        env.update(environment(names, os.getpid()))
    os.execve(command[0], command, env)


if __name__ == "__main__":
    launch(sys.argv[1:])
