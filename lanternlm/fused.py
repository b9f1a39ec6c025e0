"""Speed as a transform: a fused CPU decode path, swapped into a built model.

A decode step of the readable model runs about 270 small PyTorch ops per token (norms, RoPE's slices and
concatenations, the cache write, attention, the gated activation), and on a small model their dispatch
costs more than the arithmetic: on the project's 2-core VM the quantized SmolLM2-135M spent ~13 ms per
token, of which the matrix products were ~5.4 ms. `fuse_for_cpu` changes the classes of the model's norm,
attention and MLP modules to subclasses whose forward calls Lantern's C++ ops (kernels/decode_cpu.cpp) for
the cases they cover, and the readable model's own forward for everything else:
- FusedRMSNorm: float32 inputs;
- FusedMLP: fused gate/up with SiLU or GELU-tanh (one op for act(gate) * up);
- FusedAttention: one new token per sequence with a KV cache (the decode step, single or batched): RoPE,
  the cache write and attention over the cache (causal, sliding window) in one op. Prefill, attention
  weights for inspection, and non-float32 caches take the readable path.
- FusedTransformer: when every linear layer is a QuantLinear (blocks, or an HF folder's bf16/fp16 matrix), a
  decode step runs all the layers in one C++ call (DecodeStack, the same ops in the same order) and returns to Python
  only for the final norm and the lm_head: 6.4 ms per token instead of 9 ms with the per-module ops. On a
  tensor-parallel rank (distributed/shard.py) the stack calls back into Python between layers for the one
  all-reduce after o_proj and the one after down_proj; an unsharded model's stack has no callback.
Module names, parameters and printed trees are unchanged (only the classes differ), so state dicts,
`inspect` and the look-inside views (which ask for hidden states or attention weights, and so take the
module path) work as before.
"""

from __future__ import annotations

import torch
from torch import nn

from .kernels import kernels
from .model import MLP, Attention, BaseOutput, CausalLM, KVCache, RMSNorm, Transformer


ROPE_TABLE_POSITIONS = 8192  # decode steps look their cos/sin up in a table this long at most (FusedTransformer._rope)


def _act_code(act: nn.Module) -> int | None:
    if isinstance(act, nn.SiLU):
        return 0
    if isinstance(act, nn.GELU) and act.approximate == "tanh":
        return 1
    return None


class FusedRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu":
            return super().forward(x)
        return kernels().rms_norm(x, self.weight, self.eps, self.weight_offset)


class FusedMLP(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused or self._act is None or x.dtype != torch.float32 or x.device.type != "cpu":
            return super().forward(x)
        return self.down_proj(kernels().gated_act(self.gate_up_proj(x), self._act))


class FusedAttention(Attention):
    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                positions: torch.Tensor, cache: KVCache | None, slots: int | torch.Tensor | None, length: int,
                return_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, _ = x.shape
        paged = getattr(cache, "paged", False)  # the engine's paged pools: read through block tables (`slots`)
        if (T != 1 or cache is None or return_weights or not self.fused or x.dtype != torch.float32
                or x.device.type != "cpu"
                or cache.k[self.layer_idx].dtype not in ((torch.float32, torch.bfloat16) if paged else (torch.float32,))):
            return super().forward(x, cos, sin, mask, positions, cache, slots, length, return_weights)
        # (B, 1, (H + 2KV) * D) -> per-head views (B, heads, D); the op reads them in place
        q, k, v = self.qkv_proj(x).view(B, self.n_heads + 2 * self.n_kv, self.head_dim).split(
            [self.n_heads, self.n_kv, self.n_kv], dim=1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if paged:
            out = kernels().decode_attention_paged(q, k, v, cos, sin, cache.k[self.layer_idx], cache.v[self.layer_idx],
                                                   slots, positions.reshape(B), self.scale, self.window)
        else:
            out = kernels().decode_attention(q, k, v, cos, sin, cache.k[self.layer_idx], cache.v[self.layer_idx],
                                             _slot_rows(self._row_tensors, slots, B), positions.reshape(B),
                                             self.scale, self.window)
        return self.o_proj(out.view(B, 1, -1)), None


def _slot_rows(table: dict[tuple[int, int], torch.Tensor], slots: int | torch.Tensor | None,
               count: int) -> torch.Tensor:
    """The cache rows of `slots` (see KVCache.update) as a (count,) tensor; a contiguous run start..start+count-1
    is made once and kept in `table` (the same every step)."""
    if isinstance(slots, torch.Tensor):
        return slots
    key = (slots or 0, count)
    if key not in table:
        table[key] = torch.arange(key[0], key[0] + count)
    return table[key]


class FusedTransformer(Transformer):
    """Runs a whole decode step's layers in one C++ call (a DecodeStack, built on the first decode step): one
    new token per sequence, with a float32 cache, and no hidden states or attention weights asked for. Everything else,
    and models the stack cannot take (plain nn.Linear layers), runs the module path."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache: KVCache | None = None,
                slots: int | torch.Tensor | None = None, output_hidden_states: bool = False,
                output_attentions: bool = False) -> BaseOutput:
        B, T = input_ids.shape
        if self._stack is None and self._stackable:
            self._stack = _decode_stack(self)  # None if the layers are not in a shape it takes
            self._stackable = self._stack is not None
        paged = getattr(cache, "paged", False)
        if (self._stack is None or T != 1 or cache is None or positions is None or output_hidden_states
                or output_attentions or input_ids.device.type != "cpu"
                or cache.k[0].dtype not in ((torch.float32, torch.bfloat16) if paged else (torch.float32,))):
            return super().forward(input_ids, positions, cache, slots, output_hidden_states, output_attentions)
        h = self.embed_tokens(input_ids)[:, 0]  # (B, C)
        if self.config.embed_scale is not None:
            h = h * torch.tensor(self.config.embed_scale, dtype=h.dtype)
        cos, sin = [], []
        for kind in self._rope_kinds:
            c, s = self._rope(kind, positions, h.dtype)  # (B, rot)
            cos.append(c)
            sin.append(s)
        if paged:  # `slots` holds the (B, max_blocks) block tables
            h = self._stack.forward_paged(h, cos, sin, cache.k, cache.v, slots, positions.reshape(B))
        else:
            h = self._stack.forward(h, cos, sin, cache.k, cache.v, _slot_rows(self._row_tensors, slots, B),
                                    positions.reshape(B))
        return BaseOutput(self.norm(h[:, None]), None, None)

    def _rope(self, kind: str, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, rot) of the rotary embedding `kind` at `positions` (B, 1), rows of a table of positions
        0..n-1 made by the module itself and grown by doubling. Computing them each step called PyTorch's cos and
        sin, which hand even a few hundred values to MKL's vector maths, and MKL opens an OpenMP region for them
        when its thread count is above one (torch.set_num_threads, --threads): its spinning threads then held up
        the kernels' pool, Gemma-3-270M shapes decoding at 65 instead of 100 tok/s on the project's 2-core VM.
        longrope computes per step (its factors depend on the longest position asked for), and so do positions
        past ROPE_TABLE_POSITIONS (the table stays at most 16 MB, for Gemma 3's head_dim 256)."""
        rotary = self.rotary[kind]
        need = int(positions.max()) + 1
        if rotary.rope.rope_type == "longrope" or need > ROPE_TABLE_POSITIONS:
            c, s = rotary(positions, dtype)
            return c[:, 0], s[:, 0]
        table = self._rope_tables.get((kind, dtype))
        if table is None or table[0].shape[0] < need:
            n = min(ROPE_TABLE_POSITIONS, max(need, 2 * table[0].shape[0] if table is not None else 512))
            c, s = rotary(torch.arange(n, device=positions.device)[None], dtype)  # (1, n, rot)
            table = self._rope_tables[(kind, dtype)] = (c[0], s[0])
        rows = positions.reshape(-1)  # index_select: see QuantEmbedding.forward
        return table[0].index_select(0, rows), table[1].index_select(0, rows)

    def rebuild_stack(self) -> None:
        """Build the decode stack again on the next decode step, over the modules as they are then: a transform
        that changes them after fuse_for_cpu (distributed/shard.py) calls this."""
        self._stack, self._stackable = None, True


def _decode_stack(transformer: Transformer):
    """The C++ DecodeStack over `transformer`'s own tensors, or None when a layer is not in the shape it takes
    (plain nn.Linear layers, an activation it lacks)."""
    from .quantize import QuantLinear

    def weights(module):
        if not isinstance(module, QuantLinear):
            raise _NotStackable
        return {"qs": module.qs, "d": module.d, "m": module.m, "kind": module.kind, "bias": module.bias}

    cfg = transformer.config
    kinds = sorted(set(cfg.layer_types))
    # A tensor-parallel rank's o_proj and down_proj (distributed/shard.py) sum their outputs over the ranks with
    # their `reduce`; the stack calls it at the same two places per layer. All of them share one process group.
    row_parallel = [m for layer in transformer.layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj)]
    reduces = [getattr(m, "reduce", None) for m in row_parallel]
    if any(r is None for r in reduces) and any(r is not None for r in reduces):
        return None
    layers = []
    try:
        for layer in transformer.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if mlp._act is None:
                raise _NotStackable
            # q/k/v and gate/up as one product each, or as separate ones (blocks of different kinds)
            qkv = [attn.qkv_proj] if attn.fused else [attn.q_proj, attn.k_proj, attn.v_proj]
            gate_up = [mlp.gate_up_proj] if mlp.fused else [mlp.gate_proj, mlp.up_proj]
            spec = {"qkv": [weights(m) for m in qkv], "o": weights(attn.o_proj),
                    "gate_up": [weights(m) for m in gate_up],
                    "down": weights(mlp.down_proj), "in_norm": layer.input_layernorm.weight,
                    "post_attn_norm": layer.post_attention_layernorm.weight,
                    "window": attn.window, "rope": kinds.index(layer.layer_type)}
            if attn.q_norm is not None:
                spec.update(q_norm=attn.q_norm.weight, k_norm=attn.k_norm.weight)
            if layer.sandwich:
                spec.update(pre_ff_norm=layer.pre_feedforward_layernorm.weight,
                            post_ff_norm=layer.post_feedforward_layernorm.weight)
            layers.append(spec)
    except _NotStackable:
        return None
    return kernels().DecodeStack(layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                                 cfg.rms_norm_eps, cfg.norm_weight_offset, transformer.layers[0].mlp._act,
                                 cfg.attention_scale, reduces[0])


class _NotStackable(Exception):
    pass


def fuse_for_cpu(model: CausalLM) -> CausalLM:
    """Swap in the fused decode path (in place). Needs the C++ kernels; returns the model unchanged without."""
    if kernels() is None:
        return model
    cfg = model.config
    row_tensors: dict[tuple[int, int], torch.Tensor] = {}  # shared by the layers
    for module in model.modules():
        if type(module) is RMSNorm:
            module.__class__ = FusedRMSNorm
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.__class__ = FusedAttention
        attn._row_tensors = row_tensors
        attn.window = cfg.sliding_window if layer.layer_type == "sliding_attention" and cfg.sliding_window else 0
        mlp.__class__ = FusedMLP
        mlp._act = _act_code(mlp.act)
    transformer = model.model
    transformer.__class__ = FusedTransformer
    transformer._rope_kinds = sorted(set(cfg.layer_types))
    transformer._rope_tables = {}  # (kind, dtype) -> cos, sin (n, rot) for positions 0..n-1, grown as needed
    transformer._row_tensors = row_tensors
    transformer._stack, transformer._stackable = None, True  # built on the first decode step
    return model
