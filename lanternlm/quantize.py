"""Speed as a transform: linear layers that compute from int8 weights, swapped in after the model is built.

The readable model (model.py) keeps plain nn.Linear modules; `quantize_from_gguf` replaces them with
Int8Linear modules built straight from a GGUF file's tensors, so weights stay 8-bit in memory instead of
being blown up to fp32. q/k/v and gate/up are fused into single modules (one matmul each) through the
model's own fused code path (the one Phi-3 checkpoints use). The dequantized fp32 model stays the reference
these are tested against.

Why int8 rows and bf16 activations (measured on this project's 2-core CI VM, PyTorch 2.13; the VM reported
"AMD EPYC" with avx512_bf16/avx512_vnni and no AMX flags; oneDNN uses AMX tiles where a CPU has them):
- one decode step is ~85% matrix-vector products bound by memory; fp32 weights read 4 bytes per weight;
- PyTorch's `_weight_int8pack_mm` with bf16 activations runs the 3072x576 MLP product in ~55 us against
  ~150 us in fp32, and the 49152x576 lm_head in ~2.1 ms against ~10 ms; its fp32-activation path and the
  CPU int4 kernel are far slower (8 tokens/s), so GGUF's 4-bit blocks are widened to 8 bits per row;
- `_weight_int8pack_mm` re-reads the weights for every input row (its time grows linearly from 2 rows on:
  3072x576 takes ~55 us for 1 row, ~207 us for 8, ~785 us for 32), so from DENSE_FROM_ROWS rows on
  (prefill, large batches) the layer is dequantized to bf16 for that call and a dense bf16 matmul runs,
  which costs far less than the product it enables. A kernel that reads 4-bit weights once for a
  whole batch is the next step (see the notes on issue 5).
Requantizing to one scale per row adds an error of at most half a step (row max / 254) per weight, and
the kernels return bf16, so logits are rounded to bf16 (3 significant digits) on this path; the exact path
(quantized=False) keeps fp32 logits.
"""

from __future__ import annotations

import torch
from torch import nn

from .loader.gguf import GGUFFile
from .loader.gguf_model import unpermute_rows
from .model import CausalLM

DENSE_FROM_ROWS = 32  # from this many input rows on (prefill, big batches), dequantize to bf16 for a dense matmul


def int8_supported() -> bool:
    """PyTorch's CPU int8-weight kernel exists in this build."""
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


class Int8Linear(nn.Module):
    """y = x @ W.T (+ b) with W stored as int8, one scale per output row; activations computed in bf16."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        weight = weight.float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,)
        self.register_buffer("weight_int8", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.register_buffer("bias", None if bias is None else bias.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (M, in)
        if x2.shape[0] < DENSE_FROM_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight_int8, self.scale)
        else:
            y = x2 @ (self.weight_int8.to(torch.bfloat16) * self.scale[:, None]).t()
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 rows, bf16 compute"


def _weight(gguf: GGUFFile, name: str, heads: int | None) -> torch.Tensor:
    w = gguf.tensor(name)
    return unpermute_rows(w, heads) if heads else w  # llama.cpp permuted Q/K rows of arch "llama"


def _bias(module: nn.Module, names: list[str]) -> torch.Tensor | None:
    biases = [getattr(module, n).bias for n in names]
    return None if biases[0] is None else torch.cat([b.detach() for b in biases])


@torch.inference_mode()
def quantize_from_gguf(model: CausalLM, gguf: GGUFFile) -> CausalLM:
    """Replace the model's linear layers with Int8Linear built from `gguf`'s tensors (in place)."""
    if not int8_supported():
        raise RuntimeError("this PyTorch build has no CPU int8-weight kernel")
    cfg = model.config
    perm = gguf.metadata.get("general.architecture") == "llama"
    for i, layer in enumerate(model.model.layers):
        blk, attn, mlp = f"blk.{i}", layer.self_attn, layer.mlp
        if cfg.fused_qkv:
            qkv, bias = _weight(gguf, f"{blk}.attn_qkv.weight", None), attn.qkv_proj.bias
        else:
            qkv = torch.cat([_weight(gguf, f"{blk}.attn_q.weight", cfg.num_attention_heads if perm else None),
                             _weight(gguf, f"{blk}.attn_k.weight", cfg.num_key_value_heads if perm else None),
                             _weight(gguf, f"{blk}.attn_v.weight", None)])
            bias = _bias(attn, ["q_proj", "k_proj", "v_proj"])
            del attn.q_proj, attn.k_proj, attn.v_proj
        attn.qkv_proj = Int8Linear(qkv, None if bias is None else bias.detach())
        attn.fused = True
        o_bias = attn.o_proj.bias
        attn.o_proj = Int8Linear(_weight(gguf, f"{blk}.attn_output.weight", None),
                                 None if o_bias is None else o_bias.detach())
        if cfg.fused_qkv:
            gate_up = _weight(gguf, f"{blk}.ffn_up.weight", None)
        else:
            gate_up = torch.cat([_weight(gguf, f"{blk}.ffn_gate.weight", None),
                                 _weight(gguf, f"{blk}.ffn_up.weight", None)])
            del mlp.gate_proj, mlp.up_proj
        mlp.gate_up_proj = Int8Linear(gate_up, None)
        mlp.fused = True
        mlp.down_proj = Int8Linear(_weight(gguf, f"{blk}.ffn_down.weight", None), None)
    head = "output.weight" if "output.weight" in gguf.tensors else "token_embd.weight"
    model.lm_head = Int8Linear(gguf.tensor(head), None)
    return model
