"""Who runs: the waiting queue, the running batch and its cache slots.

Running sequences stay packed in slots 0..n-1 (a finished one's slot is refilled by moving the last one into
it), so the batched decode reads the cache as views, never a gathered copy. The scheduler decides; moving a
sequence's cached keys and values is the runner's job, asked for through `release_finished(move)`.
Not thread-safe on its own: the engine calls it under its lock (queue changes) or from its thread.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

from ..errors import LanternError
from .sequence import Sequence


class QueueFullError(LanternError):
    """Too many requests are waiting; retry later."""


class Scheduler:
    def __init__(self, max_batch: int, max_queue: int):
        self.max_batch, self.max_queue = max_batch, max_queue
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []   # running[i] lives in cache slot i

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.max_queue:
            raise QueueFullError(f"the queue is full ({self.max_queue} requests waiting)")
        self.waiting.append(seq)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def abort(self, request_ids: set[str]) -> int:
        """Drop waiting requests and mark running ones aborted; how many waiting ones were dropped."""
        dropped = [s for s in self.waiting if s.request_id in request_ids]
        for seq in dropped:
            self.waiting.remove(seq)
        for seq in self.running:
            if seq.request_id in request_ids:
                seq.aborted = True
        return len(dropped)

    def admit(self) -> None:
        """Move waiting requests into free slots, first come first served."""
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting.popleft()
            seq.slot = len(self.running)
            self.running.append(seq)

    def next_prefill(self) -> Sequence | None:
        """The sequence whose prompt gets the next prefill chunk (one per step: running streams keep going)."""
        return next((s for s in self.running if s.prefilling and not s.aborted), None)

    def decoding(self) -> list[Sequence]:
        return [s for s in self.running if not s.prefilling and not s.finished and not s.aborted]

    def release_finished(self, move: Callable[[int, int, int], None]) -> list[Sequence]:
        """Free the slots of finished or aborted sequences, keeping the rest packed in slots 0..n-1;
        `move(src, dst, length)` copies a sequence's cache row. Returns the sequences released."""
        released, i = [], 0
        while i < len(self.running):
            seq = self.running[i]
            if not (seq.finished or seq.aborted):
                i += 1
                continue
            released.append(seq)
            last = self.running.pop()
            if last is not seq:  # move the last sequence into the freed slot
                move(last.slot, seq.slot, last.length)
                last.slot = seq.slot
                self.running[i] = last
        return released

    def drain(self) -> list[Sequence]:
        """Every sequence, running or waiting, removed (shutdown or failure)."""
        everything = list(self.running) + list(self.waiting)
        self.running, self.waiting = [], collections.deque()
        return everything
