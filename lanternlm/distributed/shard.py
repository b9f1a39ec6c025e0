"""Tensor parallelism as a transform: cut a built model down to one rank's part and join the parts with collectives.

After `shard_model(model, plan, group)` each rank's model computes, for the same input, the same full logits as
the unsplit model (up to the order of float sums), holding only its part of the weights and of the KV cache:

- q/k/v (Phi-3's and Lantern's fused qkv_proj: rows [Q; K; V]) and gate/up (gate_up_proj: [gate; up]) are
  column-parallel: a rank keeps the output rows of its heads and MLP columns, biases too. No collective.
- o_proj and down_proj are row-parallel: a rank keeps the input columns of its heads and MLP columns and its
  output is a partial sum; one all-reduce (sum) each. A bias stays on rank 0 only, so the sum adds it once.
- the embedding is vocab-parallel: a rank holds its range of rows, gives zeros for other ids, and one
  all-reduce sums; lm_head holds the same rows and its logits are all-gathered (slices may differ by one row:
  padded to the largest, then trimmed), so every rank returns the full vocabulary (Gemma's soft-capping, in
  CausalLM.forward, then applies to the full logits). A tied lm_head shares the embedding's sliced matrix.
- the attention modules get the local head counts, and `model.config` becomes the local config
  (num_attention_heads, num_key_value_heads: the rank's), so a KV cache sized from it holds only the rank's KV
  heads; vocab_size, hidden_size and intermediate_size stay the model's.
- norms (Qwen3/Gemma 3's per-head q/k norms included) are replicated: they see full vectors or whole heads.

Quantized matrices are cut between whole 32-element blocks (kernels/blocks.py, Blocks.columns). The C++ decode
stack (fused.py) runs per rank and calls the row-parallel modules' `reduce` between layers.

The modules keep their names (state dicts and printed trees are the model's); their classes become the
subclasses below, which add the collective to the class's own forward, as fused.py swaps classes for its
ops. Hidden states and attention weights are refused (ShardError): the attention weights would hold only the
rank's heads, and a forward that rank 0 runs for inspection alone would wait forever for the others.

`slice_model` and `parallelize` are the two halves of `shard_model`: load.py slices a model that is still on
the meta device, fills it with only the rank's part of the file (quantize.py reads the `matrix_parts`), and
then adds the collectives.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..fused import FusedTransformer
from ..kernels.blocks import is_float_kind
from ..model import CausalLM
from ..quantize import Int8Linear, MatrixPart, QuantEmbedding, QuantLinear
from .plan import ShardError, ShardPlan, split_evenly

EMBEDDING, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def shard_model(model: CausalLM, plan: ShardPlan, group) -> CausalLM:
    """Cut `model` to `plan`'s part and join the ranks' parts through `group` (a torch.distributed process group,
    gloo on the CPU; its rank and size must be the plan's), in place. Works on the float model (nn.Linear) and on
    the fast path's (QuantLinear, QuantEmbedding, Int8Linear), fused for the CPU or not. The parts are copies:
    the whole model's memory goes once nothing else holds it (load(..., shard=...) reads only the part instead)."""
    return parallelize(slice_model(model, plan), plan, group)


# ------------------------------------------------------------------ which part of each matrix a rank keeps

def _heads(heads: tuple[int, int], head_dim: int, offset: int = 0) -> tuple[int, int]:
    """Rows (or columns) of the heads start..end-1 in a matrix whose heads begin at `offset`."""
    return offset + heads[0] * head_dim, offset + heads[1] * head_dim


def qkv_part(config: ModelConfig, plan: ShardPlan) -> MatrixPart:
    """A fused [Q; K; V] matrix's part: the rank's query heads, then its key heads, then its value heads."""
    D, q_rows, kv_rows = config.head_dim, config.num_attention_heads * config.head_dim, \
        config.num_key_value_heads * config.head_dim
    return MatrixPart(rows=(_heads(plan.q_heads, D), _heads(plan.kv_heads, D, q_rows),
                            _heads(plan.kv_heads, D, q_rows + kv_rows)))


def gate_up_part(config: ModelConfig, plan: ShardPlan) -> MatrixPart:
    """A fused [gate; up] matrix's part: the rank's MLP columns of each."""
    start, end = plan.intermediate
    I = config.intermediate_size
    return MatrixPart(rows=((start, end), (I + start, I + end)))


def matrix_parts(config: ModelConfig, plan: ShardPlan) -> dict[str, MatrixPart]:
    """The part of every weight matrix a rank keeps, by HF name as a file stores them (q/k/v or Phi-3's qkv_proj,
    gate/up or gate_up_proj, o_proj, down_proj, the embedding, lm_head): what quantize.py's weight sources read."""
    D = config.head_dim
    q, kv = MatrixPart(rows=(_heads(plan.q_heads, D),)), MatrixPart(rows=(_heads(plan.kv_heads, D),))
    columns = MatrixPart(rows=(plan.intermediate,))
    parts = {EMBEDDING: MatrixPart(rows=(plan.vocab,)), HEAD: MatrixPart(rows=(plan.vocab,))}
    for i in range(config.num_hidden_layers):
        attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        if config.fused_qkv:
            parts[attn + "qkv_proj.weight"] = qkv_part(config, plan)
            parts[mlp + "gate_up_proj.weight"] = gate_up_part(config, plan)
        else:
            parts.update({attn + "q_proj.weight": q, attn + "k_proj.weight": kv, attn + "v_proj.weight": kv,
                          mlp + "gate_proj.weight": columns, mlp + "up_proj.weight": columns})
        parts[attn + "o_proj.weight"] = MatrixPart(cols=_heads(plan.q_heads, D))
        parts[mlp + "down_proj.weight"] = MatrixPart(cols=plan.intermediate)
    return parts


# ------------------------------------------------------------------ slicing

def slice_model(model: CausalLM, plan: ShardPlan) -> CausalLM:
    """Cut every matrix, bias and head count of `model` (real or meta tensors) to `plan`'s part and give it the
    local config, in place. No collective yet: `parallelize` adds them."""
    config = model.config
    if _is_sharded(model):
        raise ShardError("this model is sharded already")
    D, rank0 = config.head_dim, plan.rank == 0
    q, kv = MatrixPart(rows=(_heads(plan.q_heads, D),)), MatrixPart(rows=(_heads(plan.kv_heads, D),))
    columns = MatrixPart(rows=(plan.intermediate,))
    for i, layer in enumerate(model.model.layers):
        attn, mlp, at = layer.self_attn, layer.mlp, f"model.layers.{i}."
        if attn.fused:  # Phi-3's qkv_proj, or q/k/v fused by quantize.py
            _keep(attn.qkv_proj, qkv_part(config, plan), at + "self_attn.qkv_proj")
        else:
            for name, part in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                _keep(getattr(attn, name), part, at + "self_attn." + name)
        _keep(attn.o_proj, MatrixPart(cols=_heads(plan.q_heads, D)), at + "self_attn.o_proj", bias=rank0)
        attn.n_heads = plan.q_heads[1] - plan.q_heads[0]
        attn.n_kv = plan.kv_heads[1] - plan.kv_heads[0]
        if mlp.fused:
            _keep(mlp.gate_up_proj, gate_up_part(config, plan), at + "mlp.gate_up_proj")
        else:
            _keep(mlp.gate_proj, columns, at + "mlp.gate_proj")
            _keep(mlp.up_proj, columns, at + "mlp.up_proj")
        _keep(mlp.down_proj, MatrixPart(cols=plan.intermediate), at + "mlp.down_proj", bias=rank0)
    vocab = MatrixPart(rows=(plan.vocab,))
    embedding, head = model.model.embed_tokens, model.lm_head
    tied = _shares_weights(embedding, head)
    _keep(head, vocab, "lm_head")
    if tied:  # one sliced matrix for both
        _share(embedding, head)
    else:
        _keep(embedding, vocab, "model.embed_tokens")
    local = dataclasses.replace(config, num_attention_heads=plan.q_heads[1] - plan.q_heads[0],
                                num_key_value_heads=plan.kv_heads[1] - plan.kv_heads[0])
    model.config = model.model.config = local
    return model


def _shares_weights(embedding: nn.Module, head: nn.Module) -> bool:
    if isinstance(embedding, nn.Embedding) and isinstance(head, nn.Linear):
        return embedding.weight is head.weight
    if isinstance(embedding, QuantEmbedding) and isinstance(head, QuantLinear):
        return embedding.qs is head.qs
    return False


def _share(embedding: nn.Module, head: nn.Module) -> None:
    """Give a tied embedding the head's (sliced) matrix."""
    if isinstance(embedding, nn.Embedding):
        embedding.weight = head.weight
        embedding.num_embeddings = head.weight.shape[0]
    else:
        embedding.qs, embedding.d, embedding.m, embedding.kind = head.qs, head.d, head.m, head.kind
        embedding.shape = head.shape
        embedding.num_embeddings = head.shape[0]


def _keep(module: nn.Module, part: MatrixPart, name: str, bias: bool = True) -> None:
    """Replace `module`'s weight (and bias) by `part` of it, in place; `bias=False` drops the bias (a row-parallel
    module on ranks other than 0). A row-parallel part (columns) keeps the whole bias on rank 0."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight = nn.Parameter(part.of(module.weight), requires_grad=False)
        if isinstance(module, nn.Embedding):
            module.num_embeddings = module.weight.shape[0]
            return
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, (QuantLinear, QuantEmbedding)):
        blocks = module.weight_blocks()
        if part.cols is not None and not is_float_kind(blocks.kind) and (part.cols[0] % 32 or part.cols[1] % 32):
            raise ShardError(f"{name}: a rank's input columns {part.cols[0]}..{part.cols[1] - 1} would cut a "
                             "32-element block of its quantized weights; shard the exact (float) model instead")
        blocks = part.of_blocks(blocks)
        # (a cut can change the kind: Q4_K blocks cut inside their super-blocks get scales per block)
        module.qs, module.d, module.m, module.shape, module.kind = blocks.qs, blocks.d, blocks.m, blocks.shape, blocks.kind
        if isinstance(module, QuantEmbedding):
            module.num_embeddings = blocks.shape[0]
            return
        module.out_features, module.in_features = blocks.shape
    elif isinstance(module, Int8Linear):  # int8 rows with one scale each: a row's columns keep its scale
        module.weight_int8 = part.of(module.weight_int8)
        module.scale = part.of(module.scale)
        module.out_features, module.in_features = module.weight_int8.shape
    else:
        raise ShardError(f"{name}: cannot shard a {type(module).__name__}")
    if module.bias is not None:
        kept = part.of(module.bias) if bias else None  # part.of takes a bias's rows only
        if isinstance(module.bias, nn.Parameter):
            module.bias = None if kept is None else nn.Parameter(kept, requires_grad=False)
        else:
            module.bias = kept


# ------------------------------------------------------------------ the collectives

class _SumOverRanks:
    """Row-parallel: each rank multiplies its input columns, and the partial outputs are summed over the ranks."""

    group: object

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x).contiguous()
        self.reduce(y)
        return y

    def reduce(self, y: torch.Tensor) -> None:
        """Sum `y` over the ranks, in place: this module's forward, and the C++ decode stack between layers."""
        sum_over_ranks(y, self.group)


def sum_over_ranks(y: torch.Tensor, group) -> None:
    """y <- the sum of every rank's y, in place, in rank order (the same bits on every rank).

    Gathered, then summed here, rather than dist.all_reduce: gloo's all-reduce takes two rounds of messages (a
    ring's reduce-scatter, then its all-gather) and a gather one, and a round that needs a peer whose core is busy
    computing waits for the OS to schedule that peer's gloo thread. SmolLM2 at TP=2 on the project's 2-core VM,
    each rank pinned whole to one core (`python -m bench.tp`): decode 9.3 tok/s with all_reduce, 12.6 with this;
    see launch._place for the rest of that story (33 tok/s)."""
    world = dist.get_world_size(group)
    parts = torch.empty(world * y.numel(), dtype=y.dtype, device=y.device)  # (world * numel,): gloo's layout
    dist.all_gather_single(parts, y.contiguous().view(-1), group=group)
    torch.sum(parts.view(world, *y.shape), dim=0, out=y)


class RowParallelLinear(_SumOverRanks, nn.Linear):
    pass


class RowParallelQuantLinear(_SumOverRanks, QuantLinear):
    pass


class RowParallelInt8Linear(_SumOverRanks, Int8Linear):
    pass


class _VocabRows:
    """Vocab-parallel embedding: a rank holds rows vocab_start..vocab_start + num_embeddings - 1; other ids give
    zeros, and one all-reduce sums the ranks' rows into each id's own."""

    group: object
    vocab_start: int

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        inside = (local >= 0) & (local < self.num_embeddings)  # (B, T)
        h = super().forward(torch.where(inside, local, torch.zeros_like(local)))  # (B, T, C)
        h = h.masked_fill(~inside[..., None], 0).contiguous()
        sum_over_ranks(h, self.group)
        return h


class VocabParallelEmbedding(_VocabRows, nn.Embedding):
    pass


class VocabParallelQuantEmbedding(_VocabRows, QuantEmbedding):
    pass


class _GatherVocab:
    """Vocab-parallel lm_head: a rank computes the logits of its rows; they are all-gathered into the full
    vocabulary on every rank. `vocab_sizes`: every rank's number of rows, in rank order."""

    group: object
    vocab_sizes: tuple[int, ...]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)  # (..., this rank's rows)
        width = max(self.vocab_sizes)  # all_gather takes equal sizes: pad to the largest slice, then trim
        y = F.pad(y, (0, width - y.shape[-1])).contiguous()
        parts = [torch.empty_like(y) for _ in self.vocab_sizes]
        dist.all_gather(parts, y, group=self.group)
        return torch.cat([p[..., :n] for p, n in zip(parts, self.vocab_sizes)], dim=-1)  # (..., V)


class VocabParallelLinear(_GatherVocab, nn.Linear):
    pass


class VocabParallelQuantLinear(_GatherVocab, QuantLinear):
    pass


class VocabParallelInt8Linear(_GatherVocab, Int8Linear):
    pass


ROW_PARALLEL = {nn.Linear: RowParallelLinear, QuantLinear: RowParallelQuantLinear, Int8Linear: RowParallelInt8Linear}
VOCAB_EMBEDDINGS = {nn.Embedding: VocabParallelEmbedding, QuantEmbedding: VocabParallelQuantEmbedding}
VOCAB_HEADS = {nn.Linear: VocabParallelLinear, QuantLinear: VocabParallelQuantLinear, Int8Linear: VocabParallelInt8Linear}


def _is_sharded(model: CausalLM) -> bool:
    return isinstance(model.lm_head, _GatherVocab)


def _swap(module: nn.Module, classes: dict[type, type], name: str, **attrs) -> None:
    """Give `module` the tensor-parallel subclass of its class, and the attributes that subclass reads."""
    if type(module) not in classes:
        raise ShardError(f"{name}: cannot shard a {type(module).__name__}")
    module.__class__ = classes[type(module)]
    for key, value in attrs.items():
        setattr(module, key, value)


def parallelize(model: CausalLM, plan: ShardPlan, group) -> CausalLM:
    """Join a model sliced to `plan` (slice_model) to the other ranks' through `group`, in place: the all-reduces
    after o_proj, down_proj and the embedding, the gather after lm_head, and the refusal of inspection."""
    if _is_sharded(model):
        raise ShardError("this model is sharded already")
    if dist.get_world_size(group) != plan.world or dist.get_rank(group) != plan.rank:
        raise ShardError(f"the plan is rank {plan.rank} of {plan.world}, the process group's rank is "
                         f"{dist.get_rank(group)} of {dist.get_world_size(group)}")
    for i, layer in enumerate(model.model.layers):
        _swap(layer.self_attn.o_proj, ROW_PARALLEL, f"model.layers.{i}.self_attn.o_proj", group=group)
        _swap(layer.mlp.down_proj, ROW_PARALLEL, f"model.layers.{i}.mlp.down_proj", group=group)
    _swap(model.model.embed_tokens, VOCAB_EMBEDDINGS, "model.embed_tokens", group=group, vocab_start=plan.vocab[0])
    sizes = tuple(end - start for start, end in split_evenly(model.config.vocab_size, plan.world))
    _swap(model.lm_head, VOCAB_HEADS, "lm_head", group=group, vocab_sizes=sizes)
    # On model.model, so that a direct call (the transformers facade, the logit lens) is refused too; a hook
    # because fuse_for_cpu may still swap model.model's class after this.
    model.model.register_forward_pre_hook(_refuse_inspection, with_kwargs=True)
    if isinstance(model.model, FusedTransformer):  # a stack built before would hold the unsliced layers
        model.model.rebuild_stack()
    return model


def _refuse_inspection(module: nn.Module, args: tuple, kwargs: dict) -> None:
    # Transformer.forward(input_ids, positions, cache, slots, output_hidden_states, output_attentions)
    if any(args[4:6]) or kwargs.get("output_hidden_states") or kwargs.get("output_attentions"):
        raise ShardError("hidden states and attention weights are not available from a tensor-parallel model "
                         "(each rank holds only some heads); load the model on one process to look inside it")
