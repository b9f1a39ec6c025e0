"""What a sequence is allowed to generate next, step by step: a grammar (structured output, tool calls), a
thinking budget, and the phases between them.

A request describes its constraint once as a `GuideSpec`; each sequence walks its own `Guide`:

    thinking  --(close tag seen, or the budget forces it)-->  answer
    answer: a grammar from the first token (response_format, a required tool call), or free text watched for
            the trigger of a tool call, after which the call's grammar holds until the call is complete.

`Guide.mask()` gives the stage for `sampling.stages`: a (name, allowed) pair, allowed a (V,) bool tensor, or
None when the next token is free. `Guide.accept(token_id)` moves the state on with the token chosen. A
grammar is never applied inside the thinking, and thinking is never cut except by its budget.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from ..text.constraint import GrammarError
from ..text.tokenizer import Tokenizer
from .grammar import Grammar, Matcher


@dataclass(frozen=True)
class Thinking:
    """How a model thinks: tags, the token that opens a thought, and the budget for one request."""

    open_text: str                     # "<think>"
    close_text: str                    # "</think>"
    open_id: int | None                # the single token spelling open_text, if there is one
    close_ids: tuple[int, ...]         # forced when the budget runs out (the close tag and the break after it)
    inside: bool                       # the prompt leaves the model inside an open thought
    budget: int | None = None          # most thinking tokens before the close tag is forced


@dataclass(frozen=True)
class GuideSpec:
    """One request's constraint; `start` gives each of its sequences a fresh Guide."""

    grammar: Grammar | None = None
    trigger: str | None = None         # lazy: the grammar starts once this text appears in the answer
    trigger_id: int | None = None      # ... or this token is chosen
    rearm: bool = False                # lazy: after a complete match, watch for the trigger again (parallel calls)
    thinking: Thinking | None = None

    def start(self, tokenizer: Tokenizer, vocab_size: int) -> Guide:
        return Guide(self, tokenizer, vocab_size)


class Guide:
    def __init__(self, spec: GuideSpec, tokenizer: Tokenizer, vocab_size: int):
        self.spec = spec
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        thinking = spec.thinking
        if thinking is None:
            self.phase = "answer"
        else:
            self.phase = "thinking" if thinking.inside else "maybe_thinking"
        self.thinking_tokens = 0
        self.forced: deque[int] = deque()
        self.matcher: Matcher | None = None
        self.watched = ""                   # answer text since the last call, searched for the trigger
        self.thought = ""                   # thinking text, searched for the close tag
        self.opening = ""                   # the first tokens' text, while they may still open a thought
        if self.phase == "thinking":
            self._enter_thinking()
        else:
            self._start_answer()

    # ------------------------------------------------------------------ before a token is chosen

    def mask(self) -> tuple[str, torch.Tensor] | None:
        if self.forced:
            return "thinking_budget", self._only([self.forced[0]])
        if self.phase == "thinking":
            return None
        if self.matcher is not None:
            if self.matcher.error:  # e.g. a step ran out of llguidance's fuel: never fall back to free text
                raise GrammarError(f"the output's grammar stopped: {self.matcher.error}")
            allowed = self.matcher.allowed()
            if self.phase == "maybe_thinking" and self.spec.thinking.open_id is not None:
                allowed[self.spec.thinking.open_id] = True  # the model may still open a thought first
            return "grammar", allowed
        return None

    def _only(self, ids: list[int]) -> torch.Tensor:
        allowed = torch.zeros(self.vocab_size, dtype=torch.bool)
        allowed[ids] = True
        return allowed

    # ------------------------------------------------------------------ after

    def accept(self, token_id: int) -> None:
        if self.forced:
            self.forced.popleft()
            if not self.forced:
                self._start_answer()
            return
        text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        if self.phase == "maybe_thinking":
            thinking = self.spec.thinking
            self.opening += text
            lead = self.opening.lstrip()
            if token_id == thinking.open_id or lead.startswith(thinking.open_text):
                self.phase, self.matcher = "thinking", None
                self._enter_thinking()
                return
            if self.matcher is None and thinking.open_text.startswith(lead):
                return  # whitespace, or the first pieces of an open tag spelled in several tokens
            self.phase = "answer"  # the grammar (if any) was applied to this token already
            text = self.opening
        if self.phase == "thinking":
            self._think(text)
            return
        self._answer(token_id, text)

    def _enter_thinking(self) -> None:
        if self.spec.thinking.budget == 0:
            self.forced.extend(self.spec.thinking.close_ids)

    def _think(self, text: str) -> None:
        thinking = self.spec.thinking
        self.thinking_tokens += 1
        self.thought = self.thought[-len(thinking.close_text):] + text  # enough to see a tag split over tokens
        if thinking.close_text in self.thought:
            self._start_answer()
        elif thinking.budget is not None and self.thinking_tokens >= thinking.budget:
            self.forced.extend(thinking.close_ids)

    def _start_answer(self) -> None:
        if self.phase != "maybe_thinking":
            self.phase = "answer"
        lazy = self.spec.trigger is not None or self.spec.trigger_id is not None
        if self.spec.grammar is not None and not lazy:
            self.matcher = self.spec.grammar.matcher()

    def _answer(self, token_id: int, text: str) -> None:
        if self.matcher is not None:
            self.matcher.accept(token_id)
            if self.matcher.done and self.spec.rearm:
                self.matcher, self.watched = None, ""
            return
        if self.spec.grammar is None:
            return
        if self.spec.trigger_id is not None and token_id == self.spec.trigger_id:
            self.matcher = self.spec.grammar.matcher()
            return
        if self.spec.trigger is None:
            return
        trigger = self.spec.trigger
        self.watched = self.watched[-len(trigger):] + text  # enough to see a trigger split over tokens
        at = self.watched.find(trigger)
        if at >= 0:  # the call starts: the rest of this token's text already belongs to it
            rest = self.watched[at + len(trigger):]
            self.matcher = self.spec.grammar.matcher()
            if rest:
                self.matcher.accept_many(self.spec.grammar.tokenize(rest))


__all__ = ["Thinking", "GuideSpec", "Guide"]
