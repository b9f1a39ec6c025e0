"""A conversation with tool calls and results, made ready for the model's template: natively (arguments as
objects, ids the template accepts) or through Lantern's fallback (calls and results written as text)."""

from __future__ import annotations

import hashlib
import json

from .formats import ALNUM, MISTRAL_ID, ToolError, ToolFormat


def prepare_messages(messages: list[dict], tools: list[dict] | None,
                     fmt: ToolFormat) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) to render with the model's template; the caller's data is not changed.

    Every earlier call's arguments must be a JSON object, as text or as a dict (else ToolError, param "messages").
    Native formats get arguments as dicts (what templates are written for) and tools whose description is at
    least "" (Hermes' template concatenates it); the fallback gets no tools and text messages instead (see the
    package docstring)."""
    if not isinstance(messages, (list, tuple)):
        return messages, tools  # the template's own validation reports it
    messages = [_checked(m, i) if isinstance(m, dict) else m for i, m in enumerate(messages)]
    if fmt.native:
        tools = [{**t, "function": {"description": "", **t["function"]}} for t in tools] if tools else None
        return _native(messages, fmt), tools
    return _fallback(messages, tools, fmt), None


def _checked(message: dict, i: int) -> dict:
    """A copy with None-valued keys dropped and each tool call as {id?, type, function: {name, arguments: dict}}."""
    message = {k: v for k, v in message.items() if v is not None}
    if not message.get("tool_calls"):
        message.pop("tool_calls", None)  # templates test the key's presence ('tool_calls' in message)
        return message
    if not isinstance(message["tool_calls"], (list, tuple)):
        raise ToolError(f"messages[{i}].tool_calls must be a list", "messages")
    calls = []
    for j, call in enumerate(message["tool_calls"]):
        where = f"messages[{i}].tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ToolError(f"{where}.function must be an object with a string name", "messages")
        arguments = function.get("arguments")
        if arguments is None or arguments == "":  # some clients send "" for a call without arguments
            arguments = {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as e:
                raise ToolError(f"{where}.function.arguments is not JSON: {e}", "messages") from None
        if not isinstance(arguments, dict):
            raise ToolError(f"{where}.function.arguments must be a JSON object, got "
                            f"{type(arguments).__name__}", "messages")
        clean = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
        if isinstance(call.get("id"), str):
            clean = {"id": call["id"], **clean}
        calls.append(clean)
    message["tool_calls"] = calls
    return message


def _native(messages: list, fmt: ToolFormat) -> list:
    """Messages as the family's real templates accept them: content "" beside calls, one call per message for
    llama3, 9-alphanumeric ids for Mistral (the same for a call and its result), results as text."""
    out = []
    ids: dict[str, str] = {}  # mistral: the caller's call id -> a 9-alphanumeric one
    pending: list[str] = []  # ids of the latest calls, for tool messages that do not say which call they answer
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            out.append(message)
            continue
        message = dict(message)
        if "tool_calls" in message:
            message.setdefault("content", "")  # Qwen3 and Devstral concatenate content without checking for it
            calls = [dict(c) for c in message["tool_calls"]]
            if fmt.mistral_ids:
                for j, call in enumerate(calls):
                    original = call.get("id", f"{i}.{j}")
                    call["id"] = ids.setdefault(original, _mistral_id(original))
            pending = [c["id"] for c in calls if "id" in c]
            if fmt.name == "llama3":  # its template raises on more than one call per message
                out += [{**message, "tool_calls": [call]} for call in calls]
                continue
            message["tool_calls"] = calls
        elif message.get("role") == "tool":
            message["content"] = _text(message.get("content", ""))
            call_id = message.get("tool_call_id")
            if call_id is None and pending:
                call_id = pending[0]
            elif call_id is not None and fmt.mistral_ids:
                call_id = ids.setdefault(call_id, _mistral_id(call_id))
            if call_id is not None:
                message["tool_call_id"] = call_id
                pending = [p for p in pending if p != call_id]
        out.append(message)
    return out


def _mistral_id(original: str) -> str:
    """9 alphanumerics, as Mistral's templates demand: the id itself if it already is, else derived from it
    (stable, so the same conversation renders the same prompt and the prompt cache keeps working)."""
    if MISTRAL_ID.fullmatch(original):
        return original
    number = int.from_bytes(hashlib.sha256(original.encode("utf-8", "surrogatepass")).digest()[:8], "big")
    return "".join(ALNUM[(number // 62 ** k) % 62] for k in range(9))


RESULTS_PROMPT = "Answer the question with these results, in plain words."


def _fallback(messages: list, tools: list[dict] | None, fmt: ToolFormat) -> list:
    out: list = []
    names: dict[str, str] = {}  # call id -> function name, to name each tool result
    pending: list[str] = []  # names of the latest calls, for results that say neither name nor call id
    results = None  # index in `out` of the user message holding the latest run of tool results
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        if role == "tool":
            name = message.get("name") or names.get(message.get("tool_call_id")) or (pending[0] if pending else None)
            if name in pending:
                pending.remove(name)
            block = _response_block(name, _text(message.get("content", "")))
            if results == len(out) - 1:
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
                results = len(out) - 1
            continue
        if role == "user" and results == len(out) - 1 and isinstance(message.get("content"), str):
            out[-1] = {**message, "content": out[-1]["content"] + "\n\n" + message["content"]}
        elif isinstance(message, dict) and "tool_calls" in message:
            calls = message["tool_calls"]
            text = _text(message.get("content", ""))
            blocks = [_call_block(c["function"]["name"], c["function"]["arguments"]) for c in calls]
            rest = {k: v for k, v in message.items() if k != "tool_calls"}
            out.append({**rest, "content": "\n".join(([text] if text else []) + blocks)})
            pending = [c["function"]["name"] for c in calls]
            names.update((c["id"], c["function"]["name"]) for c in calls if "id" in c)
        else:
            out.append(message)
        results = None
    if results is not None and results == len(out) - 1:
        # The conversation ends with results: say what to do with them. Without this line the default model
        # (SmolLM2-135M) echoed the <tool_response> block as its answer (3 of 3 runs); with it, it answered
        # from the result (3 of 3: "The weather in Paris is sunny.").
        out[-1] = {**out[-1], "content": out[-1]["content"] + "\n\n" + RESULTS_PROMPT}
    if tools:
        out = _with_instructions(out, _instructions(tools), fmt.system_role)
    return out


def _with_instructions(messages: list, text: str, system_role: bool) -> list:
    first = messages[0] if messages and isinstance(messages[0], dict) else {}
    if first.get("role") == "system":
        return [{**first, "content": _text(first.get("content", "")) + "\n\n" + text}] + messages[1:]
    if system_role:
        return [{"role": "system", "content": text}] + messages
    for k, message in enumerate(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = {**message, "content": text + "\n\n" + _text(message.get("content", ""))}
            return messages[:k] + [content] + messages[k + 1:]
    return [{"role": "user", "content": text}] + messages


def _instructions(tools: list[dict]) -> str:
    listing = "\n".join(json.dumps({k: t["function"][k] for k in ("name", "description", "parameters")
                                     if t["function"].get(k)}, ensure_ascii=False) for t in tools)
    return ("# Tools\n\nYou can call these functions to help answer the user:\n" + listing + "\n\n"
            "To call a function, write a <tool_call> block holding a JSON object with the function's name and "
            "its arguments, one block per call:\n"
            '<tool_call>\n{"name": "function name", "arguments": {"argument name": "value"}}\n</tool_call>\n\n'
            "Each result comes back in a <tool_response> block. When no function is needed, answer directly.")


def _call_block(name: str, arguments: dict) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + "\n</tool_call>"


def _response_block(name: str | None, content: str) -> str:
    try:
        value = json.loads(content)  # a JSON result is shown as JSON, not as a string of escaped JSON
        if not isinstance(value, (dict, list)):
            value = content
    except json.JSONDecodeError:
        value = content
    body = ({"name": name} if name else {}) | {"content": value}
    return "<tool_response>\n" + json.dumps(body, ensure_ascii=False) + "\n</tool_response>"


def _text(content) -> str:
    """A message's content as text: a string, or the text parts of a list joined by newlines."""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        return "\n".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return "" if content is None else str(content)


__all__ = ["prepare_messages"]
