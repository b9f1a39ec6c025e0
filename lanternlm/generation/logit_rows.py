"""Questions the per-token trace asks of a logits row (V,): its top k, how many tokens are still in play (logit
> -inf), a token's rank. Answered in one pass each by the C++ kernels (kernels/logits_cpu.cpp) where they are
loaded, by PyTorch otherwise, with the same answers: ties are ordered by token id, lower first, as argmax breaks
them, and NaN is never counted, ranked ahead or taken into the top (the callers check for NaN themselves).

Why not torch alone: the trace runs once per generated token, and on a 49,152-token row torch's topk took ~80 us
and the trace's passes together ~0.5 ms, a tenth of a decode step of the default model (measured on the project's
2-core VM); the kernel's top k is ~16 us.
"""

from __future__ import annotations

import math

import torch

from ..kernels import kernels


def in_one_pass(logits: torch.Tensor) -> bool:
    """Whether the kernels answer for this row (a contiguous float32 (V,) row on the CPU, the kernels loaded): else
    each question takes PyTorch's passes over it."""
    return _kernel_row(logits) is not None


def _kernel_row(logits: torch.Tensor):
    """The kernels module when it can take this row as it is, else None."""
    module = kernels(quiet=True)
    if (module is not None and logits.device.type == "cpu" and logits.dtype == torch.float32
            and logits.dim() == 1 and logits.is_contiguous()):
        return module
    return None


def top_logits(logits: torch.Tensor, k: int) -> tuple[list[float], list[int], int]:
    """(values, ids, kept): the min(k, kept) largest logits of the row that are > -inf, largest first (the lower
    id first on ties), their token ids, and kept = how many logits are > -inf."""
    module = _kernel_row(logits)
    if module is None:
        return top_logits_torch(logits, k)
    values, ids, kept = module.top_logits(logits, k)
    n = min(k, int(kept))
    return values[:n].tolist(), ids[:n].tolist(), int(kept)


def top_logits_torch(logits: torch.Tensor, k: int) -> tuple[list[float], list[int], int]:
    """top_logits in PyTorch's ops (any device and dtype)."""
    x = logits.detach().float()
    kept = int(torch.count_nonzero(x > -math.inf))
    n = min(k, kept)
    if n == 0:
        return [], [], kept
    x = torch.where(torch.isnan(x), -math.inf, x)  # topk would rank NaN above every number
    bar = torch.topk(x, n).values[-1]
    # topk orders ties arbitrarily and may take any of those tied with the n-th: take them all, then order.
    ids = torch.nonzero(x >= bar).flatten().tolist()
    values = x[ids].tolist()
    best = sorted(zip(values, ids), key=lambda pair: (-pair[0], pair[1]))[:n]
    return [v for v, _ in best], [i for _, i in best], kept


def logit_rank(logits: torch.Tensor, index: int, ties_by_id: bool = True) -> int:
    """1-based rank of logits[index]: 1 + the number of logits above it, + those equal to it at lower ids when
    `ties_by_id` (a descending order that breaks ties as argmax does; without it, equal logits share a rank)."""
    module = _kernel_row(logits)
    if module is not None:
        return module.logit_rank(logits, index, ties_by_id)
    return logit_rank_torch(logits, index, ties_by_id)


def logit_rank_torch(logits: torch.Tensor, index: int, ties_by_id: bool = True) -> int:
    """logit_rank in PyTorch's ops."""
    v = logits[index]
    tied = (logits[:index] == v).sum() if ties_by_id else 0
    return int((logits > v).sum() + tied) + 1


__all__ = ["in_one_pass", "logit_rank", "logit_rank_torch", "top_logits", "top_logits_torch"]
