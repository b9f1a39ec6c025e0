"""GGUF files written in the test from tiny HF models load back to the same logits (catches the Q/K
permutation, Gemma's norm offset, Phi-3's fused tensors and every supported quant type)."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as T

from lanternlm.load import load

from gguf_writer import write_gguf
from tiny_models import make_hf_model

# GGUF cannot express everything a config.json can: llama.cpp assumes Gemma 3's 5:1 sliding pattern and
# query_pre_attn_scalar == head_dim, and applies no sliding window to Mistral. The tiny models follow that.
GGUF_ARCHS = {
    "llama": {},
    "mistral": dict(sliding_window=None),
    "qwen2": {},
    "qwen3": {},
    "phi3": {},
    "gemma3": dict(num_hidden_layers=6, layer_types=None, query_pre_attn_scalar=32),
}


def logits_of(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", sorted(GGUF_ARCHS))
def test_f32_gguf_equals_hf_folder_logits(arch, tmp_path):
    hf = make_hf_model(arch, **GGUF_ARCHS[arch])
    write_gguf(hf, tmp_path / "m.gguf", T.F32)
    loaded = load(tmp_path / "m.gguf", exact=True)  # the exact path; tests/test_quantized.py covers the other
    # llama.cpp writes Mistral as arch "llama"; everything else keeps its own architecture.
    assert loaded.config.model_type == {"mistral": "llama"}.get(hf.config.model_type, hf.config.model_type)
    ids = torch.randint(3, 320, (2, 14), generator=torch.Generator().manual_seed(0))
    diff = (logits_of(loaded.model, ids) - logits_of(hf, ids)).abs().max().item()
    assert diff <= 1e-4, f"{arch}: {diff}"


@pytest.mark.parametrize("qtype", [T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1])
def test_quantized_gguf_equals_the_weights_it_encodes(qtype, tmp_path):
    # llama arch, so the permutation is undone on quantized rows too.
    hf = make_hf_model("llama")
    encoded = write_gguf(hf, tmp_path / "m.gguf", qtype)
    ref = make_hf_model("llama")
    ref.load_state_dict(encoded)
    ours = load(tmp_path / "m.gguf", exact=True).model
    ids = torch.randint(3, 320, (1, 12), generator=torch.Generator().manual_seed(1))
    assert (logits_of(ours, ids) - logits_of(ref, ids)).abs().max().item() <= 1e-4
    if qtype != T.F16:  # and the quantization really changed the weights: the test is not a no-op
        assert not torch.equal(encoded["model.layers.0.self_attn.q_proj.weight"],
                               hf.state_dict()["model.layers.0.self_attn.q_proj.weight"])


def test_mixed_k_quant_gguf(tmp_path):
    # K-quants need rows of 256; a mixed file as real ones are (Q4_K attention, Q6_K / Q5_K / Q3_K / Q2_K MLP).
    choice = {"q_proj": T.Q4_K, "k_proj": T.Q5_K, "v_proj": T.Q6_K, "o_proj": T.Q3_K, "gate_proj": T.Q2_K,
              "up_proj": T.Q4_K, "down_proj": T.Q6_K, "embed_tokens": T.Q8_0, "lm_head": T.Q6_K}

    def pick(name, shape):
        return next((q for k, q in choice.items() if k in name), T.F32)

    size = dict(hidden_size=256, intermediate_size=256, num_attention_heads=8, num_key_value_heads=4)
    hf = make_hf_model("llama", **size)
    path = tmp_path / "k.gguf"
    encoded = write_gguf(hf, path, qtype_for=pick)
    ref = make_hf_model("llama", **size)
    ref.load_state_dict(encoded)
    loaded = load(path, exact=True)
    assert {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "F32"} <= set(loaded.gguf_types)
    ids = torch.randint(3, 320, (1, 10), generator=torch.Generator().manual_seed(2))
    ref_logits = logits_of(ref, ids)
    diff = (logits_of(loaded.model, ids) - ref_logits).abs().max().item()
    assert diff <= 1e-4 * max(1.0, ref_logits.abs().max().item()), diff
