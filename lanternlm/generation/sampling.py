"""Choosing the next token from a row of logits: sampling parameters (vLLM / OpenAI names), their validation,
and the processing stages as pure functions on a float32 logits row of shape (V,). No model code here.

Order of the stages (each is skipped when its parameter is neutral):

0. a constraint, when the sequence has one (``grammar`` from a JSON schema, regex or tool-call grammar, or
   ``thinking_budget`` forcing the end of a thought): tokens it does not allow are removed before anything
   else, so every later stage (and greedy's arg-max) only sees tokens the constraint allows. vLLM applies its
   structured-output bitmask to the logits before its sampler in the same way.
1. ``logit_bias``  -- add the caller's per-token bias. Both references apply it first: vLLM runs its
   logit-bias processor before the penalties, and transformers' ``SequenceBiasLogitsProcessor`` precedes its
   ``RepetitionPenaltyLogitsProcessor``.
2. ``repetition_penalty`` -- for every token seen in prompt + output: positive logits are divided by the
   penalty, negative ones multiplied (transformers and vLLM alike).
3. ``frequency_presence_penalty`` -- OpenAI's formula over output tokens only, as vLLM does:
   ``logit -= frequency_penalty * count(token) + presence_penalty * (count(token) > 0)``.
   Penalties work on the (biased) model logits, before any temperature scaling, in both references.
4. ``temperature`` -- divide by T. Coming before truncation means top_p/min_p see the tempered
   distribution, as in both references. ``temperature == 0`` means greedy instead: a ``greedy`` stage keeps
   only the arg-max of the penalised logits and stages 4-7 are skipped (vLLM does the same).
5. ``top_k`` -- keep the k largest logits (ties with the k-th are kept, as transformers and vLLM do).
6. ``top_p`` -- keep the smallest set of most likely tokens whose probability reaches p, measured after
   top-k (both references apply top-k first).
7. ``min_p`` -- drop tokens whose probability is below ``min_p`` times the top token's. transformers runs it
   after top-p; since it compares ratios to the top token, the kept set does not depend on that order.

Removed tokens get ``-inf``. The most likely token (of those the constraint allows) survives every stage.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from ..errors import LanternError
from .logit_rows import in_one_pass, logit_rank, top_logits

# Neutral values used when neither the request nor the model's generation_config sets a parameter.
_NEUTRAL = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}
# generation_config.json keys read by with_defaults (same names as ours).
_MODEL_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
# torch.Generator.manual_seed accepts this range.
_SEED_MIN, _SEED_MAX = -(1 << 63), (1 << 64) - 1


class SamplingParamsError(LanternError, ValueError):
    """A sampling parameter has an invalid value; the message names the field."""


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(name: str, value, *, optional: bool = True) -> float | None:
    """``value`` as a finite float, or an error naming the field."""
    if value is None and optional:
        return None
    if not _is_number(value) or not math.isfinite(value):
        raise SamplingParamsError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. ``None`` means "use the model's default" (see with_defaults)."""

    temperature: float | None = None  # 0 -> greedy; None -> model default, else 1.0
    top_p: float | None = None  # (0, 1]; 1 disables
    top_k: int | None = None  # -1 or 0 disables (vLLM)
    min_p: float | None = None  # [0, 1]; 0 disables
    repetition_penalty: float | None = None  # > 0; 1 disables
    presence_penalty: float = 0.0  # [-2, 2]
    frequency_penalty: float = 0.0  # [-2, 2]
    logit_bias: dict[int, float] | None = None  # token id -> bias in [-100, 100]
    seed: int | None = None
    max_tokens: int | None = None  # None -> until an end token or the context is full
    stop: tuple[str, ...] = ()  # a str or list is accepted and stored as a tuple
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        def store(name, value):  # frozen dataclass: normalise through object.__setattr__
            object.__setattr__(self, name, value)

        temperature = _number("temperature", self.temperature)
        if temperature is not None and temperature < 0:
            raise SamplingParamsError(f"temperature must be >= 0 (0 means greedy), got {self.temperature!r}")
        store("temperature", temperature)

        top_p = _number("top_p", self.top_p)
        if top_p is not None and not 0 < top_p <= 1:
            raise SamplingParamsError(f"top_p must be in (0, 1], got {self.top_p!r}")
        store("top_p", top_p)

        if self.top_k is not None:
            if not _is_int(self.top_k):
                raise SamplingParamsError(f"top_k must be an integer, got {self.top_k!r}")
            if self.top_k < -1:
                raise SamplingParamsError(f"top_k must be -1 or 0 (disabled) or a positive count, got {self.top_k}")

        min_p = _number("min_p", self.min_p)
        if min_p is not None and not 0 <= min_p <= 1:
            raise SamplingParamsError(f"min_p must be in [0, 1], got {self.min_p!r}")
        store("min_p", min_p)

        repetition_penalty = _number("repetition_penalty", self.repetition_penalty)
        if repetition_penalty is not None and repetition_penalty <= 0:
            raise SamplingParamsError(
                f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty!r}"
            )
        store("repetition_penalty", repetition_penalty)

        for name in ("presence_penalty", "frequency_penalty"):
            value = _number(name, getattr(self, name), optional=False)
            if not -2 <= value <= 2:
                raise SamplingParamsError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
            store(name, value)

        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, Mapping):
                raise SamplingParamsError(f"logit_bias must be a dict of token id -> bias, got {self.logit_bias!r}")
            bias = {}
            for token, value in self.logit_bias.items():
                if not _is_int(token) or token < 0:
                    raise SamplingParamsError(
                        f"logit_bias keys must be non-negative integer token ids, got {token!r}"
                    )
                value = _number(f"logit_bias[{token}]", value, optional=False)
                if not -100 <= value <= 100:
                    raise SamplingParamsError(f"logit_bias[{token}] must be in [-100, 100], got {value!r}")
                bias[token] = value
            store("logit_bias", bias)

        if self.seed is not None and (not _is_int(self.seed) or not _SEED_MIN <= self.seed <= _SEED_MAX):
            raise SamplingParamsError(f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}")

        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 0):
            raise SamplingParamsError(f"max_tokens must be a non-negative integer or None, got {self.max_tokens!r}")

        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if stop is None:
            stop = ()
        if not isinstance(stop, (list, tuple)):
            raise SamplingParamsError(f"stop must be a string or a list of strings, got {self.stop!r}")
        for item in stop:
            if not isinstance(item, str):
                raise SamplingParamsError(f"stop must contain only strings, got {item!r}")
            if not item:
                raise SamplingParamsError("stop contains an empty string, which would stop before any text")
        store("stop", tuple(stop))

        ids = self.stop_token_ids
        if ids is None:
            ids = ()
        if not isinstance(ids, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in ids):
            raise SamplingParamsError(f"stop_token_ids must be a list of non-negative integers, got {ids!r}")
        store("stop_token_ids", tuple(ids))

        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingParamsError(f"{name} must be true or false, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_defaults(self, generation_config: dict | None) -> SamplingParams:
        """Fill parameters left ``None`` from the model's generation_config.json, then with neutral values.

        Explicit values always win. ``do_sample: false`` in the config makes an unset temperature 0 (greedy),
        as transformers would decode greedily; the config's other sampling values are then moot.
        """
        config = generation_config or {}
        if not isinstance(config, Mapping):
            raise SamplingParamsError(f"generation_config must be a dict, got {type(config).__name__}")
        model_values = {key: config[key] for key in _MODEL_DEFAULT_KEYS if config.get(key) is not None}
        if config.get("do_sample") is False:
            model_values["temperature"] = 0.0
        try:
            # Validates the model's values with the same rules (and messages) as a request's.
            model = SamplingParams(**model_values)
        except SamplingParamsError as e:
            raise SamplingParamsError(f"the model's generation_config has an invalid value: {e}") from None
        filled = {}
        for name, neutral in _NEUTRAL.items():
            if getattr(self, name) is None:
                model_value = getattr(model, name)
                filled[name] = neutral if model_value is None else model_value
        return replace(self, **filled)


def make_generator(seed: int | None) -> torch.Generator | None:
    """A CPU random generator seeded with ``seed``; None (torch's global generator) when no seed is given."""
    if seed is None:
        return None
    if not _is_int(seed) or not _SEED_MIN <= seed <= _SEED_MAX:
        raise SamplingParamsError(f"seed must be an integer in [-2**63, 2**64), got {seed!r}")
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return generator


# --- Stages: each takes a logits row (V,) and returns a new one; inputs are never modified.


def _token_ids(ids, vocab_size: int, name: str, device) -> torch.Tensor:
    """``ids`` (a sequence of ints or an integer tensor) as a flat LongTensor, checked against the vocabulary."""
    if isinstance(ids, torch.Tensor):
        tensor = ids.reshape(-1).to(device=device, dtype=torch.long)
    else:
        tensor = torch.as_tensor(list(ids), dtype=torch.long, device=device)
    if tensor.numel() and (int(tensor.min()) < 0 or int(tensor.max()) >= vocab_size):
        bad = tensor[(tensor < 0) | (tensor >= vocab_size)][0]
        raise LanternError(f"{name} contains token id {int(bad)}, outside the vocabulary of {vocab_size} tokens")
    return tensor


def apply_logit_bias(logits: torch.Tensor, logit_bias: Mapping[int, float]) -> torch.Tensor:
    vocab_size = logits.shape[-1]
    ids = _token_ids(list(logit_bias), vocab_size, "logit_bias", logits.device)
    values = torch.tensor(list(logit_bias.values()), dtype=logits.dtype, device=logits.device)
    out = logits.clone()
    out[ids] += values
    return out


def apply_repetition_penalty(logits: torch.Tensor, penalty: float, seen_ids: torch.Tensor) -> torch.Tensor:
    """Make every token in ``seen_ids`` less likely: positive logits / penalty, negative logits * penalty."""
    seen = torch.unique(seen_ids)
    scores = logits[seen]
    out = logits.clone()
    out[seen] = torch.where(scores < 0, scores * penalty, scores / penalty)
    return out


def apply_frequency_presence_penalty(
    logits: torch.Tensor, frequency: float, presence: float, output_ids: torch.Tensor
) -> torch.Tensor:
    counts = torch.bincount(output_ids, minlength=logits.shape[-1]).to(logits.dtype)  # (V,)
    out = logits
    if frequency:
        out = out - frequency * counts
    if presence:
        out = out - presence * (counts > 0).to(logits.dtype)
    return out


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits / temperature


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    kth_best = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth_best, -math.inf)


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches p: a token stays while the
    mass of the tokens more likely than it is below p (the most likely always stays), as transformers'
    TopPLogitsWarper decides it.

    Only the head of the distribution is put in order: the k most likely tokens, k growing until the set is
    decided inside them. Sorting the whole vocabulary, as the warper does, costs ~7 ms for 49,152 values on
    one core of the project's VM (torch.sort), more than a whole decode step of the default model; a top-64
    takes ~0.2 ms. A nucleus too wide for that (a flat distribution) falls back to the full sort."""
    V = logits.shape[-1]
    probs = logits.softmax(dim=-1)
    k = min(V, 64)
    while True:
        top, index = torch.topk(probs, k) if k < V // 4 else torch.sort(probs, descending=True)
        top = top.double()  # the running sums in float64: the decision sits on their value against p
        before = top.cumsum(dim=-1) - top  # (k,): mass of the tokens more likely than each
        if len(top) == V or float(before[-1]) >= p:  # the k-th token already goes, so do all later ones
            break
        k *= 4
    keep = before < p
    keep[0] = True
    kept = index[keep]
    return torch.full_like(logits, -math.inf).index_put_((kept,), logits[kept])


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    probs = logits.softmax(dim=-1)
    drop = probs < min_p * probs.max()
    drop[logits.argmax()] = False  # the most likely token always stays
    return logits.masked_fill(drop, -math.inf)


def argmax(logits: torch.Tensor) -> int:
    """torch.argmax of one (V,) row as an int: the first index on ties, a NaN's if there is one. A CPU float32 row
    goes through numpy's arg-max (the same answer, SIMD): on one thread over 262,144 float32, 19 us against
    torch's 218 (measured on the project's Zen 4 VM), and greedy decoding takes two per token."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 1:
        return int(logits.detach().numpy().argmax())
    return int(logits.argmax())


def keep_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Greedy decoding as a stage: only the arg-max keeps its logit (the first one on ties, like argmax)."""
    best = argmax(logits)
    out = torch.full_like(logits, -math.inf)
    out[best] = logits[best]
    return out


def apply_constraint(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Remove the tokens a constraint does not allow. allowed: (V,) bool."""
    if allowed.shape != logits.shape or allowed.dtype != torch.bool:
        raise LanternError(f"a constraint's mask must be a bool tensor of shape {tuple(logits.shape)}, got "
                           f"{allowed.dtype} {tuple(allowed.shape)}")
    # torch.where costs about a quarter of masked_fill(~allowed) on a 152k row; a mask that allows nothing
    # leaves only -inf, which `sample` refuses.
    return torch.where(allowed.to(logits.device), logits, -math.inf)


def stages(logits, params: SamplingParams, prompt_ids, output_ids,
           constraint: tuple[str, torch.Tensor] | None = None) -> list[tuple[str, torch.Tensor]]:
    """The logits row after each active stage, starting with ``("input", logits)`` as float32.

    ``logits`` is the model's (V,) row for the next token; ``prompt_ids`` and ``output_ids`` are the
    token ids so far (sequences of ints or integer tensors). ``constraint`` is a (stage name, allowed (V,)
    bool) pair from the sequence's guide, applied first. Parameters still ``None`` count as neutral
    (call :meth:`SamplingParams.with_defaults` first to apply the model's defaults).
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 1 or logits.numel() == 0:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise LanternError(f"logits must be one row of shape (vocab_size,), got {shape}")
    x = logits.float()
    vocab_size = x.shape[-1]
    result = [("input", x)]

    def add(name, value):
        result.append((name, value))
        return value

    if constraint is not None:
        x = add(constraint[0], apply_constraint(x, constraint[1]))
    if params.logit_bias:
        x = add("logit_bias", apply_logit_bias(x, params.logit_bias))
    if params.repetition_penalty is not None and params.repetition_penalty != 1:
        seen = torch.cat([_token_ids(prompt_ids, vocab_size, "prompt_ids", x.device),
                          _token_ids(output_ids, vocab_size, "output_ids", x.device)])
        x = add("repetition_penalty", apply_repetition_penalty(x, params.repetition_penalty, seen))
    if params.frequency_penalty or params.presence_penalty:
        out_ids = _token_ids(output_ids, vocab_size, "output_ids", x.device)
        x = add("frequency_presence_penalty",
                apply_frequency_presence_penalty(x, params.frequency_penalty, params.presence_penalty, out_ids))
    if params.greedy:
        add("greedy", keep_argmax(x))
        return result
    if params.temperature is not None and params.temperature != 1:
        x = add("temperature", apply_temperature(x, params.temperature))
    if params.top_k is not None and 0 < params.top_k < vocab_size:
        x = add("top_k", apply_top_k(x, params.top_k))
    if params.top_p is not None and params.top_p < 1:
        x = add("top_p", apply_top_p(x, params.top_p))
    if params.min_p:
        x = add("min_p", apply_min_p(x, params.min_p))
    return result


def process_logits(logits, params: SamplingParams, prompt_ids, output_ids,
                   constraint: tuple[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The final float32 (V,) logits to sample from; removed tokens are ``-inf``."""
    return stages(logits, params, prompt_ids, output_ids, constraint)[-1][1]


_NAN = "the logits contain NaN; the model produced invalid numbers"


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Draw a token id from *processed* logits (the output of :func:`process_logits`).

    Greedy (arg-max) when ``params.temperature == 0``; otherwise one draw from softmax(logits) using
    ``generator`` (a CPU generator from :func:`make_generator`, or None for torch's global one). The draw
    happens on the CPU so a seed gives the same tokens whatever device the model runs on.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 1 or logits.numel() == 0:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise LanternError(f"logits must be one row of shape (vocab_size,), got {shape}")
    if params.greedy:
        token = argmax(logits)  # a NaN anywhere wins the arg-max, so one pass also finds it
        best = float(logits[token])
        if math.isnan(best):
            raise LanternError(_NAN)
        if best == -math.inf:
            raise LanternError("no token is left to choose: every logit is -inf after processing")
        return token
    if torch.isnan(logits).any():
        raise LanternError(_NAN)
    probs = logits.float().softmax(dim=-1).cpu()
    if not torch.isfinite(probs).all() or float(probs.sum()) <= 0:
        raise LanternError("no token is left to sample: every logit is -inf after processing")
    # The same draw the explain trace reports, so turning the trace on never changes a seeded run.
    return inverse_cdf_draw(probs, generator)[0]


def inverse_cdf_draw(probs: torch.Tensor, generator: torch.Generator | None) -> tuple[int, dict]:
    """Sample one token: one uniform draw u in [0, 1) from `generator`; the token is the first whose cumulative probability
    exceeds u * total. probs: (V,) on the CPU. Tokens with probability 0 can never be chosen."""
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    cdf = probs.double().cumsum(-1)  # (V,), float64 so the intervals of tiny probabilities stay distinct
    target = u * float(cdf[-1])  # scaling by the total keeps rounding from running past the last token
    token = int(torch.searchsorted(cdf, torch.tensor([target], dtype=torch.float64), right=True)[0])
    last_possible = int(torch.nonzero(probs > 0)[-1])
    token = min(token, last_possible)
    low = float(cdf[token - 1]) if token > 0 else 0.0
    return token, {"method": "inverse_cdf", "uniform": u, "total": float(cdf[-1]),
                   "low": low, "high": float(cdf[token])}



__all__ = [
    "SamplingParams", "SamplingParamsError", "make_generator", "stages", "process_logits", "sample",
    "inverse_cdf_draw",
    "apply_logit_bias", "apply_repetition_penalty", "apply_frequency_presence_penalty",
    "apply_temperature", "apply_top_k", "apply_top_p", "apply_min_p", "argmax", "keep_argmax", "apply_constraint",
    "token_logprobs",
]


def token_logprobs(logits: torch.Tensor, targets: Sequence[int],
                   top: int) -> list[tuple[float, int, list[tuple[int, float]]]]:
    """Log-probabilities under the model's own distribution (before any sampling stage, as OpenAI and vLLM
    report them): for each row of `logits` (T, V), the target token's logprob, its rank (1 = most likely), and
    the `top` most likely tokens with their logprobs, best first."""
    row = logits[0].float().contiguous() if logits.shape[0] == 1 else None  # a decode step's token
    if row is not None and in_one_pass(row):  # else the (T, V) way's three passes beat PyTorch's answers to each
        one = _row_logprobs(row, int(targets[0]), top)
        if one is not None:
            return [one]
    logp = torch.log_softmax(logits.float(), dim=-1)  # (T, V)
    chosen = logp.gather(1, torch.tensor(list(targets), device=logp.device)[:, None])  # (T, 1)
    ranks = ((logp > chosen).sum(dim=-1) + 1).tolist()
    chosen = chosen[:, 0].tolist()
    if top <= 0:
        return [(lp, rank, []) for lp, rank in zip(chosen, ranks)]
    best = logp.topk(top, dim=-1)
    return [(lp, rank, list(zip(ids, values)))
            for lp, rank, ids, values in zip(chosen, ranks, best.indices.tolist(), best.values.tolist())]


def _row_logprobs(row: torch.Tensor, target: int, top: int) -> tuple[float, int, list[tuple[int, float]]] | None:
    """token_logprobs of one (V,) row from its logsumexp, one pass for the top and one for the rank
    (logit_rows), where the (T, V) way takes a log_softmax, a comparison and a sorting topk over the row: the cost
    of `logprobs` on every decoded token (~150 -> ~50 us on a 49,152-token row). None when the row has fewer
    than `top` logits above -inf (the (T, V) way reports those too)."""
    lse = float(torch.logsumexp(row, -1))
    values, ids, _ = top_logits(row, top) if top > 0 else ([], [], 0)
    if len(ids) < top:
        return None
    # logit - lse orders as the log-probabilities do; equal logits share a rank, as (logp > chosen) counts them
    rank = logit_rank(row, target, ties_by_id=False)
    return float(row[target]) - lse, rank, [(i, v - lse) for v, i in zip(values, ids)]
