"""Grammars that constrain what a sequence may generate: JSON schemas, regular expressions and Lark grammars,
compiled by llguidance (https://github.com/guidance-ai/llguidance) against the model's own tokenizer.

A request's constraint travels as a `text.constraint.GrammarSpec` (plain text, hashable). A
`GrammarCompiler` per tokenizer turns it into a `Grammar`, once: compiled grammars are cached (least recently used out). Each sequence then
walks its own `Matcher`, which says which token ids may come next, as a (V,) bool tensor, and consumes the
token chosen. This module knows no model and no sampling: `sampling.stages` applies the mask as one stage.

Untrusted input (the spec's own checks are in `text.constraint`): llguidance refuses keywords it cannot
enforce (never silently ignored: `GrammarError.keyword` names them), and compilation runs under llguidance's
counted limits, so a schema that would take too long fails the same way on every machine instead of
stalling a step.
"""

from __future__ import annotations

import collections
import re
import threading

import llguidance
import numpy as np
import torch

from ..text.constraint import GrammarError, GrammarSpec
from ..text.tokenizer import Tokenizer

CACHE_ENTRIES = 64              # compiled grammars kept per tokenizer
# llguidance's own counted limits (see LLParserLimits); these are its defaults made explicit, except the
# grammar size, lowered so that compiling stays well under a second for anything accepted.
LIMITS = dict(max_items_in_row=2000, initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000,
              step_max_items=50_000, max_lexer_states=250_000, max_grammar_size=200_000, verbose_errors=False)
_UNIMPLEMENTED = re.compile(r'Unimplemented keys: \[([^\]]*)\]')


class Grammar:
    """A compiled grammar: a matcher in its start state, copied for each sequence."""

    def __init__(self, spec: GrammarSpec, pristine: llguidance.LLMatcher, tokenizer: llguidance.LLTokenizer,
                 vocab_size: int):
        self.spec = spec
        self._pristine = pristine
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size

    def matcher(self) -> Matcher:
        return Matcher(self._pristine.deep_copy(), self.vocab_size)

    def tokenize(self, text: str) -> list[int]:
        """Token ids for `text` as the grammar engine splits it (to feed text that arrived inside a token)."""
        return self._tokenizer.tokenize_str(text)


class Matcher:
    """One sequence's position in a grammar."""

    def __init__(self, inner: llguidance.LLMatcher, vocab_size: int):
        self._inner = inner
        self.vocab_size = vocab_size

    def allowed(self) -> torch.Tensor:
        """(V,) bool: the token ids that may come next (end tokens only, once the grammar is complete)."""
        bits = np.frombuffer(self._inner.compute_bitmask(), dtype=np.uint8)  # bit i of the mask = token i
        return torch.from_numpy(np.unpackbits(bits, count=self.vocab_size, bitorder="little").view(bool))

    def accept(self, token_id: int) -> bool:
        """Advance by one token; False (and the matcher stays in error) if the grammar does not allow it."""
        return self._inner.consume_token(token_id)

    def accept_many(self, token_ids: list[int]) -> bool:
        return self._inner.consume_tokens(token_ids)

    @property
    def done(self) -> bool:
        """The grammar is complete and admits nothing more but an end token."""
        return self._inner.is_stopped()

    @property
    def accepting(self) -> bool:
        return self._inner.is_accepting()

    @property
    def error(self) -> str | None:
        return self._inner.get_error() or None


class GrammarCompiler:
    """Compiles specs for one tokenizer (thread-safe), keeping the latest `CACHE_ENTRIES` grammars."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._lock = threading.Lock()
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._cache: collections.OrderedDict[GrammarSpec, Grammar] = collections.OrderedDict()
        self.compiled = 0          # how many compilations ran (cache misses)

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of the vocabulary: built on first use (~0.2 s at 49k tokens, ~0.8 s at 152k)."""
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = llguidance.LLTokenizer(
                    self.tokenizer.backend.to_str(), n_vocab=self.vocab_size,
                    eos_token=sorted(self.tokenizer.end_token_ids) or None)
            return self._ll_tokenizer

    def compile(self, spec: GrammarSpec) -> Grammar:
        with self._lock:
            cached = self._cache.get(spec)
            if cached is not None:
                self._cache.move_to_end(spec)
                return cached
        tokenizer = self.ll_tokenizer
        try:
            source = spec.llguidance_source()
        except ValueError as e:
            raise GrammarError(f"cannot read the {_what(spec)}: {e}") from None
        limits = llguidance.LLParserLimits(**LIMITS)
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(source, tokenizer, limits=limits)
        if failed:
            raise _error(spec, messages[0] if messages else "rejected")
        matcher = llguidance.LLMatcher(tokenizer, source, log_level=0, limits=limits)
        if matcher.is_error():
            raise _error(spec, matcher.get_error())
        grammar = Grammar(spec, matcher, tokenizer, self.vocab_size)
        with self._lock:
            self.compiled += 1
            self._cache[spec] = grammar
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return grammar



def _what(spec: GrammarSpec) -> str:
    return {"json_schema": "JSON schema", "regex": "regex", "lark": "grammar"}.get(spec.kind, spec.kind)


def _error(spec: GrammarSpec, message: str) -> GrammarError:
    message = message.strip().splitlines()[0] if message.strip() else "rejected"
    unimplemented = _UNIMPLEMENTED.search(message)
    if unimplemented:
        keys = [k.strip().strip('"') for k in unimplemented.group(1).split(",") if k.strip()]
        return GrammarError(f"the {_what(spec)} uses {', '.join(repr(k) for k in keys)}, which Lantern cannot "
                            f"enforce while generating; remove {'it' if len(keys) == 1 else 'them'} or validate "
                            f"after generation", keyword=keys[0] if keys else None)
    keyword = "oneOf" if "oneOf constraints are not supported" in message else (
        "format" if message.startswith("Unknown format") else None)
    return GrammarError(f"cannot compile the {_what(spec)}: {message}", keyword=keyword)


__all__ = ["Grammar", "Matcher", "GrammarCompiler", "CACHE_ENTRIES", "LIMITS"]
