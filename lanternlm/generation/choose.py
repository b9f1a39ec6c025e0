"""Choosing a sequence's next token: the one path every generator uses (the Python API, the serving engine and
the trace), so a constraint or a sampling stage cannot be applied in one place and forgotten in another.

`Chooser.choose` takes the model's logits row and returns the token, and a trace of how it was chosen when
asked for: the guide's constraint (grammar, thinking budget) is a stage, then `sampling`'s stages, then the
draw. Tracing uses the very same stages and the same single uniform draw from the sequence's generator, so a
seeded run picks the same tokens traced or not.

Token strings in a trace come twice: `text` is the token decoded on its own, specials shown, and `piece` is
the vocabulary entry as stored ('Ġworld', '<0x0A>'), "" for ids the tokenizer has no entry for.
Shapes: V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LanternError
from ..text.tokenizer import Tokenizer
from .guide import Guide
from .sampling import SamplingParams, inverse_cdf_draw, process_logits, sample, stages


@dataclass
class Chooser:
    """One sequence's way of choosing: its sampling parameters, random generator, guide and trace setting."""

    params: SamplingParams
    generator: torch.Generator | None
    guide: Guide | None = None
    trace_top_k: int | None = None       # None: no trace; else this many candidates per stage

    def choose(self, logits: torch.Tensor, prompt_ids, output_ids, tokenizer: Tokenizer) -> tuple[int, dict | None]:
        """The next token from the model's raw logits row (V,), and its trace (None unless asked for)."""
        constraint = self.guide.mask() if self.guide is not None else None
        if self.trace_top_k:
            token, trace = trace_step(logits, self.params, prompt_ids, output_ids, self.generator, tokenizer,
                                      self.trace_top_k, constraint)
        else:
            processed = process_logits(logits.float(), self.params, prompt_ids, output_ids, constraint)
            token, trace = sample(processed, self.params, self.generator), None
        if self.guide is not None:
            self.guide.accept(token)
        return token, trace


def _positive_int(value, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise LanternError(f"{name} must be a positive integer, got {value!r}")
    return value


def _token(tokenizer: Tokenizer, token_id: int) -> dict:
    """How one token id is shown: the id, its text on its own and its vocabulary piece."""
    try:
        piece = tokenizer.tokens([token_id])[0]
    except LanternError:  # an id past the tokenizer's vocabulary (a padded embedding row)
        piece = ""
    return {"id": token_id, "text": tokenizer.decode([token_id], skip_special_tokens=False), "piece": piece}


def _rank(values: torch.Tensor, index: int) -> int:
    """1-based rank of values[index] in a descending order that breaks ties by position, as argmax does.
    values: (V,)."""
    v = values[index]
    ahead = (values > v).sum() + (values[:index] == v).sum()
    return int(ahead) + 1


def _top(tokenizer: Tokenizer, logits: torch.Tensor, probs: torch.Tensor, k: int) -> list[dict]:
    """The k most probable tokens of one distribution, skipping removed ones (-inf logits).
    logits, probs: (V,) float32 on the CPU."""
    k = min(k, int((logits > -torch.inf).sum()))
    values, order = torch.topk(probs, k)  # sorted, most probable first
    return [{**_token(tokenizer, int(i)), "logit": float(logits[i]), "prob": float(p)}
            for p, i in zip(values, order)]



def trace_step(logits: torch.Tensor, params: SamplingParams, prompt_ids, output_ids,
               generator: torch.Generator | None, tokenizer: Tokenizer, top_k: int = 5,
               constraint: tuple[str, torch.Tensor] | None = None) -> tuple[int, dict]:
    """Choose the next token from the model's raw `logits` (V,) as `sampling` would, and say how.

    Returns (token_id, trace). The trace holds:
      - `candidates`: the top_k tokens of the raw logits with their logit, probability and log-probability;
      - `stages`: after each active sampling stage (see `sampling.stages`; the first is the raw `input`, then the
        sequence's `constraint` when it has one, e.g. "grammar"), how
        many tokens it keeps, the probability mass those kept tokens had just before the stage, and the top_k
        of its distribution (softmax over the kept tokens);
      - `chosen`: the token with its raw logit, raw probability and rank, and its probability and rank under
        the final distribution (ranks are 1-based; ties go to the lower id, as argmax does);
      - `draw`: None when greedy; else the uniform number u drawn from `generator` and the cumulative
        probabilities [low, high) of the chosen token, which contain u * total (inverse-CDF over token ids).

    Greedy picks exactly what `sampling.sample` picks, and sampling uses the same inverse-CDF draw as
    `sampling.sample` (one `torch.rand` from `generator`), so a seeded run picks the same tokens traced or not.
    """
    top_k = _positive_int(top_k, "top_k")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 1 or logits.numel() == 0:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise LanternError(f"logits must be one row of shape (vocab_size,), got {shape}")
    raw = logits.detach().float().cpu()  # (V,); the trace is a few V-sized operations, cheapest on the CPU
    if torch.isnan(raw).any():
        raise LanternError("the logits contain NaN; the model produced invalid numbers")

    all_stages = stages(raw, params, prompt_ids, output_ids, constraint)
    raw_probs = raw.softmax(-1)
    raw_logprobs = raw.log_softmax(-1)
    candidates = [{**entry, "logprob": float(raw_logprobs[entry["id"]])}
                  for entry in _top(tokenizer, raw, raw_probs, top_k)]

    stage_list = []
    previous = None  # the distribution before the current stage, (V,)
    for name, stage_logits in all_stages:
        probs = stage_logits.softmax(-1)
        kept = stage_logits > -torch.inf
        stage_list.append({
            "name": name,
            "kept": int(kept.sum()),
            # Of the mass the previous distribution held, how much the survivors had (1.0 for the input).
            "kept_mass": 1.0 if previous is None else float(previous[kept].sum()),
            "top": _top(tokenizer, stage_logits, probs, top_k),
        })
        previous = probs
    final_logits = all_stages[-1][1]
    final_probs = previous

    if params.greedy:
        token = sample(final_logits, params, generator)  # the very code generate() runs
        draw = None
    else:
        if not torch.isfinite(final_probs).all() or float(final_probs.sum()) <= 0:
            raise LanternError("no token is left to sample: every logit is -inf after processing")
        token, draw = inverse_cdf_draw(final_probs, generator)

    chosen = {
        **_token(tokenizer, token),
        "logit": float(raw[token]),
        "raw_prob": float(raw_probs[token]),
        "raw_rank": _rank(raw, token),
        "prob": float(final_probs[token]),
        "rank": _rank(final_probs, token),
    }
    return token, {"greedy": params.greedy, "candidates": candidates, "stages": stage_list,
                   "chosen": chosen, "draw": draw}


__all__ = ["Chooser", "trace_step"]
