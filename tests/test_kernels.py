"""Lantern's C++ CPU kernels (lanternlm/kernels) against the PyTorch references they replace.

- the split-block layout equals gguf-py's dequantization of the ggml blocks it came from;
- the quantized matrix product equals x @ W.T with W the exact dequantized weights, for every block kind,
  batch size and shape edge (a block count that is odd, or not a multiple of 16), on every instruction set
  this CPU has (the AVX2 kernel is forced on AVX-512 machines too);
- the fused decode ops (RMSNorm, gated activation, single-token attention with RoPE and the cache write)
  equal the readable model's modules, single and batched, with GQA, sliding windows, partial rotary and
  q/k norms.
Skipped as a whole where the kernels cannot be built (no compiler, not x86-64 with AVX2); the fallback path
is tested in test_quantized.py.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from lanternlm.config import ModelConfig
from lanternlm.fused import FusedAttention, fuse_for_cpu
from lanternlm.kernels import kernels, why_unavailable
from lanternlm.kernels.blocks import (KIND_BF16, KIND_F16, KIND_IQ4_NL, KIND_Q4, KIND_Q4_K, KIND_Q4_MIN, KIND_Q5,
                                      KIND_Q5_MIN, KIND_Q8, KIND_Q8_LANES, Blocks, dequantize_blocks, from_ggml,
                                      from_lanes, quantize_q8, to_lanes)
from lanternlm.loader.quants import q4_k_parts
from lanternlm.model import KVCache
from lanternlm.quantize import DENSE_FROM_ROWS, QuantEmbedding, QuantLinear

from gguf_writer import SCALE_AT, random_blocks
from tiny_models import make_hf_model

K = kernels(quiet=True)
pytestmark = pytest.mark.skipif(K is None, reason=f"kernels unavailable: {why_unavailable()}")


def ggml_blocks(qtype: T, n: int, k: int, seed: int) -> tuple[np.ndarray, torch.Tensor]:
    """Raw ggml bytes of an (n, k) matrix and gguf-py's float32 decoding of them."""
    rng = np.random.default_rng(seed)
    if qtype in SCALE_AT:
        raw = random_blocks(qtype, n, k, rng)
    else:
        w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 2.0, (n, 1))).astype(np.float32)
        raw = gguf_quantize(w, qtype)
    return raw.reshape(-1).view(np.uint8), torch.from_numpy(gguf_dequantize(raw, qtype).astype(np.float32))


@pytest.mark.parametrize("qtype,kind", [(T.Q4_0, KIND_Q4), (T.Q4_1, KIND_Q4_MIN), (T.Q8_0, KIND_Q8)])
def test_native_block_types_repack_exactly(isa, qtype, kind):
    raw, ref = ggml_blocks(qtype, 7, 96, seed=1)
    blocks = from_ggml(raw, qtype, (7, 96))
    assert blocks.kind == kind
    assert torch.equal(dequantize_blocks(blocks), ref)
    assert torch.equal(K.dequantize(blocks.qs, blocks.d, blocks.m, blocks.kind, 96, torch.float32), ref)
    assert torch.equal(K.dequantize(blocks.qs, blocks.d, blocks.m, blocks.kind, 96, torch.bfloat16),
                       ref.to(torch.bfloat16))


def test_q4_k_keeps_its_own_scales_and_a_cut_inside_super_blocks_rounds_them_to_float16(isa):
    raw, ref = ggml_blocks(T.Q4_K, 4, 512, seed=2)
    blocks = from_ggml(raw, T.Q4_K, (4, 512))
    assert blocks.kind == KIND_Q4_K  # super-block d and dmin, a 6-bit scale and min per block: gguf-py's values
    assert torch.equal(dequantize_blocks(blocks), ref)
    assert torch.equal(K.dequantize(blocks.qs, blocks.d, blocks.m, blocks.kind, 512, torch.float32), ref)
    assert torch.equal(dequantize_blocks(blocks.columns(256, 512)), ref[:, 256:])  # whole super-blocks: as is
    # A tensor-parallel rank's columns cut inside super-blocks: each block gets its own scale and offset, rounded
    # to float16 (KIND_Q4_MIN), a relative change of at most 2^-11 (2^-25 absolute below float16's normal range)
    # of each term of value = q * scale - offset.
    cut = blocks.columns(96, 352)
    assert cut.kind == KIND_Q4_MIN
    got = dequantize_blocks(cut)
    q, scale, offset = q4_k_parts(torch.from_numpy(raw.copy()).view(-1, 144))  # (4*2, 8, 32), (4*2, 8)
    terms = (q.float() * scale[..., None] + offset[..., None]).reshape(4, 512)[:, 96:352]
    bound = 2.0 ** -11 * terms + 2 * 2.0 ** -25 * (q.float().reshape(4, 512)[:, 96:352] + 1) + 1e-9
    assert torch.all((got - ref[:, 96:352]).abs() <= bound)
    assert not torch.equal(got, ref[:, 96:352])  # the rounding is real: this checks the bound, not a no-op
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(2))
    product = K.qmatmul(x, cut.qs, cut.d, cut.m, cut.kind)
    assert torch.all((product.double() - x.double() @ got.double().t()).abs() <= product_bound(x, got).double())


def test_f16_matrices_keep_their_values():
    # F16/BF16/F32 matrices become the float kind of their type (tests/test_bf16_path.py multiplies them)
    w = torch.randn(5, 64)
    blocks = from_ggml(w.half().numpy().reshape(-1).view(np.uint8), T.F16, (5, 64))
    assert blocks.kind == KIND_F16 and blocks.qs.dtype == torch.float16
    assert torch.equal(dequantize_blocks(blocks), w.half().float())


@pytest.mark.parametrize("qtype", [T.Q6_K, T.Q3_K])  # computed as 8-bit blocks on AVX2 (quantize.requantized_kinds)
def test_requantized_types_become_8_bit_blocks_within_half_a_step(qtype):
    raw, ref = ggml_blocks(qtype, 5, 256, seed=3)
    blocks = quantize_q8(dequantize_blocks(from_ggml(raw, qtype, tuple(ref.shape))))  # what the loader does there
    assert blocks.kind == KIND_Q8
    got = dequantize_blocks(blocks)
    step = ref.view(ref.shape[0], -1, 32).abs().amax(-1, keepdim=True) / 127
    # half a step, plus the float16 rounding of the scale (2^-11 of a value)
    bound = (step * 0.5 * (1 + 2.0 ** -10) + ref.view_as(step.expand(-1, -1, 32)).abs() * 2.0 ** -10).reshape(ref.shape)
    assert torch.all((got - ref).abs() <= bound + 1e-7)
    assert not torch.equal(got, ref)


def product_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Rounding of int16 activations per block of 32 (half of max|x| / 32767 per value) times |w|, plus float32
    summation."""
    xb = x.view(x.shape[0], -1, 32)
    step = (xb.abs().amax(-1, keepdim=True) / 32767 / 2).expand_as(xb).reshape(x.shape)
    return step @ w.abs().t() + 1e-5 * (x.abs() @ w.abs().t()) + 1e-6


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.IQ4_NL])
# 1, 3, 18, 19, 20, 25 and 32 blocks: odd counts, partial groups of 16 (AVX-512 computes the 4- and 5-bit kinds 16
# blocks at a time across lanes; a last group of 1-4 blocks with other rows' (add_tails), of 5-6 a block at a
# time), whole groups
@pytest.mark.parametrize("k", [32, 96, 576, 608, 640, 800, 1024])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 13])
def test_qmatmul_equals_the_dequantized_product(isa, qtype, k, rows):
    n = 37
    raw, w = ggml_blocks(qtype, n, k, seed=k + rows)
    blocks = from_ggml(raw, qtype, (n, k))
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    x[0, :32] *= 100  # an outlier block must not cost the other blocks their precision
    got = K.qmatmul(x, blocks.qs, blocks.d, blocks.m, blocks.kind)
    ref = x.double() @ w.double().t()
    assert got.shape == (rows, n) and got.dtype == torch.float32
    assert torch.all((got.double() - ref).abs() <= product_bound(x, w).double())


BLOCK_PATH_AVX2, BLOCK_PATH_INT16, BLOCK_PATH_ACROSS, BLOCK_PATH_ACROSS_TAILS = 1, 2, 3, 4  # kernels().last_block_path()
PACKED_TAIL_KINDS = (KIND_Q4, KIND_Q4_MIN, KIND_Q5, KIND_Q5_MIN, KIND_IQ4_NL)  # rows ending in 1-4 blocks: add_tails


@pytest.mark.parametrize("qtype,wide_path", [(T.Q4_0, BLOCK_PATH_ACROSS), (T.Q4_1, BLOCK_PATH_ACROSS),
                                             (T.Q4_K, BLOCK_PATH_ACROSS), (T.Q5_0, BLOCK_PATH_ACROSS),
                                             (T.Q5_1, BLOCK_PATH_ACROSS), (T.Q5_K, BLOCK_PATH_ACROSS),
                                             (T.Q6_K, BLOCK_PATH_ACROSS), (T.Q3_K, BLOCK_PATH_ACROSS),
                                             (T.Q2_K, BLOCK_PATH_ACROSS), (T.Q8_0, BLOCK_PATH_INT16),
                                             (T.IQ4_NL, BLOCK_PATH_ACROSS), (T.IQ4_XS, BLOCK_PATH_ACROSS)])
def test_each_kind_runs_its_kernel_and_a_row_gets_the_same_bits_in_any_batch(isa, qtype, wide_path):
    """AVX-512 computes the 2- to 6-bit kinds with byte dot products, 16 blocks across the lanes of a
    register (IQ4's values looked up), and the 8-bit kind in block order (KIND_Q8) with int16 ones; AVX2 all
    with int16 ones, a block at a time for tiles of up to 4 activation rows. On every path, every (weight row, activation row) pair adds
    its blocks in the same order whatever the batch: a row's result has the same bits alone and in any batch
    (the 8-bit kind's AVX-512 tiles of 3-4 rows once added them in one chain, not two, and did not)."""
    # 8 blocks (one partial group), 16 + 1 to 16 + 4 (the last 1-4 blocks with other weight rows' in add_tails,
    # 45 rows making sets of 16 / t and a last smaller one), 16 + 9 or 16 + 8 (two groups); K-quants come in
    # super-blocks of 256, and the matrices kept in groups of 16 blocks (3-, 5- and 6-bit) are also cut between
    # blocks (a tensor-parallel rank's columns: 16 + 2, in add_tails as Q5_0/Q5_1 and a cut Q5_K are, a block at
    # a time as Q3_K and Q6_K are; and 16 + 9 blocks)
    k_quant = qtype in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS)
    cases = [(k, None) for k in ((256, 768) if k_quant else (256, 544, 576, 608, 640, 800))]
    cases += [(768, (0, 576)), (1024, (64, 864))] if qtype in (T.Q3_K, T.Q5_0, T.Q5_1, T.Q5_K, T.Q6_K) else []
    for k, cut in cases:
        raw, _ = ggml_blocks(qtype, 45, k, seed=k)
        b = from_ggml(raw, qtype, (45, k))
        if cut:
            b = b.columns(*cut)
            k = cut[1] - cut[0]
        w = dequantize_blocks(b)  # (Q4_K's scales become float16 ones: test_q4_k_repacks_within_float16_scale_rounding)
        x = torch.randn(8, k, generator=torch.Generator().manual_seed(k))
        whole = K.qmatmul(x, b.qs, b.d, b.m, b.kind)
        tails = b.kind in PACKED_TAIL_KINDS and 1 <= k // 32 % 16 <= 4  # (a cut Q5_K is KIND_Q5: 16 + 2 blocks)
        assert K.last_block_path() == (BLOCK_PATH_AVX2 if isa == 1 else BLOCK_PATH_ACROSS_TAILS if tails else wide_path)
        assert torch.all((whole.double() - x.double() @ w.double().t()).abs() <= product_bound(x, w).double())
        for start, end in [(i, i + 1) for i in range(8)] + [(1, 6), (5, 8), (0, 3)]:
            assert torch.equal(K.qmatmul(x[start:end], b.qs, b.d, b.m, b.kind), whole[start:end]), (k, start, end)


def test_8_bit_blocks_across_lanes_are_step_major_groups_and_convert_back():
    """KIND_Q8_LANES (blocks.py): each group of 16 blocks (and a last one of more than 6) step-major, byte 4Ls + 4l + j
    of a group of L blocks being byte 4s + j of block l; a last group of up to 6 blocks in block order."""
    for nb in (16, 18, 23, 25, 5):  # whole groups, last groups of 2 (block order), 7 and 9 (step-major), one of 5
        qs = torch.randint(-128, 128, (3, 32 * nb), dtype=torch.int8, generator=torch.Generator().manual_seed(nb))
        plain = Blocks(qs.clone(), torch.rand(3, nb).half(), None, KIND_Q8, (3, 32 * nb))
        lanes = to_lanes(Blocks(qs.clone(), plain.d, None, KIND_Q8, plain.shape))
        assert lanes.kind == KIND_Q8_LANES
        for g in range(0, nb, 16):
            size = min(16, nb - g)
            for l, s, j in [(0, 0, 0), (size - 1, 7, 3), (size // 2, 3, 1)]:
                byte = 32 * (g + l) + 4 * s + j
                at = 32 * g + (4 * size * s + 4 * l + j if size > 6 else 32 * l + 4 * s + j)
                assert torch.equal(lanes.qs[:, at], qs[:, byte]), (nb, g, l, s, j)
        assert torch.equal(from_lanes(lanes).qs, qs)
        assert torch.equal(dequantize_blocks(lanes), dequantize_blocks(plain))
        with pytest.raises(ValueError, match="only 8-bit blocks"):
            to_lanes(lanes)


# rows of 1 and 3 blocks; whole groups; last groups of 2, 3 (add_tails), 5 (a block at a time), 7 and 9 (across)
@pytest.mark.parametrize("k", [32, 96, 512, 576, 608, 672, 736, 800, 1024])
def test_8_bit_blocks_across_lanes_equal_the_dequantized_product_and_a_row_alone(isa, k):
    """The 8-bit kind as loaded on AVX-512 (KIND_Q8_LANES): byte dot products across lanes from the step-major
    groups, its signed values as v + 128 against the activations' hi bytes; rows ending in 1-4 blocks with other
    rows' (add_tails), 5-6 a block at a time; AVX2 reads the same bytes a block at a time (gathered). The same
    values as the plain 8-bit blocks, within int16 rounding, and a row's bits alone equal its bits in any batch."""
    n = 45
    raw, w = ggml_blocks(T.Q8_0, n, k, seed=k)
    lanes = to_lanes(from_ggml(raw, T.Q8_0, (n, k)))
    assert torch.equal(K.dequantize(lanes.qs, lanes.d, None, KIND_Q8_LANES, k, torch.float32), w)
    assert torch.equal(K.dequantize(lanes.qs[7:9], lanes.d[7:9], None, KIND_Q8_LANES, k, torch.float32), w[7:9])
    x = torch.randn(13, k, generator=torch.Generator().manual_seed(k))
    x[0, :32] *= 100
    whole = K.qmatmul(x, lanes.qs, lanes.d, None, KIND_Q8_LANES)
    tails = 1 <= k // 32 % 16 <= 4
    assert K.last_block_path() == (BLOCK_PATH_AVX2 if isa == 1 else BLOCK_PATH_ACROSS_TAILS if tails
                                   else BLOCK_PATH_ACROSS)
    assert torch.all((whole.double() - x.double() @ w.double().t()).abs() <= product_bound(x, w).double())
    for start, end in [(i, i + 1) for i in range(0, 13, 3)] + [(1, 6), (5, 13), (0, 3)]:
        assert torch.equal(K.qmatmul(x[start:end], lanes.qs, lanes.d, None, KIND_Q8_LANES), whole[start:end])


def test_a_product_past_the_threads_reused_buffer_equals_its_rows_one_by_one(isa):
    # 600 rows x K = 8192 of quantized activations (int16, and on AVX-512 their two bytes again) need more than
    # the 8 MB a thread keeps between products (quant_cpu.cpp, XQuant): that product gets a buffer of its own.
    # Both kernels compute a Q4_1 row the same way alone or in a batch, so the bits must match.
    raw, w = ggml_blocks(T.Q4_1, 20, 8192, seed=9)
    b = from_ggml(raw, T.Q4_1, (20, 8192))
    x = torch.randn(600, 8192, generator=torch.Generator().manual_seed(9))
    whole = K.qmatmul(x, b.qs, b.d, b.m, b.kind)
    rows = torch.cat([K.qmatmul(x[i:i + 1], b.qs, b.d, b.m, b.kind) for i in range(600)])
    assert torch.all((whole.double() - x.double() @ w.double().t()).abs() <= product_bound(x, w).double())
    assert torch.equal(whole, rows)


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q6_K, T.Q2_K, T.Q8_0])
def test_a_batch_taken_in_passes_over_weight_blocks_equals_its_rows_one_by_one(isa, qtype):
    """AVX-512 takes a batch whose activations would not stay in L1 in passes of a few rows over blocks of weight
    rows (quant_cpu.cpp, rows_all): at K = 4096, 4 rows a pass, so 11 rows make 3 passes, and 1,100 Q4_1 rows
    (2.5 KiB each) more than one block. Every (weight row, activation row) pair still adds its blocks in the same
    order: the same bits as each row alone."""
    n = 1100 if qtype == T.Q4_1 else 300
    raw, _ = ggml_blocks(qtype, n, 4096, seed=11)
    b = from_ggml(raw, qtype, (n, 4096))
    x = torch.randn(11, 4096, generator=torch.Generator().manual_seed(11))
    whole, w = K.qmatmul(x, b.qs, b.d, b.m, b.kind), dequantize_blocks(b)
    assert torch.all((whole.double() - x.double() @ w.double().t()).abs() <= product_bound(x, w).double())
    assert torch.equal(whole, torch.cat([K.qmatmul(x[i:i + 1], b.qs, b.d, b.m, b.kind) for i in range(11)]))


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q8_0, T.BF16])
def test_products_do_not_depend_on_the_thread_or_the_split(qtype):
    """The Engine computes on a thread of its own (the kernels' pool, whose threads claim chunks of rows as they
    get a core) and the API on the main thread (the same pool): both, with 1 or 2 threads, give the same
    bits, so the server and `lantern run` pick the same tokens. Shapes with N not a multiple of 4 put the row tiles'
    edge inside a chunk."""
    import threading
    products = []
    for n, k, rows in [(37, 576, 1), (1539, 576, 1), (577, 1536, 3), (4101, 64, 8), (13, 608, 2)]:
        if qtype == T.BF16:
            w = torch.randn(n, k).to(torch.bfloat16)
            args = (w, None, None, KIND_BF16)
        else:
            raw, _ = ggml_blocks(qtype, n, k, seed=n)
            b = from_ggml(raw, qtype, (n, k))
            args = (b.qs, b.d, b.m, b.kind)
        products.append((torch.randn(rows, k, generator=torch.Generator().manual_seed(n)), args))
    threads = torch.get_num_threads()
    try:
        results = {}
        for count in (1, 2):
            torch.set_num_threads(count)
            results[("main", count)] = [K.qmatmul(x, *args) for x, args in products]
            box = []
            worker = threading.Thread(target=lambda: box.append([K.qmatmul(x, *args) for x, args in products]))
            worker.start()
            worker.join()
            results[("thread", count)] = box[0]
    finally:
        torch.set_num_threads(threads)
    first = results[("main", 1)]
    for key, got in results.items():
        assert all(torch.equal(a, b) for a, b in zip(got, first)), key


def test_serial_torch_ops_is_this_threads_alone(monkeypatch):
    """serial_torch_ops makes PyTorch's ops on the calling thread serial and restores its count after; another
    thread, and the process-wide default a new thread starts with, keep theirs. Chooser.choose (the one path
    that picks tokens: API, Engine, trace) runs inside it."""
    import threading

    from lanternlm.generation import choose as choose_module
    from lanternlm.generation.choose import Chooser
    from lanternlm.generation.sampling import SamplingParams
    from lanternlm.kernels import serial_torch_ops

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        seen = {}
        with serial_torch_ops():
            seen["inside"] = torch.get_num_threads()
            other = threading.Thread(target=lambda: seen.setdefault("other thread", torch.get_num_threads()))
            other.start()
            other.join()
        seen["after"] = torch.get_num_threads()
        assert seen == {"inside": 1, "other thread": 2, "after": 2}

        real_sample = choose_module.sample
        monkeypatch.setattr(choose_module, "sample",
                            lambda *a: seen.setdefault("while choosing", torch.get_num_threads()) and real_sample(*a))
        token, _ = Chooser(SamplingParams(temperature=0), None).choose(torch.tensor([0.0, 3.0, 1.0]), [], [], None)
        assert (token, seen["while choosing"], torch.get_num_threads()) == (1, 1, 2)
    finally:
        torch.set_num_threads(threads)


def test_quantize_q8_in_cpp_equals_the_torch_recipe(isa):
    """The C++ one-pass Q8_0 quantizer (used to requantize types computed as 8-bit blocks, and for --quantize
    q8_0) gives the torch recipe's bits: zero blocks, exact .5 ties (round to even), an outlier."""
    from lanternlm.kernels.blocks import quantize_q8, quantize_q8_torch
    w = torch.randn(61, 608, generator=torch.Generator().manual_seed(3)) * torch.rand(61, 1) * 4
    w[0, :32] = 0
    w[1, 7] = 1e5
    w[2, :32] = torch.arange(-16, 16) * 0.5 + 0.25  # with max|x| 63.5, d = 0.5 and every x / d ends in .5
    w[2, 0] = 63.5
    got, want = quantize_q8(w), quantize_q8_torch(w)
    assert got.kind == want.kind == KIND_Q8
    assert torch.equal(got.qs, want.qs) and torch.equal(got.d, want.d)


def test_qmatmul_zero_rows_and_zero_activations():
    raw, w = ggml_blocks(T.Q4_1, 8, 64, seed=0)
    blocks = from_ggml(raw, T.Q4_1, (8, 64))
    assert K.qmatmul(torch.zeros(0, 64), blocks.qs, blocks.d, blocks.m, blocks.kind).shape == (0, 8)
    assert torch.equal(K.qmatmul(torch.zeros(2, 64), blocks.qs, blocks.d, blocks.m, blocks.kind), torch.zeros(2, 8))


def test_kernels_refuse_malformed_arguments():
    raw, _ = ggml_blocks(T.Q4_1, 8, 64, seed=0)
    b = from_ggml(raw, T.Q4_1, (8, 64))
    with pytest.raises(RuntimeError, match="multiple of 32"):
        K.qmatmul(torch.zeros(1, 48), b.qs, b.d, b.m, b.kind)
    with pytest.raises(RuntimeError, match="row length"):
        K.qmatmul(torch.zeros(1, 96), b.qs, b.d, b.m, b.kind)
    with pytest.raises(RuntimeError, match="float32"):
        K.qmatmul(torch.zeros(1, 64, dtype=torch.float64), b.qs, b.d, b.m, b.kind)
    with pytest.raises(RuntimeError, match="m:"):
        K.qmatmul(torch.zeros(1, 64), b.qs, b.d, None, b.kind)
    with pytest.raises(RuntimeError, match="kind"):
        K.qmatmul(torch.zeros(1, 64), b.qs, b.d, b.m, 99)  # kinds 0-9 exist


@pytest.mark.parametrize("rows", [1, 5, DENSE_FROM_ROWS, 40])  # the kernel, and the dense bf16 path from 32 rows
def test_quant_linear_both_paths(rows):
    raw, w = ggml_blocks(T.Q4_1, 48, 96, seed=5)
    bias = torch.randn(48)
    layer = QuantLinear(from_ggml(raw, T.Q4_1, (48, 96)), bias)
    x = torch.randn(2, rows, 96)
    got = layer(x)
    ref = x @ w.t() + bias
    assert got.shape == (2, rows, 48)
    if rows < DENSE_FROM_ROWS:
        bound = product_bound(x.reshape(-1, 96), w).reshape(ref.shape)
    else:  # bf16 activations and weights: 2^-8 relative each, on the magnitudes multiplied
        bound = 3 * 2.0 ** -8 * (x.abs() @ w.abs().t()) + 1e-5
    assert torch.all((got - ref).abs() <= bound)


@pytest.mark.parametrize("ggml_type", [T.Q4_1, T.Q4_K, T.Q6_K, T.F16])
def test_the_dense_path_dequantizes_a_chunk_of_rows_at_a_time(ggml_type, monkeypatch):
    # 16-row chunks of a 56-row matrix (the last one short): the same numbers as one bf16 matmul over the whole
    # matrix dequantized at once, from one dequantize call per chunk, each into the same scratch memory.
    from lanternlm import quantize

    k = 256
    raw, w = ggml_blocks(ggml_type, 56, k, seed=9)
    layer = QuantLinear(from_ggml(raw, ggml_type, (56, k)), None)
    x = torch.randn(3, DENSE_FROM_ROWS, k)
    whole = (x.to(torch.bfloat16) @ w.to(torch.bfloat16).t()).float()
    assert torch.equal(layer(x), whole)  # one chunk: 56 rows of 256 bf16 are far below DENSE_CHUNK_BYTES
    module, calls = quantize.kernels(), []

    class Counting:
        def __getattr__(self, name):
            return getattr(module, name)

        def dequantize_into(self, qs, *rest):
            calls.append((qs.shape[0], rest[-1].data_ptr()))
            return module.dequantize_into(qs, *rest)

    monkeypatch.setattr(quantize, "kernels", Counting)
    monkeypatch.setattr(quantize, "DENSE_CHUNK_BYTES", 16 * 2 * k)
    got = layer(x)
    assert [rows for rows, _ in calls] == [16, 16, 16, 8]
    assert len({ptr for _, ptr in calls}) == 1  # no fresh memory per chunk
    torch.testing.assert_close(got, whole, rtol=1e-6, atol=1e-6)  # oneDNN's sums over k may group differently


@pytest.mark.parametrize("ggml_type", [T.Q4_K, T.F16])
def test_the_dense_paths_scratch_serves_calls_in_and_outside_inference_mode(ggml_type):
    # The thread's scratch is made by whichever call comes first; made under inference_mode it must still be
    # writable by a call outside it (the float kinds fill it with copy_, which refuses inference tensors).
    import threading

    raw, w = ggml_blocks(ggml_type, 56, 256, seed=4)
    layer = QuantLinear(from_ggml(raw, ggml_type, (56, 256)), None)
    x = torch.randn(DENSE_FROM_ROWS, 256)
    want = (x.to(torch.bfloat16) @ w.to(torch.bfloat16).t()).float()
    got = {}

    def run():  # a thread of its own: a fresh scratch, made first under inference_mode
        with torch.inference_mode():
            got["inside"] = layer(x).clone()
        got["outside"] = layer(x)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert torch.equal(got["inside"], want) and torch.equal(got["outside"], want)


def test_dequantize_into_checks_its_output():
    raw, w = ggml_blocks(T.Q4_K, 4, 256, seed=3)
    b = from_ggml(raw, T.Q4_K, (4, 256))
    out = torch.empty(4, 256)
    assert K.dequantize_into(b.qs, b.d, b.m, b.kind, 256, out).data_ptr() == out.data_ptr()
    assert torch.equal(out, w)  # gguf-py's values
    for bad in (torch.empty(4, 255), torch.empty(3, 256), torch.empty(256, 4).t(),
                torch.empty(4, 256, dtype=torch.float16)):
        with pytest.raises(RuntimeError, match="out:|float32 or bfloat16"):
            K.dequantize_into(b.qs, b.d, b.m, b.kind, 256, bad)


def test_quant_embedding_rows_are_exact():
    raw, w = ggml_blocks(T.Q8_0, 50, 64, seed=6)
    emb = QuantEmbedding(from_ggml(raw, T.Q8_0, (50, 64)))
    ids = torch.tensor([[3, 0, 49], [7, 7, 1]])
    assert torch.equal(emb(ids), w[ids])


def test_quantize_q8_keeps_zero_rows_and_signs():
    w = torch.randn(3, 64)
    w[1] = 0
    got = dequantize_blocks(quantize_q8(w))
    assert torch.equal(got[1], torch.zeros(64))
    assert torch.all((got - w).abs() <= w.view(3, 2, 32).abs().amax(-1, keepdim=True).expand(3, 2, 32).reshape(3, 64) / 127)


# ---- fused decode ops ----

def test_rms_norm_and_gated_activations_equal_the_readable_modules():
    from lanternlm.model import MLP, RMSNorm
    for offset in (0.0, 1.0):
        norm = RMSNorm(96, 1e-6, offset)
        torch.nn.init.normal_(norm.weight)
        x = torch.randn(2, 3, 96)
        ref = norm(x)
        fused = fuse_for_cpu_module(norm)
        assert torch.allclose(fused(x), ref, atol=1e-5, rtol=1e-5)
    for act in ("silu", "gelu_pytorch_tanh"):
        cfg = ModelConfig.from_hf(make_hf_model("phi3", hidden_act=act).config.to_dict())
        mlp = MLP(cfg)
        for p in mlp.parameters():
            torch.nn.init.normal_(p, std=0.2)
        x = torch.randn(1, 2, cfg.hidden_size)
        ref = mlp(x)
        assert torch.allclose(fuse_for_cpu_module(mlp)(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("act", [0, 1], ids=["silu", "gelu-tanh"])
def test_gated_act_over_the_whole_float_range_on_each_instruction_set(act, isa):
    # AVX-512's loops compute both as g * sigmoid(a) with their own exp; AVX2 keeps the scalar expf/tanhf. Rows
    # whose width is no multiple of 16 (the masked tail), values out to where exp overflows and underflows.
    g = torch.cat([torch.linspace(-120, 120, 2001), torch.randn(999) * 4, torch.tensor([0.0, -0.0, 1e-30, -1e-30])])
    u = torch.randn(g.numel())
    x = torch.cat([g, u]).view(1, -1).repeat(3, 1)
    got = K.gated_act(x, act)
    f = torch.nn.functional
    want = (f.silu(g.double()) if act == 0 else f.gelu(g.double(), approximate="tanh")) * u.double()
    assert got.shape == (3, g.numel()) and torch.isfinite(got).all()
    for row in got:
        torch.testing.assert_close(row.double(), want, atol=1e-6, rtol=2e-6)


def fuse_for_cpu_module(module):
    """A copy of one module with its fused class, as fuse_for_cpu swaps it in a model."""
    from lanternlm import fused
    m = copy.deepcopy(module)
    m.__class__ = {"RMSNorm": fused.FusedRMSNorm, "MLP": fused.FusedMLP}[type(module).__name__]
    m._act = fused._act_code(m.act) if hasattr(m, "act") else None
    return m


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3", "phi3", "gemma3"])
def test_decode_step_equals_the_readable_model_single_and_batched(arch):
    # The tiny models of the other tests, with q/k/v and gate/up fused as the quantize transform fuses them.
    hf = make_hf_model(arch)  # mistral and gemma3 have windows (5, 4) shorter than the sequences below
    from lanternlm.loader.build import build_model
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    ref = build_model(cfg, {k: v.float() for k, v in hf.state_dict().items()}, "tiny")
    fuse_qkv(ref)
    fast = fuse_for_cpu(copy.deepcopy(ref))
    assert any(isinstance(m, FusedAttention) for m in fast.modules())
    gen = torch.Generator().manual_seed(0)
    # three sequences of different lengths in slots 2, 0, 3 of a 4-slot cache (the Engine's batched decode)
    lengths = [9, 3, 14]
    slots = torch.tensor([2, 0, 3])
    caches = [KVCache(cfg, 4, 32, torch.float32) for _ in range(2)]
    for model, cache in zip((ref, fast), caches):
        for slot, n in zip(slots.tolist(), lengths):
            ids = torch.randint(0, cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
            model(ids, torch.arange(n)[None], cache, slots=slot)
    with torch.inference_mode():
        for step in range(4):  # four decode steps, batched
            ids = torch.randint(0, cfg.vocab_size, (3, 1), generator=gen)
            pos = torch.tensor([[n + step] for n in lengths])
            a = ref(ids, pos, caches[0], slots=slots).logits
            b = fast(ids, pos, caches[1], slots=slots).logits
            assert torch.allclose(a, b, atol=2e-4, rtol=1e-4), (a - b).abs().max()
        for layer in range(cfg.num_hidden_layers):  # the op wrote the same keys and values
            assert torch.allclose(caches[0].k[layer], caches[1].k[layer], atol=1e-5)
            assert torch.allclose(caches[0].v[layer], caches[1].v[layer], atol=1e-5)
        # and a single sequence (B = 1, slot given as an int), as plain generation runs it
        a = ref(torch.tensor([[5]]), torch.tensor([[lengths[1] + 4]]), caches[0], slots=0).logits
        b = fast(torch.tensor([[5]]), torch.tensor([[lengths[1] + 4]]), caches[1], slots=0).logits
        assert torch.allclose(a, b, atol=2e-4, rtol=1e-4)


def fuse_qkv(model) -> None:
    """Fuse q/k/v and gate/up into single nn.Linear modules in place (the layout the fused path runs on)."""
    from torch import nn
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if not attn.fused:
            parts = [attn.q_proj, attn.k_proj, attn.v_proj]
            fused = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts), bias=parts[0].bias is not None)
            fused.weight.data = torch.cat([p.weight for p in parts])
            if fused.bias is not None:
                fused.bias.data = torch.cat([p.bias for p in parts])
            del attn.q_proj, attn.k_proj, attn.v_proj
            attn.qkv_proj, attn.fused = fused, True
        if not mlp.fused:
            gate_up = nn.Linear(mlp.gate_proj.in_features, 2 * mlp.gate_proj.out_features, bias=False)
            gate_up.weight.data = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            del mlp.gate_proj, mlp.up_proj
            mlp.gate_up_proj, mlp.fused = gate_up, True


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3", "llama-k-quants"])
def test_decode_stack_equals_the_module_path(arch, tmp_path):
    # The one-call C++ decoder stack against the same quantized model run module by module. "llama-k-quants"
    # is laid out like a Q4_K_M file: Q4_K q/k next to a Q6_K v, so q, k and v stay separate products.
    from lanternlm.load import load

    from gguf_writer import write_gguf
    if arch == "llama-k-quants":
        mix = {"q_proj": T.Q4_K, "k_proj": T.Q4_K, "v_proj": T.Q6_K, "down_proj": T.Q6_K}
        write_gguf(make_hf_model("llama", hidden_size=256, intermediate_size=512, head_dim=64), tmp_path / "m.gguf",
                   T.Q4_K, qtype_for=lambda name, shape: mix.get(name.rsplit(".", 2)[-2], T.Q4_K))
    else:
        write_gguf(make_hf_model(arch), tmp_path / "m.gguf", T.Q8_0)
    model = load(tmp_path / "m.gguf", exact=False).model
    if arch == "llama-k-quants":
        assert not model.model.layers[0].self_attn.fused and model.model.layers[0].mlp.fused
    # With separate q/k/v the module path runs the readable attention (PyTorch's RoPE and SDPA) instead of the
    # fused op, so float summation order differs: measured 7e-4 on logits of magnitude ~10.
    atol = 2e-3 if arch == "llama-k-quants" else 1e-4
    slow = copy.deepcopy(model)
    slow.model._stackable = False  # module by module
    cfg = model.config
    caches = [KVCache(cfg, 4, 40, torch.float32) for _ in range(2)]
    lengths, slots = [9, 3, 14], torch.tensor([2, 0, 3])
    with torch.inference_mode():
        for m, cache in zip((model, slow), caches):
            for slot, n in zip(slots.tolist(), lengths):
                ids = torch.randint(0, cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
                m(ids, torch.arange(n)[None], cache, slots=slot)
        gen = torch.Generator().manual_seed(1)
        for step in range(5):
            ids = torch.randint(0, cfg.vocab_size, (3, 1), generator=gen)
            pos = torch.tensor([[n + step] for n in lengths])
            a = model(ids, pos, caches[0], slots=slots).logits
            b = slow(ids, pos, caches[1], slots=slots).logits
            assert torch.allclose(a, b, atol=atol, rtol=1e-5), (a - b).abs().max()
        assert model.model._stack is not None and slow.model._stack is None  # both paths really ran
        a = model(torch.tensor([[7]]), torch.tensor([[30]]), caches[0], slots=1).logits
        b = slow(torch.tensor([[7]]), torch.tensor([[30]]), caches[1], slots=1).logits
        assert torch.allclose(a, b, atol=atol, rtol=1e-5)
        for layer in range(cfg.num_hidden_layers):
            assert torch.allclose(caches[0].k[layer], caches[1].k[layer], atol=atol / 10)
            assert torch.allclose(caches[0].v[layer], caches[1].v[layer], atol=atol / 10)


def test_products_from_another_thread_equal_the_main_threads():
    # The process's first thread and another (the serving Engine's) share Lantern's pool (pool.cpp): both must
    # give the same numbers, for every row split, and the pool's workers must serve either caller.
    import threading
    raw, _ = ggml_blocks(T.Q4_1, 3000, 576, seed=9)
    b = from_ggml(raw, T.Q4_1, (3000, 576))
    results = {}
    for rows in (1, 3, 8):
        x = torch.randn(rows, 576, generator=torch.Generator().manual_seed(rows))
        results["main", rows] = K.qmatmul(x, b.qs, b.d, b.m, b.kind)

        def work(rows=rows, x=x):
            for _ in range(3):  # repeated calls reuse the pool's sleeping/spinning workers
                results["thread", rows] = K.qmatmul(x, b.qs, b.d, b.m, b.kind)

        t = threading.Thread(target=work)
        t.start()
        t.join()
        assert torch.equal(results["main", rows], results["thread", rows])


def test_decode_steps_look_rope_up_in_a_table_that_equals_the_module(tmp_path, monkeypatch):
    # FusedTransformer._rope: cos/sin of decode steps come from a table of positions the rotary module computed
    # (grown by doubling), not from per-step cos/sin calls (MKL opens an OpenMP region for those when its thread
    # count is above one, and its spinning threads held up the kernels' pool). Both of Gemma 3's rope kinds.
    import lanternlm.fused as fused
    from lanternlm.load import load

    from gguf_writer import write_gguf
    write_gguf(make_hf_model("gemma3"), tmp_path / "m.gguf", T.Q8_0)
    transformer = load(tmp_path / "m.gguf", exact=False).model.model
    monkeypatch.setattr(fused, "ROPE_TABLE_POSITIONS", 1000)
    for kind in transformer._rope_kinds:
        for positions in ([[3]], [[600], [5]], [[999]], [[1500]]):  # 600 grows the table; 1500 is past its cap
            pos = torch.tensor(positions)
            c, s = transformer._rope(kind, pos, torch.float32)
            ref_c, ref_s = transformer.rotary[kind](pos, torch.float32)
            assert torch.allclose(c, ref_c[:, 0], atol=1e-6) and torch.allclose(s, ref_s[:, 0], atol=1e-6)
        table = transformer._rope_tables[(kind, torch.float32)]
        assert table[0].shape[0] == 1000  # grown from 512 and capped, never grown for 1500
