"""The block manager: allocation, prefix-cache hits and keys, LRU eviction, fork, window release, and a
randomized run against a plain reference model of which blocks should be free, used or cached."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lanternlm.engine.block_manager import EMPTY, BlockManager, NoFreeBlocksError, prefix_keys

BS = 4


def finished(bm: BlockManager, seq_id, tokens, salt=None) -> int:
    """Run a request to the end as the engine would: allocate, mark its KV written, free. Returns hits."""
    cached = bm.allocate(seq_id, tokens, salt)
    bm.register_full_blocks(seq_id, tokens)
    bm.free(seq_id)
    bm.check()
    return cached


# ---------------------------------------------------------------------- allocation and hits

def test_a_new_pool_is_all_free():
    bm = BlockManager(10, BS)
    assert (bm.num_free, bm.num_used, bm.num_cached, bm.num_available) == (10, 0, 0, 10)
    bm.check()


def test_allocate_covers_the_prompt_with_distinct_fresh_blocks():
    bm = BlockManager(10, BS)
    assert bm.allocate("a", list(range(9))) == 0
    table = bm.block_table("a")
    assert len(table) == 3 and len(set(table)) == 3
    assert (bm.num_used, bm.num_free, bm.num_tokens("a")) == (3, 7, 9)
    assert "a" in bm and "b" not in bm
    bm.check()
    with pytest.raises(ValueError):
        bm.allocate("a", [1])


def test_a_registered_prefix_is_reused_by_the_next_request():
    bm = BlockManager(10, BS)
    prompt = list(range(10))                     # 2 full blocks + 2 tokens
    finished(bm, "a", prompt)
    assert (bm.num_cached, bm.num_free) == (2, 8)   # the partial block was never keyed
    cached = bm.allocate("b", prompt + [99, 98])
    assert cached == 2 * BS
    assert bm.num_cached == 0 and bm.num_used == 3
    assert (bm.hit_tokens, bm.query_tokens) == (8, 22)
    assert bm.hit_rate == pytest.approx(8 / 22)
    bm.check()


def test_the_whole_prompt_is_never_cached():
    bm = BlockManager(10, BS)
    prompt = list(range(2 * BS))                 # exactly two full blocks
    finished(bm, "a", prompt)
    cached = bm.allocate("b", prompt)
    assert cached == BS                          # the last block is recomputed for the last token's logits
    shared, own = bm.block_table("b")
    assert own != shared and bm.num_cached == 1  # the cached twin of the last block is left alone
    # recomputing it and registering it finds the key taken: the cached twin keeps it
    assert bm.register_full_blocks("b", prompt) == 0
    bm.free("b")
    assert bm.num_cached == 2 and bm.num_free == 8
    bm.check()


def test_a_one_block_prompt_is_never_a_hit():
    bm = BlockManager(4, BS)
    finished(bm, "a", [1, 2, 3, 4])
    assert bm.allocate("b", [1, 2, 3, 4]) == 0


def test_cacheable_tokens_caps_reuse():
    bm = BlockManager(32, BS)
    prompt = list(range(13))
    finished(bm, "a", prompt)
    assert bm.allocate("echo", prompt, cacheable_tokens=0) == 0
    assert bm.allocate("some", prompt, cacheable_tokens=BS + 3) == BS
    assert bm.allocate("all", prompt, cacheable_tokens=100) == 3 * BS
    with pytest.raises(ValueError):
        bm.allocate("bad", prompt, cacheable_tokens=-1)
    bm.check()


@pytest.mark.parametrize("changed_block", [0, 1, 2, 3])
def test_a_changed_token_misses_its_block_and_all_after_it(changed_block):
    bm = BlockManager(16, BS)
    prompt = list(range(5 * BS))
    finished(bm, "a", prompt)
    other = list(prompt)
    other[changed_block * BS + 2] = 999
    assert bm.allocate("b", other) == changed_block * BS
    bm.check()


def test_equal_blocks_after_different_prefixes_do_not_match():
    bm = BlockManager(16, BS)
    finished(bm, "a", [1, 1, 1, 1, 7, 7, 7, 7, 0])
    assert bm.allocate("b", [2, 2, 2, 2, 7, 7, 7, 7, 0]) == 0   # block 1's tokens equal, its prefix differs


def test_salts_partition_the_cache():
    bm = BlockManager(32, BS)
    prompt = list(range(3 * BS))
    finished(bm, "a", prompt, salt="tenant-a")
    assert bm.allocate("none", prompt) == 0
    assert bm.allocate("b", prompt, salt="tenant-b") == 0
    assert bm.allocate("a2", prompt, salt="tenant-a") == 2 * BS
    finished(bm, "unsalted", prompt)
    assert bm.cached_tokens(prompt, salt="") == 0                # "" is a salt of its own, not None
    assert bm.cached_tokens(prompt) == 2 * BS
    bm.check()


def test_keys_are_stable_and_chain():
    keys = prefix_keys(list(range(10)), BS, salt="s")
    assert len(keys) == 2 and len(set(keys)) == 2
    assert keys == prefix_keys(list(range(10)), BS, salt="s")   # no per-process hash seed involved
    assert keys[0] == prefix_keys(list(range(BS)), BS, salt="s")[0]
    assert keys[0] != prefix_keys(list(range(BS)), BS)[0]


# ---------------------------------------------------------------------- admission and exhaustion

def test_can_allocate_counts_free_cached_and_hit_blocks():
    bm = BlockManager(4, BS)
    prompt = list(range(4 * BS))
    finished(bm, "a", prompt)                    # 4 cached blocks, 0 free
    assert (bm.num_free, bm.num_cached) == (0, 4)
    # a hit prompt needs 3 revived + 1 fresh (evicting the 4th cached block)
    assert bm.blocks_needed(prompt) == 4 and bm.can_allocate(prompt)
    assert bm.can_allocate(list(range(100, 100 + 4 * BS)))       # misses: all 4 by eviction
    assert not bm.can_allocate(list(range(4 * BS + 1)))           # 5 blocks
    assert bm.allocate("b", prompt) == 3 * BS
    assert not bm.can_allocate([1])
    bm.check()


def test_allocate_refuses_without_changing_anything():
    bm = BlockManager(3, BS)
    bm.allocate("a", list(range(2 * BS)))
    before = (bm.num_free, bm.num_used, bm.num_cached, bm.query_tokens)
    with pytest.raises(NoFreeBlocksError):
        bm.allocate("b", list(range(2 * BS)))
    assert (bm.num_free, bm.num_used, bm.num_cached, bm.query_tokens) == before and "b" not in bm
    bm.check()


def test_a_hit_block_is_never_evicted_to_make_room_for_its_own_request():
    bm = BlockManager(4, BS)
    prompt, other = list(range(2 * BS + 1)), [60] * BS + [1]
    finished(bm, "p", prompt)                    # 2 cached; released first, so least recent
    finished(bm, "q", other)                     # 1 cached
    bm.allocate("x", [50])                       # takes the last free block
    assert bm.allocate("b", prompt) == 2 * BS    # 1 fresh block needed: by evicting q's, not a hit
    assert bm.cached_tokens(other + [2]) == 0
    bm.check()


def test_append_slot_grows_one_block_at_each_boundary():
    bm = BlockManager(3, BS)
    bm.allocate("a", list(range(BS - 1)))
    assert bm.append_slot("a", BS) and len(bm.block_table("a")) == 1
    assert bm.append_slot("a", BS + 1) and len(bm.block_table("a")) == 2
    assert bm.append_slot("a", 3 * BS) and len(bm.block_table("a")) == 3
    assert not bm.append_slot("a", 3 * BS + 1)                   # pool exhausted: the caller preempts
    assert len(bm.block_table("a")) == 3 and bm.num_tokens("a") == 3 * BS
    with pytest.raises(ValueError):
        bm.append_slot("a", 2)
    bm.check()


def test_preemption_frees_blocks_for_the_survivor_and_keeps_the_victims_prefix():
    bm = BlockManager(5, BS)
    old, young = list(range(2 * BS)), list(range(100, 100 + 3 * BS))
    bm.allocate("old", old)
    bm.allocate("young", young)
    bm.register_full_blocks("young", young)
    assert not bm.append_slot("old", 2 * BS + 1)
    bm.free("young")                             # preempted: its written blocks stay cached
    assert bm.num_available == 3
    assert bm.append_slot("old", 2 * BS + 1)     # evicts the young one's least recent block: its tail
    assert bm.cached_tokens(young) == 2 * BS     # its recompute will resume after its surviving blocks
    bm.free("old")
    assert bm.allocate("young", young) == 2 * BS
    bm.check()


# ---------------------------------------------------------------------- free and eviction

def test_free_returns_unkeyed_blocks_and_keeps_keyed_ones_cached():
    bm = BlockManager(10, BS)
    bm.allocate("a", list(range(3 * BS + 1)))
    bm.register_full_blocks("a", list(range(2 * BS)))  # only two blocks' KV written so far
    bm.free("a")
    assert (bm.num_cached, bm.num_free, bm.num_used) == (2, 8, 0)
    with pytest.raises(KeyError):
        bm.free("a")
    bm.check()


def test_eviction_takes_the_least_recently_used_block_first():
    bm = BlockManager(7, BS)
    prompts = {name: [i * 10 + j for j in range(2 * BS + 1)] for i, name in enumerate("ABC")}
    for name in "ABC":                           # each leaves 2 cached blocks: 6 cached, 1 free
        finished(bm, name, prompts[name])
    assert (bm.num_cached, bm.num_free) == (6, 1)
    assert finished(bm, "A again", prompts["A"]) == 2 * BS   # A is now the most recent: order B, C, A
    bm.allocate("x", [7])                        # the free block
    bm.allocate("y", [7])                        # evicts B's tail
    assert [bm.cached_tokens(prompts[n]) for n in "ABC"] == [2 * BS, BS, 2 * BS]
    bm.allocate("z", [7])                        # ... then B's head
    assert [bm.cached_tokens(prompts[n]) for n in "ABC"] == [2 * BS, 0, 2 * BS]
    bm.allocate("w", [7])                        # ... then C's tail
    assert [bm.cached_tokens(prompts[n]) for n in "ABC"] == [2 * BS, 0, BS]
    bm.check()


def test_tails_are_evicted_before_their_parents():
    bm = BlockManager(3, BS)
    prompt = list(range(3 * BS + 1))
    bm.allocate("a", prompt[:3 * BS])
    bm.register_full_blocks("a", prompt[:3 * BS])
    bm.free("a")                                 # 3 cached
    bm.allocate("x", [7])                        # evicts one
    assert bm.cached_tokens(prompt) == 2 * BS    # the chain's head and middle survive


def test_a_key_registered_twice_stays_with_the_first_block():
    bm = BlockManager(10, BS)
    prompt = list(range(2 * BS + 1))
    bm.allocate("a", prompt)
    bm.allocate("b", prompt)                     # computed concurrently: both miss
    assert bm.register_full_blocks("a", prompt) == 2
    assert bm.register_full_blocks("b", prompt) == 0
    a_blocks = bm.block_table("a")[:2]
    bm.free("b")
    assert bm.num_cached == 0 and bm.num_free == 7   # b's duplicates went straight back
    bm.free("a")
    assert bm.num_cached == 2
    bm.allocate("c", prompt)
    assert bm.block_table("c")[:2] == a_blocks
    bm.check()


def test_register_is_incremental_and_bounded_by_the_table():
    bm = BlockManager(10, BS)
    tokens = list(range(3 * BS))
    bm.allocate("a", tokens)
    assert bm.register_full_blocks("a", tokens[:BS + 2]) == 1    # a prefill chunk ending mid-block
    assert bm.register_full_blocks("a", tokens[:BS + 2]) == 0
    assert bm.register_full_blocks("a", tokens) == 2
    with pytest.raises(ValueError):
        bm.register_full_blocks("a", tokens + [1])
    bm.check()


def test_decode_registers_blocks_a_later_turn_hits():
    bm = BlockManager(10, BS)
    prompt = [1, 2, 3, 4, 5, 6]
    bm.allocate("turn1", prompt)
    tokens = list(prompt)
    for t in range(10, 15):                      # each decode step: one more position, then its KV written
        tokens.append(t)
        assert bm.append_slot("turn1", len(tokens))
        bm.register_full_blocks("turn1", tokens[:-1])  # the newest token's KV is written by the next forward
    bm.register_full_blocks("turn1", tokens)     # the final forward wrote it
    bm.free("turn1")
    assert bm.allocate("turn2", tokens + [20, 21]) == 2 * BS
    bm.check()


# ---------------------------------------------------------------------- fork

def test_fork_shares_full_blocks_and_copies_the_partial_one():
    bm = BlockManager(10, BS)
    bm.allocate("p", list(range(2 * BS + 1)))
    src, dst = bm.fork("p", "c")
    p, c = bm.block_table("p"), bm.block_table("c")
    assert p[:2] == c[:2] and src == p[2] and dst == c[2] and src != dst
    assert bm.num_used == 4
    bm.free("p")
    assert bm.num_used == 3                      # the shared blocks live on in the child
    bm.free("c")
    assert bm.num_used == 0 and bm.num_free == 10
    bm.check()


def test_fork_of_a_block_aligned_sequence_needs_no_copy():
    bm = BlockManager(4, BS)
    bm.allocate("p", list(range(2 * BS)))
    assert bm.fork("p", "c") is None
    assert bm.block_table("p") == bm.block_table("c") and bm.num_used == 2
    assert bm.append_slot("p", 2 * BS + 1) and bm.append_slot("c", 2 * BS + 1)
    assert bm.block_table("p")[2] != bm.block_table("c")[2]     # each writes its own next block
    with pytest.raises(ValueError):
        bm.fork("p", "c")
    bm.check()


def test_fork_without_a_block_for_the_copy_changes_nothing():
    bm = BlockManager(2, BS)
    bm.allocate("p", list(range(BS + 1)))
    with pytest.raises(NoFreeBlocksError):
        bm.fork("p", "c")
    assert "c" not in bm and bm.num_used == 2
    bm.check()


def test_a_fork_child_registers_what_the_parent_left_unregistered():
    bm = BlockManager(10, BS)
    prompt = list(range(BS + 2))
    bm.allocate("p", prompt)
    bm.fork("p", "c")
    p_tokens, c_tokens = prompt + [100, 101], prompt + [200, 201]
    for seq, tokens in (("p", p_tokens), ("c", c_tokens)):
        assert bm.append_slot(seq, len(tokens))
    assert bm.register_full_blocks("p", p_tokens) == 2          # the shared block and p's own second block
    assert bm.register_full_blocks("c", c_tokens) == 1          # the shared one is keyed already
    bm.free("p")
    bm.free("c")
    assert bm.allocate("p2", p_tokens + [1]) == 2 * BS
    assert bm.allocate("c2", c_tokens + [1]) == 2 * BS
    bm.check()


# ---------------------------------------------------------------------- sliding window

def test_window_release_frees_blocks_wholly_before_the_window():
    bm = BlockManager(10, BS)
    tokens = list(range(5 * BS))
    bm.allocate("a", tokens)
    bm.register_full_blocks("a", tokens[:BS])    # block 0 keyed: it stays cached once released
    # window 6 at length 20: positions < 14 are never read again, so blocks 0..2 (positions 0..11) go
    assert bm.release_outside_window("a", window=6, length=20) == 3
    assert bm.block_table("a")[:3] == [EMPTY] * 3 and EMPTY not in bm.block_table("a")[3:]
    assert (bm.num_used, bm.num_cached, bm.num_free) == (2, 1, 7)
    assert bm.release_outside_window("a", window=6, length=20) == 0
    assert bm.register_full_blocks("a", tokens) == 2             # keys still chain through EMPTY slots
    assert bm.append_slot("a", 5 * BS + 1)
    bm.free("a")
    assert bm.num_used == 0 and bm.num_free + bm.num_cached == 10
    bm.allocate("b", [1])
    with pytest.raises(ValueError):
        bm.release_outside_window("b", window=0, length=1)
    bm.check()


def test_window_release_keeps_the_block_being_written():
    bm = BlockManager(10, BS)
    bm.allocate("a", list(range(2 * BS + 1)))
    assert bm.release_outside_window("a", window=1, length=2 * BS + 1) == 2
    assert bm.block_table("a")[2] != EMPTY
    with pytest.raises(ValueError):
        bm.release_outside_window("a", window=1, length=2 * BS + 2)
    bm.check()


def test_bytes_held_counts_used_and_cached_blocks():
    bm = BlockManager(10, BS)
    finished(bm, "a", list(range(2 * BS + 1)))
    bm.allocate("b", [9])
    assert bm.bytes_held(1000) == 3000
    assert bm.num_touched == 3


# ---------------------------------------------------------------------- randomized, against a reference

class Reference:
    """What the manager's state should be, kept the plain way: keys are whole prefixes (salt, tokens),
    the LRU is a release tick per cached block, and block choices are checked, not predicted."""

    def __init__(self, num_blocks, block_size):
        self.bs = block_size
        self.ref = [0] * num_blocks
        self.key: dict[int, tuple] = {}         # block -> (salt, prefix tokens)
        self.by_key: dict[tuple, int] = {}
        self.tick: dict[int, int] = {}          # cached block -> when it was released
        self.clock = 0
        self.free = set(range(num_blocks))
        self.seqs: dict[int, dict] = {}         # id -> table, tokens, salt, offered
        self.hits = self.queries = 0

    def available(self):
        return len(self.free) + len(self.tick)

    def match(self, prompt, salt, cacheable):
        limit = len(prompt) - 1 if cacheable is None else min(len(prompt) - 1, cacheable)
        hits = []
        for i in range(max(0, limit) // self.bs):
            b = self.by_key.get((salt, tuple(prompt[:(i + 1) * self.bs])))
            if b is None:
                break
            hits.append(b)
        return hits

    def needed(self, prompt, salt, cacheable):
        hits = self.match(prompt, salt, cacheable)
        return math.ceil(len(prompt) / self.bs) - len(hits) + sum(self.ref[b] == 0 for b in hits)

    def acquire(self, b):
        if self.ref[b] == 0:
            del self.tick[b]
        self.ref[b] += 1

    def take(self, chosen):
        """Check the manager's fresh blocks: free ones first, then the least recently released."""
        assert len(set(chosen)) == len(chosen)
        evict = max(0, len(chosen) - len(self.free))
        evicted = sorted(self.tick, key=self.tick.get)[:evict]
        if evict:
            assert set(chosen) == self.free | set(evicted)
        else:
            assert set(chosen) <= self.free
        for b in evicted:
            del self.by_key[self.key.pop(b)], self.tick[b]
        for b in chosen:
            self.free.discard(b)
            self.ref[b] = 1

    def release(self, b):
        self.ref[b] -= 1
        assert self.ref[b] >= 0
        if self.ref[b] == 0:
            if b in self.key:
                self.clock += 1
                self.tick[b] = self.clock
            else:
                self.free.add(b)

    def allocate(self, seq, prompt, salt, cacheable, table):
        hits = self.match(prompt, salt, cacheable)
        assert table[:len(hits)] == hits
        for b in hits:
            self.acquire(b)
        self.take(table[len(hits):])
        self.seqs[seq] = {"table": list(table), "tokens": list(prompt), "salt": salt, "offered": len(hits)}
        self.queries += len(prompt)
        self.hits += len(hits) * self.bs
        return len(hits) * self.bs

    def register(self, seq, written):
        s, registered = self.seqs[seq], 0
        for i in range(s["offered"], written // self.bs):
            s["offered"] = i + 1
            b, k = s["table"][i], (s["salt"], tuple(s["tokens"][:(i + 1) * self.bs]))
            if b == EMPTY or b in self.key or k in self.by_key:
                continue
            self.key[b], self.by_key[k] = k, b
            registered += 1
        return registered

    def free_seq(self, seq):
        for b in reversed(self.seqs.pop(seq)["table"]):
            if b != EMPTY:
                self.release(b)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_random_operations_match_the_reference(data):
    bs = data.draw(st.integers(1, 4), label="block_size")
    n = data.draw(st.integers(1, 12), label="num_blocks")
    bm, ref = BlockManager(n, bs), Reference(n, bs)
    tokens = st.integers(0, 2)                   # a tiny vocabulary: prefixes collide often
    next_id = 0
    for _ in range(data.draw(st.integers(1, 40), label="steps")):
        live = sorted(ref.seqs)
        op = data.draw(st.sampled_from(["allocate", "allocate", "append", "append", "register", "register",
                                        "free", "fork", "window"] if live else ["allocate"]))
        seq = data.draw(st.sampled_from(live)) if live and op != "allocate" else None
        if op == "allocate":
            prompt = data.draw(st.lists(tokens, min_size=1, max_size=12))
            salt = data.draw(st.sampled_from([None, None, "a", "b"]))
            cacheable = data.draw(st.sampled_from([None, None, 0]) | st.integers(0, 12))
            can = ref.needed(prompt, salt, cacheable) <= ref.available()
            assert bm.can_allocate(prompt, salt, cacheable) == can
            assert bm.blocks_needed(prompt, salt, cacheable) == ref.needed(prompt, salt, cacheable)
            assert bm.cached_tokens(prompt, salt, cacheable) == len(ref.match(prompt, salt, cacheable)) * bs
            if can:
                cached = bm.allocate(next_id, prompt, salt, cacheable)
                assert cached == ref.allocate(next_id, prompt, salt, cacheable, bm.block_table(next_id))
                assert cached < len(prompt) and cached % bs == 0
            else:
                with pytest.raises(NoFreeBlocksError):
                    bm.allocate(next_id, prompt, salt, cacheable)
            next_id += 1
        elif op == "append":
            s = ref.seqs[seq]
            total = len(s["tokens"]) + 1
            more = math.ceil(total / bs) - len(s["table"])
            ok = more <= ref.available()
            assert bm.append_slot(seq, total) == ok
            if ok:
                s["tokens"].append(data.draw(tokens))
                ref.take(bm.block_table(seq)[len(s["table"]):])
                s["table"] = bm.block_table(seq)
        elif op == "register":
            s = ref.seqs[seq]
            written = data.draw(st.integers(0, len(s["tokens"])))
            assert bm.register_full_blocks(seq, s["tokens"][:written]) == ref.register(seq, written)
        elif op == "free":
            bm.free(seq)
            ref.free_seq(seq)
        elif op == "fork":
            s = ref.seqs[seq]
            partial = len(s["tokens"]) % bs != 0
            if partial and ref.available() < 1:
                with pytest.raises(NoFreeBlocksError):
                    bm.fork(seq, next_id)
            else:
                copy = bm.fork(seq, next_id)
                child = bm.block_table(next_id)
                shared = s["table"][:-1] if partial else s["table"]
                assert child[:len(shared)] == shared
                for b in shared:
                    if b != EMPTY:
                        ref.acquire(b)
                if partial:
                    assert copy == (s["table"][-1], child[-1])
                    ref.take([child[-1]])
                else:
                    assert copy is None
                ref.seqs[next_id] = dict(s, table=child, tokens=list(s["tokens"]))
            next_id += 1
        elif op == "window":
            s = ref.seqs[seq]
            window = data.draw(st.integers(1, 6))
            length = data.draw(st.integers(0, len(s["tokens"])))
            expected = 0
            for i in reversed(range(max(0, length - window) // bs)):
                if s["table"][i] != EMPTY:
                    ref.release(s["table"][i])
                    s["table"][i] = EMPTY
                    expected += 1
            assert bm.release_outside_window(seq, window, length) == expected

        bm.check()
        assert (bm.num_free, bm.num_cached) == (len(ref.free), len(ref.tick))
        assert bm.num_used == sum(r > 0 for r in ref.ref)
        assert bm.num_free + bm.num_used + bm.num_cached == n
        assert (bm.hit_tokens, bm.query_tokens) == (ref.hits, ref.queries)
        for seq_id, s in ref.seqs.items():
            assert bm.block_table(seq_id) == s["table"]
        # the hashed keys index exactly the prefixes the reference holds, each on the same block
        assert bm._by_key == {prefix_keys(list(p), bs, salt)[-1]: b for (salt, p), b in ref.by_key.items()}
