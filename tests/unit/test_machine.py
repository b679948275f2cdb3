"""Every transition of the table, driven through the machine with a
recording Dummy for what the behaviours ask of the cache."""

from __future__ import annotations

from twisted.internet.defer import Deferred, DeferredQueue, fail, succeed
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from xguard.cache.layout import Batch, Item, Version
from xguard.cache.machine import TRANSITIONS, _CacheCore, build_machine

V = Version(Item("vm", 0), 1)
B = Batch("vm", ((V, b"x"),))


class Dummy:
    """Records what the behaviours ask of the core's parts (the Direct
    attempts, the versions on disk, the flusher)."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.work = False
        self.on_disk: list[Item] = []

    def start(self, batch: Batch, done: Deferred[None]) -> None:
        self.events.append("attempt_direct")

    def persist(self, batch: Batch) -> Deferred[None]:
        self.events.append("persist")
        return succeed(None)

    def wake_flusher(self) -> None:
        self.events.append("wake")

    def __bool__(self) -> bool:
        return False

    def scan(self) -> Deferred[list[Item]]:
        return succeed(list(self.on_disk))

    def has_work(self) -> bool:
        return self.work


def build(queue_size: int = 2) -> tuple[object, Dummy, DeferredQueue[Version]]:
    dummy = Dummy()
    queue: DeferredQueue[Version] = DeferredQueue(size=queue_size)
    return build_machine(_CacheCore("Swtpm", queue, dummy, dummy, dummy.wake_flusher,
                                     dummy.has_work, Logger())), dummy, queue


def in_state(state: str, queue_size: int = 2):  # type: ignore[no-untyped-def]
    m, dummy, queue = build(queue_size)
    if state == "Starting":
        return m, dummy, queue
    m.start_empty()
    if state in ("Engaged", "Disengaged"):
        m.push_failed_transient(B)
    if state == "Disengaged":
        while True:
            m.push_failed_transient(B)
            if m.mode() == "Disengaged":
                break
    dummy.events.clear()
    return m, dummy, queue


def feed(m, name: str) -> None:  # type: ignore[no-untyped-def]
    if name == "write":
        m.write(B, Deferred())
    elif name == "start_pending":
        m.start_pending([V])
    elif name == "push_failed_transient":
        m.push_failed_transient(B)
    else:
        getattr(m, name)()


class TableTests(SynchronousTestCase):
    def test_every_transition(self) -> None:
        for state, name, target in TRANSITIONS:
            m, dummy, queue = in_state(state, queue_size=10)
            dummy.work = True  # settle alone never empties the cache
            feed(m, name)
            self.assertEqual(m.mode(), target, (state, name))

    def test_direct_write_goes_upstream(self) -> None:
        m, dummy, _ = in_state("Direct")
        m.write(B, Deferred())
        self.assertEqual(dummy.events, ["attempt_direct"])

    def test_engaged_write_persists_and_queues(self) -> None:
        m, dummy, queue = in_state("Engaged", queue_size=5)
        done: Deferred[None] = Deferred()
        m.write(B, done)
        self.assertEqual(dummy.events, ["persist"])
        self.assertEqual(len(queue.pending), 2)
        self.assertIsNone(self.successResultOf(done))

    def test_queue_full_disengages(self) -> None:
        m, dummy, queue = in_state("Engaged", queue_size=1)
        m.write(B, Deferred())
        self.assertEqual(m.mode(), "Disengaged")
        m.write(B, Deferred())
        self.assertEqual(len(queue.pending), 1)  # Disengaged: disk only

    def test_drained_only_when_nothing_pending(self) -> None:
        m, dummy, queue = in_state("Engaged")
        dummy.work = True
        queue.pending.clear()
        m.settle()
        self.assertEqual(m.mode(), "Engaged")
        dummy.work = False
        m.settle()
        self.assertEqual(m.mode(), "Direct")

    def test_scan_empty_to_direct(self) -> None:
        m, dummy, queue = in_state("Disengaged")
        dummy.on_disk = [V.item]
        m.settle()
        self.assertEqual(m.mode(), "Disengaged")
        dummy.on_disk = []
        m.settle()
        self.assertEqual(m.mode(), "Direct")
        self.assertEqual(queue.pending, [])

    def test_batches(self) -> None:
        m, dummy, queue = in_state("Direct")
        self.assertIsNone(self.successResultOf(m.next_batch()))
        m.push_failed_transient(B)
        self.assertEqual(self.successResultOf(m.next_batch()), [V.item])
        self.assertEqual(queue.pending, [])

    def test_a_batch_queues_every_version(self) -> None:
        m, dummy, queue = in_state("Engaged", queue_size=10)
        three = Batch("vm", tuple((Version(Item("vm", k), 5), b"x") for k in range(3)))
        m.write(three, Deferred())
        self.assertEqual(len(queue.pending), 1 + 3)

    def test_failed_persist_is_not_acknowledged(self) -> None:
        m, dummy, queue = in_state("Engaged", queue_size=10)
        dummy.persist = lambda batch: fail(OSError(28, "No space left on device"))
        done: Deferred[None] = Deferred()
        m.write(B, done)
        self.failureResultOf(done, OSError)
        self.assertEqual(len(queue.pending), 1)  # nothing queued for it
        self.assertEqual(m.mode(), "Engaged")

    def test_start_pending_overflow(self) -> None:
        m, dummy, _ = build(queue_size=1)
        m.start_pending([V, Version(Item("vm", 1), 1)])
        self.assertEqual(m.mode(), "Disengaged")
        self.assertIn("wake", dummy.events)


class DiagramTests(SynchronousTestCase):
    """doc/cache.md's mermaid diagram is tested against the machine's table,
    so the picture operators read cannot drift from the code."""

    def edges(self) -> set[tuple[str, str, str]]:
        import os
        import re

        doc = os.path.join(os.path.dirname(__file__), "..", "..", "doc", "cache.md")
        with open(doc, encoding="utf-8") as f:
            text = f.read()
        (diagram,) = re.findall(r"```mermaid\n(.*?)```", text, re.S)
        found = set()
        for src, dst, label in re.findall(r"^\s*(\w+) --> (\w+) : (.*)$", diagram, re.M):
            for part in label.split(" / "):
                found.add((src, part.split(" ")[0], dst))
        return found

    def test_every_drawn_edge_is_in_the_table(self) -> None:
        from xguard.cache.machine import TRANSITIONS

        self.assertLessEqual(self.edges(), set(TRANSITIONS))

    def test_every_mode_change_is_drawn(self) -> None:
        from xguard.cache.machine import TRANSITIONS

        changes = {t for t in TRANSITIONS if t[0] != t[2]}
        self.assertLessEqual(changes, self.edges())
