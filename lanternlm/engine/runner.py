"""Turns a scheduled batch into one forward: a prefill chunk of one sequence, or one decode token for each of
several, against the engine's paged KV cache, read and written through the sequences' block tables. Returns
logits; choosing tokens is not its business."""

from __future__ import annotations

import torch

from ..model import CausalLM
from ..models.kv_cache import PagedKVCache
from .block_manager import BlockManager
from .sequence import Sequence

SCORING_CHUNK = 128  # prefill chunk for requests that want every prompt position's logprobs


class ModelRunner:
    def __init__(self, model: CausalLM, cache: PagedKVCache, blocks: BlockManager, prefill_chunk: int,
                 device: torch.device):
        self.model, self.cache, self.blocks = model, cache, blocks
        self.prefill_chunk, self.device = prefill_chunk, device

    def tables(self, seqs: list[Sequence]) -> torch.Tensor:
        """(B, max_blocks) int64 block tables, -1 past each sequence's last block."""
        rows = [self.blocks.block_table(s.request_id) for s in seqs]
        width = max(len(r) for r in rows)
        return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.int64, device=self.device)

    def prefill(self, seq: Sequence) -> tuple[torch.Tensor, int]:
        """The next chunk of `seq.target` into its blocks: (logits, chunk length). Logits are (1, V) for the
        chunk's last position, or (T, V) for every position when the request scores its prompt."""
        start = seq.computed
        scoring = seq.scoring  # every position's logits are needed, not only the last
        # Scoring keeps (chunk, vocab) float32 logits: a smaller chunk bounds that (128 x 262k x 4 B = 134 MB).
        size = min(self.prefill_chunk, SCORING_CHUNK) if scoring else self.prefill_chunk
        chunk = seq.target[start:start + size]
        ids = torch.tensor([chunk], device=self.device)
        positions = torch.arange(start, start + len(chunk), device=self.device)[None]
        logits = self.model(ids, positions, self.cache, slots=self.tables([seq]),
                            logits_to_keep=0 if scoring else 1).logits[0]
        return logits, len(chunk)

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One token for each sequence, in one batched forward: (B, V) logits."""
        ids = torch.tensor([[s.stream.output_ids[-1]] for s in seqs], device=self.device)
        positions = torch.tensor([[s.length - 1] for s in seqs], device=self.device)
        return self.model(ids, positions, self.cache, slots=self.tables(seqs), logits_to_keep=1).logits[:, -1]
