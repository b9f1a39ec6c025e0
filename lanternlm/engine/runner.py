"""Turns a scheduled batch into one forward: a prefill chunk of one sequence, or one decode token for each of
several, against the engine's KV cache. Returns logits; choosing tokens is not its business."""

from __future__ import annotations

import torch

from ..model import CausalLM, KVCache
from .sequence import Sequence

SCORING_CHUNK = 128  # prefill chunk for requests that want every prompt position's logprobs


class ModelRunner:
    def __init__(self, model: CausalLM, slots: int, context: int, prefill_chunk: int, device: torch.device):
        self.model, self.context, self.prefill_chunk, self.device = model, context, prefill_chunk, device
        self.cache = KVCache(model.config, slots=slots, max_len=context, dtype=model.dtype, device=device)

    def prefill(self, seq: Sequence) -> tuple[torch.Tensor, int]:
        """The next chunk of `seq`'s prompt into its cache slot: (logits, chunk length). Logits are (1, V) for the
        chunk's last position, or (T, V) for every position when the request scores its prompt."""
        start = seq.computed
        scoring = seq.prompt_logprobs is not None  # every position's logits are needed, not only the last
        # Scoring keeps (chunk, vocab) float32 logits: a smaller chunk bounds that (128 x 262k x 4 B = 134 MB).
        size = min(self.prefill_chunk, SCORING_CHUNK) if scoring else self.prefill_chunk
        chunk = seq.prompt_ids[start:start + size]
        ids = torch.tensor([chunk], device=self.device)
        positions = torch.arange(start, start + len(chunk), device=self.device)[None]
        logits = self.model(ids, positions, self.cache, slots=seq.slot, logits_to_keep=0 if scoring else 1).logits[0]
        return logits, len(chunk)

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One token for each sequence, in one batched forward: (B, V) logits."""
        # Running sequences are packed, so a contiguous run of slots is a view of the cache.
        first = seqs[0].slot
        contiguous = all(s.slot == first + i for i, s in enumerate(seqs))
        slots = first if contiguous else torch.tensor([s.slot for s in seqs], device=self.device)
        ids = torch.tensor([[s.stream.output_ids[-1]] for s in seqs], device=self.device)
        positions = torch.tensor([[s.length - 1] for s in seqs], device=self.device)
        return self.model(ids, positions, self.cache, slots=slots, logits_to_keep=1).logits[:, -1]

    def move(self, src: int, dst: int, length: int) -> None:
        self.cache.move(src, dst, min(length, self.context))
