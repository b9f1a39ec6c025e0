"""Which part of a model each tensor-parallel rank holds: query and key/value heads, MLP columns, vocabulary rows.

Pure arithmetic on the config (no torch.distributed): every rank computes the same plan for every rank, so the
ranks agree on the split without talking. Counts that do not divide by the number of ranks are split as evenly
as possible, the first ranks taking one more (9 query heads over 2 ranks: 5 + 4, or 6 + 3 when they follow
their key/value heads); only a split that would leave a rank no query head is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from ..config import ModelConfig
from ..errors import LanternError

BLOCK = 32  # quantized weights are 32-element blocks along the input dimension (kernels/blocks.py)


class ShardError(LanternError):
    """A model cannot be split the way it was asked (more ranks than query heads, a block cut in two, ...)."""


@dataclass(frozen=True)
class ShardPlan:
    """One rank's part of the model; every range is [start, end) in the unsplit model's numbering."""

    rank: int
    world: int
    q_heads: tuple[int, int]       # query heads
    kv_heads: tuple[int, int]      # key/value heads (the rank's KV cache holds these)
    intermediate: tuple[int, int]  # MLP columns: rows of gate/up, columns of down
    vocab: tuple[int, int]         # rows of the embedding and of lm_head


@dataclass(frozen=True)
class Shard:
    """What `load(..., shard=...)` needs to load one rank's part: the plan and the torch.distributed process group
    (gloo on the CPU) whose collectives join the parts."""

    plan: ShardPlan
    group: Any  # torch.distributed.ProcessGroup


def split_evenly(total: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) of `parts` contiguous ranges covering 0..total-1, sizes differing by at most one (the first
    ranges the larger): split_evenly(9, 2) == [(0, 5), (5, 9)]."""
    base, extra = divmod(total, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + base + (i < extra))
    return list(pairwise(bounds))


def plan_shards(config: ModelConfig, rank: int, world: int) -> ShardPlan:
    """Rank `rank`'s part of `config`'s model split over `world` ranks.

    Heads. With world <= num_key_value_heads the KV heads are split (3 over 2 ranks: 2 + 1) and each rank takes
    exactly the query heads of its KV heads (SmolLM2's 9 query / 3 KV heads: 6 + 3). Query heads follow their
    KV group because a group cut across two ranks would leave a rank whose query heads map to its KV heads
    unevenly (2 queries on one KV head, 1 on the next); SDPA's enable_gqa and Lantern's C++ attention both need
    every KV head to serve the same number of consecutive query heads. With more ranks than KV heads, ranks are
    spread over the KV heads as evenly as possible (contiguous), each rank holds (a copy of) exactly one KV head,
    and the query heads of that head's group are split among the ranks sharing it (9 / 3 heads over 6 ranks:
    2 + 1 query heads per KV head). More ranks than query heads would leave a rank with no head: refused.

    MLP columns split at multiples of 32, whole quantized blocks of down_proj's input (the last range ends at
    intermediate_size); vocabulary rows split anywhere. world == 1 gives the whole model."""
    if world < 1 or not 0 <= rank < world:
        raise ShardError(f"rank {rank} is not one of the {world} ranks 0..{world - 1}")
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    if world > heads:
        raise ShardError(f"cannot split {heads} query heads over {world} ranks: a rank would hold no head "
                         f"(use at most {heads} ranks)")
    group = heads // kv  # query heads per KV head
    if world <= kv:
        kv_heads = split_evenly(kv, world)[rank]
        q_heads = (kv_heads[0] * group, kv_heads[1] * group)
    else:
        # ranks per KV head as evenly as possible; this rank is the j-th of the n sharing KV head g
        for g, (first, end) in enumerate(split_evenly(world, kv)):
            if first <= rank < end:
                break
        start, stop = split_evenly(group, end - first)[rank - first]
        kv_heads = (g, g + 1)
        q_heads = (g * group + start, g * group + stop)
    blocks = split_evenly(-(-config.intermediate_size // BLOCK), world)[rank]
    intermediate = tuple(min(b * BLOCK, config.intermediate_size) for b in blocks)
    return ShardPlan(rank, world, q_heads, kv_heads, intermediate, split_evenly(config.vocab_size, world)[rank])
