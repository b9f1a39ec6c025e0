"""The quantized path (Lantern's kernels on 4/8-bit blocks, or the PyTorch int8 fallback) against the dequantized
reference it replaces."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as T

from lanternlm import LLM, SamplingParams
from lanternlm import quantize as quantize_module
from lanternlm.kernels import blocks as blocks_module
from lanternlm.kernels import kernels
from lanternlm.kernels.blocks import (KIND_IQ4_NL, KIND_IQ4_XS, KIND_Q4_K, KIND_Q5_K, KIND_Q6, KIND_Q8, KIND_Q8_LANES,
                                      dequantize_blocks)
from lanternlm import load as load_module
from lanternlm.load import load
from lanternlm.model import KVCache
from lanternlm.quantize import DENSE_FROM_ROWS, Int8Linear, QuantLinear

from gguf_writer import write_gguf
from tiny_models import make_hf_model


def error_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What int8 rows + bf16 compute may cost: half an int8 step per weight (row max / 254) and bf16's relative
    rounding (2^-8) of activations, weights and the product, each times the magnitudes it multiplies."""
    step = w.abs().amax(dim=1) / 254.0                       # (out,)
    magnitude = x.abs() @ w.abs().t()                        # (M, out)
    return x.abs().sum(-1, keepdim=True) * step + 4 * 2.0 ** -8 * magnitude + 1e-6


@pytest.mark.parametrize("rows", [1, 3, DENSE_FROM_ROWS, 64])  # both kernels: int8 matvec and dense bf16
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_within_its_error_of_the_exact_product(rows, bias):
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 64, generator=gen) * torch.rand(96, 1, generator=gen)
    b = torch.randn(96, generator=gen) if bias else None
    x = torch.randn(rows, 64, generator=gen)
    ref = x @ w.t() + (b if bias else 0)
    got = Int8Linear(w, b)(x)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert torch.all((got - ref).abs() <= error_bound(x, w)), (got - ref).abs().max()
    assert not torch.equal(got, ref)  # it really is quantized


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "gemma3"])
def test_pytorch_fallback_tracks_the_dequantized_reference(arch, tmp_path, monkeypatch):
    # Where Lantern's kernels cannot run (no compiler, no AVX2), linear layers fall back to Int8Linear.
    monkeypatch.setattr(quantize_module, "uses_kernels", lambda gguf: False)
    hf = make_hf_model(arch)
    write_gguf(hf, tmp_path / "m.gguf", T.Q8_0)
    quant = load(tmp_path / "m.gguf", exact=False)
    ref = load(tmp_path / "m.gguf", exact=True)
    assert not quant.exact and ref.exact
    kinds = {type(m).__name__ for m in quant.model.modules()}
    assert "Int8Linear" in kinds and "Linear" not in kinds and "QuantLinear" not in kinds
    # Measured 2.4-3.1% of the logits' norm here (random weights, bf16 activations through every matmul);
    # twice that would mean a real fault. The real model's top-1 agreement is checked below.
    assert max(relative_error(quant.model, ref.model)) < 0.06


def relative_error(a, b) -> tuple[float, float]:
    """(prefill of 40 rows, the dense path; 20-row prefill plus 4 cached decode steps, the row-wise path)."""
    ids = torch.randint(3, 320, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
        assert la.shape == lb.shape
        dense = ((la - lb).norm() / lb.norm()).item()
        rows = 0.0
        cache_a, cache_b = KVCache(a.config, 1, 64, torch.float32), KVCache(b.config, 1, 64, torch.float32)
        a(ids[:, :20], torch.arange(20)[None], cache_a)
        b(ids[:, :20], torch.arange(20)[None], cache_b)
        for p in range(20, 24):
            la = a(ids[:, p:p + 1], torch.tensor([[p]]), cache_a).logits
            lb = b(ids[:, p:p + 1], torch.tensor([[p]]), cache_b).logits
            rows = max(rows, ((la - lb).norm() / lb.norm()).item())
    return dense, rows


LEGACY_MIX = {"q_proj": T.Q4_0, "k_proj": T.Q4_0, "v_proj": T.Q8_0, "o_proj": T.Q4_1, "gate_proj": T.Q4_1,
              "up_proj": T.Q4_1, "down_proj": T.Q8_0, "qkv_proj": T.Q4_0, "gate_up_proj": T.Q4_1}
K_MIX = {"q_proj": T.Q4_K, "k_proj": T.Q4_K, "v_proj": T.Q6_K, "o_proj": T.Q4_K, "gate_proj": T.Q4_K,
         "up_proj": T.Q4_K, "down_proj": T.Q5_K, "qkv_proj": T.Q4_K, "gate_up_proj": T.Q4_K}


def pick_from(table):
    return lambda name, shape: table.get(name.rsplit(".", 2)[-2], T.Q8_0)


@pytest.mark.skipif(kernels(quiet=True) is None, reason="Lantern's kernels are unavailable here")
@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "gemma3"])
@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_1, "mixed"])
def test_kernel_path_tracks_the_dequantized_reference(arch, qtype, tmp_path):
    hf = make_hf_model(arch)
    write_gguf(hf, tmp_path / "m.gguf", qtype if qtype != "mixed" else T.Q8_0,
               qtype_for=pick_from(LEGACY_MIX) if qtype == "mixed" else None)
    quant = load(tmp_path / "m.gguf", exact=False)
    ref = load(tmp_path / "m.gguf", exact=True)
    kinds = {type(m).__name__ for m in quant.model.modules()}
    assert {"QuantLinear", "QuantEmbedding", "FusedAttention"} <= kinds and "Linear" not in kinds
    # The weights are the file's own values. From 32 rows on (prefill) weights and activations are rounded to
    # bf16 for a dense matmul: measured ~3% of the logits' norm on these random weights. Below that, the
    # kernel rounds activations to int16 per block of 32: measured 1-3e-4 (float32 summation order mostly).
    dense, rows = relative_error(quant.model, ref.model)
    assert dense < 0.06, dense
    assert rows < 1e-3, rows


def test_k_quant_file_weights_through_the_kernel_path(tmp_path, isa):
    # Random k-quant blocks make a chaotic network (weights up to ~8), so this checks each layer's weights
    # and one product rather than the logits.
    hf = make_hf_model("llama", hidden_size=256, intermediate_size=512, head_dim=64)  # rows of 256
    write_gguf(hf, tmp_path / "m.gguf", T.Q8_0, qtype_for=pick_from(K_MIX))
    quant = load(tmp_path / "m.gguf", exact=False).model
    ref = load(tmp_path / "m.gguf", exact=True).model
    x = torch.randn(3, 512)
    for name, module in quant.named_modules():
        if not isinstance(module, QuantLinear):
            continue
        names = {"self_attn.qkv_proj": ["q_proj", "k_proj", "v_proj"], "mlp.gate_up_proj": ["gate_proj", "up_proj"]}
        suffix = ".".join(name.split(".")[-2:])
        parts = [f"{name.rsplit('.', 1)[0]}.{p}" for p in names[suffix]] if suffix in names else [name]
        w = torch.cat([ref.get_submodule(p).weight for p in parts])
        got = dequantize_blocks(module.weight_blocks())
        # Q4_K, Q5_K and Q6_K exact; Q8_0 requantized ones (AVX2's Q6_K) within half an 8-bit step. The bound
        # below (that plus 2^-9 of the block's max) covers every kind.
        block_max = w.view(w.shape[0], -1, 32).abs().amax(-1, keepdim=True).expand(-1, -1, 32).reshape(w.shape)
        assert torch.all((got - w).abs() <= block_max * (1 / 254 + 2.0 ** -9) + 1e-6), name
        xi = x[:, :module.in_features]
        # int16 activations: at most max|x| / 65534 per value, times the weights' magnitudes
        bound = xi.abs().amax() / 65534 * got.abs().sum(1) + 1e-5 * (xi.abs() @ got.abs().t())
        assert torch.all((module(xi) - xi @ got.t()).abs() <= bound), name
    kinds = {m.kind for m in quant.modules() if isinstance(m, QuantLinear)}
    # Q4_K and Q5_K in their own bits; Q6_K too with AVX-512, as 8-bit blocks with AVX2 (quantize.requantized_kinds:
    # its AVX2 kernel is slower than the 8-bit one); the head is Q8_0 (across lanes with AVX-512).
    assert kinds == ({KIND_Q4_K, KIND_Q5_K, KIND_Q6, KIND_Q8_LANES} if isa == 2 else {KIND_Q4_K, KIND_Q5_K, KIND_Q8})
    assert not quant.model.layers[0].self_attn.fused  # Q4_K q/k next to Q6_K v: separate products


IQ_MIX = {"q_proj": T.IQ4_XS, "k_proj": T.IQ4_NL, "v_proj": T.IQ3_S, "o_proj": T.IQ3_XXS, "gate_proj": T.IQ2_XXS,
          "up_proj": T.IQ2_S, "down_proj": T.TQ2_0, "embed_tokens": T.IQ2_XS, "lm_head": T.IQ1_S}


@pytest.mark.skipif(kernels(quiet=True) is None, reason="Lantern's kernels are unavailable here")
def test_iq_file_weights_are_the_files_values_exactly_and_8_bit_blocks_within_half_a_step(tmp_path, monkeypatch):
    # The IQ family (but IQ4_NL and IQ4_XS, kinds of their own) and the ternary types: gguf-py decodes them
    # (loader/quants) and the kernel path keeps them as 8-bit blocks, a chunk of rows at a time (a small
    # CHUNK_BYTES: several chunks).
    monkeypatch.setattr(quantize_module, "CHUNK_BYTES", 3000)
    hf = make_hf_model("llama", hidden_size=256, intermediate_size=512, head_dim=64, tie_word_embeddings=False)
    encoded = write_gguf(hf, tmp_path / "m.gguf", T.Q8_0, qtype_for=pick_from(IQ_MIX))
    ref = load(tmp_path / "m.gguf", exact=True).model
    for name, w in encoded.items():  # the exact path: gguf-py's values, permutations undone
        assert torch.equal(ref.get_parameter(name).float(), w), name
    quant = load(tmp_path / "m.gguf", exact=False).model
    modules = [m for m in quant.modules() if isinstance(m, QuantLinear)]
    eight_bit = KIND_Q8_LANES if kernels().isa() == 2 else KIND_Q8  # (quantize._linear)
    assert {m.kind for m in modules} == {eight_bit, KIND_IQ4_XS, KIND_IQ4_NL}
    layer = quant.model.layers[0]
    for name in ("self_attn.q_proj", "self_attn.k_proj"):  # IQ4_XS, IQ4_NL: their own bits, the same values
        assert torch.equal(dequantize_blocks(layer.get_submodule(name).weight_blocks()),
                           encoded[f"model.layers.0.{name}.weight"]), name
    for module, name in [(layer.mlp.down_proj, "model.layers.0.mlp.down_proj.weight"), (quant.lm_head, "lm_head.weight"),
                         (layer.self_attn.o_proj, "model.layers.0.self_attn.o_proj.weight")]:
        w = encoded[name]
        got = dequantize_blocks(module.weight_blocks())
        step = w.view(w.shape[0], -1, 32).abs().amax(-1, keepdim=True).expand(-1, -1, 32).reshape(w.shape) / 127
        # half an 8-bit step, and the float16 rounding of the block's scale (2^-11 of each value)
        assert torch.all((got - w).abs() <= step * 0.5 * (1 + 2.0 ** -10) + w.abs() * 2.0 ** -10 + 1e-7)
    ids = torch.tensor([[5, 17, 90, 3]])
    assert torch.isfinite(quant(ids).logits).all()


@pytest.mark.skipif(kernels(quiet=True) is None, reason="Lantern's kernels are unavailable here")
def test_matrices_read_in_chunks_of_rows_are_the_matrices_read_whole(tmp_path, monkeypatch):
    # Big matrices (the embedding) are copied into place, and Q6_K ones requantized, a chunk of rows at a time so
    # that the file's pages can be let go of as they are copied: the blocks must be the same bits as in one go.
    hf = make_hf_model("llama", hidden_size=256, intermediate_size=512, head_dim=64)
    write_gguf(hf, tmp_path / "m.gguf", T.Q8_0, qtype_for=pick_from(K_MIX))
    whole = load(tmp_path / "m.gguf", exact=False).model
    monkeypatch.setattr(quantize_module, "CHUNK_BYTES", 3000)  # a few rows per chunk, and a ragged last one
    monkeypatch.setattr(blocks_module, "CHUNK_ELEMENTS", 700)
    rows_read = []  # rows per conversion out of the file
    from_ggml = quantize_module.from_ggml
    monkeypatch.setattr(quantize_module, "from_ggml",
                        lambda raw, ggml_type, shape, *a: rows_read.append(shape[0]) or from_ggml(raw, ggml_type, shape, *a))
    chunked = load(tmp_path / "m.gguf", exact=False).model
    # the chunked path really ran: no conversion took more rows than 3000 bytes of the narrowest rows (Q4_K, 144
    # bytes for 256 columns) hold, where the embedding and q_proj have hundreds
    assert rows_read and max(rows_read) <= 3000 // 144
    pairs = [(name, a.weight_blocks(), b.weight_blocks()) for (name, a), b in
             zip(whole.named_modules(), chunked.modules()) if hasattr(a, "weight_blocks")]
    assert any(name.endswith("embed_tokens") for name, _, _ in pairs)
    for name, a, b in pairs:
        assert a.kind == b.kind and a.shape == b.shape, name
        for x, y in zip(a.tensors(), b.tensors()):
            assert torch.equal(x, y), name
    ids = torch.tensor([[5, 17, 90, 3, 44]])
    assert torch.equal(whole(ids).logits, chunked(ids).logits)


@pytest.fixture(scope="module")
def pair(default_gguf):
    return LLM(str(default_gguf), exact=False), LLM(str(default_gguf), exact=True)


def test_quantized_default_model_answers(pair):
    quant, _ = pair
    assert not quant.loaded.exact
    answer = quant.chat([{"role": "user", "content": "What is the capital of France?"}],
                        SamplingParams(temperature=0, max_tokens=30))
    assert "Paris" in answer.text


def test_top1_agreement_with_the_dequantized_reference_over_256_tokens(pair):
    quant, ref = pair
    ids = ref.encode_chat([{"role": "user", "content": "Write a long story about a dragon who learns to cook."}])
    greedy = ref.generate(ids, SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)).token_ids
    seq = torch.tensor([ids + greedy])
    with torch.no_grad():  # teacher-forced: both models see the reference's own continuation
        a = quant.model(seq).logits[0, len(ids) - 1:-1].argmax(-1)
        b = ref.model(seq).logits[0, len(ids) - 1:-1].argmax(-1)
        # the same continuation fed one token per step through the KV cache: the decode path (row-wise
        # kernel, fused attention) after a dense prefill of the prompt
        cache = KVCache(quant.model.config, 1, len(ids) + 257, torch.float32)
        step = [quant.model(torch.tensor([ids]), torch.arange(len(ids))[None], cache, logits_to_keep=1)
                .logits[0, -1].argmax()]
        for i, tok in enumerate(greedy[:-1]):
            p = len(ids) + i
            step.append(quant.model(torch.tensor([[tok]]), torch.tensor([[p]]), cache).logits[0, -1].argmax())
    agreement = (a == b).float().mean().item()
    decode_agreement = (torch.stack(step) == b).float().mean().item()
    print(f"\ntop-1 agreement with the dequantized reference over 256 tokens: {agreement:.4f} in one prefill "
          f"(dense bf16), {decode_agreement:.4f} decoding token by token")
    assert torch.equal(b, torch.tensor(greedy))  # the reference's argmax is its own greedy continuation
    assert agreement >= 0.95 and decode_agreement >= 0.95
