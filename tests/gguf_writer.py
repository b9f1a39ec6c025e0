"""Write a tiny transformers model as a GGUF file, the way llama.cpp's converter lays it out.

Used by the tests to check that Lantern undoes every converter convention (Q/K row permutation for
arch `llama`, Gemma's 1 + w norms, Phi-3's fused tensors, reversed dims, mixed quant types) and lands on
the weights it started from. The quantized weights a GGUF holds are not the float weights the HF model
had, so `write_gguf` also returns the float weights the file really encodes (dequantized by gguf-py,
permutations undone): the reference model is rebuilt from those.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUFWriter
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
        "gemma3_text": "gemma3"}
BLOCK = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
GEMMA = {**BLOCK, "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
         "post_feedforward_layernorm": "post_ffw_norm"}


def gguf_name(hf: str, model_type: str) -> str:
    if hf.startswith("model.layers."):
        _, _, n, rest = hf.split(".", 3)
        base, kind = rest.rsplit(".", 1)
        return f"blk.{n}.{(GEMMA if model_type == 'gemma3_text' else BLOCK)[base]}.{kind}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[hf]


def permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter permutation of Q/K rows (the one Lantern must undo)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# Where the fp16 scales sit in each block of the types gguf-py has no quantizer for (the K-quants, the IQ family,
# the ternary types), for random_blocks.
SCALE_AT = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
            T.IQ4_NL: (0,), T.IQ4_XS: (0,), T.IQ3_S: (0,), T.IQ3_XXS: (0,), T.IQ2_S: (0,), T.IQ2_XS: (0,),
            T.IQ2_XXS: (0,), T.IQ1_S: (0,), T.TQ2_0: (64,), T.TQ1_0: (52,)}


def random_blocks(qtype: T, rows: int, cols: int, rng: np.random.Generator,
                  ranges: tuple[tuple[float, float], ...] | None = None) -> np.ndarray:
    """Random but valid blocks of a type in SCALE_AT: random bytes (values, grid indices, signs, sub-block scales)
    with small fp16 scales, uniform in `ranges` (one (low, high) per SCALE_AT offset; default 0.0005-0.002)."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    for at, (low, high) in zip(SCALE_AT[qtype], ranges or [(0.0005, 0.002)] * len(SCALE_AT[qtype]), strict=True):
        scales = rng.uniform(low, high, size=blocks.shape[0]).astype(np.float16)
        blocks[:, at:at + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def tokenizer_metadata(writer: GGUFWriter, vocab_size: int) -> None:
    """A small byte-level BPE vocabulary (GPT-2 style), enough for the loader to build a tokenizer."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    byte_chars = list(bytes_to_unicode().values())
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + byte_chars
    merges = []
    while len(tokens) < vocab_size:
        a, b = byte_chars[len(merges) % 26 + 65], byte_chars[(len(merges) // 26) % 26 + 65]
        if a + b not in tokens:
            tokens.append(a + b)
            merges.append(f"{a} {b}")
        else:
            tokens.append(f"<extra_{len(tokens)}>")
    tokens = tokens[:vocab_size]
    types = [3, 3, 3] + [1] * (vocab_size - 3)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                             "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_gguf(hf_model, path, qtype: T = T.F32, qtype_for=None) -> dict[str, torch.Tensor]:
    """Write `hf_model` to `path`; return the float HF state dict the file encodes.

    `qtype_for(hf_name, shape)` may choose a type per tensor (mixed files are normal); 1-D tensors stay F32.
    """
    cfg = hf_model.config
    model_type = cfg.model_type
    arch = ARCH[model_type]
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    writer.add_vocab_size(cfg.vocab_size)
    if model_type == "gemma3_text":
        writer.add_sliding_window(cfg.sliding_window)
    tokenizer_metadata(writer, cfg.vocab_size)

    encoded: dict[str, torch.Tensor] = {}
    state = hf_model.state_dict()
    for name, tensor in state.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = tensor.float().numpy().copy()
        if model_type == "gemma3_text" and name.endswith("norm.weight"):
            w = w + 1.0  # the converter stores Gemma's norm as 1 + w
        heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
        perm = next((h for k, h in heads.items() if arch == "llama" and name.endswith(f"{k}.weight")), None)
        if perm:
            w = permute(w, perm)
        kind = qtype_for(name, w.shape) if qtype_for else qtype
        if w.ndim == 1:
            kind = T.F32
        if kind == T.F32:
            data, stored = w.astype(np.float32), w.astype(np.float32)
            writer.add_tensor(gguf_name(name, model_type), data)
        elif kind == T.F16:
            data = w.astype(np.float16)
            stored = data.astype(np.float32)
            writer.add_tensor(gguf_name(name, model_type), data)
        else:
            if kind in SCALE_AT:
                data = random_blocks(kind, w.shape[0], w.shape[1], np.random.default_rng(len(encoded)))
            else:
                data = quantize(w, kind)
            stored = dequantize(data, kind).astype(np.float32)
            writer.add_tensor(gguf_name(name, model_type), data, raw_dtype=kind)
        if model_type == "gemma3_text" and name.endswith("norm.weight"):
            stored = stored - 1.0
        if perm:
            stored = unpermute(stored, perm)
        encoded[name] = torch.from_numpy(np.ascontiguousarray(stored))
    if cfg.tie_word_embeddings:
        encoded["lm_head.weight"] = encoded["model.embed_tokens.weight"]
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return encoded
