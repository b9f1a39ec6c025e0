"""The native kernels for the 2-, 3-, 5- and 6-bit ggml types (Q5_0, Q5_1, Q5_K, Q6_K, Q3_K, Q2_K), Q4_K and the
non-linear 4-bit IQ4_NL and IQ4_XS, against gguf-py and the float32 product.

For every type, on AVX-512 VNNI and on AVX2 (forced through set_isa; AVX-512 skipped on CPUs without it):
- the blocks keep the type's own bits: their kind is the type's native one (not the 8-bit fallback) and they
  take about the file's bytes;
- dequantization (the torch reference and the kernel's, used by the dense prefill and the embedding) equals
  gguf-py's exactly (Q4_K, Q5_K, Q2_K and IQ4_XS keep their own scales; what a tensor-parallel cut inside
  super-blocks takes, per-block float16 scales or Q2_K's 8-bit blocks, is checked separately);
- the product equals the float32 product of the dequantized weights within the int16 activation rounding,
  for 1, 3 and 8 activation rows, odd N and several K;
and a tiny Llama written with these types decodes the greedy tokens of its exact float32 path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

import lanternlm.quantize
from lanternlm import LLM, SamplingParams
from lanternlm.kernels import kernels, why_unavailable
from lanternlm.kernels.blocks import (
    BLOCK_BYTES,
    KIND_IQ4_NL,
    KIND_IQ4_XS,
    KIND_Q2_K,
    KIND_Q3,
    KIND_Q4_K,
    KIND_Q4_MIN,
    KIND_Q5,
    KIND_Q5_K,
    KIND_Q5_MIN,
    KIND_Q6,
    KIND_Q8,
    blocks_nbytes,
    dequantize_blocks,
    from_ggml,
)
from lanternlm.loader.quants import block_fields, f16, k_scales_mins, type_layout
from lanternlm.quantize import QuantLinear

import gguf_writer
from gguf_writer import random_blocks  # bound here: the tiny-model test swaps gguf_writer's for k_blocks
from tiny_models import make_hf_model

K = kernels(quiet=True)
pytestmark = pytest.mark.skipif(K is None, reason=f"kernels unavailable: {why_unavailable()}")

NATIVE = {T.Q5_0: KIND_Q5, T.Q5_1: KIND_Q5_MIN, T.Q5_K: KIND_Q5_K, T.Q6_K: KIND_Q6, T.Q3_K: KIND_Q3,
          T.Q4_K: KIND_Q4_K, T.Q2_K: KIND_Q2_K, T.IQ4_NL: KIND_IQ4_NL, T.IQ4_XS: KIND_IQ4_XS}
K_TYPES = {T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS}  # super-blocks of 256
RANDOM_TYPES = K_TYPES | {T.IQ4_NL}  # no gguf-py quantizer: random blocks (k_blocks)
# Super-block scales small enough that weights stay about 0.01-0.5, like a trained model's.
SUPER_SCALES = {T.Q2_K: {"d": (0.0005, 0.003), "dmin": (0.0005, 0.003)}, T.Q3_K: {"d": (0.0005, 0.003)},
                T.IQ4_NL: {"d": (0.0005, 0.003)}, T.IQ4_XS: {"d": (0.00002, 0.0001)}, T.Q4_K: {"d": (0.0002, 0.0008), "dmin": (0.0002, 0.0008)},
                T.Q5_K: {"d": (0.0001, 0.0004), "dmin": (0.0002, 0.0008)}, T.Q6_K: {"d": (0.00002, 0.0001)}}


def k_blocks(qtype: T, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Valid K-quant and IQ4 blocks (gguf-py has no quantizer for them) with the scale ranges above."""
    return random_blocks(qtype, rows, cols, rng, ranges=tuple(SUPER_SCALES[qtype].values()))


def ggml_tensor(qtype: T, n: int, k: int, seed: int) -> tuple[np.ndarray, torch.Tensor]:
    """Raw ggml bytes of an (n, k) matrix and gguf-py's float32 decoding of them."""
    rng = np.random.default_rng(seed)
    if qtype in RANDOM_TYPES:
        raw = k_blocks(qtype, n, k, rng)
    else:
        raw = gguf_quantize((rng.standard_normal((n, k)) * rng.uniform(0.01, 2.0, (n, 1))).astype(np.float32), qtype)
    return raw.reshape(-1).view(np.uint8), torch.from_numpy(gguf_dequantize(raw, qtype).astype(np.float32)).view(n, k)


def widths(qtype: T) -> list[int]:
    """Several K: 1, 3 and 19 blocks of 32 (odd, and not a multiple of 16), or 1 and 3 super-blocks."""
    return [256, 768] if qtype in K_TYPES else [32, 96, 608]


def scale_rounding_bound(raw: np.ndarray, qtype: T, n: int, k: int) -> torch.Tensor:
    """Q4_K/Q5_K cut into per-block scales: value = q*scale - offset with scale and offset each rounded to
    float16, a relative change of
    at most 2^-11 of each term (2^-25 absolute below float16's normal range): bound per weight, (n, k)."""
    fields = block_fields(torch.from_numpy(raw.copy()).view(-1, type_layout(qtype)[1]), qtype)
    scales, mins = k_scales_mins(fields["scales"])
    scale, offset = (f16(fields["d"]) * scales)[..., None], (f16(fields["dmin"]) * mins)[..., None]  # (., 8, 1)
    qmax = 31 if qtype == T.Q5_K else 15
    bound = 2.0 ** -11 * (qmax * scale + offset) + 2 * 2.0 ** -25 * (qmax + 1)
    return bound.expand(-1, 8, 32).reshape(n, k) + 1e-9


def product_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Rounding of int16 activations per block of 32 (half of max|x| / 32767 per value) times |w|, plus float32
    summation and conversion of the integer dot products."""
    xb = x.view(x.shape[0], -1, 32)
    step = (xb.abs().amax(-1, keepdim=True) / 32767 / 2).expand_as(xb).reshape(x.shape)
    return step @ w.abs().t() + 1e-5 * (x.abs() @ w.abs().t()) + 1e-6


@pytest.mark.parametrize("qtype", list(NATIVE), ids=lambda t: t.name)
def test_blocks_keep_the_type_bits_and_dequantize_like_gguf_py(isa, qtype):
    for k in widths(qtype):
        n = 13
        raw, ref = ggml_tensor(qtype, n, k, seed=k)
        blocks = from_ggml(raw, qtype, (n, k))
        assert blocks.kind == NATIVE[qtype]  # the native kind, not the 8-bit fallback
        held = sum(t.numel() * t.element_size() for t in blocks.tensors())
        assert held == sum(blocks_nbytes(qtype, (n, k)))
        # about the file's bytes: per-block float16 scales cost K-quants at most 0.5625 bit per weight more;
        # Q2_K keeps exactly the file's
        assert held <= raw.size + n * k * 0.5625 / 8
        if qtype == T.Q2_K:
            assert held == raw.size
        assert blocks.qs.shape == (n, k // 32 * BLOCK_BYTES[blocks.kind])
        torch_ref = dequantize_blocks(blocks)
        f32 = K.dequantize(blocks.qs, blocks.d, blocks.m, blocks.kind, k, torch.float32)
        bf16 = K.dequantize(blocks.qs, blocks.d, blocks.m, blocks.kind, k, torch.bfloat16)
        assert torch.equal(f32, torch_ref)
        assert torch.equal(bf16, torch_ref.to(torch.bfloat16))
        assert torch.equal(f32, ref)
        if qtype == T.IQ4_XS:  # a cut inside super-blocks: IQ4_NL, each block's scale rounded to float16
            cut = blocks.columns(96, k - 96)
            assert cut.kind == KIND_IQ4_NL
            want = ref[:, 96:k - 96]
            assert torch.all((dequantize_blocks(cut) - want).abs() <= want.abs() * 2.0 ** -11 + 2.0 ** -24 * 127)
            assert torch.equal(K.dequantize(cut.qs, cut.d, cut.m, cut.kind, k - 192, torch.float32),
                               dequantize_blocks(cut))
        if qtype in (T.Q4_K, T.Q5_K):  # a cut inside super-blocks: per-block float16 scales and offsets
            cut = blocks.columns(96, k - 96)
            assert cut.kind == (KIND_Q4_MIN if qtype == T.Q4_K else KIND_Q5_MIN)
            got = dequantize_blocks(cut)
            assert torch.all((got - ref[:, 96:k - 96]).abs() <= scale_rounding_bound(raw, qtype, n, k)[:, 96:k - 96])
            assert torch.equal(K.dequantize(cut.qs, cut.d, cut.m, cut.kind, k - 192, torch.float32), got)
        if qtype == T.Q2_K:  # a cut inside super-blocks: its values as 8-bit blocks, within half a step
            cut = blocks.columns(96, k - 96)
            assert cut.kind == KIND_Q8
            want = ref[:, 96:k - 96].reshape(n, -1, 32)
            step = want.abs().amax(-1, keepdim=True) / 127
            assert torch.all((dequantize_blocks(cut).view_as(want) - want).abs() <= 0.5 * step * 1.002)


@pytest.mark.parametrize("qtype", list(NATIVE), ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_product_equals_the_float32_product_of_the_dequantized_weights(isa, qtype, rows):
    for k in widths(qtype):
        n = 37  # not a multiple of the 2- and 4-row tiles
        raw, _ = ggml_tensor(qtype, n, k, seed=k + rows)
        blocks = from_ggml(raw, qtype, (n, k))
        w = dequantize_blocks(blocks)
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
        x[0, :32] *= 100  # an outlier block must not cost the other blocks their precision
        got = K.qmatmul(x, blocks.qs, blocks.d, blocks.m, blocks.kind)
        ref = x.double() @ w.double().t()
        assert got.shape == (rows, n) and got.dtype == torch.float32
        assert torch.all((got.double() - ref).abs() <= product_bound(x, w).double()), (qtype.name, k)


@pytest.mark.parametrize("rows", [1, 2, 3, 8])
def test_mixed_kind_parts_in_one_call_give_the_bits_of_separate_products(isa, rows):
    # q, k, v of a K-quant mix in three types (as Q4_K_M files keep them): qmatmul_parts quantizes x once and
    # runs every part's rows in one parallel region; each part must come out as its own qmatmul's bits.
    k = 256
    parts = [from_ggml(*ggml_tensor(qtype, n, k, seed=n)[:1], qtype, (n, k))
             for qtype, n in ((T.Q5_0, 37), (T.Q8_0, 6), (T.Q4_K, 13), (T.Q6_K, 5))]
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    got = K.qmatmul_parts(x, [b.qs for b in parts], [b.d for b in parts], [b.m for b in parts],
                          [b.kind for b in parts])
    want = torch.cat([K.qmatmul(x, b.qs, b.d, b.m, b.kind) for b in parts], -1)
    assert got.shape == (rows, 37 + 6 + 13 + 5)
    assert torch.equal(got, want)
    with pytest.raises(RuntimeError, match="one entry per part"):
        K.qmatmul_parts(x, [parts[0].qs], [parts[0].d, parts[1].d], [parts[0].m], [parts[0].kind])


def test_malformed_multipliers_are_refused():
    raw, _ = ggml_tensor(T.Q6_K, 4, 256, seed=0)
    b = from_ggml(raw, T.Q6_K, (4, 256))
    with pytest.raises(RuntimeError, match="multipliers"):
        K.qmatmul(torch.zeros(1, 256), b.qs, b.d, None, b.kind)
    with pytest.raises(RuntimeError, match="multipliers"):
        K.qmatmul(torch.zeros(1, 256), b.qs, b.d, b.m[:, :8].contiguous(), b.kind)


@pytest.mark.parametrize("qtype", [T.Q2_K, T.IQ4_XS], ids=lambda t: t.name)
def test_malformed_super_block_scales_are_refused(qtype):
    raw, _ = ggml_tensor(qtype, 4, 512, seed=0)
    b = from_ggml(raw, qtype, (4, 512))
    with pytest.raises(RuntimeError, match="per super-block"):
        K.qmatmul(torch.zeros(1, 512), b.qs, b.d[:, :1].contiguous(), b.m, b.kind)
    with pytest.raises(RuntimeError, match="contiguous uint8"):
        K.qmatmul(torch.zeros(1, 512), b.qs, b.d, b.m[:, :4].contiguous(), b.kind)
    with pytest.raises(RuntimeError, match="contiguous uint8"):
        K.qmatmul(torch.zeros(1, 512), b.qs, b.d, None, b.kind)


TYPES_BY_MATRIX = {"q_proj": T.Q5_K, "k_proj": T.IQ4_XS, "v_proj": T.Q6_K, "o_proj": T.Q5_0, "gate_proj": T.Q3_K,
                   "up_proj": T.IQ4_NL, "down_proj": T.Q2_K, "embed_tokens": T.Q5_1, "lm_head": T.Q4_K}


def test_tiny_model_of_these_types_decodes_the_greedy_tokens_of_the_float32_path(tmp_path, monkeypatch):
    # gguf_writer writes K-quant blocks from random bytes; give them the small scales of k_blocks, so the
    # network is not chaotic and its float32 logits are a meaningful reference.
    monkeypatch.setattr(gguf_writer, "random_blocks", k_blocks)
    # Without AVX-512, models compute Q6_K and Q3_K as 8-bit blocks (quantize.requantized_kinds: slower native
    # kernels there); here the model runs every kind natively, through the fused decode stack.
    monkeypatch.setattr(lanternlm.quantize, "requantized_kinds", lambda: ())
    hf = make_hf_model("llama", hidden_size=256, intermediate_size=512, head_dim=64)  # rows of 256
    gguf_writer.write_gguf(hf, tmp_path / "m.gguf", T.Q8_0,
                           qtype_for=lambda name, shape: TYPES_BY_MATRIX.get(name.rsplit(".", 2)[-2], T.F32))
    quant = LLM(str(tmp_path / "m.gguf"), exact=False)
    exact = LLM(str(tmp_path / "m.gguf"), exact=True)
    kinds = {m.kind for m in quant.model.modules() if isinstance(m, QuantLinear)}
    assert {KIND_Q5_K, KIND_Q6, KIND_Q5, KIND_Q3, KIND_Q2_K, KIND_IQ4_XS, KIND_IQ4_NL} <= kinds  # (+ untied Q4_K head)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    for prompt in ([5, 17, 90, 3], [200, 1, 44, 44, 9, 120, 7]):  # short: every product is the int16 kernel
        assert quant.generate(prompt, params).token_ids == exact.generate(prompt, params).token_ids


def test_nibble_runs_are_repacked_in_one_pass_as_the_torch_fallback_repacks_them(monkeypatch):
    # from_ggml repacks K-quant nibble runs with the kernels' one-pass pack_nibble_runs, straight from the file's
    # strided fields (Q6_K ql in runs of 64 bytes, Q4_K and Q5_K qs in runs of 32); without the kernels, blocks.py
    # does it in torch. (The exactness tests above check the kernels' result against gguf-py.)
    import lanternlm.kernels.blocks as blocks_module
    raw = torch.from_numpy(np.random.default_rng(3).integers(0, 256, size=(257, 210), dtype=np.uint8))
    cases = [(raw[:, 0:128], 64), (raw[:, 16:144], 32), (raw[:, 48:176], 32)]
    fast = [blocks_module._pack_nibble_runs(field, run) for field, run in cases]
    monkeypatch.setattr(blocks_module, "kernels", lambda quiet=False: None)
    for (field, run), got in zip(cases, fast):
        assert got.shape == (257, 8, 16)
        assert torch.equal(got, blocks_module._pack_nibble_runs(field, run))


def test_crumbs_are_regrouped_in_one_pass_as_the_torch_fallback_and_a_bit_by_bit_loop_regroup_them(monkeypatch):
    # K-quant 2-bit runs (Q2_K/Q3_K qs, Q6_K qh: bits 2t, 2t+1 of byte l of run h belong to element l of sub-block
    # 4h + t) -> per sub-block 8 crumb bytes, byte 4c + j holding at bits 2s, 2s+1 the crumb of element 16c + 4s + j.
    # The kernels do it in one pass from the file's strided field; without them, blocks.py in torch.
    import lanternlm.kernels.blocks as blocks_module
    raw = torch.from_numpy(np.random.default_rng(11).integers(0, 256, size=(517, 110), dtype=np.uint8))
    runs = raw[:, 32:96]  # Q3_K's qs, strided
    fast = blocks_module._crumbs(runs)
    r = runs.numpy().astype(np.int64)
    want = np.zeros((517, 8, 8), dtype=np.int64)
    for h in range(2):
        for t in range(4):
            for c in range(2):
                for j in range(4):
                    for s4 in range(4):
                        want[:, 4 * h + t, 4 * c + j] |= ((r[:, 32 * h + 16 * c + 4 * s4 + j] >> (2 * t)) & 3) << (2 * s4)
    assert torch.equal(fast, torch.from_numpy(want.astype(np.uint8)))
    monkeypatch.setattr(blocks_module, "kernels", lambda quiet=False: None)
    assert torch.equal(blocks_module._crumbs(runs), fast)


def test_high_bits_are_transposed_in_one_pass_as_the_torch_fallback_transposes_them(monkeypatch):
    # The 5-bit kinds' fifth bits: ggml's plane (bit e of a little-endian uint32: element e) -> 4 bytes, byte j
    # holding at bit s that of element 4s + j (the byte kernel's step s takes bit s of each byte). The kernels do
    # it in one pass straight from the file's strided qh field; without them, blocks.py in torch.
    import lanternlm.kernels.blocks as blocks_module
    planes = np.random.default_rng(5).integers(0, 256, size=(1001, 22), dtype=np.uint8)[:, 2:6]  # Q5_0's qh
    bits = np.unpackbits(np.ascontiguousarray(planes), axis=1, bitorder="little")  # (n, 32): element e
    want = np.zeros((1001, 4), dtype=np.uint8)
    for j in range(4):
        for s_ in range(8):
            want[:, j] |= bits[:, 4 * s_ + j] << s_
    fast = blocks_module._plane_high_bits(planes)
    monkeypatch.setattr(blocks_module, "kernels", lambda quiet=False: None)
    slow = blocks_module._plane_high_bits(planes)
    assert np.array_equal(fast.numpy(), want) and np.array_equal(slow.numpy(), want)
