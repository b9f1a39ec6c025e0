"""What a tokenizer call returns: `BatchEncoding`, a dict of input_ids / attention_mask with attribute access and
`.to(device)`, and the padding and tensor conversion that build it, shaped as transformers shapes them.

Shapes: B texts, T tokens (after padding).
"""

from __future__ import annotations

import torch

from ..errors import LanternError
from .errors import UnsupportedArgumentError


class BatchEncoding(dict):
    """`enc["input_ids"]` and `enc.input_ids` alike; `.to(device)` moves every tensor."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device) -> BatchEncoding:
        return BatchEncoding({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.items()})


def _target_length(lengths: list[int], padding, max_length: int | None, pad_to_multiple_of: int | None) -> int | None:
    """The padded length, or None when the rows stay as they are."""
    if padding in (False, None, "do_not_pad"):
        return None
    if padding in (True, "longest"):
        target = max(lengths, default=0)
    elif padding == "max_length":
        if max_length is None:
            raise LanternError("padding='max_length' needs max_length")
        target = max_length
    else:
        raise UnsupportedArgumentError("tokenizer", "padding", f"use True, 'longest', 'max_length' or False, "
                                                               f"got {padding!r}")
    if pad_to_multiple_of:
        target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
    return target


def pad_rows(rows: list[list[int]], pad_id: int | None, side: str, padding, max_length: int | None = None,
             pad_to_multiple_of: int | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """(input_ids, attention_mask) with every row padded on `side` ("left" or "right") as `padding` asks."""
    masks = [[1] * len(r) for r in rows]
    target = _target_length([len(r) for r in rows], padding, max_length, pad_to_multiple_of)
    if target is None:
        return rows, masks
    if pad_id is None:
        raise LanternError("asked to pad, but the tokenizer has no padding token; set tokenizer.pad_token "
                           "(e.g. tokenizer.pad_token = tokenizer.eos_token)")
    if side not in ("left", "right"):
        raise LanternError(f"padding_side must be 'left' or 'right', got {side!r}")
    padded, padded_masks = [], []
    for row, mask in zip(rows, masks):
        n = max(target - len(row), 0)
        if side == "left":
            padded.append([pad_id] * n + row)
            padded_masks.append([0] * n + mask)
        else:
            padded.append(row + [pad_id] * n)
            padded_masks.append(mask + [0] * n)
    return padded, padded_masks


def as_output(rows: list[list[int]], masks: list[list[int]], batched: bool, return_tensors,
              return_attention_mask: bool = True) -> BatchEncoding:
    """Lists (one row unwrapped when the input was a single text) or (B, T) tensors with return_tensors="pt"."""
    if return_tensors not in (None, "pt"):
        raise UnsupportedArgumentError("tokenizer", "return_tensors", f"only 'pt' (PyTorch), got {return_tensors!r}")
    fields = {"input_ids": rows, "attention_mask": masks} if return_attention_mask else {"input_ids": rows}
    if return_tensors == "pt":
        if len({len(r) for r in rows}) > 1:
            raise LanternError("the texts tokenize to different lengths, so they cannot form one tensor; pass "
                               "padding=True")
        return BatchEncoding({k: torch.tensor(v, dtype=torch.long) for k, v in fields.items()})
    if not batched:
        fields = {k: v[0] for k, v in fields.items()}
    return BatchEncoding(fields)
