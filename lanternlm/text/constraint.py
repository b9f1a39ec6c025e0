"""A constraint on what a model may write, described as text: a JSON schema, a regular expression or a Lark
grammar (llguidance's dialect). `GrammarSpec` is plain, hashable data that requests carry; nothing here knows a
tokenizer or a model (`generation.grammar` compiles a spec against a vocabulary).

Untrusted input: a spec is bounded in size, a JSON schema is checked against its metaschema first (so an
invalid schema is an error naming the place, not a guess), and `GrammarError.keyword` names the keyword at
fault when there is one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import jsonschema
import llguidance

from ..errors import LanternError

MAX_SOURCE_BYTES = 128 * 1024   # a schema, regex or grammar larger than this is refused before compiling
# Free whitespace between JSON tokens: bounded, so a small model cannot pad until max_tokens; 12 characters
# leave room for a newline and the indentation of pretty-printed JSON a few levels deep.
JSON_OPTIONS = {"whitespace_flexible": True, "whitespace_pattern": r"[ \t\n\r]{0,12}", "lenient": False}


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


__all__ = ["GrammarError", "GrammarSpec", "json_schema_grammar", "JSON_OPTIONS", "MAX_SOURCE_BYTES"]
