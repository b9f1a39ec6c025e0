"""Tiny random transformers models of every supported architecture, built in the tests (no downloads).

Every parameter is drawn at random, norms included, so a wrong norm offset or a swapped projection cannot
hide behind an initialisation of ones and zeros.
"""

from __future__ import annotations

import torch
import transformers

COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)

# name -> (config class, model class, config overrides)
ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "llama3_rope": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "llama_tied_mha": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        num_key_value_heads=4, tie_word_embeddings=True)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=5)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=24)),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, dict(
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})),
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, dict(
        head_dim=32, query_pre_attn_scalar=24, sliding_window=4, layer_types=[
            "sliding_attention", "full_attention", "sliding_attention"])),
}


def make_hf_model(name: str, seed: int = 0, **overrides):
    config_cls, model_cls, extra = ARCHS[name]
    config = config_cls(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(torch.randn_like(p) * 0.3 + (0.0 if name == "gemma3" else 1.0))
            else:
                p.normal_(0.0, 0.15)
    return model
