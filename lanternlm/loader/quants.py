"""Dequantization of ggml tensor data (F32/F16/BF16 and the Q*_0/Q*_1/Q*_K block formats) to float32, in torch.

This is the only place in Lantern that knows ggml block layouts. Every function works on whole tensors at
once (blocks are rows of a 2-D uint8 tensor), with no Python loop over blocks. The arithmetic is the same
float32 operations, in the same order, as gguf-py's reference dequantizer, so results are bit-identical to
`gguf.quants.dequantize`.

The other weight types people download (the IQ family: IQ4_XS, IQ4_NL, IQ3_S, IQ2_XXS, ...; the ternary TQ1_0,
TQ2_0; MXFP4) are decoded by gguf-py itself (`GGUF_PY_TYPES`), in numpy, ~10 ns a weight on this project's VM:
their layouts (lattice grids, sign tables) are data that gguf-py carries and Lantern does not copy.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from lanternlm.errors import LanternError

# Super-block size of the k-quants (ggml's QK_K).
_QK_K = 256

# (block_size in elements, type_size in bytes) of each type this module can dequantize.
# Facts from ggml's block structs; written out here so validation does not depend on a table we also test against.
_SUPPORTED_LAYOUTS: dict[int, tuple[int, int]] = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    30: (1, 2),  # BF16
    2: (32, 2 + 16),  # Q4_0: f16 d, 16 bytes of nibbles
    3: (32, 2 + 2 + 16),  # Q4_1: f16 d, f16 m, 16 bytes of nibbles
    6: (32, 2 + 4 + 16),  # Q5_0: f16 d, 32 high bits, 16 bytes of nibbles
    7: (32, 2 + 2 + 4 + 16),  # Q5_1: f16 d, f16 m, 32 high bits, 16 bytes of nibbles
    8: (32, 2 + 32),  # Q8_0: f16 d, 32 int8
    10: (_QK_K, 16 + 64 + 2 + 2),  # Q2_K: scales, 2-bit quants, f16 d, f16 dmin
    11: (_QK_K, 32 + 64 + 12 + 2),  # Q3_K: high-bit mask, 2-bit quants, 6-bit scales, f16 d
    12: (_QK_K, 2 + 2 + 12 + 128),  # Q4_K: f16 d, f16 dmin, 6-bit scales/mins, nibbles
    13: (_QK_K, 2 + 2 + 12 + 32 + 128),  # Q5_K: f16 d, f16 dmin, scales/mins, high bits, nibbles
    14: (_QK_K, 128 + 64 + 16 + 2),  # Q6_K: low nibbles, high 2 bits, int8 scales, f16 d
}

# The types gguf-py decodes for us (see the docstring), by name: those this gguf-py version knows.
GGUF_PY_TYPES: frozenset[int] = frozenset(
    int(GGMLQuantizationType[name]) for name in ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S",
                                                 "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4", "NVFP4")
    if name in GGMLQuantizationType.__members__ and hasattr(gguf_quants, name))

# The ggml type ids this module dequantizes (an immutable constant, for callers that want to pre-check a file).
SUPPORTED_TYPES: frozenset[int] = frozenset(_SUPPORTED_LAYOUTS) | GGUF_PY_TYPES


def type_name(ggml_type: int) -> str:
    """ggml's name for a type id (e.g. 3 -> 'Q4_1'), or 'unknown type N' for ids ggml does not define."""
    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"unknown type {ggml_type}"


def type_layout(ggml_type: int) -> tuple[int, int]:
    """(block_size, type_size) of a ggml type: elements per block and bytes per block.

    Covers every type ggml defines (so a file whose tensors we cannot dequantize can still be opened and
    validated); raises LanternError for ids ggml does not define.
    """
    layout = _SUPPORTED_LAYOUTS.get(ggml_type)
    if layout is not None:
        return layout
    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise LanternError(f"unknown ggml tensor type {ggml_type}") from None


def tensor_nbytes(ggml_type: int, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of this type and PyTorch shape occupies; raises LanternError if rows do not fill whole blocks."""
    block_size, type_size = type_layout(ggml_type)
    count = math.prod(shape)
    # ggml quantizes along the fastest dimension (PyTorch's last), so each row must be whole blocks.
    row = shape[-1] if shape else 1
    if row % block_size != 0:
        raise LanternError(
            f"{type_name(ggml_type)} tensor of shape {tuple(shape)} has rows of {row} elements, "
            f"not a multiple of its block size {block_size}"
        )
    return count // block_size * type_size


def dequantize(raw: torch.Tensor | np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Decode a tensor's raw bytes (1-D uint8) of the given ggml type into a new float32 tensor of `shape`.

    Raises LanternError for unsupported types or when the byte count does not match the shape.
    """
    shape = tuple(int(d) for d in shape)
    name = type_name(ggml_type)
    if ggml_type not in SUPPORTED_TYPES:
        supported = ", ".join(sorted(type_name(t) for t in SUPPORTED_TYPES))
        raise LanternError(f"dequantizing {name} is not supported (supported types: {supported})")
    expected = tensor_nbytes(ggml_type, shape)
    data = _owned_bytes(raw, name)
    if data.numel() != expected:
        raise LanternError(f"{name} tensor of shape {shape} needs {expected} bytes, got {data.numel()}")

    block_size, type_size = type_layout(ggml_type)
    if ggml_type in GGUF_PY_TYPES:
        with np.errstate(all="ignore"):  # a block whose scale is inf or NaN decodes to such values, as in ggml
            out = gguf_quants.dequantize(data.numpy().reshape(-1, type_size), GGMLQuantizationType(ggml_type))
        return torch.from_numpy(out).reshape(shape)
    if block_size == 1:
        out = _decode_float(data, ggml_type)
    else:
        blocks = data.view(-1, type_size)  # (n_blocks, type_size)
        out = _BLOCK_DECODERS[ggml_type](blocks)  # (n_blocks, block_size) float32
    return out.reshape(shape)


def _owned_bytes(raw: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    """A fresh, contiguous, writable 1-D uint8 torch copy of `raw`.

    Copying the (compressed) bytes is cheap and means the result never aliases a read-only memory map.
    """
    if isinstance(raw, np.ndarray):
        if raw.dtype != np.uint8 or raw.ndim != 1:
            raise LanternError(f"{name} raw data must be a 1-D uint8 array, got {raw.dtype} with shape {raw.shape}")
        return torch.from_numpy(np.array(raw, copy=True))
    if isinstance(raw, torch.Tensor):
        if raw.dtype != torch.uint8 or raw.dim() != 1:
            raise LanternError(
                f"{name} raw data must be a 1-D uint8 tensor, got {raw.dtype} with shape {tuple(raw.shape)}"
            )
        return raw.detach().to("cpu").contiguous().clone()
    raise LanternError(f"{name} raw data must be a numpy array or torch tensor, got {type(raw).__name__}")


def _decode_float(data: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """F32 / F16 / BF16: reinterpret the little-endian bytes; widening to float32 is exact."""
    if ggml_type == 0:
        return data.view(torch.float32)
    if ggml_type == 1:
        return data.view(torch.float16).float()
    # BF16 is the top half of a float32: place the 16 bits above 16 zero bits.
    return (data.view(torch.int16).to(torch.int32) << 16).view(torch.float32)


# ---- ggml's block fields ----

# Where each field sits inside one block, (start, end) in bytes: facts from ggml's block structs (ggml-common.h).
# d/m/dmin are little-endian fp16; every other field is bytes whose bits the functions below take apart.
BLOCK_FIELDS: dict[int, dict[str, tuple[int, int]]] = {
    2: {"d": (0, 2), "qs": (2, 18)},  # Q4_0
    3: {"d": (0, 2), "m": (2, 4), "qs": (4, 20)},  # Q4_1
    6: {"d": (0, 2), "qh": (2, 6), "qs": (6, 22)},  # Q5_0
    7: {"d": (0, 2), "m": (2, 4), "qh": (4, 8), "qs": (8, 24)},  # Q5_1
    8: {"d": (0, 2), "qs": (2, 34)},  # Q8_0
    10: {"scales": (0, 16), "qs": (16, 80), "d": (80, 82), "dmin": (82, 84)},  # Q2_K
    11: {"hmask": (0, 32), "qs": (32, 96), "scales": (96, 108), "d": (108, 110)},  # Q3_K
    12: {"d": (0, 2), "dmin": (2, 4), "scales": (4, 16), "qs": (16, 144)},  # Q4_K
    13: {"d": (0, 2), "dmin": (2, 4), "scales": (4, 16), "qh": (16, 48), "qs": (48, 176)},  # Q5_K
    14: {"ql": (0, 128), "qh": (128, 192), "scales": (192, 208), "d": (208, 210)},  # Q6_K
    20: {"d": (0, 2), "qs": (2, 18)},  # IQ4_NL
    23: {"d": (0, 2), "scales_h": (2, 4), "scales_l": (4, 8), "qs": (8, 136)},  # IQ4_XS
}


def block_fields(blocks: torch.Tensor | np.ndarray, ggml_type: int) -> dict[str, torch.Tensor | np.ndarray]:
    """The named fields of every block: blocks (n_blocks, type_size) uint8 -> {name: (n_blocks, width) uint8}
    (views; `f16` reads the fp16 ones). The fields' meaning is documented where they are decoded below:

    - Q4_0/Q4_1/Q5_0/Q5_1 `qs`: byte j holds element j in its low nibble and element j+16 in its high one;
      Q5_0/Q5_1 `qh`: a little-endian uint32 whose bit e is the fifth bit of element e (`le_bits`);
    - K-quant 4-bit fields: runs of bytes whose low nibbles are elements in byte order and whose high nibbles
      continue after them (`nibbles`): Q4_K/Q5_K `qs` in runs of 32 bytes (low: sub-block 2r, high: 2r+1),
      Q6_K `ql` in runs of 64 (low: sub-blocks 4h, 4h+1; high: 4h+2, 4h+3);
    - K-quant bit fields (Q5_K/Q6_K `qh`, Q3_K `hmask` and `qs`, Q2_K `qs`): runs of 32 bytes in which bit s
      of byte i belongs to element i of the run's sub-block s (`run_bits` gathers them per sub-block);
    - `scales`: `k_scales_mins` (Q4_K/Q5_K), `q3_k_scales` (Q3_K), int8 per 16 elements (Q6_K), a 4-bit scale
      and min per 16 elements (Q2_K); IQ4_XS: each 32-element sub-block's 6-bit scale, its low 4 bits in
      `scales_l` (a nibble each) and its high 2 bits in `scales_h` (a little-endian uint16, 2 bits each:
      `iq4_xs_scales`);
    - IQ4_NL, IQ4_XS `qs`: nibbles in Q4_0's order per 32 elements, each an index into IQ4_NL_VALUES.
    """
    return {name: blocks[:, a:b] for name, (a, b) in BLOCK_FIELDS[ggml_type].items()}


def f16(field: torch.Tensor) -> torch.Tensor:
    """A 2-byte little-endian fp16 field (n_blocks, 2), widened to float32: (n_blocks, 1)."""
    return field.contiguous().view(torch.float16).float()


def _shifts(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8)


def _split_fields(packed: torch.Tensor, shifts: torch.Tensor, mask: int) -> torch.Tensor:
    """Extract several bit fields from every byte.

    packed (n, groups, width) -> (n, groups, len(shifts), width): field s of byte b is (b >> shifts[s]) & mask.
    The field index sits between group and byte, which is how ggml orders elements (all low fields of a
    group of bytes, then the next field of the same bytes, ...).
    """
    return (packed.unsqueeze(2) >> shifts.view(1, 1, -1, 1)) & mask


def nibbles(packed: torch.Tensor, groups: int) -> torch.Tensor:
    """Low then high nibbles of `groups` runs of bytes: (n, groups*width) uint8 -> (n, groups*2*width) in 0..15."""
    n = packed.shape[0]
    return _split_fields(packed.reshape(n, groups, -1), _shifts(0, 4), 0x0F).reshape(n, -1)


def _bit_planes(packed: torch.Tensor, planes: int) -> torch.Tensor:
    """Bit p of byte i -> element p*width + i: (n, width) uint8 -> (n, planes*width) in 0..1."""
    n = packed.shape[0]
    return _split_fields(packed.reshape(n, 1, -1), _shifts(*range(planes)), 0x01).reshape(n, -1)


def _le_bits(packed: torch.Tensor) -> torch.Tensor:
    """The bits of a little-endian bit string, in order: (n, width) uint8 -> (n, 8*width), bit p of byte i at 8*i + p."""
    n = packed.shape[0]
    return _split_fields(packed.reshape(n, -1, 1), _shifts(*range(8)), 0x01).reshape(n, -1)


# Multiplying the eight bytes' bit 0 (at bits 0, 8, ..., 56) by this puts byte i's bit at bit 56 + i, with
# every other partial product at a distinct position that cannot carry into the top byte.
_GATHER_BITS = np.uint64(0x0102040810204080)


def run_bits(packed: torch.Tensor | np.ndarray) -> np.ndarray:
    """Regroup K-quant bit fields by sub-block: (n, runs*32) uint8, where bit s of byte i in a run is a bit of
    element i of the run's sub-block s, -> (n, runs, 8, 4) uint8: for each run and bit position s, the 32 bits
    of its 32 elements as a little-endian uint32 (bit i = element i). A bit-matrix transpose, 8 bytes at a time."""
    data = packed.numpy() if isinstance(packed, torch.Tensor) else packed
    n = data.shape[0]
    words = np.ascontiguousarray(data).view(np.uint64).reshape(n, -1, 4)  # (n, runs, 4 words of 8 bytes)
    ones = np.uint64(0x0101010101010101)
    out = np.empty((n, words.shape[1], 8, 4), dtype=np.uint8)
    for s in range(8):
        out[:, :, s, :] = (((words >> np.uint64(s)) & ones) * _GATHER_BITS >> np.uint64(56)).astype(np.uint8)
    return out


def k_scales_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit scales and eight 6-bit mins of Q4_K/Q5_K from their 12 packed bytes: two (n, 8) float32.

    Bytes 0-3 hold scales 0-3 (low 6 bits), bytes 4-7 mins 0-3; scales/mins 4-7 take their low 4 bits from
    bytes 8-11 (low/high nibble) and their top 2 bits from the top 2 bits of bytes 0-3 / 4-7.
    """
    lo_sc, lo_min, extra = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat([lo_sc & 0x3F, (extra & 0x0F) | ((lo_sc >> 2) & 0x30)], dim=1)
    mins = torch.cat([lo_min & 0x3F, (extra >> 4) | ((lo_min >> 2) & 0x30)], dim=1)
    return scales.float(), mins.float()


# ggml's kvalues_iq4nl: the value each IQ4_NL/IQ4_XS nibble stands for, times its block's scale.
IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def iq4_xs_scales(scales_h: torch.Tensor, scales_l: torch.Tensor) -> torch.Tensor:
    """IQ4_XS's eight 6-bit sub-block scales (n, 8) uint8 in 0..63 (the scale is d * (ls - 32)), from scales_h
    (n, 2) and scales_l (n, 4)."""
    n = scales_h.shape[0]
    low = _split_fields(scales_l.reshape(n, 4, 1), _shifts(0, 4), 0x0F).reshape(n, 8)  # byte j: scales 2j, 2j+1
    high_bits = scales_h.contiguous().view(torch.int16).reshape(n, 1).int() & 0xFFFF
    high = (high_bits >> torch.arange(0, 16, 2).view(1, 8)) & 3
    return (low.int() | (high << 4)).to(torch.uint8)


def q3_k_scales(packed: torch.Tensor) -> torch.Tensor:
    """Q3_K's sixteen signed 6-bit scales (one per 16 elements) from their 12 packed bytes: (n, 16) int8 in
    -32..31. Low 4 bits from bytes 0..7 (low nibbles then high nibbles), high 2 bits from bytes 8..11 (four
    2-bit fields each)."""
    n = packed.shape[0]
    low = nibbles(packed[:, 0:8], 1)  # (n, 16)
    high = _split_fields(packed[:, 8:12].reshape(n, 1, 4), _shifts(0, 2, 4, 6), 0x03).reshape(n, 16)
    return (low | (high << 4)).to(torch.int8) - 32


# ---- one decoder per block format: (n_blocks, type_size) uint8 -> (n_blocks, block_size) float32 ----


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    f = block_fields(blocks, 2)
    q = nibbles(f["qs"], 1).to(torch.int8) - 8  # (n, 32) in -8..7
    return f16(f["d"]) * q.float()


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    f = block_fields(blocks, 3)
    q = nibbles(f["qs"], 1).float()  # (n, 32) in 0..15
    return q.mul_(f16(f["d"])).add_(f16(f["m"]))


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    f = block_fields(blocks, 6)
    high = _le_bits(f["qh"])  # bit e of the little-endian uint32 is the 5th bit of element e
    q = (nibbles(f["qs"], 1) | (high << 4)).to(torch.int8) - 16  # (n, 32) in -16..15
    return f16(f["d"]) * q.float()


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    f = block_fields(blocks, 7)
    high = _le_bits(f["qh"])
    q = (nibbles(f["qs"], 1) | (high << 4)).float()  # (n, 32) in 0..31
    return q.mul_(f16(f["d"])).add_(f16(f["m"]))


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    f = block_fields(blocks, 8)
    q = f["qs"].contiguous().view(torch.int8).float()  # (n, 32)
    return q.mul_(f16(f["d"]))


def _q2_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    f = block_fields(blocks, 10)
    packed_scales = f["scales"]  # per 16-element sub-block: low nibble scale, high nibble min
    d, dmin = f16(f["d"]), f16(f["dmin"])
    dl = (d * (packed_scales & 0x0F).float()).view(n, 16, 1)
    ml = (dmin * (packed_scales >> 4).float()).view(n, 16, 1)
    # Two halves of 32 bytes; each byte holds four 2-bit quants, for elements 32 apart.
    q = _split_fields(f["qs"].reshape(n, 2, 32), _shifts(0, 2, 4, 6), 0x03)  # (n, 2, 4, 32)
    q = q.reshape(n, 16, 16).float()
    return q.mul_(dl).sub_(ml).view(n, _QK_K)


def _q3_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    f = block_fields(blocks, 11)
    dl = (f16(f["d"]) * q3_k_scales(f["scales"]).float()).view(n, 16, 1)
    low2 = _split_fields(f["qs"].reshape(n, 2, 32), _shifts(0, 2, 4, 6), 0x03).reshape(n, 16, 16)
    # A clear bit in the 32-byte mask subtracts 4 (ggml stores the high bit inverted).
    hbit = _bit_planes(f["hmask"], 8).reshape(n, 16, 16)
    q = (low2.to(torch.int8) - ((hbit ^ 1) << 2).to(torch.int8)).float()  # in -4..3
    return (dl * q).view(n, _QK_K)


def q4_k_parts(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q4_K super-block's 8 sub-blocks of 32: values (n, 8, 32) uint8 in 0..15, scales and offsets (n, 8)
    float32, where element = q * scale - offset."""
    n = blocks.shape[0]
    f = block_fields(blocks, 12)
    scales, mins = k_scales_mins(f["scales"])
    return nibbles(f["qs"], 4).view(n, 8, 32), f16(f["d"]) * scales, f16(f["dmin"]) * mins


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    q, dl, ml = q4_k_parts(blocks)
    return q.float().mul_(dl.view(n, 8, 1)).sub_(ml.view(n, 8, 1)).view(n, _QK_K)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    f = block_fields(blocks, 13)
    scales, mins = k_scales_mins(f["scales"])
    dl = (f16(f["d"]) * scales).view(n, 8, 1)
    ml = (f16(f["dmin"]) * mins).view(n, 8, 1)
    high = _bit_planes(f["qh"], 8)  # bit s of byte i -> element 32*s + i
    q = (nibbles(f["qs"], 4) | (high << 4)).view(n, 8, 32).float()
    return q.mul_(dl).sub_(ml).view(n, _QK_K)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    f = block_fields(blocks, 14)
    scales = f["scales"].contiguous().view(torch.int8).float()  # (n, 16), one per 16 elements
    dl = (f16(f["d"]) * scales).view(n, 16, 1)
    # Each 128-element half has 64 bytes of nibbles (low nibbles elements 0-63 of the half, high nibbles
    # 64-127) and 32 bytes whose bits 2t, 2t+1 of byte i are the top two bits of element 32t + i.
    low = nibbles(f["ql"], 2)  # (n, 256)
    high = _split_fields(f["qh"].reshape(n, 2, 32), _shifts(0, 2, 4, 6), 0x03).reshape(n, _QK_K)
    q = ((low | (high << 4)).to(torch.int8) - 32).view(n, 16, 16).float()  # in -32..31
    return (dl * q).view(n, _QK_K)

_BLOCK_DECODERS = {
    2: _q4_0,
    3: _q4_1,
    6: _q5_0,
    7: _q5_1,
    8: _q8_0,
    10: _q2_k,
    11: _q3_k,
    12: _q4_k,
    13: _q5_k,
    14: _q6_k,
}

