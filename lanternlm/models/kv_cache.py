"""The paged KV cache: per layer, pools of fixed-size blocks of keys and values, read and written through each
sequence's block table (which blocks hold its positions: the engine's `block_manager` decides; a lone
`generate()` owns all its blocks in order). Both use it, so one sequence computes the same numbers in either.

Pools are (num_blocks, KV, block_size, D), in bfloat16 on the fast path and float32 on the exact path (the
transformers-equal reference). They are allocated zeroed by the operating system (numpy's calloc-backed
zeros): pages are only touched, and only count in the process's memory, once a block is written. Unwritten or
stale entries are always finite, so a masked position contributes exactly nothing to attention.

The model reaches it through the same small interface as `model.KVCache`: `update(layer, k, v, positions,
tables, length)` writes the new keys and values and returns the cached ones for positions 0..length-1, here
gathered through the tables. The fused C++ decode step reads the pools through the tables directly.

Shapes: B sequences, T new tokens, L cached length, KV key/value heads, D head size, N blocks, S block size.
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import ModelConfig

BLOCK_SIZE = 16  # tokens per block: small enough to share prefixes finely, large enough to read in runs
_NUMPY = {torch.float32: np.float32, torch.bfloat16: np.uint16, torch.float16: np.float16}


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed tensor; on the CPU one whose pages the OS maps lazily (bf16 through its 16-bit pattern)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    tensor = torch.from_numpy(np.zeros(shape, dtype=_NUMPY[dtype]))
    return tensor.view(dtype) if dtype == torch.bfloat16 else tensor


class PagedKVCache:
    paged = True  # the fused decode step reads these pools through block tables

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 compute_dtype: torch.dtype, device: torch.device | str = "cpu"):
        if dtype not in _NUMPY:
            raise ValueError(f"a paged KV cache is float32, bfloat16 or float16, not {dtype}")
        self.num_blocks, self.block_size, self.dtype, self.compute_dtype = num_blocks, block_size, dtype, compute_dtype
        shape = (num_blocks, config.num_key_value_heads, block_size, config.head_dim)
        device = torch.device(device)
        self.k = [_zeros(shape, dtype, device) for _ in range(config.num_hidden_layers)]
        self.v = [_zeros(shape, dtype, device) for _ in range(config.num_hidden_layers)]
        self.bytes_per_block = self.block_bytes(config, block_size, dtype)

    @staticmethod
    def block_bytes(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        """Keys and values of every layer for one block of `block_size` tokens."""
        item = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_hidden_layers * config.num_key_value_heads * block_size * config.head_dim * item

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_block // self.block_size

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor,
               length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, T, KV, D) at `positions` (B, T; -1 for padding, not written) through `tables` (B, max_blocks; -1 where a sequence has
        no block) and return keys and values (B, KV, length, D) for positions 0..length-1 in the compute dtype.
        Positions a row has no block for come back as zeros (a shorter row in a batch masks them anyway)."""
        S = self.block_size
        kp, vp = self.k[layer], self.v[layer]
        written = positions >= 0  # (B, T); -1 marks padding in a batch of unequal rows: nothing is written
        if not bool(written.all()):
            k, v, positions = k[written], v[written], positions[written]
            rows = tables[written.nonzero()[:, 0]]  # each real token's sequence's table
            blocks = rows.gather(1, (positions // S)[:, None])[:, 0]  # (n,) for the n real tokens
        else:
            blocks = tables.gather(1, positions // S)  # (B, T)
        offsets = positions % S
        kp[blocks, :, offsets] = k.to(self.dtype)
        vp[blocks, :, offsets] = v.to(self.dtype)
        at = torch.arange(length, device=tables.device)
        read = tables[:, at // S]  # (B, L)
        missing = read < 0
        read = read.clamp(min=0)
        keys = kp[read, :, (at % S)[None, :]]  # (B, L, KV, D)
        values = vp[read, :, (at % S)[None, :]]
        if bool(missing.any()):
            keys = keys.masked_fill(missing[:, :, None, None], 0)
            values = values.masked_fill(missing[:, :, None, None], 0)
        return (keys.transpose(1, 2).to(self.compute_dtype), values.transpose(1, 2).to(self.compute_dtype))

    def copy_block(self, src: int, dst: int) -> None:
        """Copy one block's keys and values (a forked sequence's partial last block)."""
        for kp, vp in zip(self.k, self.v):
            kp[dst] = kp[src]
            vp[dst] = vp[src]


__all__ = ["PagedKVCache", "BLOCK_SIZE"]
