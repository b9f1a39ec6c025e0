"""Seeing inside a model as plain data: a per-token trace of how each token was chosen, the logit lens, and
the attention weights.

Every function reads a model and a tokenizer and returns dicts and lists of str / int / float / None only, so
the CLI, the Python API and the HTTP server can print them or `json.dumps` them as they are. Nothing here
changes the model or slows its normal path: the trace runs beside the sampling stages of `sampling.py`, the
lens reuses the hidden states the model can already return, and the attention view uses the model's own
explicit-weights path.

Token strings come twice: `text` is the token decoded on its own, specials shown (what a reader sees; a
byte-level piece holding part of a character shows as U+FFFD), and `piece` is the vocabulary entry as
stored ('Ġworld', '<0x0A>'), "" for ids the tokenizer has no entry for (padded embedding rows).

Shapes: T tokens, V vocabulary, C hidden size, H query heads.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .errors import LanternError
from .generation.choose import _positive_int, _token, _top, trace_step
from .generation.generate import Step, generate
from .generation.guide import GuideSpec
from .generation.logit_rows import logit_rank
from .generation.sampling import SamplingParams
from .model import CausalLM
from .text.tokenizer import Tokenizer

# attention(): the forward materialises every layer's (H, T, T) weights at once, so the prompt is bounded by
# this many float32 values in total (512 MB); the Python lists returned are bounded by `max_weights`.
ATTENTION_FORWARD_BUDGET = 128 * 1024 * 1024


# ---------------------------------------------------------------------- small shared pieces


def _prompt_ids(ids, vocab_size: int, name: str = "ids") -> list[int]:
    """`ids` (a sequence of ints or a 1-D integer tensor) as a checked, non-empty list of token ids."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex():
            raise LanternError(f"{name} must be a 1-D tensor of token ids, got shape {tuple(ids.shape)} "
                               f"of {ids.dtype}")
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise LanternError(f"{name} must be a list of token ids, got {type(ids).__name__}")
    out = list(ids)
    if not out:
        raise LanternError(f"{name} is empty: give at least one token")
    for i in out:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < vocab_size:
            raise LanternError(f"{name} contains {i!r}, which is not a token id of this model (0..{vocab_size - 1})")
    return out


# ---------------------------------------------------------------------- 1. generation with the trace on (trace_step lives in choose.py)


def explain_generate(model: CausalLM, tokenizer: Tokenizer, prompt_ids, params: SamplingParams, context: int,
                     top_k: int = 5, guide: GuideSpec | None = None,
                     kv_dtype: torch.dtype | None = None) -> Iterator[tuple[Step, dict]]:
    """`generate.generate` with a trace per token: yields (Step, trace) where trace is `trace_step`'s dict plus
    the token's `index` among the new tokens, its `position` in the sequence, and the Step's `text` and
    `finish_reason`. It is the same generation (same path, same tokens), with the trace switched on."""
    top_k = _positive_int(top_k, "top_k")
    prompt_ids = _prompt_ids(prompt_ids, model.config.vocab_size, "prompt_ids")
    for index, step in enumerate(generate(model, tokenizer, prompt_ids, params, context, model.device, guide,
                                          trace_top_k=top_k, kv_dtype=kv_dtype)):
        yield step, {"index": index, "position": len(prompt_ids) + index, "text": step.text,
                     "finish_reason": step.finish_reason, **step.trace}


# ---------------------------------------------------------------------- 3. logit lens


@torch.inference_mode()
def logit_lens(model: CausalLM, tokenizer: Tokenizer, ids, position: int = -1, top_k: int = 5) -> dict:
    """What each depth of the model would predict after token `position` if the stack stopped there.

    Depth 0 is the embeddings, depth d the output of decoder layer d - 1 (`layers.{d-1}`); each hidden state is
    sent through the final norm and the lm_head (and Gemma's logit soft-capping), so the last depth is exactly
    the model's next-token distribution. Per depth: the top_k tokens with logit and probability, the entropy
    (nats), and the probability and rank of the model's final top-1 token.
    """
    top_k = _positive_int(top_k, "top_k")
    ids = _prompt_ids(ids, model.config.vocab_size)
    limit = model.config.max_position_embeddings
    if len(ids) > limit:
        raise LanternError(f"the prompt has {len(ids)} tokens but the model's context holds {limit}")
    if not isinstance(position, int) or isinstance(position, bool) or not -len(ids) <= position < len(ids):
        raise LanternError(f"position {position!r} is outside the prompt of {len(ids)} tokens "
                           f"(use 0..{len(ids) - 1}, or negative from the end)")
    position %= len(ids)
    device = model.device
    # Attention is causal, so the tokens after `position` cannot change what it sees: leave them out.
    prefix = torch.tensor([ids[:position + 1]], device=device)  # (1, position + 1)
    out = model(prefix, output_hidden_states=True, logits_to_keep=1)
    hidden = torch.stack([h[0, -1] for h in out.hidden_states])  # (N + 1, C), before the final norm
    lens_logits = model.lm_head(model.model.norm(hidden))  # (N + 1, V)
    cap = model.config.final_logit_softcapping
    if cap is not None:  # as CausalLM.forward does
        lens_logits = torch.tanh(lens_logits / cap) * cap
    lens_logits = lens_logits.float().cpu()
    final_top = int(lens_logits[-1].argmax())

    depths = []
    for depth, row in enumerate(lens_logits):
        probs = row.softmax(-1)
        depths.append({
            "depth": depth,
            "name": "embed_tokens" if depth == 0 else f"layers.{depth - 1}",
            "top": _top(tokenizer, row, probs, top_k),
            "entropy": float(-(probs * row.log_softmax(-1)).nan_to_num().sum()),
            "final_token_prob": float(probs[final_top]),
            "final_token_rank": logit_rank(probs, final_top),
        })
    return {"position": position, "token": _token(tokenizer, ids[position]),
            "final_token": _token(tokenizer, final_top), "num_layers": len(model.model.layers),
            "depths": depths}


# ---------------------------------------------------------------------- 4. attention


def _indices(chosen, count: int, name: str) -> list[int]:
    if chosen is None:
        return list(range(count))
    if isinstance(chosen, (str, bytes)) or not isinstance(chosen, Sequence) or not chosen:
        raise LanternError(f"{name} must be a non-empty list of indices, got {chosen!r}")
    for i in chosen:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < count:
            raise LanternError(f"{name} contains {i!r}; this model has {count} (0..{count - 1})")
    return list(chosen)


@torch.inference_mode()
def attention(model: CausalLM, tokenizer: Tokenizer, ids, layers: Sequence[int] | None = None,
              heads: Sequence[int] | None = None, max_weights: int = 4_000_000) -> dict:
    """The attention weights of every (or the chosen) layer and query head over the prompt `ids`.

    `layers[i]["heads"][j]` is a T x T list of rows: row q holds how much token q attends to each token k;
    every row sums to 1, and weights are exactly 0 where the mask forbids looking (k > q, and for
    sliding-window layers k <= q - window). Layers and heads are numbered from 0, as in `layers.{i}`.
    `max_weights` bounds how many numbers are returned; the prompt is bounded so the forward fits in memory.
    """
    max_weights = _positive_int(max_weights, "max_weights")
    ids = _prompt_ids(ids, model.config.vocab_size)
    config = model.config
    n_layers, n_heads, T = len(model.model.layers), config.num_attention_heads, len(ids)
    layer_idx = _indices(layers, n_layers, "layers")
    head_idx = _indices(heads, n_heads, "heads")
    if n_layers * n_heads * T * T > ATTENTION_FORWARD_BUDGET:
        longest = int((ATTENTION_FORWARD_BUDGET / (n_layers * n_heads)) ** 0.5)
        raise LanternError(f"the prompt has {T} tokens; the attention view of this model handles at most "
                           f"{longest} tokens")
    returned = len(layer_idx) * len(head_idx) * T * T
    if returned > max_weights:
        raise LanternError(f"{len(layer_idx)} layers x {len(head_idx)} heads x {T} x {T} tokens is {returned} "
                           f"weights, more than max_weights={max_weights}: choose fewer layers or heads, or a "
                           f"shorter prompt")
    device = model.device
    out = model(torch.tensor([ids], device=device), output_attentions=True, logits_to_keep=1)
    result_layers = []
    for i in layer_idx:
        weights = out.attentions[i][0].float().cpu()  # (H, T, T)
        layer_type = model.model.layers[i].layer_type
        result_layers.append({
            "layer": i,
            "name": f"layers.{i}",
            "type": layer_type,
            "window": config.sliding_window if layer_type == "sliding_attention" else None,
            "heads": [weights[h].tolist() for h in head_idx],
        })
    shown = [_token(tokenizer, i) for i in ids]
    return {"ids": ids, "tokens": [t["text"] for t in shown], "pieces": [t["piece"] for t in shown],
            "num_layers": n_layers, "num_heads": n_heads, "head_indices": head_idx, "layers": result_layers}


__all__ = ["trace_step", "explain_generate", "logit_lens", "attention", "ATTENTION_FORWARD_BUDGET"]
