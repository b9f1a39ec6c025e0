"""The split-block weight layout the CPU kernels compute from, and its conversion from ggml tensors.

A matrix (N, K) is kept as 32-element blocks, row after row (see quant_cpu.cpp for the byte order):
qs (N, K/2) uint8 of 4-bit values or (N, K) int8 of 8-bit values; d (N, K/32) float16 scales; m (N, K/32)
float16 offsets for the 4-bit kind with stored offsets. A weight is d*q + m, with m = -8d for Q4_0's kind
and m = 0 for the 8-bit kind.

Conversions, from a GGUF tensor's raw bytes:
- Q4_0, Q4_1, Q8_0: the same values, fields only moved apart (exact);
- Q4_K: each 32-element sub-block becomes a block with stored offset, its scale d*sc and offset -dmin*m
  rounded to float16 (a relative change of at most 2^-11 per scale, far inside 4-bit rounding);
- every other type (Q5_*, Q6_K, Q2_K, Q3_K, F16, BF16, F32): dequantized, then quantized to 8 bits per block
  of 32 (scale max|w|/127), an error of at most half a step, max|w|/254, per weight.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..loader.quants import dequantize, q4_k_parts, type_layout

KIND_Q4_MIN, KIND_Q4, KIND_Q8 = 0, 1, 2
KIND_NAMES = {KIND_Q4_MIN: "4-bit blocks with offsets", KIND_Q4: "4-bit blocks", KIND_Q8: "8-bit blocks"}
_Q4_0, _Q4_1, _Q8_0, _Q4_K = 2, 3, 8, 12


@dataclass
class Blocks:
    """One weight matrix (out_features, in_features) in split-block layout."""

    qs: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None
    kind: int
    shape: tuple[int, int]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.qs, self.d, self.m) if t is not None]

    def rows(self, index: torch.Tensor) -> Blocks:
        """The rows at `index` (a permutation or a lookup), as a new Blocks."""
        return Blocks(self.qs[index], self.d[index], None if self.m is None else self.m[index], self.kind,
                      (int(index.numel()), self.shape[1]))

    @staticmethod
    def cat(parts: list[Blocks]) -> Blocks:
        """Stack matrices with the same kind and in_features along the output dimension (fused q/k/v)."""
        kind, k = parts[0].kind, parts[0].shape[1]
        if any(p.kind != kind or p.shape[1] != k for p in parts):
            raise ValueError("only blocks of one kind and width can be stacked")
        m = None if kind != KIND_Q4_MIN else torch.cat([p.m for p in parts])
        return Blocks(torch.cat([p.qs for p in parts]), torch.cat([p.d for p in parts]), m, kind,
                      (sum(p.shape[0] for p in parts), k))


def kind_for(ggml_type: int) -> int:
    """The block kind a ggml type converts to."""
    return {_Q4_0: KIND_Q4, _Q4_1: KIND_Q4_MIN, _Q4_K: KIND_Q4_MIN}.get(ggml_type, KIND_Q8)


def blocks_nbytes(ggml_type: int, shape: tuple[int, ...]) -> list[int]:
    """Bytes of each tensor (qs, d, and m when the kind has offsets) a matrix of this type converts to."""
    n, k = (int(s) for s in shape)
    kind = kind_for(ggml_type)
    scales = n * (k // 32) * 2
    return [n * k if kind == KIND_Q8 else n * k // 2, scales] + ([scales] if kind == KIND_Q4_MIN else [])


def from_ggml(raw: np.ndarray | torch.Tensor, ggml_type: int, shape: tuple[int, int]) -> Blocks:
    """Blocks for a 2-D tensor of PyTorch shape (N, K) from its ggml bytes (K must be a multiple of 32)."""
    n, k = (int(s) for s in shape)
    if k % 32:
        raise ValueError(f"in_features {k} is not a multiple of 32")
    if isinstance(raw, np.ndarray):
        with warnings.catch_warnings():  # a read-only view of the file: everything below copies out of it
            warnings.simplefilter("ignore", UserWarning)
            data = torch.frombuffer(raw, dtype=torch.uint8) if raw.size else torch.empty(0, dtype=torch.uint8)
    else:
        data = raw
    nb = k // 32
    if ggml_type in (_Q4_0, _Q4_1, _Q8_0):
        size = type_layout(ggml_type)[1]
        b = data.view(n, nb, size)
        d = b[..., 0:2].contiguous().view(torch.float16).view(n, nb)
        if ggml_type == _Q8_0:
            return Blocks(b[..., 2:34].contiguous().view(torch.int8).view(n, k), d, None, KIND_Q8, (n, k))
        start = 2 if ggml_type == _Q4_0 else 4
        qs = b[..., start:start + 16].contiguous().view(n, k // 2)
        m = None if ggml_type == _Q4_0 else b[..., 2:4].contiguous().view(torch.float16).view(n, nb)
        return Blocks(qs, d, m, KIND_Q4 if ggml_type == _Q4_0 else KIND_Q4_MIN, (n, k))
    if ggml_type == _Q4_K:
        q, scale, offset = q4_k_parts(data.view(-1, type_layout(_Q4_K)[1]))  # (n*k/256, 8, 32), (., 8)
        q = q.reshape(n, nb, 32)
        qs = (q[..., :16] | (q[..., 16:] << 4)).reshape(n, k // 2)  # ggml's nibble order within a block
        return Blocks(qs.contiguous(), scale.reshape(n, nb).half(), (-offset).reshape(n, nb).half(),
                      KIND_Q4_MIN, (n, k))
    return quantize_q8(dequantize(raw, ggml_type, (n, k)))


def quantize_q8(w: torch.Tensor) -> Blocks:
    """Float weights (N, K) -> 8-bit blocks of 32: scale max|w|/127 rounded to float16, q = round(w/scale)."""
    n, k = w.shape
    blocks = w.float().reshape(n, k // 32, 32)
    d = (blocks.abs().amax(-1) / 127.0).half()
    inv = torch.where(d.float() > 0, 1.0 / d.float(), torch.zeros((), dtype=torch.float32))
    q = torch.round(blocks * inv[..., None]).clamp(-127, 127).to(torch.int8)
    return Blocks(q.view(n, k), d, None, KIND_Q8, (n, k))


def dequantize_blocks(blocks: Blocks) -> torch.Tensor:
    """The float32 values, computed in torch (the reference the kernels are tested against)."""
    n, k = blocks.shape
    nb = k // 32
    if blocks.kind == KIND_Q8:
        q = blocks.qs.view(n, nb, 32).float()
        return (q * blocks.d.float()[..., None]).reshape(n, k)
    packed = blocks.qs.view(n, nb, 16)
    q = torch.cat([packed & 0x0F, packed >> 4], dim=-1).float()  # (n, nb, 32) in element order
    d = blocks.d.float()[..., None]
    m = -8.0 * d if blocks.kind == KIND_Q4 else blocks.m.float()[..., None]
    return (q * d + m).reshape(n, k)
