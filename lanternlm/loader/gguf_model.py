"""GGUF files as models: GGUF tensor names -> Hugging Face names, and the layout differences llama.cpp's
converter introduced (Q/K row permutation for arch `llama`, Gemma's norm weights stored as 1 + w).

The file format itself (parsing, bounds checks, dequantization) lives in gguf.py and quants.py, which
know no model.
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch

from ..config import ConfigError, ModelConfig
from ..errors import ModelFileError
from .gguf import GGUFFile

# The one table: GGUF name (per block, after "blk.N.") -> HF name (after "model.layers.N.").
# Gemma 3 reuses llama.cpp's ffn_norm for its pre-feedforward norm and names its extra norms itself.
BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GEMMA3_BLOCK_NAMES = {
    **BLOCK_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
PHI3_BLOCK_NAMES = {**BLOCK_NAMES, "ffn_up": "mlp.gate_up_proj"}  # Phi-3's ffn_up holds gate and up fused
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Tensors that configure RoPE rather than hold weights.
ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")

_BLOCK = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")


def hf_name(gguf_name: str, model_type: str) -> str | None:
    """The HF parameter name for a GGUF tensor name, or None when it has no counterpart."""
    m = _BLOCK.fullmatch(gguf_name)
    if m:
        table = {"gemma3_text": GEMMA3_BLOCK_NAMES, "phi3": PHI3_BLOCK_NAMES}.get(model_type, BLOCK_NAMES)
        base = table.get(m.group(2))
        return None if base is None else f"model.layers.{m.group(1)}.{base}.{m.group(3)}"
    stem, _, kind = gguf_name.rpartition(".")
    base = TOP_NAMES.get(stem)
    return None if base is None else f"{base}.{kind}"


def unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K permutation (arch `llama`): within each head the converter interleaved the two
    rotary halves (rows 0..D/2-1 and D/2..D-1) as pairs, for its own RoPE kernel. w: (n_heads * D, C)."""
    half = w.shape[0] // n_heads // 2
    # permuted row (head, i, j) came from original row (head, j, i): swap the two axes back
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_config(gguf: GGUFFile) -> ModelConfig:
    """ModelConfig from metadata, plus llama.cpp's RoPE factor tensors when present."""
    # By HF name, as the config knows them: the names it reads (embedding, lm_head, q/o biases, q norm) are the
    # same in every family's table.
    shapes = {hf: info.shape for name, info in gguf.tensors.items() if (hf := hf_name(name, "llama"))}
    try:
        config = ModelConfig.from_gguf(gguf.metadata, shapes, source=str(gguf.path))
    except ConfigError as e:
        raise ModelFileError(gguf.path, str(e).split(": ", 1)[-1]) from None
    rope = config.rope["full_attention"]
    if "rope_freqs.weight" in gguf.tensors:  # Llama 3.1 style scaling, precomputed by the converter
        factors = tuple(gguf.tensor("rope_freqs.weight").tolist())
        rope = replace(rope, freq_factors=factors)
    if "rope_factors_long.weight" in gguf.tensors and "rope_factors_short.weight" in gguf.tensors:
        orig = gguf.metadata.get(f"{gguf.metadata['general.architecture']}.rope.scaling.original_context_length")
        rope = replace(rope, rope_type="longrope",
                       long_factor=tuple(gguf.tensor("rope_factors_long.weight").tolist()),
                       short_factor=tuple(gguf.tensor("rope_factors_short.weight").tolist()),
                       original_max_position_embeddings=int(orig or config.max_position_embeddings),
                       factor=config.max_position_embeddings / int(orig or config.max_position_embeddings))
    return config.with_(rope={**config.rope, "full_attention": rope})


LINEAR_WEIGHTS = ("_proj.weight", "lm_head.weight")


def gguf_tensors(gguf: GGUFFile, config: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                 skip: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Every weight, dequantized to `dtype` on `device`, under its HF name, in HF layout. HF names in `skip`
    are left out (a quantize transform builds those from the blocks)."""
    arch = gguf.metadata.get("general.architecture")
    out: dict[str, torch.Tensor] = {}
    for name in gguf.tensors:
        if name in ROPE_TENSORS:
            continue
        target = hf_name(name, config.model_type)
        if target is None:
            raise ModelFileError(gguf.path, f"tensor {name!r} has no counterpart in a {arch} model")
        if target in skip:
            continue
        w = gguf.tensor(name, dtype=torch.float32)
        gguf.release(name)
        if arch == "llama" and target.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in target else config.num_key_value_heads
            w = unpermute_rows(w, heads)
        if config.norm_weight_offset and target.endswith("norm.weight"):
            w = w - config.norm_weight_offset  # the converter stored 1 + w; HF's Gemma norm adds the 1 itself
        out[target] = w.to(device=device, dtype=dtype)
    return out
