"""The split-block weight layouts the CPU kernels compute from, and their conversion from ggml tensors.

A matrix (N, K) is kept as 32-element blocks, row after row (quant_cpu.cpp reads the same layout):
- qs (N, K/32 * block_bytes): each block's integer values, uint8 (int8 for the 8-bit kind);
- d (N, K/32) float16: one scale per block;
- m: per kind, (N, K/32) float16 offsets, or (N, K/16) int8 multipliers of 16-element halves, or None.
KIND_Q4_K, KIND_Q5_K and KIND_Q2_K keep the K-quants' own scales instead: d (N, K/256 * 2) float16, each
super-block's D and DMIN, and m (N, K/32 * 2) uint8: each block's 6-bit scale sc and min mn (KIND_Q4_K, KIND_Q5_K),
or each 16-element half's 4-bit scale and min, sc | mn << 4, the file's bytes (KIND_Q2_K).

Block bytes, by kind (the nibble bytes are ggml's Q4_0 order: byte j holds element j in its low nibble and
element j+16 in its high one):

  kind          bytes  qs per block                       weight                    from
  KIND_Q4_MIN   16     nibbles                            d*q + m                   Q4_1
  KIND_Q4_K     16     nibbles                            D*sc*q - DMIN*mn          Q4_K
  KIND_Q4       16     nibbles                            d*(q - 8)                 Q4_0
  KIND_Q8       32     int8 values                        d*q                       Q8_0 (and requantized types)
  KIND_Q8_LANES 32     int8 values, groups step-major     d*q                       KIND_Q8 on AVX-512 (to_lanes)
  KIND_Q5_MIN   20     nibbles; high bits (see below)     d*q + m                   Q5_1
  KIND_Q5_K     20     nibbles; high bits (see below)     D*sc*q - DMIN*mn          Q5_K
  KIND_Q5       20     nibbles; high bits (see below)     d*(q - 16)                Q5_0
  KIND_Q6       24     nibbles; crumbs (see below)        d*m[half]*(q - 32)        Q6_K
  KIND_Q3       12     crumbs; high bits (see below)      d*m[half]*(q - 4)         Q3_K
  KIND_Q2_K      8     crumbs (see below)                 D*sc[half]*q - DMIN*mn[half]  Q2_K
  KIND_IQ4_NL   16     nibbles                            d*V[q]                    IQ4_NL
  KIND_IQ4_XS   16     nibbles                            D*(ls - 32)*V[q]          IQ4_XS

KIND_Q8_LANES is KIND_Q8 with each row's groups of 16 blocks (and a last group of more than
Q8_LANES_BLOCK_ORDER_MAX blocks) step-major: byte 4Ls + 4l + j of a group of L blocks is byte 4s + j of its block l,
the order the AVX-512 kernel takes a group in (quant_cpu.cpp, lanes_of); a last group of up to
Q8_LANES_BLOCK_ORDER_MAX blocks stays block after block. `to_lanes` makes it at load where the kernels run
AVX-512; d is KIND_Q8's.

KIND_BF16_TILES is KIND_BF16's matrix (N a multiple of 16, K of 32) in the order AMX tiles take it (amx_cpu.cpp):
element (r, i) at ((r//16 * K/32 + i//32) * 16 + i%32//2) * 32 + r%16 * 2 + i%2 of qs, which keeps the (N, K) shape.
`to_tiles` makes it at load where the CPU has AMX-BF16; `from_tiles` is the reference for the order.

V is ggml's table of 16 non-linear values (loader/quants.IQ4_NL_VALUES). KIND_IQ4_XS keeps the file's scales: d
(N, K/256) float16, each super-block's D, and m (N, K/32) uint8, each block's 6-bit scale ls.

The 5-, 6- and 3-bit kinds' rows are not block after block: each group of 16 blocks (fewer in the row's last)
holds one part of every block, then the other (`GROUP_PARTS`, `group_split`, `group_join`). The 5-bit kinds:
16 nibble bytes, then 4 high-bit bytes (bit 4) per block; KIND_Q6: 16 nibble bytes, then 8 crumb bytes, a crumb
being an element's bits 4 and 5; KIND_Q3: 8 crumb bytes (bits 0 and 1), then 4 high-bit bytes (bit 2). Crumb
byte 4c + j holds at bits 2s, 2s+1 those of element 16c + 4s + j; high-bit byte j holds at bit s that of element
4s + j. KIND_Q2_K's 8 crumb bytes (bits 0 and 1) are its whole block, block after block. The AVX-512 kernel's
byte dot products take 4 elements of each of 16
blocks per step (quant_cpu.cpp, avx512::load_across): each part then gives a step's bits with one shift, and a
row stays one sequential stream of bytes.

Float kinds (KIND_BF16, KIND_F16, KIND_F32) are no blocks: qs is the plain (N, K) matrix in its stored type
(HF folders, F16/BF16 GGUFs), d and m are None, and K may be any length. The kernels widen each weight to
float32 (quant_cpu.cpp, "float weights").

Conversions, from a GGUF tensor's raw bytes (whole-tensor torch/numpy operations, no loop over blocks):
- Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q6_K, Q3_K: the same values (exact); Q6_K/Q3_K keep their int8 multipliers per
  16 elements and repeat the super-block's fp16 d for each of its 8 blocks;
- Q2_K: the same values and the file's 2.625 bits a weight (its crumbs regrouped per block, its scale bytes and
  super-block d, dmin as stored); a tensor-parallel cut inside super-blocks becomes 8-bit blocks (as below);
- IQ4_NL, IQ4_XS: the same values (nibbles, d and IQ4_XS's 6-bit scales as stored: 4.5 and 4.3125 bits a weight
  against the file's 4.5 and 4.25); an IQ4_XS cut inside super-blocks becomes KIND_IQ4_NL with each block's
  scale D*(ls - 32) rounded to float16;
- Q4_K, Q5_K: the same values (exact), their 6-bit scales unpacked to a byte each (KIND_Q4_K: 4.625 bits a
  weight against the file's 4.5, KIND_Q5_K 5.625 against 5.5); a tensor-parallel cut inside super-blocks becomes
  per-block scales D*sc and offsets -DMIN*mn rounded to float16 (KIND_Q4_MIN, KIND_Q5_MIN: a relative change of
  at most 2^-11 per term, far inside 4-bit rounding);
- F16, BF16, F32: the float kind of the same type (the values as stored);
- every other type loader/quants decodes (the other IQ types, TQ1_0, TQ2_0, MXFP4: through gguf-py): dequantized,
  then quantized to 8 bits per block of 32 (scale max|w|/127), an error of at most half a step, max|w|/254,
  per weight. The same 8-bit blocks are what a model computes the kinds in quantize.requantized_kinds() as.

Quantization of float weights at load (`quantize`: q8_0, q4_0, q4_1) follows ggml's reference recipes
(quantize_row_q8_0/q4_0/q4_1_ref), as whole-matrix torch operations.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..loader.quants import (
    IQ4_NL_VALUES,
    block_fields,
    dequantize,
    iq4_xs_scales,
    k_scales_mins,
    q3_k_scales,
    run_bits,
    type_layout,
)
from . import kernels

(KIND_Q4_MIN, KIND_Q4, KIND_Q8, KIND_Q5_MIN, KIND_Q5, KIND_Q6, KIND_Q3, KIND_BF16, KIND_F16, KIND_F32,
 KIND_Q4_K, KIND_Q5_K, KIND_Q2_K, KIND_IQ4_NL, KIND_IQ4_XS, KIND_Q8_LANES, KIND_BF16_TILES) = range(17)
KIND_NAMES = {KIND_Q4_MIN: "4-bit blocks with offsets", KIND_Q4: "4-bit blocks", KIND_Q8: "8-bit blocks",
              KIND_Q8_LANES: "8-bit blocks, 16 across lanes",
              KIND_Q4_K: "4-bit blocks with Q4_K's scales", KIND_Q5_K: "5-bit blocks with Q5_K's scales",
              KIND_Q5_MIN: "5-bit blocks with offsets", KIND_Q5: "5-bit blocks",
              KIND_Q6: "6-bit blocks with multipliers per 16", KIND_Q3: "3-bit blocks with multipliers per 16",
              KIND_Q2_K: "2-bit blocks with Q2_K's scales", KIND_IQ4_NL: "4-bit non-linear blocks",
              KIND_IQ4_XS: "4-bit non-linear blocks with IQ4_XS's scales",
              KIND_BF16: "bfloat16", KIND_F16: "float16", KIND_F32: "float32",
              KIND_BF16_TILES: "bfloat16 in AMX tiles"}
FLOAT_KINDS = {torch.bfloat16: KIND_BF16, torch.float16: KIND_F16, torch.float32: KIND_F32}  # dtype -> kind
_FLOAT_DTYPES = {kind: dtype for dtype, kind in FLOAT_KINDS.items()}
BLOCK_BYTES = {KIND_Q4_MIN: 16, KIND_Q4_K: 16, KIND_Q4: 16, KIND_Q8: 32, KIND_Q8_LANES: 32, KIND_Q5_MIN: 20,
               KIND_Q5: 20, KIND_Q5_K: 20, KIND_Q6: 24, KIND_Q3: 12, KIND_Q2_K: 8, KIND_IQ4_NL: 16, KIND_IQ4_XS: 16}
_OFFSETS = (KIND_Q4_MIN, KIND_Q5_MIN)  # m: float16 offset per block
_MULTIPLIERS = (KIND_Q6, KIND_Q3)  # m: int8 multiplier per 16 elements
# kinds kept in groups of 16 blocks: the bytes of each part
GROUP_PARTS = {KIND_Q5_MIN: (16, 4), KIND_Q5: (16, 4), KIND_Q5_K: (16, 4), KIND_Q6: (16, 8), KIND_Q3: (8, 4)}
# kinds with the K-quants' scales -> the per-block kind a cut inside super-blocks takes
_SUPER_SCALES = {KIND_Q4_K: KIND_Q4_MIN, KIND_Q5_K: KIND_Q5_MIN, KIND_Q2_K: KIND_Q8}
_EIGHT_BIT = (KIND_Q8, KIND_Q8_LANES)  # qs: (N, K) int8
# A row's last group of up to this many blocks stays in block order in KIND_Q8_LANES (quant_cpu.cpp TAIL_ALONE_MAX:
# such a group is computed a block at a time, not across lanes).
Q8_LANES_BLOCK_ORDER_MAX = 6
_ZERO = {KIND_Q4: 8, KIND_Q5: 16, KIND_Q6: 32, KIND_Q3: 4}  # implicit zero points
_F32, _F16, _Q4_0, _Q4_1, _Q5_0, _Q5_1, _Q8_0, _Q2_K, _Q3_K, _Q4_K, _Q5_K, _Q6_K, _IQ4_NL, _IQ4_XS, _BF16 = (
    0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 20, 23, 30)
_GGML_FLOATS = {_F32: KIND_F32, _F16: KIND_F16, _BF16: KIND_BF16}
_KIND_OF = {_Q4_0: KIND_Q4, _Q4_1: KIND_Q4_MIN, _Q5_0: KIND_Q5, _Q5_1: KIND_Q5_MIN, _Q8_0: KIND_Q8,
            _Q2_K: KIND_Q2_K, _Q3_K: KIND_Q3, _Q4_K: KIND_Q4_K, _Q5_K: KIND_Q5_K, _Q6_K: KIND_Q6, _IQ4_NL: KIND_IQ4_NL,
            _IQ4_XS: KIND_IQ4_XS}


@dataclass
class Blocks:
    """One weight matrix (out_features, in_features) in split-block layout."""

    qs: torch.Tensor
    d: torch.Tensor | None  # None for the float kinds
    m: torch.Tensor | None
    kind: int
    shape: tuple[int, int]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.qs, self.d, self.m) if t is not None]

    def rows(self, index: torch.Tensor) -> Blocks:
        """The rows at `index` (a permutation or a lookup), as a new Blocks (a tiled matrix's as plain bf16)."""
        if self.kind == KIND_BF16_TILES:
            return float_blocks(kernels().bf16_tile_rows(self.qs, index.reshape(-1).long()))
        return Blocks(self.qs[index], None if self.d is None else self.d[index],
                      None if self.m is None else self.m[index], self.kind, (int(index.numel()), self.shape[1]))

    def columns(self, start: int, end: int) -> Blocks:
        """Input columns start..end-1 as a new Blocks (contiguous copies): a tensor-parallel rank's part of a
        row-parallel matrix. Block kinds are cut between whole blocks of 32 (qs, d and per-block offsets by
        block; Q6_K/Q3_K's multipliers per 16 elements); a float kind anywhere."""
        n, k = self.shape
        if self.kind == KIND_BF16_TILES:  # as plain bf16
            return from_tiles(self).columns(start, end)
        if is_float_kind(self.kind):
            return Blocks(self.qs[:, start:end].contiguous(), None, None, self.kind, (n, end - start))
        if self.kind == KIND_Q8_LANES:  # its groups start again at the cut's first block
            return to_lanes(from_lanes(self).columns(start, end))
        if self.kind in (*_SUPER_SCALES, KIND_IQ4_XS) and (start % 256 or end % 256):  # blocks' own scales
            return per_block_scales(self).columns(start, end)
        if start % 32 or end % 32 or not 0 <= start <= end <= k:
            raise ValueError(f"columns {start}..{end - 1} of a {k}-column matrix do not fall on 32-element blocks")
        b0, b1 = start // 32, end // 32
        per_block = self.qs.shape[1] // (k // 32)  # bytes of one block (int8 values of the 8-bit kind)
        qs = self.qs[:, b0 * per_block:b1 * per_block]
        if self.kind in GROUP_PARTS:  # regrouped from the cut's first block
            parts = [p[:, b0:b1] for p in group_split(self.qs, k // 32, GROUP_PARTS[self.kind])]
            qs = group_join(parts, torch.empty(n, (b1 - b0) * per_block, dtype=torch.uint8))
        m, d = self.m, self.d[:, b0:b1]
        if self.kind in _SUPER_SCALES:  # whole super-blocks: d and dmin of each, scale and min of each block
            d = self.d[:, start // 128:end // 128]
        if self.kind == KIND_IQ4_XS:  # whole super-blocks: d of each, a scale per block
            d = self.d[:, start // 256:end // 256]
        if m is not None:
            m = m[:, start // 16:end // 16] if self.kind in (*_MULTIPLIERS, *_SUPER_SCALES) else m[:, b0:b1]
            m = m.contiguous()
        return Blocks(qs.contiguous(), d.contiguous(), m, self.kind, (n, end - start))

    @staticmethod
    def cat(parts: list[Blocks]) -> Blocks:
        """Stack matrices with the same kind and in_features along the output dimension (fused q/k/v)."""
        kind, k = parts[0].kind, parts[0].shape[1]
        if any(p.kind != kind or p.shape[1] != k for p in parts):
            raise ValueError("only blocks of one kind and width can be stacked")
        d = None if parts[0].d is None else torch.cat([p.d for p in parts])
        m = None if parts[0].m is None else torch.cat([p.m for p in parts])
        return Blocks(torch.cat([p.qs for p in parts]), d, m, kind,
                      (sum(p.shape[0] for p in parts), k))


def per_block_scales(blocks: Blocks) -> Blocks:
    """KIND_Q4_K (KIND_Q5_K) blocks as KIND_Q4_MIN (KIND_Q5_MIN) ones: each block's scale D*sc and offset -DMIN*mn
    rounded to float16; the values stay as they are. KIND_IQ4_XS becomes KIND_IQ4_NL, each block's scale
    D*(ls - 32) rounded to float16. KIND_Q2_K's halves have scales and mins of their own, which no per-block kind
    keeps: its blocks become 8-bit ones (quantize_q8 of its values)."""
    if blocks.kind == KIND_Q2_K:
        return quantize_q8(dequantize_blocks(blocks))
    if blocks.kind == KIND_IQ4_XS:  # KIND_IQ4_NL with each block's D*(ls - 32)
        return Blocks(blocks.qs, _iq4_xs_block_scales(blocks).half(), None, KIND_IQ4_NL, blocks.shape)
    scale, offset = _super_block_scales(blocks)
    return Blocks(blocks.qs, scale.half(), offset.half(), _SUPER_SCALES[blocks.kind], blocks.shape)


def _super_block_scales(blocks: Blocks) -> tuple[torch.Tensor, torch.Tensor]:
    """KIND_Q4_K's or KIND_Q5_K's per-block scale D*sc and offset -DMIN*mn, (n, nb) float32 each (exact
    products); KIND_Q2_K's per half, (n, nb, 2) each."""
    n, nb = blocks.shape[0], blocks.shape[1] // 32
    super_scales = blocks.d.float().view(n, nb // 8, 1, 2).expand(n, nb // 8, 8, 2).reshape(n, nb, 2)
    if blocks.kind == KIND_Q2_K:
        sub = blocks.m.view(n, nb, 2)
        return (super_scales[..., :1] * (sub & 0x0F).float(), -(super_scales[..., 1:] * (sub >> 4).float()))
    sub = blocks.m.view(n, nb, 2).float()
    return super_scales[..., 0] * sub[..., 0], -(super_scales[..., 1] * sub[..., 1])


def _iq4_xs_block_scales(blocks: Blocks) -> torch.Tensor:
    """KIND_IQ4_XS's per-block scale D*(ls - 32), (n, nb) float32 (exact products)."""
    return blocks.d.float().repeat_interleave(8, dim=1) * (blocks.m.float() - 32)


def group_split(qs: torch.Tensor, nb: int, widths: tuple[int, int]) -> list[torch.Tensor]:
    """A grouped kind's qs (n, nb * sum(widths)) -> each block's two parts, (n, nb, widths[0]) and
    (n, nb, widths[1])."""
    n, full, size = qs.shape[0], nb // 16, sum(widths)
    groups = qs[:, :full * 16 * size].reshape(n, full, 16 * size)
    tail = qs[:, full * 16 * size:]
    left = nb - 16 * full
    parts, at = [], 0
    for w in widths:
        parts.append(torch.cat([groups[:, :, 16 * at:16 * (at + w)].reshape(n, -1, w),
                                tail[:, left * at:left * (at + w)].reshape(n, -1, w)], dim=1))
        at += w
    return parts


def group_join(parts: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """Each block's two parts, (n, nb, w0) and (n, nb, w1) -> `out` (n, nb * (w0 + w1)), in groups of 16 blocks."""
    n, nb = parts[0].shape[:2]
    full, size = nb // 16, sum(p.shape[2] for p in parts)
    groups = out[:, :full * 16 * size].view(n, full, 16 * size)
    tail = out[:, full * 16 * size:]
    left, at = nb - 16 * full, 0
    for p in parts:
        w = p.shape[2]
        groups[:, :, 16 * at:16 * (at + w)] = p[:, :16 * full].reshape(n, full, 16 * w)
        tail[:, left * at:left * (at + w)] = p[:, 16 * full:].reshape(n, left * w)
        at += w
    return out


def float_blocks(w: torch.Tensor) -> Blocks:
    """A bfloat16, float16 or float32 matrix (N, K) as the float kind of its dtype (no copy if contiguous)."""
    return Blocks(w.contiguous(), None, None, FLOAT_KINDS[w.dtype], tuple(w.shape))


def is_float_kind(kind: int) -> bool:
    return kind in _FLOAT_DTYPES


def kind_for(ggml_type: int) -> int:
    """The block (or float) kind a ggml type converts to."""
    return _GGML_FLOATS.get(ggml_type, _KIND_OF.get(ggml_type, KIND_Q8))


def blocks_nbytes(ggml_type: int, shape: tuple[int, ...]) -> list[int]:
    """Bytes of each tensor (qs, d, and m when the kind has one) a matrix of this type converts to."""
    n, k = (int(s) for s in shape)
    return [math.prod(size) * dtype.itemsize for size, dtype in field_specs(kind_for(ggml_type), n, k).values()]


def field_specs(kind: int, n: int, k: int) -> dict[str, tuple[tuple[int, int], torch.dtype]]:
    """The (shape, dtype) of each tensor of an (n, k) matrix in `kind`'s layout: qs, and d and m where it has them."""
    if is_float_kind(kind):
        return {"qs": ((n, k), _FLOAT_DTYPES[kind])}
    nb = k // 32
    specs = {"qs": ((n, nb * BLOCK_BYTES[kind]) if kind not in _EIGHT_BIT else (n, k),
                    torch.int8 if kind in _EIGHT_BIT else torch.uint8), "d": ((n, nb), torch.float16)}
    if kind in _SUPER_SCALES:
        specs["d"], specs["m"] = ((n, k // 128), torch.float16), ((n, nb * 2), torch.uint8)
    elif kind == KIND_IQ4_XS:
        specs["d"], specs["m"] = ((n, k // 256), torch.float16), ((n, nb), torch.uint8)
    elif kind in _OFFSETS:
        specs["m"] = ((n, nb), torch.float16)
    elif kind in _MULTIPLIERS:
        specs["m"] = ((n, k // 16), torch.int8)
    return specs


def new_tensor(field: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The default `alloc` of from_ggml and q8_by_rows: a fresh tensor. (`field` is qs, d or m: an allocator
    that places each field of a fused matrix in its own run of rows, as quantize._Arena does, needs it.)"""
    return torch.empty(shape, dtype=dtype)


def _fill(alloc, field: str, src: torch.Tensor) -> torch.Tensor:
    out = alloc(field, tuple(src.shape), src.dtype)
    out.copy_(src)
    return out


def _fill_bytes(alloc, field: str, shape: tuple[int, int], dtype: torch.dtype, *parts: np.ndarray) -> torch.Tensor:
    """A new (shape, dtype) tensor from `alloc` whose bytes, block by block, are `parts` side by side: each part a
    (n_blocks, width) uint8 array of the file's fields (strided views of the map), copied once, straight in."""
    out = alloc(field, shape, dtype)
    rows = parts[0].shape[0]
    dst = out.view(torch.uint8).numpy().reshape(rows, -1)
    at = 0
    for part in parts:
        np.copyto(dst[:, at:at + part.shape[1]], part)
        at += part.shape[1]
    return out


def from_ggml(raw: np.ndarray | torch.Tensor, ggml_type: int, shape: tuple[int, int], alloc=new_tensor) -> Blocks:
    """Blocks for a 2-D tensor of PyTorch shape (N, K) from its ggml bytes (K must be a multiple of 32). Each
    resulting tensor comes from `alloc(field, shape, dtype)` (default: a new one), and the file's fields are
    copied into it once: `alloc` may hand out views of a preallocated buffer (quantize._Arena)."""
    n, k = (int(s) for s in shape)
    data = _bytes(raw)
    if ggml_type in _GGML_FLOATS:  # the values as stored, copied out of the file
        return float_blocks(_fill(alloc, "qs", data.view(_FLOAT_DTYPES[_GGML_FLOATS[ggml_type]]).reshape(n, k)))
    if k % 32:
        raise ValueError(f"in_features {k} is not a multiple of 32")
    if ggml_type not in _KIND_OF:
        return refill(quantize_q8(dequantize(raw, ggml_type, (n, k))), alloc)
    nb = k // 32
    kind = _KIND_OF[ggml_type]
    specs = field_specs(kind, n, k)
    if ggml_type in _CONVERT_K:
        fields = block_fields(data.view(-1, type_layout(ggml_type)[1]), ggml_type)  # (n_blocks, width) views
        qs, d, m = _CONVERT_K[ggml_type](fields)  # (n*k/256, 8, bytes), (n*k/256, 8), m per super-block
        if kind in GROUP_PARTS:
            out = group_join([p.reshape(n, nb, -1) for p in qs], alloc("qs", *specs["qs"]))
        else:
            out = _fill(alloc, "qs", qs.reshape(specs["qs"][0]))
        return Blocks(out, _fill(alloc, "d", d.reshape(specs["d"][0])), _fill(alloc, "m", m.reshape(specs["m"][0])),
                      kind, (n, k))
    # 32-element types: fields only moved apart (qs: ggml's order already), by numpy (it copies these narrow
    # strided fields ~20x faster than torch does); the 5-bit ones' qh becomes high-bit bytes, grouped.
    f = block_fields(data.numpy().reshape(-1, type_layout(ggml_type)[1]), ggml_type)  # (n_blocks, width) views
    d = _fill_bytes(alloc, "d", *specs["d"], f["d"])
    m = _fill_bytes(alloc, "m", *specs["m"], f["m"]) if "m" in f else None
    if kind in GROUP_PARTS:
        parts = [torch.from_numpy(f["qs"]), _plane_high_bits(f["qh"])]
        qs = group_join([p.reshape(n, nb, -1) for p in parts], alloc("qs", *specs["qs"]))
    else:
        qs = _fill_bytes(alloc, "qs", *specs["qs"], f["qs"])
    return Blocks(qs, d, m, kind, (n, k))


def refill(blocks: Blocks, alloc) -> Blocks:
    """`blocks` with each tensor copied into one from `alloc` (itself when alloc is the default)."""
    if alloc is new_tensor:
        return blocks
    return Blocks(*(None if t is None else _fill(alloc, name, t) for name, t in
                    (("qs", blocks.qs), ("d", blocks.d), ("m", blocks.m))), blocks.kind, blocks.shape)


def _bytes(raw: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A tensor's raw bytes as a uint8 torch tensor (a view: callers copy out of it)."""
    if not isinstance(raw, np.ndarray):
        return raw
    with warnings.catch_warnings():  # a read-only view of the file: every caller copies out of it
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(raw, dtype=torch.uint8) if raw.size else torch.empty(0, dtype=torch.uint8)


def f16_bits(field: torch.Tensor) -> torch.Tensor:
    """A 2-byte fp16 field (n_blocks, 2) as a float16 tensor (n_blocks,), bits unchanged."""
    return field.contiguous().view(torch.float16).view(-1)


def _pack_nibble_runs(packed: torch.Tensor, run: int) -> torch.Tensor:
    """K-quant nibble runs -> (n, sub-blocks, 16) bytes in ggml's Q4_0 order (element j low, j+16 high).

    packed (n, runs*run) holds, per run of `run` bytes, elements 0..run-1 in its low nibbles and run..2run-1 in
    its high ones (`nibbles`); the same result as packing `nibbles(packed, runs)` pairwise, with byte-wide
    operations instead of one byte per element.
    """
    n = packed.shape[0]
    k = kernels(quiet=True)
    if k is not None and packed.stride(-1) == 1:  # the same bytes in one pass (quant_cpu.cpp)
        return k.pack_nibble_runs(packed, run)
    r = packed.reshape(n, -1, run // 32, 2, 16)  # (n, runs, sub-blocks per nibble half, bytes 0-15 | 16-31, 16)
    a, b = r[:, :, :, 0], r[:, :, :, 1]  # the bytes of elements j and j+16 of each sub-block
    low = (a & 0x0F) | (b << 4)  # uint8 shifts drop the bits pushed out
    high = (a >> 4) | (b & 0xF0)
    return torch.stack([low, high], dim=2).reshape(n, -1, 16)  # low-nibble sub-blocks of a run first


def _planes(bits: np.ndarray) -> torch.Tensor:
    """run_bits output (n, runs, 8, 4) -> torch (n, runs*8, 4) bit planes, one row per (run, bit position)."""
    n = bits.shape[0]
    return torch.from_numpy(bits.reshape(n, -1, 4))


def _convert_q4_k(f: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """-> nibbles (n, 8, 16), (D, DMIN) (n, 2) float16, (sc, mn) per sub-block (n, 8, 2) uint8."""
    scales, mins = k_scales_mins(f["scales"])
    super_scales = torch.cat([f["d"], f["dmin"]], dim=1).contiguous().view(torch.float16)
    return _pack_nibble_runs(f["qs"], 32), super_scales, torch.stack([scales, mins], dim=2).to(torch.uint8)


def _convert_q5_k(f: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """-> (nibbles (n, 8, 16), high bits (n, 8, 4)) per super-block (from_ggml groups them), (D, DMIN) (n, 2)
    float16, (sc, mn) per sub-block (n, 8, 2) uint8: Q4_K's nibbles and scales at Q5_K's offsets."""
    nibbles, super_scales, sub = _convert_q4_k(f)
    planes = _planes(run_bits(f["qh"]))  # (n, 8, 4): bit s of the 32 bytes is sub-block s's fifth bit
    high = _plane_high_bits(planes.reshape(-1, 4).numpy()).view(planes.shape)
    return (nibbles, high), super_scales, sub


def _transpose_fields(words: torch.Tensor, swaps: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """Each integer as a square matrix of bit fields, transposed by swapping fields `delta` bits apart under
    `mask`, for each (delta, mask) of `swaps` (Hacker's Delight, 7-3)."""
    for delta, mask in swaps:
        t = ((words >> delta) ^ words) & mask
        words = words ^ t ^ (t << delta)
    return words


def _crumbs(runs: torch.Tensor) -> torch.Tensor:
    """K-quant 2-bit fields in runs of 32 bytes (Q6_K qh, Q3_K qs: bits 2t, 2t+1 of byte l belong to element l of
    the run's sub-block t) -> (n, 8, 8) crumb bytes per sub-block (crumb byte 4c + j holds at bits 2s those of
    element 16c + 4s + j). For each (run h, c, j), the bytes l = 16c + 4s + j (s = 0..3) as one int32 hold field
    (s, t) at bit 8s + 2t; its transpose holds, in byte t, that crumb byte of sub-block t. The kernels do it in one
    pass where they are built (quant_cpu.cpp, `crumbs`; the torch version was 60% of a 1B Q2_K file's load)."""
    n = runs.shape[0]
    k = kernels(quiet=True)
    if k is not None and runs.stride(-1) == 1:
        return k.crumbs(runs)
    words = runs.reshape(n, 2, 2, 4, 4).transpose(3, 4).contiguous().view(torch.int32)  # (n, h, c, j)
    crumbs = _transpose_fields(words, ((12, 0x0000F0F0), (6, 0x00CC00CC))).view(torch.uint8).view(n, 2, 2, 4, 4)
    return crumbs.permute(0, 1, 4, 2, 3).reshape(n, 8, 8)  # (n, sub-block 4h + t, byte 4c + j)


# The swaps that transpose an 8 x 8 bit matrix held in an int64, byte r = row r (Hacker's Delight, 7-3).
_TRANSPOSE_8X8 = ((7, 0x00AA00AA00AA00AA), (14, 0x0000CCCC0000CCCC), (28, 0x00000000F0F0F0F0))


def _high_bits(mask: torch.Tensor) -> torch.Tensor:
    """Q3_K's hmask (n, 32) (bit s of byte l: element l of sub-block s) -> (n, 8, 4) high-bit bytes per sub-block
    (byte j holds at bit s that of element 4s + j). For each j, the bytes l = 4s + j (s = 0..7) as one int64
    hold bit (s, t) at 8s + t; its transpose holds, in byte t, that byte of sub-block t."""
    n = mask.shape[0]
    words = mask.reshape(n, 8, 4).transpose(1, 2).contiguous().view(torch.int64)  # (n, j)
    bits = _transpose_fields(words, _TRANSPOSE_8X8)
    return bits.view(torch.uint8).view(n, 4, 8).transpose(1, 2)  # (n, sub-block t, byte j)


def _plane_high_bits(plane: np.ndarray) -> torch.Tensor:
    """Bit planes (n, 4) uint8 (a little-endian uint32 whose bit e belongs to element e, as ggml's qh) -> (n, 4)
    high-bit bytes (byte j holds at bit s that of element 4s + j). Element 4s + j is bit j of nibble s; with
    nibble s spread to byte s, each plane is an 8 x 8 bit matrix whose transpose holds, in byte j, bits s."""
    n = plane.shape[0]
    k = kernels(quiet=True)
    if k is not None and plane.strides[1] == 1:  # the same bytes in one pass (quant_cpu.cpp)
        return k.high_bits(torch.from_numpy(plane))
    nibbles = np.stack([plane & 0x0F, plane >> 4], axis=-1)  # (n, 4, 2): byte i's low and high nibble
    words = torch.from_numpy(np.ascontiguousarray(nibbles).reshape(n, 8).view(np.int64).reshape(n))  # byte s: nibble s
    return _transpose_fields(words, _TRANSPOSE_8X8).view(torch.uint8).view(n, 8)[:, :4]


def _convert_q6_k(f: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """-> (nibbles (n, 8, 16), crumbs (n, 8, 8)) per super-block (from_ggml groups them), d, multipliers."""
    n = f["d"].shape[0]
    d = f16_bits(f["d"]).view(n, 1).expand(n, 8)
    return (_pack_nibble_runs(f["ql"], 64), _crumbs(f["qh"])), d, f["scales"].contiguous().view(torch.int8)


def _convert_q2_k(f: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """-> crumbs (n, 8, 8) per super-block, (D, DMIN) (n, 2) float16, the 16 scale bytes (n, 16) uint8 as stored
    (one per 16 elements: scale in the low nibble, min in the high one). Q2_K's qs are Q3_K's crumb runs."""
    super_scales = torch.cat([f["d"], f["dmin"]], dim=1).contiguous().view(torch.float16)
    return _crumbs(f["qs"]), super_scales, f["scales"]


def _convert_q3_k(f: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """-> (crumbs (n, 8, 8), high bits (n, 8, 4)) per super-block (from_ggml groups them), d, multipliers. ggml's
    set high bit means +4 over the stored value - 4: q = low bits + 4 * high bit, zero point 4."""
    n = f["d"].shape[0]
    d = f16_bits(f["d"]).view(n, 1).expand(n, 8)
    return (_crumbs(f["qs"]), _high_bits(f["hmask"])), d, q3_k_scales(f["scales"])


def _convert_iq4_xs(f: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """-> nibbles (n, 8, 16) (already Q4_0's order per sub-block), D (n, 1) float16, the 6-bit scales (n, 8)
    uint8."""
    n = f["d"].shape[0]
    return f["qs"].reshape(n, 8, 16), f16_bits(f["d"]).view(n, 1), iq4_xs_scales(f["scales_h"], f["scales_l"])


_CONVERT_K = {_Q4_K: _convert_q4_k, _Q5_K: _convert_q5_k, _Q6_K: _convert_q6_k, _Q3_K: _convert_q3_k,
              _Q2_K: _convert_q2_k, _IQ4_XS: _convert_iq4_xs}


# Rows converted at a time when a whole matrix would need a float32 copy: ~16 MB of float32 for K = 896 (a 151k x
# 896 embedding at once is 545 MB, which set the peak RSS of loading a 0.5B file).
CHUNK_ELEMENTS = 1 << 22


def _lane_groups(nb: int) -> list[tuple[int, int]]:
    """(first block, blocks) of each group of a KIND_Q8_LANES row of nb blocks that is step-major."""
    groups = [(g, min(16, nb - g)) for g in range(0, nb, 16)]
    return [(g, size) for g, size in groups if size > Q8_LANES_BLOCK_ORDER_MAX]


def to_lanes(blocks: Blocks) -> Blocks:
    """KIND_Q8 blocks as KIND_Q8_LANES, their qs reordered in place (the kernels' q8_lanes); d shared."""
    if blocks.kind != KIND_Q8:
        raise ValueError(f"only 8-bit blocks go across lanes, not {KIND_NAMES[blocks.kind]}")
    kernels().q8_lanes(blocks.qs)
    return Blocks(blocks.qs, blocks.d, None, KIND_Q8_LANES, blocks.shape)


def from_lanes(blocks: Blocks) -> Blocks:
    """KIND_Q8_LANES blocks as KIND_Q8 (a new qs in block order), in torch: the reference for the kernels' order."""
    n, k = blocks.shape
    qs = blocks.qs.clone()
    for g, size in _lane_groups(k // 32):
        part = blocks.qs[:, 32 * g:32 * (g + size)].reshape(n, 8, size, 4)  # (row, step, block, byte)
        qs[:, 32 * g:32 * (g + size)] = part.transpose(1, 2).reshape(n, 32 * size)
    return Blocks(qs, blocks.d, None, KIND_Q8, blocks.shape)


def tileable(blocks: Blocks) -> bool:
    """Whether `to_tiles` takes this matrix: bf16 with N a multiple of 16 and K of 32."""
    n, k = blocks.shape
    return blocks.kind == KIND_BF16 and n % 16 == 0 and k % 32 == 0


def to_tiles(blocks: Blocks) -> Blocks:
    """A KIND_BF16 matrix as KIND_BF16_TILES, its qs reordered in place (the kernels' bf16_tiles)."""
    if not tileable(blocks):
        raise ValueError(f"only bf16 matrices with N % 16 == 0 and K % 32 == 0 take AMX tiles, not "
                         f"{KIND_NAMES[blocks.kind]} {blocks.shape}")
    kernels().bf16_tiles(blocks.qs)
    return Blocks(blocks.qs, None, None, KIND_BF16_TILES, blocks.shape)


def from_tiles(blocks: Blocks) -> Blocks:
    """KIND_BF16_TILES as KIND_BF16 (a new qs in row order), in torch: the reference for the kernels' order."""
    n, k = blocks.shape
    tiles = blocks.qs.reshape(n // 16, k // 32, 16, 16, 2)  # (column block, tile, pair p, output c, 2)
    return float_blocks(tiles.permute(0, 3, 1, 2, 4).reshape(n, k))


def quantize_q8(w: torch.Tensor) -> Blocks:
    """Float weights (N, K) -> 8-bit blocks of 32: scale max|w|/127 rounded to float16, q = round(w/scale).
    The C++ kernels do it in one pass where they are built (a chunk of rows at a time, so a bf16 matrix never
    exists whole in float32), bit for bit as quantize_q8_torch."""
    if w.device.type != "cpu" or kernels(quiet=True) is None:
        return quantize_q8_torch(w)
    return q8_by_rows(w.shape, lambda r0, r1: w[r0:r1].float())


def q8_by_rows(shape: tuple[int, int], rows, alloc=new_tensor) -> Blocks:
    """8-bit blocks of an (N, K) matrix whose float32 rows r0..r1-1 `rows(r0, r1)` gives, a chunk at a time (C++
    kernels only), into tensors from `alloc` (see from_ggml)."""
    n, k = shape
    qs, d = alloc("qs", (n, k), torch.int8), alloc("d", (n, k // 32), torch.float16)
    step = max(1, CHUNK_ELEMENTS // max(k, 1))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        qs[r0:r1], d[r0:r1] = kernels().quantize_q8(rows(r0, r1))
    return Blocks(qs, d, None, KIND_Q8, (n, k))


def quantize_q8_torch(w: torch.Tensor) -> Blocks:
    """quantize_q8 as whole-tensor torch operations (six passes over the weights)."""
    n, k = w.shape
    blocks = w.float().reshape(n, k // 32, 32)
    d = (blocks.abs().amax(-1) / 127.0).half()
    inv = torch.where(d.float() > 0, 1.0 / d.float(), torch.zeros((), dtype=torch.float32))
    q = torch.round(blocks * inv[..., None]).clamp(-127, 127).to(torch.int8)
    return Blocks(q.view(n, k), d, None, KIND_Q8, (n, k))


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """1/d, and 0 where d is 0 (an all-zero block quantizes to zeros)."""
    return torch.where(d != 0, 1.0 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(n, nb, 32) values 0..15 -> (n, nb * 16) bytes: byte j holds element j (low) and j + 16 (high)."""
    q = q.to(torch.uint8)
    return (q[..., :16] | (q[..., 16:] << 4)).reshape(q.shape[0], -1)


def quantize_q4_0(w: torch.Tensor) -> Blocks:
    """Float weights (N, K) -> ggml Q4_0 blocks of 32: d = (the value of largest magnitude) / -8, so that value
    maps to q = 0 exactly, and q = min(15, floor(w/d + 8.5))."""
    n, k = w.shape
    blocks = w.float().reshape(n, k // 32, 32)
    at = blocks.abs().argmax(-1, keepdim=True)  # the first of equal magnitudes, as ggml's loop keeps
    d = blocks.gather(-1, at)[..., 0] / -8.0  # (n, nb)
    q = torch.floor(blocks * _inverse(d)[..., None] + 8.5).clamp(0, 15)
    return Blocks(_pack_nibbles(q), d.half(), None, KIND_Q4, (n, k))


def quantize_q4_1(w: torch.Tensor) -> Blocks:
    """Float weights (N, K) -> ggml Q4_1 blocks of 32: offset m = min, d = (max - min) / 15,
    q = min(15, floor((w - min)/d + 0.5)); a weight is d*q + m."""
    n, k = w.shape
    blocks = w.float().reshape(n, k // 32, 32)
    lo, hi = blocks.amin(-1), blocks.amax(-1)  # (n, nb)
    d = (hi - lo) / 15.0
    q = torch.floor((blocks - lo[..., None]) * _inverse(d)[..., None] + 0.5).clamp(0, 15)
    return Blocks(_pack_nibbles(q), d.half(), lo.half(), KIND_Q4_MIN, (n, k))


QUANTIZERS = {"q8_0": quantize_q8, "q4_0": quantize_q4_0, "q4_1": quantize_q4_1}  # --quantize choices


def _crumb_values(crumb_bytes: torch.Tensor) -> torch.Tensor:
    """Crumb bytes (n, nb, 8) -> (n, nb, 32) int32 crumbs in element order (byte 4c + j holds at bits 2s those of
    element 16c + 4s + j)."""
    n, nb = crumb_bytes.shape[:2]
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8).view(1, 1, 1, 4, 1)  # s
    return ((crumb_bytes.reshape(n, nb, 2, 1, 4) >> shifts) & 3).reshape(n, nb, 32).int()


def _high_bit_values(high: torch.Tensor) -> torch.Tensor:
    """High-bit bytes (n, nb, 4) -> (n, nb, 32) int32 bits in element order (byte j holds at bit s that of
    element 4s + j)."""
    n, nb = high.shape[:2]
    bits = (high.reshape(n, nb, 1, 4) >> torch.arange(8, dtype=torch.uint8).view(1, 1, 8, 1)) & 1
    return bits.reshape(n, nb, 32).int()


def dequantize_blocks(blocks: Blocks) -> torch.Tensor:
    """The float32 values, computed in torch (the reference the kernels are tested against)."""
    n, k = blocks.shape
    nb, kind = k // 32, blocks.kind
    if is_float_kind(kind):
        return blocks.qs.float()
    if kind == KIND_BF16_TILES:
        return from_tiles(blocks).qs.float()
    if kind in _EIGHT_BIT:
        q = (from_lanes(blocks) if kind == KIND_Q8_LANES else blocks).qs.view(n, nb, 32).float()
        return (q * blocks.d.float()[..., None]).reshape(n, k)
    q = torch.zeros(n, nb, 32, dtype=torch.int32)
    if kind in GROUP_PARTS:
        first, second = group_split(blocks.qs, nb, GROUP_PARTS[kind])
        if kind == KIND_Q3:
            q += _crumb_values(first) + (_high_bit_values(second) << 2)
        else:  # nibbles: elements j, j + 16
            q += torch.cat([first & 0x0F, first >> 4], dim=-1).int()
            q += _crumb_values(second) << 4 if kind == KIND_Q6 else _high_bit_values(second) << 4
    elif kind == KIND_Q2_K:
        q += _crumb_values(blocks.qs.view(n, nb, 8))
    else:
        packed = blocks.qs.view(n, nb, BLOCK_BYTES[kind])
        q += torch.cat([packed & 0x0F, packed >> 4], dim=-1).int()  # (n, nb, 32) in element order
    if kind == KIND_Q2_K:  # each half its own scale and offset
        scale, offset = _super_block_scales(blocks)  # (n, nb, 2)
        halves = q.float().view(n, nb, 2, 16)
        return (halves * scale[..., None] + offset[..., None]).reshape(n, k)
    if kind in _SUPER_SCALES:
        scale, offset = _super_block_scales(blocks)
        return (q.float() * scale[..., None] + offset[..., None]).reshape(n, k)
    if kind in (KIND_IQ4_NL, KIND_IQ4_XS):
        values = torch.tensor(IQ4_NL_VALUES, dtype=torch.float32)[q]
        scale = blocks.d.float() if kind == KIND_IQ4_NL else _iq4_xs_block_scales(blocks)
        return (values * scale[..., None]).reshape(n, k)
    d = blocks.d.float()[..., None]
    if kind in _MULTIPLIERS:
        mult = blocks.m.view(n, nb, 2, 1).float().expand(n, nb, 2, 16).reshape(n, nb, 32)
        return (d * mult * (q - _ZERO[kind]).float()).reshape(n, k)
    m = blocks.m.float()[..., None] if kind in _OFFSETS else -_ZERO[kind] * d
    return (q.float() * d + m).reshape(n, k)
