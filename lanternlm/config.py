"""ModelConfig: the one description of a decoder-only transformer that model.py reads.

Built from a Hugging Face config.json (`from_hf`) or from GGUF metadata (`from_gguf`). Field names follow
transformers so that a reader of either can map them one to one; architecture differences are flags here,
never subclasses in the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import LanternError

# model_type values we run, with the transformers class each corresponds to.
SUPPORTED = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


class ConfigError(LanternError):
    """config.json or GGUF metadata does not describe a model Lantern can run."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters for one kind of layer (transformers' rope_parameters entry)."""

    rope_theta: float = 10000.0
    rope_type: str = "default"
    factor: float | None = None
    partial_rotary_factor: float = 1.0
    # llama3
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    # yarn
    beta_fast: float | None = None
    beta_slow: float | None = None
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    # longrope: per-frequency divisors (len head_dim * partial / 2)
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    # GGUF files may carry the final per-frequency divisors as a tensor instead (llama.cpp's rope_freqs).
    freq_factors: tuple[float, ...] | None = None


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    # Bias flags: Llama's attention_bias covers q/k/v/o; Qwen2 has bias on q/k/v only.
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False                  # Qwen3, Gemma 3: RMSNorm over head_dim on q and k
    fused_qkv: bool = False                # Phi-3 checkpoints: qkv_proj and gate_up_proj
    norm_weight_offset: float = 0.0        # Gemma: RMSNorm scales by (1 + w)
    embed_scale: float | None = None       # Gemma: embeddings times sqrt(hidden_size)
    sandwich_norm: bool = False            # Gemma 3: extra norms after attention and around the MLP
    query_pre_attn_scalar: float | None = None  # Gemma 3: attention scale is this ** -0.5
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None
    # One entry per layer: "full_attention" or "sliding_attention".
    layer_types: tuple[str, ...] = ()
    # RoPE per layer type; Gemma 3 uses a different theta for sliding layers.
    rope: dict[str, RopeConfig] = field(default_factory=dict)
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()

    @property
    def architecture(self) -> str:
        return SUPPORTED[self.model_type]

    def rope_for(self, layer_type: str) -> RopeConfig:
        return self.rope.get(layer_type) or self.rope["full_attention"]

    @property
    def attention_scale(self) -> float:
        if self.query_pre_attn_scalar is not None:
            return self.query_pre_attn_scalar ** -0.5
        return self.head_dim ** -0.5

    def with_(self, **changes) -> "ModelConfig":
        return replace(self, **changes)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Read a transformers config.json dict (v4 or v5 layout)."""
        if not isinstance(cfg, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        model_type = cfg.get("model_type")
        if model_type == "gemma3" and isinstance(cfg.get("text_config"), dict):
            raise ConfigError(
                f"{source}: multimodal Gemma 3 checkpoints (Gemma3ForConditionalGeneration) are not supported; "
                "use a text-only gemma3_text checkpoint")
        if model_type not in SUPPORTED:
            archs = cfg.get("architectures")
            raise ConfigError(
                f"{source}: unsupported architecture model_type={model_type!r} ({archs}); "
                f"supported: {', '.join(sorted(SUPPORTED))}")

        def need(key, kind=int):
            if key not in cfg or cfg[key] is None:
                raise ConfigError(f"{source}: missing required field {key!r}")
            value = cfg[key]
            if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ConfigError(f"{source}: {key} must be a positive integer, got {value!r}")
            return value

        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        kv_heads = cfg.get("num_key_value_heads") or heads  # missing -> multi-head attention
        head_dim = cfg.get("head_dim") or hidden // heads
        if not isinstance(kv_heads, int) or heads % kv_heads:
            raise ConfigError(f"{source}: num_attention_heads={heads} is not a multiple of "
                              f"num_key_value_heads={kv_heads}")
        layers = need("num_hidden_layers")
        max_pos = cfg.get("max_position_embeddings") or 2048

        is_gemma = model_type == "gemma3_text"
        sliding = cfg.get("sliding_window")
        layer_types = cfg.get("layer_types")
        if layer_types is None:
            layer_types = _default_layer_types(cfg, model_type, layers, sliding)
        if len(layer_types) != layers or any(t not in ("full_attention", "sliding_attention") for t in layer_types):
            raise ConfigError(f"{source}: layer_types must list 'full_attention'/'sliding_attention' "
                              f"for each of the {layers} layers")
        if model_type in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
            sliding = None  # Qwen configs carry a window they do not use unless use_sliding_window
        if sliding is None:
            layer_types = ["full_attention"] * layers

        if cfg.get("attn_logit_softcapping") is not None:
            raise ConfigError(f"{source}: attn_logit_softcapping is not supported")

        attention_bias = bool(cfg.get("attention_bias", False))
        eos = cfg.get("eos_token_id")
        return cls(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=max_pos,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            hidden_act=cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu",
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", is_gemma)),
            qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias and model_type != "qwen2",
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=model_type in ("qwen3", "gemma3_text"),
            fused_qkv=model_type == "phi3",
            norm_weight_offset=1.0 if is_gemma else 0.0,
            embed_scale=math.sqrt(hidden) if is_gemma else None,
            sandwich_norm=is_gemma,
            query_pre_attn_scalar=cfg.get("query_pre_attn_scalar", 256) if is_gemma else None,
            final_logit_softcapping=cfg.get("final_logit_softcapping"),
            sliding_window=sliding,
            layer_types=tuple(layer_types),
            rope=_rope_from_hf(cfg, model_type, max_pos, source),
            torch_dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
        )

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]],
                  source: str = "gguf") -> "ModelConfig":
        """Build the config from GGUF metadata (keys `{arch}.*`) and the tensor shapes (PyTorch order) by HF name
        (gguf_model.gguf_config maps the file's tensor names)."""
        arch = meta.get("general.architecture")
        model_type = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
                      "gemma3": "gemma3_text"}.get(arch)
        if model_type is None:
            raise ConfigError(f"{source}: unsupported GGUF architecture {arch!r}; "
                              "supported: llama, qwen2, qwen3, phi3, gemma3")

        def get(key, default=None, required=False):
            value = meta.get(f"{arch}.{key}", default)
            if required and value is None:
                raise ConfigError(f"{source}: missing metadata {arch}.{key}")
            return value

        hidden = int(get("embedding_length", required=True))
        heads = int(get("attention.head_count", required=True))
        kv = get("attention.head_count_kv", heads)
        if not isinstance(kv, int):  # some files store a per-layer array
            kv = int(kv[0])
        layers = int(get("block_count", required=True))
        head_dim = int(get("attention.key_length", hidden // heads))
        embd = tensor_shapes.get("model.embed_tokens.weight")
        if embd is None:
            raise ConfigError(f"{source}: no token embedding tensor (token_embd.weight)")
        vocab = int(get("vocab_size", embd[0]))
        ffn = get("feed_forward_length", required=True)
        ffn = int(ffn if isinstance(ffn, int) else ffn[0])
        max_pos = int(get("context_length", 2048))
        eps = float(get("attention.layer_norm_rms_epsilon", 1e-6))
        is_gemma = model_type == "gemma3_text"

        sliding = get("attention.sliding_window")
        if is_gemma:
            sliding = int(sliding or 4096)
            pattern = 6
            layer_types = tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers))
        else:
            sliding = None  # llama.cpp applies no window for these architectures
            layer_types = ("full_attention",) * layers

        # RoPE. llama.cpp may store precomputed per-frequency divisors (rope_freqs) instead of the scaling params.
        theta = float(get("rope.freq_base", 10000.0))
        rot_dims = int(get("rope.dimension_count", head_dim))
        partial = rot_dims / head_dim
        scaling = get("rope.scaling.type")
        factor = get("rope.scaling.factor")
        orig = get("rope.scaling.original_context_length")
        if scaling in (None, "none") or (scaling == "linear" and not factor):
            full = RopeConfig(rope_theta=theta, partial_rotary_factor=partial)
        elif scaling == "linear":
            full = RopeConfig(rope_theta=theta, rope_type="linear", factor=float(factor), partial_rotary_factor=partial)
        elif scaling == "yarn":
            full = RopeConfig(rope_theta=theta, rope_type="yarn", factor=float(factor), partial_rotary_factor=partial,
                              original_max_position_embeddings=int(orig or max_pos),
                              beta_fast=get("rope.scaling.yarn_beta_fast"),
                              beta_slow=get("rope.scaling.yarn_beta_slow"))
        else:
            raise ConfigError(f"{source}: unsupported rope scaling type {scaling!r}")
        rope = {"full_attention": full}
        if is_gemma:
            rope["sliding_attention"] = RopeConfig(rope_theta=10000.0)

        return cls(
            model_type=model_type,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=ffn,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=int(kv),
            head_dim=head_dim,
            max_position_embeddings=max_pos,
            rms_norm_eps=eps,
            hidden_act="gelu_pytorch_tanh" if is_gemma else "silu",
            tie_word_embeddings="lm_head.weight" not in tensor_shapes,
            qkv_bias="model.layers.0.self_attn.q_proj.bias" in tensor_shapes,
            o_bias="model.layers.0.self_attn.o_proj.bias" in tensor_shapes,
            qk_norm="model.layers.0.self_attn.q_norm.weight" in tensor_shapes,
            fused_qkv=model_type == "phi3",
            norm_weight_offset=1.0 if is_gemma else 0.0,
            embed_scale=math.sqrt(hidden) if is_gemma else None,
            sandwich_norm=is_gemma,
            query_pre_attn_scalar=float(head_dim) if is_gemma else None,
            final_logit_softcapping=get("final_logit_softcapping"),
            sliding_window=sliding,
            layer_types=layer_types,
            rope=rope,
            torch_dtype="float32",
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=tuple(i for i in (meta.get("tokenizer.ggml.eos_token_id"),) if i is not None),
        )


def _default_layer_types(cfg: dict, model_type: str, layers: int, sliding: int | None) -> list[str]:
    if model_type == "gemma3_text":
        pattern = int(cfg.get("sliding_window_pattern", 6))
        return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    if model_type in ("qwen2", "qwen3") and sliding is not None and cfg.get("use_sliding_window", False):
        first = cfg.get("max_window_layers", layers)
        return ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    if sliding is not None:  # Mistral, Phi-3: the window applies to every layer
        return ["sliding_attention"] * layers
    return ["full_attention"] * layers


def _rope_from_hf(cfg: dict, model_type: str, max_pos: int, source: str) -> dict[str, RopeConfig]:
    """Accept transformers v5 `rope_parameters` (flat, or per layer type) and v4 `rope_theta` + `rope_scaling`."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and any(k in params for k in ("full_attention", "sliding_attention")):
        per_type = dict(params)
    else:
        flat = dict(params) if isinstance(params, dict) else {}
        if "rope_theta" in cfg and "rope_theta" not in flat:
            flat["rope_theta"] = cfg["rope_theta"]
        scaling = cfg.get("rope_scaling")
        if isinstance(scaling, dict):
            flat = {**scaling, **flat} if params else {**flat, **scaling}
        per_type = {"full_attention": flat}
        if model_type == "gemma3_text":
            per_type["sliding_attention"] = {"rope_theta": cfg.get("rope_local_base_freq", 10000.0)}
    if model_type == "gemma3_text":
        per_type.setdefault("full_attention", {}).setdefault("rope_theta", 1_000_000.0)
        per_type.setdefault("sliding_attention", {}).setdefault("rope_theta", 10_000.0)
    partial_default = cfg.get("partial_rotary_factor", 1.0)
    return {name: _rope_entry(p or {}, partial_default, max_pos, cfg, source) for name, p in per_type.items()}


def _rope_entry(p: dict, partial_default: float, max_pos: int, cfg: dict, source: str) -> RopeConfig:
    rope_type = p.get("rope_type") or p.get("type") or "default"
    if rope_type == "su":  # old Phi-3 name
        rope_type = "longrope"
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"{source}: unsupported rope_type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
    orig = p.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
    if rope_type in ("llama3", "yarn", "longrope") and not orig:
        orig = max_pos
    factor = p.get("factor")
    if rope_type in ("linear", "llama3") and factor is None:
        raise ConfigError(f"{source}: rope_type {rope_type!r} needs a 'factor'")
    if rope_type == "llama3" and (p.get("low_freq_factor") is None or p.get("high_freq_factor") is None):
        raise ConfigError(f"{source}: rope_type 'llama3' needs low_freq_factor and high_freq_factor")
    if rope_type == "longrope" and (not p.get("short_factor") or not p.get("long_factor")):
        raise ConfigError(f"{source}: rope_type 'longrope' needs short_factor and long_factor")
    return RopeConfig(
        rope_theta=float(p.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        rope_type=rope_type,
        factor=None if factor is None else float(factor),
        partial_rotary_factor=float(p.get("partial_rotary_factor", partial_default)),
        low_freq_factor=p.get("low_freq_factor"),
        high_freq_factor=p.get("high_freq_factor"),
        original_max_position_embeddings=None if orig is None else int(orig),
        beta_fast=p.get("beta_fast"),
        beta_slow=p.get("beta_slow"),
        attention_factor=p.get("attention_factor"),
        mscale=p.get("mscale"),
        mscale_all_dim=p.get("mscale_all_dim"),
        truncate=bool(p.get("truncate", True)),
        short_factor=tuple(p["short_factor"]) if p.get("short_factor") else None,
        long_factor=tuple(p["long_factor"]) if p.get("long_factor") else None,
    )
