"""Grammars that constrain what a sequence may generate: JSON schemas, regular expressions and Lark grammars,
compiled by llguidance (https://github.com/guidance-ai/llguidance) against the model's own tokenizer.

A request's constraint travels as a `GrammarSpec` (plain text, hashable). A `GrammarCompiler` per tokenizer
turns it into a `Grammar`, once: compiled grammars are cached (least recently used out). Each sequence then
walks its own `Matcher`, which says which token ids may come next, as a (V,) bool tensor, and consumes the
token chosen. This module knows no model and no sampling: `sampling.stages` applies the mask as one stage.

Untrusted input: a spec is bounded in size, a JSON schema is checked against its metaschema first (so an
invalid schema is an error, not a guess), llguidance refuses keywords it cannot enforce (never silently
ignored: `GrammarError.keyword` names them), and compilation runs under llguidance's counted limits, so a
schema that would take too long fails the same way on every machine instead of stalling a step.
"""

from __future__ import annotations

import collections
import json
import re
import threading
from dataclasses import dataclass

import jsonschema
import llguidance
import numpy as np
import torch

from .errors import LanternError
from .tokenizer import Tokenizer

MAX_SOURCE_BYTES = 128 * 1024   # a schema, regex or grammar larger than this is refused before compiling
CACHE_ENTRIES = 64              # compiled grammars kept per tokenizer
# Free whitespace between JSON tokens: bounded, so a small model cannot pad until max_tokens; 12 characters
# leave room for a newline and the indentation of pretty-printed JSON a few levels deep.
JSON_OPTIONS = {"whitespace_flexible": True, "whitespace_pattern": r"[ \t\n\r]{0,12}", "lenient": False}
# llguidance's own counted limits (see LLParserLimits); these are its defaults made explicit, except the
# grammar size, lowered so that compiling stays well under a second for anything accepted.
LIMITS = dict(max_items_in_row=2000, initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000,
              step_max_items=50_000, max_lexer_states=250_000, max_grammar_size=200_000, verbose_errors=False)

_UNIMPLEMENTED = re.compile(r'Unimplemented keys: \[([^\]]*)\]')


class GrammarError(LanternError, ValueError):
    """A schema, regex or grammar that cannot be enforced. `keyword` names the JSON-schema keyword at fault,
    when one is."""

    def __init__(self, message: str, keyword: str | None = None):
        super().__init__(message)
        self.keyword = keyword


@dataclass(frozen=True)
class GrammarSpec:
    """What to constrain to, as text: `kind` is "json_schema", "regex" or "lark"."""

    kind: str
    source: str

    @staticmethod
    def json_schema(schema) -> GrammarSpec:
        """A JSON schema (a dict, or its JSON text); checked against its metaschema here."""
        if isinstance(schema, str):
            _check_size(schema, "the JSON schema")
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise GrammarError(f"the JSON schema is not valid JSON: {e}") from None
        if schema is False:
            raise GrammarError("the JSON schema is false, which no output can match")
        if schema is True:
            schema = {}
        if not isinstance(schema, dict):
            raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
        try:
            # Key order kept: llguidance generates properties in the order the schema lists them.
            text = json.dumps(schema, ensure_ascii=False)
        except RecursionError:
            raise GrammarError("the JSON schema is nested too deeply") from None
        except (TypeError, ValueError) as e:
            raise GrammarError(f"the JSON schema is not JSON: {e}") from None
        _check_size(text, "the JSON schema")
        try:
            jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
        except jsonschema.SchemaError as e:
            where = "/".join(str(p) for p in e.path)
            raise GrammarError(f"invalid JSON schema{' at ' + where if where else ''}: {e.message}",
                               keyword=str(e.path[-1]) if e.path else None) from None
        except RecursionError:
            raise GrammarError("the JSON schema is nested too deeply") from None
        return GrammarSpec("json_schema", text)

    @staticmethod
    def json_object() -> GrammarSpec:
        """Any JSON object (OpenAI's response_format json_object)."""
        return GrammarSpec("json_schema", '{"type": "object"}')

    @staticmethod
    def regex(pattern: str) -> GrammarSpec:
        if not isinstance(pattern, str) or not pattern:
            raise GrammarError("the regex must be a non-empty string")
        _check_size(pattern, "the regex")
        return GrammarSpec("regex", pattern)

    @staticmethod
    def lark(grammar: str) -> GrammarSpec:
        """A grammar in llguidance's Lark syntax (rules, /regex/ terminals, %json {...} for inline schemas,
        <[id]> for a token id)."""
        if not isinstance(grammar, str) or not grammar.strip():
            raise GrammarError("the grammar must be a non-empty string")
        _check_size(grammar, "the grammar")
        return GrammarSpec("lark", grammar)

    def llguidance_source(self) -> str:
        if self.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(self.source, defaults=JSON_OPTIONS)
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.source)
        if self.kind == "lark":
            return llguidance.LLMatcher.grammar_from_lark(self.source)
        raise GrammarError(f"unknown grammar kind {self.kind!r}")


def _check_size(text: str, what: str) -> None:
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_SOURCE_BYTES:
        raise GrammarError(f"{what} is {size:,} bytes; at most {MAX_SOURCE_BYTES:,} are accepted")


def json_schema_grammar(schema: dict) -> str:
    """A schema as an inline Lark rule body (`%json {...}`), for grammars that embed JSON (tool calls)."""
    return "%json " + json.dumps(schema, ensure_ascii=False)


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


__all__ = ["GrammarError", "GrammarSpec", "Grammar", "Matcher", "GrammarCompiler", "json_schema_grammar",
           "MAX_SOURCE_BYTES"]
