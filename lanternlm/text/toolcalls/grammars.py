"""The grammar (llguidance's Lark dialect) that a tool call must match while it is generated: the family's own
layout around JSON whose arguments match the function's parameters schema."""

from __future__ import annotations

import json

from ..constraint import JSON_OPTIONS, json_schema_grammar
from .formats import ToolError, ToolFormat

_LLAMA3_AFTER_NAME = '", "parameters": '
# Parallel calls from the first token (tool_choice required or named) are bounded: a small model that would
# otherwise call again and again until max_tokens ends after this many, with every call complete.
MAX_PARALLEL_CALLS = 4
_MORE = f"{{0,{MAX_PARALLEL_CALLS - 1}}}"


def call_grammar(fmt: ToolFormat, tools: list[dict], choice: str, parallel: bool, *, after_trigger: bool,
                 trigger_id: int | None, marker_ids: dict[str, int] | None = None) -> str:
    """The Lark source (llguidance) that a call region must match: from the start of the answer, trigger
    included (one call, or up to MAX_PARALLEL_CALLS when `parallel`), or, `after_trigger`, the rest of ONE call (the engine
    re-arms after each call). `choice` "auto" or "required" allows every tool (the two differ only in when the
    grammar starts), a function name only that one. `trigger_id`: the trigger is that single token, written
    `<[id]>` so that the model emits the token itself rather than its spelling. `marker_ids`: the same for the
    markers inside a call (Qwen's "</tool_call>", Mistral's "[ARGS]" and "[CALL_ID]"): llguidance takes such added
    tokens for special ones, which a text literal never matches, so spelled as text the grammar would refuse the
    model's own token for them."""
    chosen = [t["function"] for t in tools if choice in ("auto", "required") or t["function"]["name"] == choice]
    if not chosen:
        raise ToolError(f"tool_choice names function {choice!r}, which is not in tools", "tool_choice")
    trigger = f"<[{trigger_id}]>" if trigger_id is not None else _lit(fmt.trigger)
    arguments = [f"args_{k}: " + json_schema_grammar(_with_options(_closed(f["parameters"])))
                 for k, f in enumerate(chosen)]
    # `rest`: one call after its trigger; `calls`: what may follow the first trigger when calls are parallel.
    if fmt.name in ("hermes", "generic"):
        body = json_schema_grammar(_with_options({"anyOf": [_call_schema(f, "arguments") for f in chosen]}))
        rules = [f"body: {body}", r'rest: "\n" body "\n" ' + _mark("</tool_call>", marker_ids)]
        calls = f'rest ("\\n" {trigger} rest){_MORE}'
    elif fmt.name == "llama3":  # {"name": "NAME", "parameters": {...}}, as its template writes a call
        rules = arguments + ["rest: " + " | ".join(f'{_lit(f["name"] + _LLAMA3_AFTER_NAME)} args_{k} "}}"'
                                                   for k, f in enumerate(chosen))]
        calls = f'rest ("\\n" {trigger} rest){_MORE}'
    elif fmt.name == "mistral":  # one trigger opens the whole list: [{"name", "arguments", "id"}, ...]
        body = json_schema_grammar(_with_options({"anyOf": [_call_schema(f, "arguments", mistral_id=True)
                                                            for f in chosen]}))
        more = f' (", " body){_MORE}' if parallel else ""
        rules = [f"body: {body}", f'rest: "[" body{more} "]"']
        calls = "rest"
    elif fmt.name == "mistral_args":  # [TOOL_CALLS]NAME[ARGS]{...} per call; Small 3.2 writes [CALL_ID]ID too
        args_mark, id_mark = (_mark(m, marker_ids) for m in ("[ARGS]", "[CALL_ID]"))
        rules = arguments + [f'id: ({id_mark} /[a-zA-Z0-9]{{9}}/)?', "rest: " + " | ".join(
            f'{_lit(f["name"])} id {args_mark} args_{k}' for k, f in enumerate(chosen))]
        calls = f"rest ({trigger} rest){_MORE}"
    else:
        raise ToolError(f"no tool-call grammar for format {fmt.name!r}", "tools")
    start = "start: rest" if after_trigger else f"start: {trigger} {calls if parallel else 'rest'}"
    return "\n".join([start, *rules]) + "\n"


def _call_schema(function: dict, key: str, mistral_id: bool = False) -> dict:
    properties = {"name": {"const": function["name"]}, key: _closed(function["parameters"])}
    if mistral_id:
        properties["id"] = {"type": "string", "pattern": "^[a-zA-Z0-9]{9}$"}
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def _closed(schema: dict) -> dict:
    """A function's parameters with no undeclared arguments, unless the schema says otherwise: a call that
    adds arguments the function does not take helps no one (OpenAI's strict mode demands the same)."""
    if schema.get("type") == "object" and "additionalProperties" not in schema and "properties" in schema:
        return {**schema, "additionalProperties": False}
    return schema


def _with_options(schema: dict) -> dict:
    # JSON inside a call: bounded free whitespace, as for response_format, so the template's `", "` and `": "`
    # (and a model's compact JSON) both match but a model cannot pad without end.
    return {**schema, "x-guidance": JSON_OPTIONS}


def _mark(text: str, token_ids: dict[str, int] | None) -> str:
    """A fixed marker: its single token when the vocabulary has one, else its text."""
    token_id = (token_ids or {}).get(text)
    return f"<[{token_id}]>" if token_id is not None else _lit(text)


def _lit(text: str) -> str:
    return json.dumps(text)  # a Lark string literal (names are ASCII: no escapes beyond \" and \\)


__all__ = ["call_grammar"]
