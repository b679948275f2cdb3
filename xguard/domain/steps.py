# -*- test-case-name: tests.unit.test_site -*-
"""Work cut into steps, so one VM's large request never holds the reactor
for more than one step.

Parsers and encoders of untrusted data are written as generators that
``yield`` between bounded steps (a slice of a body, a piece of an answer)
and ``return`` their result; they stay pure and synchronous. The domain
apps run them with :func:`run_steps`, which gives the reactor a turn
between steps (other VMs' requests run there); tests and callers that do
not care run them at once with :func:`drain`.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TypeVar

from twisted.internet.defer import Deferred

__all__ = ["Steps", "drain", "run_steps"]

T = TypeVar("T")
#: A computation that yields between bounded steps and returns a T.
Steps = Generator[None, None, T]


def drain(steps: Steps[T]) -> T:
    """Run every step now; the result (or the exception) of the work."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


async def run_steps(steps: Steps[T], turn: Callable[[], "Deferred[None]"]) -> T:
    """Run the steps, waiting for ``turn()`` between two of them."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        await turn()
