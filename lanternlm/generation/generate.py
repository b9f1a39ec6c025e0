"""Generation as a generator of steps: token id, the new text it completes, and a finish reason on the last.

`OutputStream` turns chosen token ids into safe text for one sequence (UTF-8 whole characters only, stop
strings never emitted, not even in part) and decides when the sequence ends; `generate` runs the model
for one sequence with a KV cache, chooses each token through `choose.Chooser` (the path the serving engine
uses too) and feeds it. The server's batched engine reuses OutputStream.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..errors import LanternError
from ..model import CausalLM
from ..models.kv_cache import BLOCK_SIZE, PagedKVCache
from ..text.tokenizer import IncrementalDecoder, Tokenizer
from .choose import Chooser
from .guide import GuideSpec
from .sampling import SamplingParams, make_generator


class ContextLengthError(LanternError):
    """The prompt (plus what must be generated) does not fit the model's context."""


@dataclass(frozen=True)
class Step:
    token_id: int
    text: str                          # text completed by this token ("" while a character or a stop is pending)
    finish_reason: str | None = None   # None while generating; "stop" or "length" on the last step
    # How the token was chosen (choose.trace_step), when asked for; not part of a Step's identity.
    trace: dict | None = field(default=None, compare=False, repr=False)


class StopMatcher:
    """Holds back text that could still become a stop string; reports the text before a stop once it appears."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop string was reached)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        # The stop that completes first wins (ties: the one starting first), as a token-by-token stream would
        # see it; this makes the result independent of how the text arrives in pieces.
        hits = [(i + len(s), i) for s in self.stops if (i := self.pending.find(s)) >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)[1]], ""
            return out, True
        keep = 0  # longest tail of pending that is a proper prefix of some stop string
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), keep, -1):
                if self.pending.endswith(stop[:n]):
                    keep = n
                    break
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class OutputStream:
    """One sequence's output: token ids in, Steps out, with the finish decided here."""

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, prompt_ids: list[int], max_new_tokens: int):
        self.params = params
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.max_new_tokens = max_new_tokens
        self.end_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(tokenizer.end_token_ids))
        self.decoder = IncrementalDecoder(tokenizer, skip_special_tokens=params.skip_special_tokens,
                                          prompt_ids=self.prompt_ids)
        self.stops = StopMatcher(params.stop)

    def append(self, token_id: int, trace: dict | None = None) -> Step:
        if self.finish_reason is not None:
            raise RuntimeError("sequence already finished")
        self.output_ids.append(token_id)
        if token_id in self.end_ids:  # end-of-turn token: its own text is never shown
            return self._finish(token_id, self.stops.push(self.decoder.flush())[0] + self.stops.flush(), "stop",
                                trace)
        text, stopped = self.stops.push(self.decoder.push(token_id))
        if stopped:
            return self._finish(token_id, text, "stop", trace)
        if len(self.output_ids) >= self.max_new_tokens:
            text2, stopped = self.stops.push(self.decoder.flush())
            return self._finish(token_id, text + text2 + ("" if stopped else self.stops.flush()),
                                "stop" if stopped else "length", trace)
        self.text += text
        return Step(token_id, text, None, trace)

    def _finish(self, token_id: int, text: str, reason: str, trace: dict | None) -> Step:
        self.text += text
        self.finish_reason = reason
        return Step(token_id, text, reason, trace)


def plan_lengths(prompt_len: int, params: SamplingParams, context: int) -> int:
    """How many new tokens this sequence may produce within `context` positions."""
    if prompt_len == 0:
        raise LanternError("the prompt is empty: give at least one token")
    if prompt_len >= context:
        raise ContextLengthError(f"the prompt has {prompt_len} tokens but the context holds {context}")
    room = context - prompt_len
    if params.max_tokens is not None and params.max_tokens > room:
        raise ContextLengthError(f"prompt ({prompt_len} tokens) + max_tokens ({params.max_tokens}) exceeds "
                                 f"the context of {context} tokens")
    return room if params.max_tokens is None else params.max_tokens


@torch.inference_mode()
def generate(model: CausalLM, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams,
             context: int, device: torch.device | str = "cpu", guide: GuideSpec | None = None,
             trace_top_k: int | None = None, kv_dtype: torch.dtype | None = None) -> Iterator[Step]:
    """Yield one Step per generated token until an end token, a stop string or the length limit.
    `guide` constrains the tokens (grammar, thinking budget); `trace_top_k` puts a trace on every Step.
    The keys and values live in the serving engine's kind of cache (paged, `kv_dtype`, default the model's
    dtype), so one sequence here and one in the engine compute the same numbers."""
    max_new = plan_lengths(len(prompt_ids), params, context)
    if max_new == 0:
        return
    stream = OutputStream(tokenizer, params, prompt_ids, max_new)
    blocks = -(-(len(prompt_ids) + max_new) // BLOCK_SIZE)
    cache = PagedKVCache(model.config, blocks, BLOCK_SIZE, kv_dtype or model.dtype, model.dtype, device)
    table = torch.arange(blocks, device=device)[None]  # (1, blocks): the sequence owns every block, in order
    chooser = Chooser(params, make_generator(params.seed),
                      guide.start(tokenizer, model.config.vocab_size) if guide is not None else None, trace_top_k)
    ids = torch.tensor([prompt_ids], device=device)
    positions = torch.arange(len(prompt_ids), device=device)[None]
    while True:
        logits = model(ids, positions, cache, slots=table, logits_to_keep=1).logits[0, -1]  # (V,)
        token, trace = chooser.choose(logits, stream.prompt_ids, stream.output_ids, tokenizer)
        step = stream.append(token, trace)
        yield step
        if step.finish_reason is not None:
            return
        pos = len(prompt_ids) + len(stream.output_ids) - 1
        ids = torch.tensor([[token]], device=device)
        positions = torch.tensor([[pos]], device=device)
