"""Who runs: the waiting queue, the running batch, and the KV blocks each sequence holds.

Admission is by free blocks: the head of the queue is admitted when the block manager can give it blocks for
its whole prompt (cached prefix blocks count as already there), first come first served, so no request is
overtaken forever. Before each decode every running sequence gets room for one more token; when the pool
runs dry the youngest running sequence is preempted: its blocks are released (the full ones stay cached)
and it goes back to the head of the queue, to be recomputed from its prompt and the tokens it has so far.
Not thread-safe on its own: the engine calls it under its lock (queue changes) or from its thread.
"""

from __future__ import annotations

import collections

from ..errors import LanternError
from .block_manager import BlockManager
from .sequence import Sequence

SCORING_CHUNK = 128  # prefill chunk of requests that want every prompt position's logprobs


class QueueFullError(LanternError):
    """Too many requests are waiting; retry later."""


class Scheduler:
    def __init__(self, max_batch: int, max_queue: int, blocks: BlockManager, prefix_caching: bool = True,
                 window: int | None = None):
        """`window`: every layer attends over this many positions at most (Mistral): blocks that fall out of
        it are released. None when any layer sees the whole context (Gemma 3 mixes both)."""
        self.max_batch, self.max_queue, self.blocks = max_batch, max_queue, blocks
        self.prefix_caching, self.window = prefix_caching, window
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []   # in admission order: the last is the youngest
        self.preemptions = 0

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

    def _cacheable(self, seq: Sequence) -> int | None:
        # Prompt logprobs need every position's logits: those positions are computed, never served.
        return 0 if seq.scoring or not self.prefix_caching else None

    def admit(self) -> None:
        """Admit waiting requests, first come first served, while there are slots and blocks."""
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            if self._twin_prefilling(seq) or not self.blocks.can_allocate(seq.target, seq.salt, self._cacheable(seq)):
                break
            self.waiting.popleft()
            cached = self.blocks.allocate(seq.request_id, seq.target, seq.salt, self._cacheable(seq))
            seq.computed = cached
            if seq.cached_tokens is None:
                seq.cached_tokens = cached
            self.running.append(seq)

    def _twin_prefilling(self, seq: Sequence) -> bool:
        """A running sequence is still prefilling a prefix this one shares (n > 1 choices, a burst with a long
        shared system prompt), and would serve at least half of this prompt from the cache beyond what the cache
        serves now: wait for it rather than compute the same blocks twice. A shorter share is computed again
        instead: a burst whose prompts share only a chat template's first block (SmolLM2's default system prompt)
        waited one prefill per step, each in turn the twin of the next (32 chat prompts of ~37 tokens: 32
        prefills, 2.5 s of a 6.8 s run, on the Engine's thread), and now prefills together."""
        if not self.prefix_caching or self._cacheable(seq) == 0:
            return False
        size, target = self.blocks.block_size, seq.target
        cached = None
        for r in self.running:
            if not (r.prefilling and r.salt == seq.salt and r.target[:size] == target[:size]):
                continue
            shared = size  # whole blocks both prompts have, the first known to match
            while shared + size <= min(len(target), len(r.target)) and \
                    r.target[shared:shared + size] == target[shared:shared + size]:
                shared += size
            if cached is None:
                cached = self.blocks.cached_tokens(target, seq.salt, self._cacheable(seq))
            if 2 * (shared - cached) >= len(target):
                return True
        return False

    def prefills(self, budget: int) -> list[tuple[Sequence, int]]:
        """The sequences whose prompts get a chunk this step, with each chunk's length: several at once (one
        forward, rows padded to the longest chunk) while rows x longest chunk stays within `budget` tokens, so
        a burst of short prompts prefills together and a long one is chunked: running streams never wait
        for more than one budget's worth of prefill. First come first served; a request that scores its
        prompt (every position's logits) runs alone, in chunks of SCORING_CHUNK."""
        waiting = [s for s in self.running if s.prefilling and not s.aborted]
        if not waiting:
            return []
        first = waiting[0]
        if first.scoring:  # scoring keeps (chunk, vocab) float32 logits: 128 x 262k x 4 B = 134 MB
            return [(first, min(first.unprefilled, budget, SCORING_CHUNK))]
        batch = [first]
        width = min(first.unprefilled, budget)
        for seq in waiting[1:]:
            if seq.scoring:
                continue
            want = max(width, min(seq.unprefilled, budget))
            if (len(batch) + 1) * want > budget:
                want = budget // (len(batch) + 1)  # the longer prompts get a shorter chunk now, the rest later
                if want < width:
                    break
            batch.append(seq)
            width = want
        return [(s, min(s.unprefilled, width)) for s in batch]

    def decoding(self) -> list[Sequence]:
        """The sequences that decode this step, each with room for its next token; preempts the youngest
        sequences when the pool has no block left for an older one."""
        ready = [s for s in self.running if not s.prefilling and not s.finished and not s.aborted]
        granted = []
        for seq in ready:
            while seq in self.running and not self.blocks.append_slot(seq.request_id, seq.length):
                self.preempt(self.running[-1])
            if seq in self.running:
                granted.append(seq)
        return [s for s in granted if s in self.running]

    def preempt(self, seq: Sequence) -> None:
        """Release `seq`'s blocks and put it back at the head of the queue, to be recomputed."""
        self.blocks.free(seq.request_id)
        self.running.remove(seq)
        seq.target = seq.all_ids
        seq.computed = 0
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def written(self, seq: Sequence, count: int) -> None:
        """The first `count` of the sequence's tokens now have keys and values in the cache: offer the full
        blocks among them to the prefix cache, and release those no later query can see (every later query
        sits at position >= count)."""
        if self.prefix_caching and not seq.scoring:
            self.blocks.register_full_blocks(seq.request_id, seq.all_ids[:count])
        if self.window:
            self.blocks.release_outside_window(seq.request_id, self.window, count)

    def release_finished(self) -> list[Sequence]:
        """Free the blocks of finished or aborted sequences; returns the sequences released."""
        released = [s for s in self.running if s.finished or s.aborted]
        for seq in released:
            self.running.remove(seq)
            self.blocks.free(seq.request_id)
        return released

    def drain(self) -> list[Sequence]:
        """Every sequence, running or waiting, removed (shutdown or failure)."""
        everything = list(self.running) + list(self.waiting)
        for seq in self.running:
            self.blocks.free(seq.request_id)
        self.running, self.waiting = [], collections.deque()
        return everything
