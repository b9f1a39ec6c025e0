"""Speed as a transform: linear layers (and the embedding) that compute from quantized or half-precision
weights, swapped in after the model is built.

The readable model (model.py) keeps plain nn.Linear modules; `quantize_from_gguf` replaces them with modules
built straight from a GGUF file's blocks, so weights stay in their own 3 to 8 bits in memory instead of being
blown up to fp32, and `quantize_from_float` does the same for an HF folder's bf16/fp16 (or fp32) tensors,
kept in their stored type, or quantized at load to q8_0/q4_0/q4_1 blocks (`quantize`). q/k/v and gate/up are
fused into single modules (one product each) through the model's own fused code path (the one Phi-3
checkpoints use). The float32 model (exact=True in load()) stays the reference these are tested against.
For a tensor-parallel rank the weight sources hand out only its part of each matrix (MatrixPart; which part is
distributed/shard.py's decision): from a GGUF file only the rows it keeps are read (a row-parallel matrix's rows
whole, then cut to its columns).

Two implementations, picked by what the machine has:
- QuantLinear / QuantEmbedding (x86-64 with AVX2, a C++ compiler to build lanternlm/kernels once): weights in
  32-element blocks of the file's own values (kernels/blocks.py lists the layouts per ggml type; 8-bit blocks are
  reordered at load where the kernels run AVX-512, blocks.to_lanes), multiplied by Lantern's own kernel, which
  rounds the activations to int16 per block of 32 (so decoding matches the float32 reference: 256 of 256 greedy
  tokens on SmolLM2) and reads each weight once per call for all input rows; or a plain bf16/fp16/fp32 matrix
  (the float kinds), multiplied with float32 activations. From DENSE_FROM_ROWS input rows on (prefill), the
  matrix is dequantized to bf16 for that call (a bf16 one is used as it is) and a dense bf16 matmul runs (oneDNN;
  AMX tiles where the CPU has them), which costs far less than the product it enables; bf16 rounding there moves
  logits by ~1e-2 relative (0.988 top-1 agreement over 256 teacher-forced tokens in one prefill). Where the CPU
  has AMX-BF16 the kernels hand a bf16 matrix to the dense matmul already from 16 rows (dense_bf16_rows(), a
  batched decode of an HF folder's weights: see quant_cpu.cpp).
- Int8Linear (GGUF files on any CPU, PyTorch only): int8 weights with one scale per row, PyTorch's
  `_weight_int8pack_mm` with bf16 activations. Measured on the project's 2-core VM: ~55 us for a 3072x576
  product against ~150 us in fp32; the CPU int4 kernel is far slower (8 tokens/s), hence 8 bits. It re-reads
  the weights per input row, so it too switches to the dense path from DENSE_FROM_ROWS rows.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import pages
from .errors import LanternError
from .kernels import kernels
from .kernels.blocks import (
    FLOAT_KINDS,
    KIND_BF16,
    KIND_BF16_TILES,
    KIND_NAMES,
    KIND_Q3,
    KIND_Q6,
    KIND_Q8,
    QUANTIZERS,
    Blocks,
    blocks_nbytes,
    field_specs,
    float_blocks,
    from_ggml,
    is_float_kind,
    kind_for,
    new_tensor,
    q8_by_rows,
    refill,
    tileable,
    to_lanes,
    to_tiles,
)
from .loader.gguf import GGUFFile
from .loader.gguf_model import hf_name, unpermute_rows
from .model import CausalLM

EMBEDDING, HEAD = "model.embed_tokens.weight", "lm_head.weight"
FLOAT_GGML_TYPES = (0, 1, 30)  # F32, F16, BF16: float kinds, any in_features
QUANTIZE_TYPES = tuple(QUANTIZERS)  # what `quantize` (--quantize) accepts
CHUNK_BYTES = 16 << 20  # a matrix bigger than this in the file is read into place a chunk of rows at a time
DENSE_FROM_ROWS = 32  # from this many input rows on (prefill, big batches), dequantize to bf16 for a dense matmul
DENSE_CHUNK_BYTES = 8 << 20  # the dense path dequantizes a matrix this many bytes of bf16 at a time (_dense)


def int8_supported() -> bool:
    """PyTorch's CPU int8-weight kernel exists in this build."""
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def quantization_available() -> bool:
    """Either implementation can run here (builds Lantern's kernels on first use, saying so)."""
    return kernels() is not None or int8_supported()


@dataclass(frozen=True)
class MatrixPart:
    """The part of an (N, K) weight matrix one tensor-parallel rank keeps (distributed/shard.py decides which):
    output rows as [start, end) ranges stacked in order (a fused q/k/v keeps one range of each of q, k and v),
    and one [start, end) range of input columns. None keeps all of them. The weight sources below hand out only
    this part of a matrix asked for by name."""

    rows: tuple[tuple[int, int], ...] | None = None
    cols: tuple[int, int] | None = None

    def shape(self, n: int, k: int) -> tuple[int, int]:
        """The part's (rows, columns) in a matrix of (n, k)."""
        rows = n if self.rows is None else sum(end - start for start, end in self.rows)
        return rows, k if self.cols is None else self.cols[1] - self.cols[0]

    def row_index(self, n: int) -> torch.Tensor:
        """The kept rows of an n-row matrix, in order, (rows,) int64."""
        if self.rows is None:
            return torch.arange(n)
        return torch.cat([torch.arange(start, end) for start, end in self.rows])

    def of(self, w: torch.Tensor) -> torch.Tensor:
        """This part of a float matrix (N, K), or of a bias (N,) (its rows), as a new contiguous tensor (a meta
        tensor stays a meta tensor)."""
        if self.rows is not None:
            w = torch.cat([w[start:end] for start, end in self.rows])
        if self.cols is not None and w.dim() == 2:
            w = w[:, self.cols[0]:self.cols[1]]
        return w.contiguous()

    def of_blocks(self, blocks: Blocks) -> Blocks:
        """This part of a matrix in blocks (columns cut between whole blocks: see Blocks.columns)."""
        if self.rows is not None:
            blocks = blocks.rows(self.row_index(blocks.shape[0]))
        return blocks if self.cols is None else blocks.columns(*self.cols)


class _BlocksModule(nn.Module):
    """Holds one matrix's blocks as buffers (qs, d, m) and its kind; `weight_blocks()` gives them back."""

    def __init__(self, blocks: Blocks):
        super().__init__()
        self.kind = blocks.kind
        self.shape = blocks.shape
        self.register_buffer("qs", blocks.qs)
        self.register_buffer("d", blocks.d)
        self.register_buffer("m", blocks.m)

    def weight_blocks(self) -> Blocks:
        return Blocks(self.qs, self.d, self.m, self.kind, self.shape)


class _Scratch(threading.local):
    """Each thread's bf16 buffer for the dense path's dequantized chunks (QuantLinear._dense), made at its first
    use: DENSE_CHUNK_BYTES, or one chunk of a matrix whose rows are longer than that."""

    buffer: torch.Tensor | None = None

    def take(self, rows: int, k: int) -> torch.Tensor:
        """(rows, k) bf16 in the buffer: valid until this thread's next take."""
        if self.buffer is None or self.buffer.numel() < rows * k:
            # A normal tensor even when first asked for under torch.inference_mode(): an inference tensor could
            # not be written (copy_) by a later call outside it.
            with torch.inference_mode(False):
                self.buffer = torch.empty(max(rows * k, DENSE_CHUNK_BYTES // 2), dtype=torch.bfloat16)
        return self.buffer[:rows * k].view(rows, k)


_SCRATCH = _Scratch()


class QuantLinear(_BlocksModule):
    """y = x @ W.T (+ b) with W kept in 32-element blocks (or as a plain bf16/fp16/fp32 matrix, the float kinds)
    and multiplied by Lantern's CPU kernel; float32 activations in, float32 out."""

    def __init__(self, blocks: Blocks, bias: torch.Tensor | None):
        super().__init__(blocks)
        self.out_features, self.in_features = blocks.shape
        self.register_buffer("bias", None if bias is None else bias.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() < DENSE_FROM_ROWS * self.in_features:  # (..., in) -> (..., out), any leading shape
            y = kernels().qmatmul(x.float(), self.qs, self.d, self.m, self.kind)
        elif self.kind == KIND_BF16_TILES:  # bf16 activations, as the dense path's, on AMX tiles
            y = kernels().tiles_matmul(x.to(torch.bfloat16), self.qs)
        else:
            y = self._dense(x.to(torch.bfloat16))
        return y if self.bias is None else y + self.bias

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T for bf16 x through oneDNN, W dequantized to bf16 a chunk of rows at a time into this thread's
        scratch buffer (DENSE_CHUNK_BYTES, reused by every call): a chunk is still in the L3 cache for its
        matmul, and no call asks the allocator for fresh memory. A matrix dequantized whole into a new tensor was
        fresh pages each time, faulted in on every call (8192 x 2048 Q4_K on the project's VM: 11.4 ms to
        dequantize whole, 1.7 ms into reused memory; a 32-token prefill of a 1B Q4_K_M file spent ~0.6 s so)."""
        if self.kind == KIND_BF16:  # used as stored
            return (x @ self.qs.t()).float()
        n, k = self.out_features, self.in_features
        rows = max(16, DENSE_CHUNK_BYTES // (2 * k))
        y = torch.empty(*x.shape[:-1], n, dtype=torch.float32)
        for r0 in range(0, n, rows):
            part = slice(r0, min(n, r0 + rows))
            w = kernels().dequantize_into(self.qs[part], None if self.d is None else self.d[part],
                                          None if self.m is None else self.m[part], self.kind, k,
                                          _SCRATCH.take(part.stop - r0, k))
            y[..., part] = x @ w.t()
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {KIND_NAMES[self.kind]}"


class QuantEmbedding(_BlocksModule):
    """Embedding lookup from 32-element blocks (or a float kind's matrix): only the looked-up rows are widened
    to float32."""

    def __init__(self, blocks: Blocks):
        super().__init__(blocks)
        self.num_embeddings, self.embedding_dim = blocks.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # index_select, not qs[flat]: PyTorch's advanced indexing opened an OpenMP region even for a decode step's
        # 8 rows, whose spinning threads then held up the kernels' pool (libgomp took 12% of a batched step)
        flat = ids.reshape(-1)
        if self.kind == KIND_BF16_TILES:  # a tied head's AMX tiles: the rows gathered back into row order
            return kernels().bf16_tile_rows(self.qs, flat).float().reshape(*ids.shape, self.embedding_dim)
        d = None if self.d is None else self.d.index_select(0, flat)
        m = None if self.m is None else self.m.index_select(0, flat)
        rows = kernels().dequantize(self.qs.index_select(0, flat), d, m, self.kind, self.embedding_dim, torch.float32)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {KIND_NAMES[self.kind]}"


class Int8Linear(nn.Module):
    """y = x @ W.T (+ b) with W stored as int8, one scale per output row; activations computed in bf16."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        weight = weight.float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,)
        self.register_buffer("weight_int8", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.register_buffer("bias", None if bias is None else bias.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (M, in)
        if x2.shape[0] < DENSE_FROM_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight_int8, self.scale)
        else:
            y = x2 @ (self.weight_int8.to(torch.bfloat16) * self.scale[:, None]).t()
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 rows, bf16 compute"


def uses_kernels(gguf: GGUFFile) -> bool:
    """quantize_from_gguf will use Lantern's kernels (and quantize the embedding too) for this file."""
    return kernels() is not None and all(info.shape[-1] % 32 == 0 or info.ggml_type in FLOAT_GGML_TYPES
                                         for info in gguf.tensors.values() if len(info.shape) == 2)


# Kinds whose native product is much slower here than the 8-bit one, so a model computes them as 8-bit blocks
# (requantized at load, at most half an 8-bit step per weight): Q6_K and Q3_K without AVX-512. Their bits carry
# a multiplier per 16 weights, which costs the int16 kernels (AVX2) a widening multiply per block; the AVX-512
# kernel takes them as byte dot products 16 blocks across lanes (quant_cpu.cpp), where a multiplier costs one
# multiply per 16 blocks. Measured on the 2-core Zen 4 VM, 2026-12-06, a 2048 x 8192 Q6_K product from DRAM at
# 1 / 8 activation rows: AVX-512 0.54-0.59 / 1.91 ms native vs 0.61 / 2.31 as 8-bit blocks; AVX2 1.03 / 6.87 vs
# 0.68 / 3.20 ms. The 5-bit kinds stay in their own bits everywhere: against 8-bit blocks they cost 4-5% of
# decode on the files where they are most of the weights (Qwen2-0.5B shapes 65 vs 68, SmolLM2's Q4_K_M 163 vs
# 171) and nothing on the 1B file, and they load in about half the time (0.5B shapes 0.93-0.98 s vs 1.28-1.60 s)
# into ~110 MB less memory. Q2_K stays in its own bits everywhere too (2.625 bits a weight against 8.5): 8192 x 2048
# from DRAM at 1 / 8 rows, AVX-512 0.34 / 1.23 ms native vs 0.70 / 1.76 as 8-bit blocks; AVX2 1.44 / 4.8 vs 1.37 /
# 3.5 ms, slower in batches there, but a Q2_K file is chosen to fit in memory, and would take 3.2x its size.
def requantized_kinds() -> tuple[int, ...]:
    """The block kinds a model loaded now computes as 8-bit blocks (on the kernels' current instruction set)."""
    k = kernels(quiet=True)
    return () if k is not None and k.isa() >= 2 else (KIND_Q6, KIND_Q3)


_Q4_1, _Q5_1, _Q8_0, _Q2_K, _Q4_K, _Q5_K, _IQ4_NL, _IQ4_XS = 3, 7, 8, 10, 12, 13, 20, 23


def _loaded_type(ggml_type: int, cols: tuple[int, int] | None = None) -> int:
    """The ggml type whose block layout a matrix of this type is computed in (see requantized_kinds); a Q4_K
    (Q5_K) matrix whose kept columns `cols` cut its super-blocks (a tensor-parallel rank's) in Q4_1's (Q5_1's),
    per-block scales, a Q2_K one as 8-bit blocks, an IQ4_XS one as IQ4_NL (blocks.Blocks.columns)."""
    if kind_for(ggml_type) in requantized_kinds():
        return _Q8_0
    cut_inside = {_Q2_K: _Q8_0, _Q4_K: _Q4_1, _Q5_K: _Q5_1, _IQ4_XS: _IQ4_NL}
    if ggml_type in cut_inside and cols is not None and (cols[0] % 256 or cols[1] % 256):
        return cut_inside[ggml_type]
    return ggml_type


class GGUFWeights:
    """The GGUF's weight matrices, asked for by HF name, as Blocks (kernels) or float tensors (Int8Linear),
    Q/K rows un-permuted. Float matrices (F16/BF16 files) are quantized when `quantize` names a type. With the
    kernels, each matrix is copied out of the file once, straight into the arena (q/k/v or gate/up of one kind
    straight into their fused matrix).

    `parts` (HF name -> MatrixPart) makes this one tensor-parallel rank's source: a matrix named there is handed
    out as that part only, the arena is sized for the parts, and with the kernels only the kept rows are read
    out of the file (a row-parallel matrix's rows are read, a chunk at a time, and cut to the kept columns)."""

    def __init__(self, gguf: GGUFFile, model_type: str, use_kernels: bool, quantize: str | None,
                 parts: dict[str, MatrixPart] | None = None):
        self.gguf, self.use_kernels, self.quantize = gguf, use_kernels, quantize
        self.parts = parts or {}
        self.names = {hf_name(name, model_type): name for name in gguf.tensors}  # HF name -> GGUF name
        self.permuted = gguf.metadata.get("general.architecture") == "llama"
        if use_kernels:
            matrices = [(hf_name(name, model_type), i) for name, i in gguf.tensors.items()
                        if len(i.shape) == 2 and name.endswith(".weight")]
            self.arena = _Arena(sum(_Arena.slot(n) for hf, i in matrices
                                    for n in blocks_nbytes(_loaded_type(i.ggml_type, self._cols(hf)),
                                                           self._shape(hf, i.shape))))

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def _cols(self, name: str | None) -> tuple[int, int] | None:
        """The columns matrix `name`'s part keeps, None for all of them."""
        return self.parts[name].cols if name in self.parts else None

    def _shape(self, name: str | None, shape: tuple[int, ...]) -> tuple[int, int]:
        """The (rows, columns) of matrix `name` as handed out: its part's, or the file's `shape`."""
        n, k = (int(s) for s in shape)
        return self.parts[name].shape(n, k) if name in self.parts else (n, k)

    def get(self, name: str, heads: int | None = None) -> Blocks | torch.Tensor:
        """The matrix `name` (its part, when `parts` names it); `heads`: the query or key heads it holds as handed
        out, for llama.cpp's Q/K permutation."""
        gguf_name = self.names[name]
        if not self.use_kernels:
            w = self.gguf.tensor(gguf_name)
            if name in self.parts:  # whole heads are kept, and the permutation stays inside each head
                w = self.parts[name].of(w)
            return unpermute_rows(w, heads) if heads and self.permuted else w
        return self._blocks(name, heads, self.arena.alloc)

    def get_group(self, names: list[str], heads: list[int | None]) -> list[Blocks | torch.Tensor]:
        """The matrices `names` (q/k/v, gate/up) as one fused matrix when their kinds agree, else each apart."""
        infos = [self.gguf.tensors[self.names[n]] for n in names]
        kinds = {kind_for(_loaded_type(i.ggml_type, self._cols(n))) for n, i in zip(names, infos)}
        if not self.use_kernels or self.quantize or len(kinds) != 1:
            return fused_or_apart(self, [self.get(n, h) for n, h in zip(names, heads)])
        shapes = [self._shape(n, i.shape) for n, i in zip(names, infos)]
        fused, allocs = self.arena.group(kinds.pop(), [rows for rows, _ in shapes], shapes[0][1])
        for name, h, alloc in zip(names, heads, allocs):
            self._blocks(name, h, alloc)
        return [fused]

    def _blocks(self, name: str, heads: int | None, alloc) -> Blocks:
        return self._part(name, heads, alloc, self.parts.get(name, MatrixPart()))

    def _part(self, name: str, heads: int | None, alloc, part: MatrixPart) -> Blocks:
        """`part` of a matrix (the whole one, or a tensor-parallel rank's part), a chunk of rows at a time: only the
        kept rows are read out of the map (numpy copies just those), converted, cut to the kept columns and copied
        into place, and each chunk's file pages are let go of as soon as it is copied (else they would all be
        resident at the end: 145 MB for a 0.5B model's Q8_0 embedding). Neither a whole matrix in its own kind nor
        more than a chunk of its file pages is held at once for the requantized_kinds() either (a 151k-row Q6_K
        embedding is 111 MB of each, which set the peak memory of a 0.5B load)."""
        gguf_name = self.names[name]
        info = self.gguf.tensors[gguf_name]
        n, k = (int(s) for s in info.shape)
        by_row = self.gguf.raw(gguf_name).reshape(n, -1)
        index = part.row_index(n)  # the file's rows, in the order the part stacks them
        if heads and self.permuted:  # whole heads are kept, and llama.cpp's permutation stays inside each head
            index = unpermute_rows(index, heads)
        index = index.numpy()
        rows, cols = part.shape(n, k)
        if part.cols is not None and not is_float_kind(kind_for(info.ggml_type)) and (part.cols[0] % 32 or
                                                                                     part.cols[1] % 32):
            raise LanternError(f"{self.gguf.path.name}: {name}'s columns {part.cols[0]}..{part.cols[1] - 1} for this "
                               "tensor-parallel rank would cut 32-element blocks; load it with exact=True")

        row_bytes = by_row.shape[1]

        def read(r0: int, r1: int) -> np.ndarray:
            """The file's bytes of the part's rows r0..r1-1: a view of the map for a run of consecutive rows (its
            pages let go of once converted), else a copy of just those rows."""
            at = index[r0:r1]
            if at[-1] - at[0] == r1 - r0 - 1 and np.all(np.diff(at) == 1):
                return by_row[at[0]:at[-1] + 1].reshape(-1)
            return by_row[at].reshape(-1)

        def done(r0: int, r1: int) -> None:
            low, high = int(index[r0:r1].min()), int(index[r0:r1].max())
            if high - low == r1 - r0 - 1:  # distinct rows spanning no more than their count: all of low..high
                self.gguf.release(gguf_name, low * row_bytes, (high + 1) * row_bytes)

        def kept(r0: int, r1: int, into=new_tensor) -> Blocks:
            """The part's rows r0..r1-1 and columns as Blocks, from `into` (from_ggml's alloc) when no columns are cut."""
            if part.cols is None:
                blocks = from_ggml(read(r0, r1), info.ggml_type, (r1 - r0, k), into)
            else:
                blocks = refill(from_ggml(read(r0, r1), info.ggml_type, (r1 - r0, k)).columns(*part.cols), into)
            done(r0, r1)
            return blocks

        if kind_for(info.ggml_type) in requantized_kinds():
            def floats(r0: int, r1: int) -> torch.Tensor:
                b = kept(r0, r1)
                return kernels().dequantize(b.qs, b.d, b.m, b.kind, cols, torch.float32)
            blocks = q8_by_rows((rows, cols), floats, alloc)
        elif self.quantize and info.ggml_type in FLOAT_GGML_TYPES:
            blocks = quantize_matrix(kept(0, rows).qs, self.quantize, name)
        else:
            step = max(1, CHUNK_BYTES // row_bytes)
            starts = range(0, rows, step)
            counts = [min(step, rows - r0) for r0 in starts]
            blocks, allocs = _row_runs(alloc, kind_for(_loaded_type(info.ggml_type, part.cols)), counts, cols)
            for r0, count, run in zip(starts, counts, allocs):
                kept(r0, r0 + count, run)  # copied straight into place
        self.gguf.release(gguf_name)
        return blocks


class _FloatSource:
    """An HF folder's weight matrices (bf16, fp16 or fp32 tensors, by HF name) as float-kind Blocks in their
    own type, or quantized to `quantize`'s blocks. Each tensor leaves `tensors` (a dict, or loader.hf.LazyTensors,
    which reads it only then) as it is taken."""

    def __init__(self, tensors, quantize: str | None, parts: dict[str, MatrixPart] | None = None):
        self.tensors, self.quantize, self.use_kernels = tensors, quantize, True
        self.parts = parts or {}  # a tensor-parallel rank's parts of the matrices (see GGUFWeights)
        sizes = [_quantized_nbytes(self.parts[n].shape(*w.shape) if n in self.parts else tuple(w.shape),
                                   w.element_size(), quantize) for n, w in tensors.items() if w.dim() == 2]
        self.arena = _Arena(sum(_Arena.slot(n) for s in sizes for n in s))

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str, heads: int | None = None) -> Blocks:
        w = self.tensors.pop(name)
        if name in self.parts:
            w = self.parts[name].of(w)
        return quantize_matrix(w, self.quantize, name) if self.quantize else float_blocks(w)

    def get_group(self, names: list[str], heads: list[int | None]) -> list[Blocks]:
        return fused_or_apart(self, [self.get(n, h) for n, h in zip(names, heads)])


def fused_or_apart(src, parts: list[Blocks | torch.Tensor]) -> list[Blocks | torch.Tensor]:
    """[one matrix stacking `parts`] when they can be one product, else `parts`: blocks of different kinds (e.g. a
    Q4_K_M file's Q6_K v next to Q4_K q/k) stay separate modules."""
    if src.use_kernels and len({p.kind for p in parts}) > 1:
        return parts
    if not src.use_kernels:
        return [torch.cat(parts)]
    return [Blocks.cat(parts)]


def quantize_matrix(w: torch.Tensor, quantize: str, name: str = "") -> Blocks:
    """A float matrix as `quantize`'s blocks (q8_0, q4_0, q4_1); a matrix whose in_features is not a multiple
    of 32 stays in its float type. The embedding and lm_head of the 4-bit types take q8_0, as llama.cpp's
    quantizer keeps its output matrix at more bits: top-1 picks are most sensitive to them."""
    if w.shape[1] % 32:
        return float_blocks(w if w.dtype in FLOAT_KINDS else w.float())
    if quantize != "q8_0" and name in (EMBEDDING, HEAD):
        quantize = "q8_0"
    return QUANTIZERS[quantize](w)


def _quantized_nbytes(shape: tuple[int, int], itemsize: int, quantize: str | None) -> list[int]:
    """Bytes of each tensor `quantize_matrix` (or float_blocks) makes of a float matrix of `shape` with elements
    of `itemsize` bytes, for the arena's size."""
    n, k = shape
    if not quantize or k % 32:
        return [n * k * itemsize]
    per_block = {"q8_0": 32, "q4_0": 16, "q4_1": 16}[quantize]
    return [n * k // 32 * per_block, n * k // 32 * 2, n * k // 32 * 2]  # an upper bound: Q8_0 for the head


def _bias(module: nn.Module, names: list[str]) -> torch.Tensor | None:
    biases = [getattr(module, n).bias for n in names]
    return None if biases[0] is None else torch.cat([b.detach() for b in biases])


def _linear(src, weight: Blocks | torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    bias = None if bias is None else bias.detach()
    if not src.use_kernels:
        return Int8Linear(weight, bias)
    blocks = src.arena.place(weight)
    if blocks.kind == KIND_Q8 and kernels().isa() == 2:  # the AVX-512 kernel's order (blocks.py, KIND_Q8_LANES)
        blocks = to_lanes(blocks)
    if tileable(blocks) and kernels().amx_bf16():  # AMX tiles' order (blocks.py, KIND_BF16_TILES)
        blocks = to_tiles(blocks)
    return QuantLinear(blocks, bias)


def _replace_linears(model: CausalLM, src) -> CausalLM:
    """Swap every linear layer of `model` (and, with the kernels, its embedding) for one built from `src`, a
    source of weight matrices by HF name. q/k/v and gate/up become one module each when their kinds agree."""
    cfg = model.config
    for i, layer in enumerate(model.model.layers):
        pre, attn, mlp = f"model.layers.{i}.", layer.self_attn, layer.mlp
        if cfg.fused_qkv:
            attn.qkv_proj = _linear(src, src.get(pre + "self_attn.qkv_proj.weight"), attn.qkv_proj.bias)
        else:
            names = ["q_proj", "k_proj", "v_proj"]
            qkv = src.get_group([f"{pre}self_attn.{n}.weight" for n in names],
                                [cfg.num_attention_heads, cfg.num_key_value_heads, None])
            if len(qkv) == 1:
                attn.qkv_proj = _linear(src, qkv[0], _bias(attn, names))
                del attn.q_proj, attn.k_proj, attn.v_proj
                attn.fused = True
            else:
                attn.q_proj, attn.k_proj, attn.v_proj = (_linear(src, w, getattr(attn, n).bias)
                                                         for w, n in zip(qkv, names))
        attn.o_proj = _linear(src, src.get(pre + "self_attn.o_proj.weight"), attn.o_proj.bias)
        if cfg.fused_qkv:
            mlp.gate_up_proj = _linear(src, src.get(pre + "mlp.gate_up_proj.weight"), None)
        else:
            gate_up = src.get_group([pre + "mlp.gate_proj.weight", pre + "mlp.up_proj.weight"], [None, None])
            if len(gate_up) == 1:
                mlp.gate_up_proj = _linear(src, gate_up[0], None)
                del mlp.gate_proj, mlp.up_proj
                mlp.fused = True
            else:
                mlp.gate_proj, mlp.up_proj = (_linear(src, w, None) for w in gate_up)
        mlp.down_proj = _linear(src, src.get(pre + "mlp.down_proj.weight"), None)
    tied = HEAD not in src
    model.lm_head = _linear(src, src.get(EMBEDDING if tied else HEAD), None)
    if src.use_kernels:
        # The embedding shares the tied head's blocks (one copy in memory), or gets its own.
        embedding = model.lm_head.weight_blocks() if tied else src.arena.place(src.get(EMBEDDING))
        model.model.embed_tokens = QuantEmbedding(embedding)
        src.arena.ready(model)
    return model


def gguf_weights(gguf: GGUFFile, model_type: str, quantize: str | None = None,
                 parts: dict[str, MatrixPart] | None = None) -> GGUFWeights:
    """The source quantize_from_gguf builds linear layers from: Lantern's kernels when `uses_kernels(gguf)` (then
    the memory for every matrix is reserved and faulted in now, in one system call that lets other Python threads
    run: the loader builds the tokenizer meanwhile), else PyTorch's int8 fallback. `quantize` (q8_0, q4_0, q4_1)
    quantizes the file's float matrices (F16/BF16 files) at load. `parts`: one tensor-parallel rank's parts of the
    matrices, by HF name (GGUFWeights)."""
    use_kernels = uses_kernels(gguf)
    if not use_kernels and not int8_supported():
        raise RuntimeError("no quantized kernels here: Lantern's need x86-64 with AVX2 and a C++ compiler, and "
                           "this PyTorch build has no CPU int8-weight kernel")
    return GGUFWeights(gguf, model_type, use_kernels, quantize, parts)


@torch.inference_mode()
def quantize_from_gguf(model: CausalLM, weights: GGUFWeights) -> CausalLM:
    """Replace the model's linear layers (and, with the kernels, its embedding) with modules built from the GGUF's
    tensors (`gguf_weights`), in place."""
    return _replace_linears(model, weights)


@torch.inference_mode()
def quantize_from_float(model: CausalLM, tensors, quantize: str | None = None,
                        parts: dict[str, MatrixPart] | None = None) -> CausalLM:
    """Replace the model's linear layers and embedding with Lantern's kernels over `tensors` (an HF folder's
    weight matrices by HF name, in their stored type: a dict, or loader.hf.LazyTensors), in place: kept in that type, or quantized to
    `quantize` (q8_0, q4_0, q4_1). `parts`: one tensor-parallel rank's parts of the matrices, by HF name (a
    model sliced to them already, distributed/shard.py). Needs the kernels."""
    if kernels() is None:
        raise RuntimeError("Lantern's CPU kernels are not available here")
    return _replace_linears(model, _FloatSource(tensors, quantize, parts))


class _Arena:
    """One buffer for every quantized weight, filled in order, then moved to 2 MiB pages (pages.py).

    Sized up front from the file's tensor table, so each matrix is copied in once, and faulted in at creation
    (GGUFWeights is made while the tokenizer builds on another thread). `ready` is called once the model holds
    every weight: it starts promoting the buffer to huge pages in the background."""

    ALIGN = 64

    def __init__(self, nbytes: int):
        huge = pages.HUGE_PAGE
        self.buffer = torch.empty(nbytes + huge, dtype=torch.uint8)
        self.start = self.offset = (-self.buffer.data_ptr()) % huge
        self.end = self.offset + nbytes
        pages.fault_in(self.buffer.data_ptr() + self.offset, (nbytes + huge - 1) // huge * huge)

    def ready(self, owner: object) -> threading.Thread | None:
        """Every weight is in: promote the filled part to 2 MiB pages while `owner` (the model) lives (the thread
        doing it, pages.promote_later)."""
        return pages.promote_later(owner, self.buffer.data_ptr() + self.start, self.offset - self.start)

    @classmethod
    def slot(cls, nbytes: int) -> int:
        return (nbytes + cls.ALIGN - 1) // cls.ALIGN * cls.ALIGN

    def alloc(self, field: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor of `shape` and `dtype` inside the buffer (a new one outside if it would not fit: the size
        estimate missed something, so stay correct and lose only the page size). `field` is from_ggml's."""
        n = math.prod(shape) * dtype.itemsize
        if self.offset + self.slot(n) > self.end:
            return torch.empty(shape, dtype=dtype)
        view = self.buffer[self.offset:self.offset + n].view(dtype).view(shape)
        self.offset += self.slot(n)
        return view

    def holds(self, t: torch.Tensor) -> bool:
        start = self.buffer.data_ptr()
        return start <= t.data_ptr() < start + self.buffer.numel()

    def place(self, blocks: Blocks) -> Blocks:
        """`blocks` inside the buffer: as they are when they are there already, else a copy."""
        if all(self.holds(t) for t in blocks.tensors()):
            return blocks
        return refill(blocks, self.alloc)

    def group(self, kind: int, rows: list[int], k: int):
        """A fused matrix of `kind` stacking parts of `rows[i]` rows each, allocated here, and one allocator per
        part that hands out its rows of each field (see _row_runs)."""
        return _row_runs(self.alloc, kind, rows, k)


def _row_runs(alloc, kind: int, rows: list[int], k: int) -> tuple[Blocks, list]:
    """A matrix of `kind`, sum(rows) x k, its tensors from `alloc` (from_ggml's), and one allocator per run of
    `rows[i]` rows that hands out that run's rows of each field: the runs are read straight into it (q/k/v into
    their fused matrix, a big matrix a chunk of rows at a time)."""
    specs = field_specs(kind, sum(rows), k)
    fields = {name: alloc(name, shape, dtype) for name, (shape, dtype) in specs.items()}
    fused = Blocks(fields["qs"], fields.get("d"), fields.get("m"), kind, (sum(rows), k))
    starts = [sum(rows[:i]) for i in range(len(rows))]

    def run(start: int, count: int):
        def alloc_rows(field: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            out = fields[field][start:start + count]
            if tuple(out.shape) != tuple(shape) or out.dtype != dtype:
                raise ValueError(f"a fused matrix's {field} is {tuple(out.shape)} {out.dtype}, the part "
                                 f"asks for {tuple(shape)} {dtype}")
            return out
        return alloc_rows

    return fused, [run(s, r) for s, r in zip(starts, rows)]
