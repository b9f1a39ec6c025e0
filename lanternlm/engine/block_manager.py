"""The paged KV cache's bookkeeping: which blocks each sequence holds, and which full blocks are kept for reuse.

Pure Python, no tensors. The KV pool is `num_blocks` blocks of `block_size` token positions each; this
module only hands out block ids, counts references and remembers content keys. The runner turns a
sequence's block table into cache reads and writes.

Every block is in exactly one of three states:

- free:    no reference, no key; on the free list, ready to be handed out;
- used:    referenced by one or more sequences' tables (`ref_count > 0`);
- cached:  no reference, but it holds a registered full block's key: a later request with the same
           prefix can take it back, and it is evicted least recently used first when the free list
           is empty.

Prefix caching. A full block's key is a hash of its parent block's key and its own token ids; the first
block's parent is a root key made from the request's salt. So two blocks have equal keys only if the
whole prefix up to their end is equal under the same salt: a tenant (API key, vLLM's `cache_salt`)
never hits another tenant's blocks. Keys are blake2b digests over a fixed-width encoding, stable across
processes (Python's `hash()` is salted per process and too short to trust).

A block is registered only after the caller says its KV has been written (`register_full_blocks`), so
no request can hit a block whose contents are still being computed. Full blocks are never written
again; the last, partially filled block of a sequence is never shared (`fork` copies it), so no
copy-on-write is needed.

The manager holds each sequence's table, keyed by the caller's sequence id (any hashable, e.g. a
request id). It is not thread-safe: the engine thread owns it. Its counters are plain ints, safe to
read from another thread for /metrics.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections import OrderedDict
from collections.abc import Hashable
from collections.abc import Sequence as Tokens
from dataclasses import dataclass, field

from ..errors import LanternError

EMPTY = -1  # a table slot whose block was released because it fell out of a sliding window


class NoFreeBlocksError(LanternError):
    """The pool has too few free or evictable blocks for the request; nothing was changed."""


def root_key(salt: str | None) -> bytes:
    """The parent key of a sequence's first block: it carries the salt into every key of the chain."""
    h = hashlib.blake2b(digest_size=32, person=b"lantern-kv-root")
    # None and "" must differ: a tag byte says which one this is
    h.update(b"\x00" if salt is None else b"\x01" + salt.encode("utf-8"))
    return h.digest()


def block_key(parent: bytes, tokens: Tokens[int]) -> bytes:
    """Key of one full block: equal keys mean equal (salt, every token up to this block's end)."""
    h = hashlib.blake2b(digest_size=32, person=b"lantern-kv-block")
    h.update(parent)                                   # always 32 bytes, so the fields cannot run together
    h.update(struct.pack(f"<{len(tokens)}q", *tokens))  # fixed-width, little-endian: stable everywhere
    return h.digest()


def prefix_keys(token_ids: Tokens[int], block_size: int, salt: str | None = None) -> list[bytes]:
    """Keys of every full block of `token_ids`, first block first."""
    keys, parent = [], root_key(salt)
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = block_key(parent, token_ids[start:start + block_size])
        keys.append(parent)
    return keys


@dataclass(slots=True)
class Block:
    """One block of the pool: how many tables reference it, and its prefix key while registered."""

    id: int
    ref_count: int = 0
    key: bytes | None = None   # set while the block is registered in the prefix cache


@dataclass
class _SeqBlocks:
    table: list[int]           # block id per block_size positions; EMPTY where released (window)
    salt: str | None
    num_tokens: int            # positions the table covers (the prompt, then every appended token)
    # chain keys of the first len(keys) full blocks; each of those blocks was offered for registration once
    keys: list[bytes] = field(default_factory=list)


class BlockManager:
    """Owns the KV pool's blocks: allocation, reference counts, prefix-cache keys and LRU eviction."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._blocks = [Block(i) for i in range(num_blocks)]
        # A stack: freed blocks are reused first and block 0 comes out first, so the blocks ever handed
        # out are always 0..num_touched-1 and a lazily-touched pool stays as small as the peak use.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached blocks, least recently used first
        self._by_key: dict[bytes, int] = {}
        self._seqs: dict[Hashable, _SeqBlocks] = {}
        self.num_touched = 0       # blocks ever handed out (a prefix of the ids): the pool's resident part
        self.query_tokens = 0      # prompt tokens asked for by allocate()
        self.hit_tokens = 0        # of those, tokens served from the cache

    # ------------------------------------------------------------------ sequences

    def blocks_needed(self, prompt_ids: Tokens[int], salt: str | None = None,
                      cacheable_tokens: int | None = None) -> int:
        """How many blocks allocate() would take out of the available (free + cached) pool: fresh blocks
        for the uncached part, plus cached blocks it revives from the evictable set."""
        hits, _ = self._match(prompt_ids, salt, cacheable_tokens)
        revived = sum(1 for b in hits if self._blocks[b].ref_count == 0)
        return self._blocks_for(len(prompt_ids)) - len(hits) + revived

    def cached_tokens(self, prompt_ids: Tokens[int], salt: str | None = None,
                      cacheable_tokens: int | None = None) -> int:
        """How many prompt tokens allocate() would find cached right now; changes nothing."""
        return len(self._match(prompt_ids, salt, cacheable_tokens)[0]) * self.block_size

    def can_allocate(self, prompt_ids: Tokens[int], salt: str | None = None,
                     cacheable_tokens: int | None = None) -> bool:
        """Whether allocate() would succeed now. Admission only: it reserves nothing for later decode."""
        return self.blocks_needed(prompt_ids, salt, cacheable_tokens) <= self.num_available

    def allocate(self, seq_id: Hashable, prompt_ids: Tokens[int], salt: str | None = None,
                 cacheable_tokens: int | None = None) -> int:
        """Give `seq_id` a table covering its prompt; return how many prompt tokens are already cached.

        The longest chain of cached full blocks is shared (one more reference each); the rest are fresh.
        The count is a multiple of block_size and at most len(prompt_ids) - 1: the last prompt token is
        always computed, since its logits pick the first output token. When every block of the prompt is
        cached, the last one is therefore not shared: the sequence gets a fresh block and recomputes it.
        `cacheable_tokens` caps the reuse (0 when every prompt position's logits are wanted).
        Raises NoFreeBlocksError, changing nothing, when can_allocate() is False.
        """
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} already has blocks")
        hits, keys = self._match(prompt_ids, salt, cacheable_tokens)
        revived = sum(1 for b in hits if self._blocks[b].ref_count == 0)
        fresh = self._blocks_for(len(prompt_ids)) - len(hits)
        if fresh + revived > self.num_available:
            raise NoFreeBlocksError(f"{fresh + revived} blocks needed, {self.num_available} available")
        for b in hits:         # before taking fresh ones: eviction must not pick a block just matched
            self._acquire(b)
        table = hits + [self._take() for _ in range(fresh)]
        self._seqs[seq_id] = _SeqBlocks(table, salt, len(prompt_ids), keys)
        cached = len(hits) * self.block_size
        self.query_tokens += len(prompt_ids)
        self.hit_tokens += cached
        return cached

    def append_slot(self, seq_id: Hashable, total_len: int) -> bool:
        """Make the table cover `total_len` positions (call before the forward that writes position
        total_len - 1). False, changing nothing, when no block can be had: the caller preempts."""
        s = self._seqs[seq_id]
        if total_len < s.num_tokens:
            raise ValueError(f"sequence {seq_id!r} holds {s.num_tokens} positions, cannot shrink to {total_len}")
        more = self._blocks_for(total_len) - len(s.table)
        if more > self.num_available:
            return False
        s.table.extend(self._take() for _ in range(more))
        s.num_tokens = total_len
        return True

    def free(self, seq_id: Hashable) -> None:
        """Drop the sequence's references. Registered blocks stay cached (evictable); others are free."""
        s = self._seqs.pop(seq_id)
        # Last block first: a chain's tail becomes least recent and is evicted before its parents,
        # since a child whose parent is gone can never be matched again.
        for b in reversed(s.table):
            if b != EMPTY:
                self._release(b)

    def fork(self, parent_id: Hashable, child_id: Hashable) -> tuple[int, int] | None:
        """Give `child_id` the parent's blocks (n > 1 choices share their prompt).

        Full blocks are shared by reference; they are never written again. A partially filled last
        block is not shared: the child gets a fresh block, and the returned (src, dst) block ids are
        the copy the caller must make before either sequence writes to it. None when nothing to copy.
        Raises NoFreeBlocksError, changing nothing, when that copy needs a block and none can be had.
        """
        p = self._seqs[parent_id]
        if child_id in self._seqs:
            raise ValueError(f"sequence {child_id!r} already has blocks")
        partial = p.num_tokens % self.block_size != 0
        if partial and self.num_available < 1:
            raise NoFreeBlocksError("no block for the copy of the last, partial block")
        table = p.table[:-1] if partial else list(p.table)
        for b in table:
            if b != EMPTY:
                self._acquire(b)
        copy = None
        if partial:
            copy = (p.table[-1], self._take())
            table.append(copy[1])
        self._seqs[child_id] = _SeqBlocks(table, p.salt, p.num_tokens, list(p.keys))
        return copy

    def register_full_blocks(self, seq_id: Hashable, token_ids: Tokens[int]) -> int:
        """Offer the sequence's newly full blocks to the prefix cache; return how many were registered.

        `token_ids` are the sequence's tokens whose KV is now written (the prompt so far after a prefill
        chunk; prompt + output minus the last sampled token after a decode). Each full block is offered
        once. If its key is already held by another block (two requests computed the same prefix at the
        same time), the block already registered keeps it, since other sequences may share it; this
        sequence's copy stays unkeyed and goes straight back to the free list when released.
        """
        s = self._seqs[seq_id]
        if len(token_ids) > s.num_tokens:
            raise ValueError(f"{len(token_ids)} tokens given, sequence {seq_id!r} holds {s.num_tokens} positions")
        bs, registered = self.block_size, 0
        parent = s.keys[-1] if s.keys else root_key(s.salt)
        for i in range(len(s.keys), len(token_ids) // bs):
            parent = block_key(parent, token_ids[i * bs:(i + 1) * bs])
            s.keys.append(parent)
            b = s.table[i]
            # already keyed: a shared block its other holder registered (after fork)
            if b == EMPTY or self._blocks[b].key is not None or parent in self._by_key:
                continue
            self._blocks[b].key = parent
            self._by_key[parent] = b
            registered += 1
        return registered

    def release_outside_window(self, seq_id: Hashable, window: int, length: int) -> int:
        """Release the blocks lying wholly before position `length - window`; return how many.

        For sliding-window attention: a query at position p reads keys at p - window + 1 .. p, so once
        every future query is at position >= length - 1, positions < length - window are never read
        again. Their table slots become EMPTY. Valid only when every layer uses this window (Mistral);
        with global layers too (Gemma 3) the caller must not call it. The caller decides.
        """
        s = self._seqs[seq_id]
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        if length > s.num_tokens:
            raise ValueError(f"length {length} is past the {s.num_tokens} positions sequence {seq_id!r} holds")
        released = 0
        for i in reversed(range(max(0, length - window) // self.block_size)):
            if s.table[i] != EMPTY:
                self._release(s.table[i])
                s.table[i] = EMPTY
                released += 1
        return released

    def block_table(self, seq_id: Hashable) -> list[int]:
        """A copy of the sequence's table: block id per block_size positions, EMPTY where released."""
        return list(self._seqs[seq_id].table)

    def num_tokens(self, seq_id: Hashable) -> int:
        """Positions the sequence's table covers."""
        return self._seqs[seq_id].num_tokens

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    # ------------------------------------------------------------------ stats

    @property
    def num_free(self) -> int:
        """Blocks with no reference and no key."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks with no reference that hold a prefix (evictable)."""
        return len(self._lru)

    @property
    def num_used(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.num_blocks - len(self._free) - len(self._lru)

    @property
    def num_available(self) -> int:
        """Blocks that can be handed out now: free ones, then cached ones by eviction."""
        return len(self._free) + len(self._lru)

    @property
    def hit_rate(self) -> float:
        """Fraction of prompt tokens asked for by allocate() that came from the cache."""
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0

    def bytes_held(self, bytes_per_block: int) -> int:
        """Memory of the blocks holding KV someone can read (used + cached)."""
        return (self.num_used + self.num_cached) * bytes_per_block

    def check(self) -> None:
        """Assert the invariants (tests, debugging): each block in exactly one state, reference counts
        equal to the tables' references, keys and the key index in agreement."""
        refs = [0] * self.num_blocks
        for seq_id, s in self._seqs.items():
            held = [b for b in s.table if b != EMPTY]
            assert len(held) == len(set(held)), f"{seq_id!r} holds a block twice: {s.table}"
            assert len(s.table) == self._blocks_for(s.num_tokens), f"{seq_id!r}: table does not fit its tokens"
            assert len(s.keys) <= s.num_tokens // self.block_size
            for b in held:
                refs[b] += 1
        free, lru = set(self._free), set(self._lru)
        assert len(free) == len(self._free), "a block is on the free list twice"
        for blk in self._blocks:
            assert blk.ref_count == refs[blk.id] >= 0, f"block {blk.id}: ref_count {blk.ref_count}, {refs[blk.id]} refs"
            in_free, in_lru = blk.id in free, blk.id in lru
            if blk.ref_count:
                assert not in_free and not in_lru, f"block {blk.id} is referenced and also free or cached"
            else:
                assert in_free != in_lru, f"block {blk.id} is unreferenced but neither/both free and cached"
                assert in_lru == (blk.key is not None), f"block {blk.id}: cached iff it has a key"
            if blk.key is not None:
                assert self._by_key.get(blk.key) == blk.id, f"block {blk.id}'s key is not indexed to it"
            assert (blk.id < self.num_touched) or (in_free and blk.key is None)
        assert len(self._by_key) == sum(b.key is not None for b in self._blocks)
        assert self.num_free + self.num_used + self.num_cached == self.num_blocks

    # ------------------------------------------------------------------ internals

    def _blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def _match(self, prompt_ids: Tokens[int], salt: str | None,
               cacheable_tokens: int | None) -> tuple[list[int], list[bytes]]:
        """The cached blocks holding the longest reusable prefix of the prompt, and their keys."""
        limit = len(prompt_ids) - 1  # the last token is always computed: its logits are needed
        if cacheable_tokens is not None:
            if cacheable_tokens < 0:
                raise ValueError(f"cacheable_tokens must be >= 0, got {cacheable_tokens}")
            limit = min(limit, cacheable_tokens)
        hits: list[int] = []
        keys: list[bytes] = []
        parent = root_key(salt)
        bs = self.block_size
        for i in range(max(0, limit) // bs):
            parent = block_key(parent, prompt_ids[i * bs:(i + 1) * bs])
            b = self._by_key.get(parent)
            if b is None:
                break
            hits.append(b)
            keys.append(parent)
        return hits, keys

    def _acquire(self, b: int) -> None:
        """One more reference to a block that is used or cached."""
        blk = self._blocks[b]
        if blk.ref_count == 0:
            del self._lru[b]
        blk.ref_count += 1

    def _take(self) -> int:
        """A block with one reference: from the free list, else the least recently used cached block."""
        if self._free:
            b = self._free.pop()
            self.num_touched = max(self.num_touched, b + 1)
        else:
            b, _ = self._lru.popitem(last=False)   # callers check num_available first
            del self._by_key[self._blocks[b].key]
            self._blocks[b].key = None
        self._blocks[b].ref_count = 1
        return b

    def _release(self, b: int) -> None:
        blk = self._blocks[b]
        assert blk.ref_count > 0, f"block {b} released more often than acquired"
        blk.ref_count -= 1
        if blk.ref_count == 0:
            if blk.key is not None:
                self._lru[b] = None   # most recently used end
            else:
                self._free.append(b)
