"""Turns a scheduled batch into one forward: a prefill chunk for each of several sequences, or one decode token
for each of several, against the engine's paged KV cache, read and written through the sequences' block tables. Returns
logits; choosing tokens is not its business."""

from __future__ import annotations

import torch

from ..model import CausalLM
from ..models.kv_cache import PagedKVCache
from .block_manager import BlockManager
from .sequence import Sequence


class ModelRunner:
    def __init__(self, model: CausalLM, cache: PagedKVCache, blocks: BlockManager, device: torch.device):
        self.model, self.cache, self.blocks, self.device = model, cache, blocks, device

    def tables(self, seqs: list[Sequence]) -> torch.Tensor:
        """(B, max_blocks) int64 block tables, -1 past each sequence's last block."""
        rows = [self.blocks.block_table(s.request_id) for s in seqs]
        width = max(len(r) for r in rows)
        return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.int64, device=self.device)

    def prefill(self, batch: list[tuple[Sequence, int]]) -> list[torch.Tensor]:
        """The next `count` tokens of each sequence's `target` into its blocks, in one forward: per sequence,
        (1, V) logits for its chunk's last position, or (count, V) for every position when it scores its
        prompt (such a request runs alone).

        Rows are left-padded to the longest chunk, so every row's last position is its own last token. Pad
        positions are -1: the cache writes nothing for them, and they see no keys (attention gives them
        zeros; their outputs are dropped)."""
        width = max(count for _, count in batch)
        ids, positions = [], []
        for seq, count in batch:
            start, pad = seq.computed, width - count
            ids.append([0] * pad + seq.target[start:start + count])
            positions.append([-1] * pad + list(range(start, start + count)))
        scoring = len(batch) == 1 and batch[0][0].scoring
        logits = self.model(torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device),
                            self.cache, slots=self.tables([seq for seq, _ in batch]),
                            logits_to_keep=0 if scoring else 1).logits
        return [logits[0]] if scoring else list(logits[:, -1:])

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One token for each sequence, in one batched forward: (B, V) logits."""
        ids = torch.tensor([[s.stream.output_ids[-1]] for s in seqs], device=self.device)
        positions = torch.tensor([[s.length - 1] for s in seqs], device=self.device)
        return self.model(ids, positions, self.cache, slots=self.tables(seqs), logits_to_keep=1).logits[:, -1]
