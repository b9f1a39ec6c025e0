"""One request inside the engine: its prompt, parameters, progress through prefill, and output stream."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..generation.choose import Chooser
from ..generation.generate import OutputStream, Step

_ids = itertools.count()


@dataclass
class Event:
    """What the engine reports for a request: a step, or an error that ended it."""

    request_id: str
    step: Step | None = None
    error: str | None = None           # set when the engine aborted the request (shutdown, failure)
    request_error: bool = False        # the error is the request's own (its grammar gave up), not the engine's
    logprob: float | None = None       # log-probability of step.token_id under the model, when asked for
    top_logprobs: list[tuple[int, float]] | None = None  # the most likely alternatives, best first
    trace: dict | None = None          # choose.trace_step's record of how the token was chosen, when asked for
    # On a request's first event, when asked for: per prompt token, None for the first (nothing predicts it),
    # then (logprob, rank, [(id, logprob), ...]) of that token given the ones before it.
    prompt_logprobs: list | None = None
    cached_tokens: int | None = None   # on a request's first event: prompt tokens served by the prefix cache


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    stream: OutputStream
    chooser: Chooser                     # how its tokens are chosen (parameters, generator, guide, trace)
    on_event: Callable[[Event], None]
    salt: str | None = None              # prefix-cache partition (vLLM's cache_salt): equal salts share blocks
    target: list[int] = field(default_factory=list)  # tokens to prefill: the prompt, or all so far after preemption
    computed: int = 0                    # tokens of `target` whose keys and values are in the cache
    cached_tokens: int | None = None     # prompt tokens the prefix cache served at first admission
    preemptions: int = 0
    arrived: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None
    aborted: bool = False
    logprobs: int | None = None          # report the chosen token's logprob and this many alternatives
    prompt_logprobs: int | None = None   # report each prompt token's logprob and this many alternatives
    prompt_lp: list = field(default_factory=list)  # what has been computed of them so far

    @staticmethod
    def new_id() -> str:
        return f"req-{next(_ids)}"

    def __post_init__(self) -> None:
        self.target = list(self.prompt_ids)

    @property
    def unprefilled(self) -> int:
        """Tokens of `target` still to prefill."""
        return len(self.target) - self.computed

    @property
    def prefilling(self) -> bool:
        return self.unprefilled > 0

    @property
    def scoring(self) -> bool:
        """This prefill must give every prompt position's logits (prompt logprobs not yet computed)."""
        return self.prompt_logprobs is not None and len(self.prompt_lp) < len(self.prompt_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.stream.output_ids

    @property
    def length(self) -> int:
        """Tokens whose keys are in the cache once the next forward has run."""
        return len(self.prompt_ids) + len(self.stream.output_ids)

    @property
    def finished(self) -> bool:
        return self.stream.finish_reason is not None
