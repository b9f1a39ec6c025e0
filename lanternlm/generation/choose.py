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

import math
from dataclasses import dataclass, field

import torch

from ..errors import LanternError
from ..kernels import serial_torch_ops
from ..text.tokenizer import Tokenizer
from .guide import Guide
from .logit_rows import logit_rank, top_logits
from .sampling import SamplingParams, argmax, inverse_cdf_draw, process_logits, sample, stages


@dataclass
class Chooser:
    """One sequence's way of choosing: its sampling parameters, random generator, guide and trace setting."""

    params: SamplingParams
    generator: torch.Generator | None
    guide: Guide | None = None
    trace_top_k: int | None = None       # None: no trace; else this many candidates per stage
    names: dict[int, dict] = field(default_factory=dict, repr=False)  # trace_step's memo of token names

    def choose(self, logits: torch.Tensor, prompt_ids, output_ids, tokenizer: Tokenizer) -> tuple[int, dict | None]:
        """The next token from the model's raw logits row (V,), and its trace (None unless asked for). The row's
        ops are microseconds each, too small to gain from a second thread: they run serially."""
        constraint = self.guide.mask() if self.guide is not None else None
        with serial_torch_ops():
            if self.trace_top_k:
                token, trace = trace_step(logits, self.params, prompt_ids, output_ids, self.generator, tokenizer,
                                          self.trace_top_k, constraint, self.names)
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


def _top(tokenizer: Tokenizer, logits: torch.Tensor, probs: torch.Tensor, k: int) -> list[dict]:
    """The k most probable tokens of one distribution, skipping removed ones (-inf logits), most probable first
    (logits order as their probabilities do). logits, probs: (V,) float32 on the CPU."""
    values, ids, _ = top_logits(logits, k)
    return [{**_token(tokenizer, i), "logit": v, "prob": float(probs[i])} for v, i in zip(values, ids)]



def trace_step(logits: torch.Tensor, params: SamplingParams, prompt_ids, output_ids,
               generator: torch.Generator | None, tokenizer: Tokenizer, top_k: int = 5,
               constraint: tuple[str, torch.Tensor] | None = None,
               names: dict[int, dict] | None = None) -> tuple[int, dict]:
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
    `sampling.sample` (one `torch.rand` from `generator`, over the same softmax), so a seeded run picks the
    same tokens traced or not. `names`: a memo of token id -> its text and piece, kept by the caller across
    steps (a sequence's trace shows many of the same tokens).

    Cost: it runs once per token while serving with the trace on, so every pass over the V logits counts.
    Per stage: one pass for the top-k and the count of kept tokens (logit_rows.top_logits) and one logsumexp
    (p = exp(logit - lse)); a stage that keeps one token needs an arg-max instead of the logsumexp.
    """
    top_k = _positive_int(top_k, "top_k")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 1 or logits.numel() == 0:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise LanternError(f"logits must be one row of shape (vocab_size,), got {shape}")
    raw = logits.detach().float().cpu()  # (V,); the trace is a few V-sized operations, cheapest on the CPU
    names = {} if names is None else names

    all_stages = stages(raw, params, prompt_ids, output_ids, constraint)
    stage_list, raw_lse, lse, count = [], None, None, None
    for name, x in all_stages:
        previous_lse, previous_count = lse, count
        values, ids, count = top_logits(x, top_k)  # NaN is not > -inf: an all-NaN row counts 0
        if count == 0:
            raise LanternError("the logits contain NaN; the model produced invalid numbers" if torch.isnan(x).any()
                               else "no token is left to choose: every logit is -inf after processing")
        if count == 1:  # greedy's last stage (or a constraint that leaves one token): nothing to sum
            best = argmax(x)  # a NaN beside the one token wins it, and is refused below
            lse = float(x[best])
            top = [{**_name(tokenizer, best, names), "logit": lse, "prob": 1.0}]
        else:
            lse = float(torch.logsumexp(x, -1))  # NaN in, NaN out
            top = [{**_name(tokenizer, i, names), "logit": v, "prob": math.exp(v - lse)}
                   for v, i in zip(values, ids)]
        if math.isnan(lse):
            raise LanternError("the logits contain NaN; the model produced invalid numbers")
        # Stages either change values and keep every token (bias, penalties, temperature) or keep some tokens
        # unchanged and remove the rest (constraint, top_k, top_p, min_p, greedy): the same count means all the
        # mass stays, and the survivors' old mass is their logsumexp, which is this stage's own.
        kept_mass = 1.0 if previous_lse is None or count == previous_count else math.exp(lse - previous_lse)
        stage_list.append({"name": name, "kept": count, "kept_mass": kept_mass, "top": top})
        raw_lse = lse if raw_lse is None else raw_lse  # the input stage's: the raw distribution's
    candidates = [{**entry, "logprob": entry["logit"] - raw_lse} for entry in stage_list[0]["top"]]
    final_x, final_lse = x, lse

    if params.greedy:
        # What sampling.sample does for greedy (arg-max, first index on ties), the NaN check done above.
        token = stage_list[-1]["top"][0]["id"] if count == 1 else argmax(final_x)
        draw = None
    else:
        final_probs = final_x.softmax(-1)  # the very distribution sampling.sample draws from
        if not torch.isfinite(final_probs).all() or float(final_probs.sum()) <= 0:
            raise LanternError("no token is left to sample: every logit is -inf after processing")
        token, draw = inverse_cdf_draw(final_probs, generator)

    chosen = {
        **_name(tokenizer, token, names),
        "logit": float(raw[token]),
        "raw_prob": math.exp(float(raw[token]) - raw_lse),
        "raw_rank": logit_rank(raw, token),
        "prob": math.exp(float(final_x[token]) - final_lse),
        "rank": 1 if count == 1 else logit_rank(final_x, token),  # logits rank as their probabilities do
    }
    return token, {"greedy": params.greedy, "candidates": candidates, "stages": stage_list,
                   "chosen": chosen, "draw": draw}


def _name(tokenizer: Tokenizer, token_id: int, names: dict[int, dict]) -> dict:
    if token_id not in names:
        names[token_id] = _token(tokenizer, token_id)
    return names[token_id]


__all__ = ["Chooser", "trace_step"]
