"""The decoder-only transformer, read top to bottom: Llama, Mistral, Qwen2, Qwen3, Phi-3 and Gemma 3.

Parameter names are Hugging Face's (model.embed_tokens, model.layers.N.self_attn.q_proj, ...), so a
transformers state dict loads as it is and `print(model)` shows the tree people know. Architecture
differences are flags on ModelConfig. The model never opens files, never samples and never knows HTTP;
speed-ups are transforms applied to it after it is built.

Shapes: B batch, T new tokens, L cached length, C hidden size, H query heads, KV key/value heads,
D head_dim, V vocabulary.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, RopeConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm. Gemma scales by (1 + w) in fp32; Llama casts back first, then scales by w."""

    def __init__(self, dim: int, eps: float, weight_offset: float = 0.0):
        super().__init__()
        self.eps = eps
        self.weight_offset = weight_offset
        self.weight = nn.Parameter(torch.zeros(dim) if weight_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32 and not self.weight_offset:  # the same formula, as one fused kernel
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight_offset:
            return (x32 * (self.weight_offset + self.weight.float())).to(dtype)
        return self.weight * x32.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


def rope_inv_freq(rope: RopeConfig, head_dim: int, long: bool = False) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (rot_dim/2,) and the cos/sin scale, as transformers' rope init functions compute them.
    Always computed on the CPU in float32, also inside a meta-device context (the loaders build there)."""
    dim = int(head_dim * rope.partial_rotary_factor)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = 1.0 / (rope.rope_theta ** exponents)
    scale = 1.0
    if rope.freq_factors is not None:  # llama.cpp's precomputed per-frequency divisors
        inv_freq = inv_freq / torch.tensor(rope.freq_factors, dtype=torch.float32, device="cpu")
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short kept, a smooth ramp between.
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif rope.rope_type == "yarn":
        inv_freq, scale = _yarn(rope, dim)
    elif rope.rope_type == "longrope":
        factors = rope.long_factor if long else rope.short_factor
        inv_freq = 1.0 / (torch.tensor(factors, dtype=torch.float32, device="cpu") * rope.rope_theta ** exponents)
        factor = rope.factor or 1.0
        scale = rope.attention_factor or (
            1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(rope.original_max_position_embeddings)))
    return inv_freq, scale


def _yarn(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, keep high ones, ramp between; scale cos/sin by mscale."""
    base, factor, orig = rope.rope_theta, rope.factor, rope.original_max_position_embeddings

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = rope.attention_factor
    if attention is None:
        attention = (mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
                     if rope.mscale and rope.mscale_all_dim else mscale(factor))

    def correction_dim(rotations):
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast or 32), correction_dim(rope.beta_slow or 1)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention


class RotaryEmbedding(nn.Module):
    """cos/sin for explicit positions; longrope switches to its long factors past the original context."""

    def __init__(self, rope: RopeConfig, head_dim: int):
        super().__init__()
        self.rope = rope
        inv_freq, self.scale = rope_inv_freq(rope, head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        if rope.rope_type == "longrope":
            self.register_buffer("long_inv_freq", rope_inv_freq(rope, head_dim, long=True)[0], persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if self.rope.rope_type == "longrope" and int(positions.max()) + 1 > self.rope.original_max_position_embeddings:
            inv_freq = self.long_inv_freq
        freqs = positions[..., None].float() * inv_freq  # (B, T, rot/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, rot)
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rot dims of x (B, T, heads, D) by the angles in cos/sin (B, T, rot)."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    half = rot // 2
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    out = x_rot * cos + rotated * sin
    return out if x_pass.shape[-1] == 0 else torch.cat((out, x_pass), dim=-1)


def contiguous_positions(positions: torch.Tensor) -> bool:
    """True when `positions` (1, T) is one run p, p+1, ..., p+T-1."""
    T = positions.shape[-1]
    return T == 1 or int(positions[0, -1]) - int(positions[0, 0]) == T - 1


class KVCache:
    """Preallocated keys and values for `slots` sequences of up to `max_len` tokens.

    Per layer k[i], v[i]: (slots, KV, max_len, D). A sequence owns one slot (row); its token at position p
    lives at index p, so causality by position is all the masking a batch of different lengths needs.
    """

    def __init__(self, config: ModelConfig, slots: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        shape = (slots, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.slots = slots
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               slots: int | torch.Tensor | None, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, T, KV, D) at `positions` (B, T) and return the cached keys and values
        (B, KV, length, D) for positions 0..length-1.

        `slots` picks the rows: None for rows 0..B-1, an int for the contiguous rows starting there (both
        read back as views, no copy), or a (B,) tensor of row indices (read back as a gathered copy)."""
        B, T = k.shape[0], k.shape[1]
        kc, vc = self.k[layer], self.v[layer]
        if B == 1 and not isinstance(slots, torch.Tensor) and contiguous_positions(positions):
            # One sequence, positions p..p+T-1 (decode or a prefill chunk): a plain slice copy.
            row, p = slots or 0, int(positions[0, 0])
            kc[row, :, p:p + T] = k[0].transpose(0, 1)
            vc[row, :, p:p + T] = v[0].transpose(0, 1)
            return kc[row:row + 1, :, :length], vc[row:row + 1, :, :length]
        if isinstance(slots, torch.Tensor):
            rows = slots
        else:
            start = slots or 0
            rows = torch.arange(start, start + B, device=k.device)
        heads = torch.arange(k.shape[2], device=k.device)
        # index (B, 1, 1) x (1, KV, 1) x (B, 1, T) -> (B, KV, T); values (B, KV, T, D)
        idx = (rows[:, None, None], heads[None, :, None], positions[:, None, :])
        kc[idx] = k.transpose(1, 2)
        vc[idx] = v.transpose(1, 2)
        if isinstance(slots, torch.Tensor):
            return kc[slots, :, :length], vc[slots, :, :length]
        start = slots or 0
        return kc[start:start + B, :, :length], vc[start:start + B, :, :length]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy a sequence's first `length` cached positions from row `src` to row `dst` (slot compaction)."""
        for kc, vc in zip(self.k, self.v):
            kc[dst, :, :length] = kc[src, :, :length]
            vc[dst, :, :length] = vc[src, :, :length]


class Attention(nn.Module):
    """Grouped-query attention with optional q/k/v bias (Qwen2), q/k norm (Qwen3, Gemma 3), fused qkv (Phi-3)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.scale = config.attention_scale
        C, q_out, kv_out = config.hidden_size, self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.fused = config.fused_qkv
        if self.fused:
            self.qkv_proj = nn.Linear(C, q_out + 2 * kv_out, bias=config.qkv_bias)
        else:
            self.q_proj = nn.Linear(C, q_out, bias=config.qkv_bias)
            self.k_proj = nn.Linear(C, kv_out, bias=config.qkv_bias)
            self.v_proj = nn.Linear(C, kv_out, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_out, C, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, config.norm_weight_offset)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, config.norm_weight_offset)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                positions: torch.Tensor, cache: KVCache | None, slots: int | torch.Tensor | None, length: int,
                return_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, _ = x.shape
        if self.fused:
            q, k, v = self.qkv_proj(x).split(
                [self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv, self.head_dim)
        v = v.view(B, T, self.n_kv, self.head_dim)
        if self.q_norm is not None:  # per-head RMSNorm before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        if cache is not None:
            keys, values = cache.update(self.layer_idx, k, v, positions, slots, length)  # (B, KV, L, D)
        else:
            keys, values = k.transpose(1, 2), v.transpose(1, 2)  # (B, KV, T, D)
        q = q.transpose(1, 2)  # (B, H, T, D)
        weights = None
        if return_weights:  # explicit path for inspection; the fused kernel below never materialises weights
            rep = self.n_heads // self.n_kv
            scores = q @ keys.repeat_interleave(rep, dim=1).transpose(-1, -2) * self.scale  # (B, H, T, L)
            weights = (scores if mask is None else scores.masked_fill(~mask, float("-inf"))).softmax(-1)
            out = weights @ values.repeat_interleave(rep, dim=1)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale,
                                                 enable_gqa=self.n_heads != self.n_kv)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(out), weights


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); SiLU for most, GELU-tanh for Gemma; Phi-3 fuses gate and up."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        C, I = config.hidden_size, config.intermediate_size
        self.fused = config.fused_qkv
        if self.fused:
            self.gate_up_proj = nn.Linear(C, 2 * I, bias=config.mlp_bias)
        else:
            self.gate_proj = nn.Linear(C, I, bias=config.mlp_bias)
            self.up_proj = nn.Linear(C, I, bias=config.mlp_bias)
        self.down_proj = nn.Linear(I, C, bias=config.mlp_bias)
        act = config.hidden_act
        if act == "silu":
            self.act = nn.SiLU()
        elif act in ("gelu_pytorch_tanh", "gelu_tanh"):
            self.act = nn.GELU(approximate="tanh")
        elif act == "gelu":
            self.act = nn.GELU()
        else:
            raise ValueError(f"unsupported activation {act!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm block; Gemma 3 adds norms after attention and around the MLP ("sandwich")."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        eps, off = config.rms_norm_eps, config.norm_weight_offset
        self.layer_type = config.layer_types[layer_idx]
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps, off)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, off)
        self.sandwich = config.sandwich_norm
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps, off)
            self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps, off)

    def forward(self, h, cos, sin, mask, positions, cache, slots, length, return_weights=False):
        attn, weights = self.self_attn(self.input_layernorm(h), cos, sin, mask, positions, cache, slots, length,
                                       return_weights)
        if self.sandwich:
            h = h + self.post_attention_layernorm(attn)
            return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h))), weights
        h = h + attn
        return h + self.mlp(self.post_attention_layernorm(h)), weights


class BaseOutput(NamedTuple):
    last_hidden_state: torch.Tensor                     # (B, T, C), after the final norm
    hidden_states: tuple[torch.Tensor, ...] | None      # embeddings + each layer's output, before the final norm
    attentions: tuple[torch.Tensor, ...] | None         # per layer (B, H, T, L)


class CausalLMOutput(NamedTuple):
    logits: torch.Tensor                                # (B, T', V)
    hidden_states: tuple[torch.Tensor, ...] | None
    attentions: tuple[torch.Tensor, ...] | None


class Transformer(nn.Module):
    """Embeddings, the decoder layers and the final norm: transformers' `model.model`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_weight_offset)
        self.rotary = nn.ModuleDict({t: RotaryEmbedding(config.rope_for(t), config.head_dim)
                                     for t in sorted(set(config.layer_types))})

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache: KVCache | None = None,
                slots: int | torch.Tensor | None = None, output_hidden_states: bool = False,
                output_attentions: bool = False) -> BaseOutput:
        """input_ids, positions: (B, T). Without a cache, positions default to 0..T-1; with one they are
        required (where a sequence continues is never guessed). `slots`: see KVCache.update."""
        B, T = input_ids.shape
        if positions is None:
            if cache is not None:
                raise ValueError("positions are required when a cache is used")
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        h = self.embed_tokens(input_ids)
        if self.config.embed_scale is not None:  # Gemma: scale in the weights' dtype, as transformers does
            h = h * torch.tensor(self.config.embed_scale, dtype=h.dtype)

        # Keys sit at positions 0..length-1 of the cache, or at the inputs' own positions without one.
        if cache is not None:
            length = int(positions.max()) + 1
            key_pos = torch.arange(length, device=input_ids.device).expand(B, length)
        else:
            length, key_pos = T, positions
        if B == 1 and T == 1 and cache is not None:
            # One new token that may see every cached key: no mask at all (the common decode step).
            causal = None
            masks = {"full_attention": None}
        else:
            causal = key_pos[:, None, :] <= positions[:, :, None]  # (B, T, L)
            masks = {"full_attention": causal[:, None]}  # (B, 1, T, L)
        if self.config.sliding_window is not None:
            window = key_pos[:, None, :] > positions[:, :, None] - self.config.sliding_window
            masks["sliding_attention"] = (window if causal is None else causal & window)[:, None]
        rope = {t: r(positions, h.dtype) for t, r in self.rotary.items()}

        all_hidden = [h] if output_hidden_states else None
        all_attn = [] if output_attentions else None
        for layer in self.layers:
            cos, sin = rope[layer.layer_type]
            h, weights = layer(h, cos, sin, masks[layer.layer_type], positions, cache, slots, length,
                               output_attentions)
            if output_hidden_states:
                all_hidden.append(h)
            if output_attentions:
                all_attn.append(weights)
        return BaseOutput(self.norm(h), tuple(all_hidden) if output_hidden_states else None,
                          tuple(all_attn) if output_attentions else None)


class CausalLM(nn.Module):
    """`model` (the Transformer) plus `lm_head`; forward returns logits. Tied checkpoints share one matrix."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Transformer(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (the final norm's: linear layers and embeddings may hold quantized weights)."""
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache: KVCache | None = None,
                slots: int | torch.Tensor | None = None, logits_to_keep: int = 0, output_hidden_states: bool = False,
                output_attentions: bool = False) -> CausalLMOutput:
        """Logits for the last `logits_to_keep` positions (0: all). (B, T) ids -> (B, T', V) logits."""
        out = self.model(input_ids, positions, cache, slots, output_hidden_states, output_attentions)
        h = out.last_hidden_state if logits_to_keep == 0 else out.last_hidden_state[:, -logits_to_keep:]
        logits = self.lm_head(h)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return CausalLMOutput(logits, out.hidden_states, out.attentions)
