"""From per-token hidden states to one vector per sequence: mean, CLS or last-token pooling over the attention
mask, then optional L2 normalisation. Pure functions on tensors; the batch is right-padded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

POOLINGS = ("mean", "cls", "last")


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """hidden (B, T, C), mask (B, T) with 1 for real tokens (right padding) -> (B, C)."""
    if mode == "mean":
        m = mask.to(hidden.dtype)[..., None]                       # (B, T, 1)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)      # sentence-transformers' clamp
    if mode == "cls":
        return hidden[:, 0]
    if mode == "last":
        last = mask.long().sum(1) - 1                               # index of the last real token, (B,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {mode!r}; use one of {', '.join(POOLINGS)}")


def normalize(vectors: torch.Tensor) -> torch.Tensor:
    """L2-normalise each row (a zero vector stays zero)."""
    return F.normalize(vectors, p=2, dim=-1)
