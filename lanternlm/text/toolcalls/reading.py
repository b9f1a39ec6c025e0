"""Reading tool calls back from output text, streamed or whole, with one incremental scanner.

Each family has openers (the texts that may start a call) and a parser that decides, from the text alone, whether
the call at an opener is complete, not a call, or undecided until more text arrives. The scanner emits content up
to anything that could still start a call, and a call once its parser accepts it; so every split of a text into
pieces gives the same content and calls as the whole text.
"""

from __future__ import annotations

import json
import re
import secrets

from .formats import ALNUM, FUNCTION_NAME, MISTRAL_ID, ToolFormat

MAX_CALL_CHARS = 1_000_000  # a call whose JSON has not closed within this many characters is not a call
_NAME_CHARS = re.compile(r"[A-Za-z0-9_.-]*")
_ID_CHARS = re.compile(r"[A-Za-z0-9]*")
_WS = " \t\r\n"


def parse_tool_calls(fmt: ToolFormat, text: str) -> tuple[str, list[dict]]:
    """(content without the call text, OpenAI tool calls) of a whole output; the same as streaming it."""
    stream = ToolCallStream(fmt)
    items = stream.push(text) + stream.finish()
    return "".join(item["content"] for item in items if "content" in item), stream.calls


class ToolCallStream:
    """Turns output text, in pieces, into OpenAI delta items: {"content": str}, and per call {"tool_call":
    {index, id, type, function: {name, arguments: ""}}} then {"tool_call": {index, function: {arguments}}}.
    Text that could still become a call is held back; a call is emitted once complete."""

    def __init__(self, fmt: ToolFormat):
        self.fmt = fmt
        self.calls: list[dict] = []
        self._openers = _OPENERS[fmt.name]
        self._buf = ""            # text not yet emitted: held whitespace, then a pending opener and what follows
        self._after_call = False  # whitespace right after a call is dropped
        self._json = _JsonEnd()   # where the pending call's JSON closes, found incrementally

    def push(self, text: str) -> list[dict]:
        self._buf += text
        return self._scan(final=False)

    def finish(self) -> list[dict]:
        return self._scan(final=True)

    def _scan(self, final: bool) -> list[dict]:
        items: list[dict] = []
        while self._buf:
            if self._after_call:
                self._buf = self._buf.lstrip(_WS)
                if not self._buf:
                    break
                self._after_call = False
            start = min((p for p in (self._buf.find(o) for o in self._openers) if p >= 0), default=-1)
            if start < 0:
                keep = 0 if final else _held(self._buf, self._openers)
                self._emit(items, self._buf[:len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep:]
                break
            before = self._buf[:start].rstrip(_WS)
            self._emit(items, before)  # the whitespace before an opener waits for the call to resolve
            self._buf = self._buf[len(before):]
            start -= len(before)
            result = _PARSERS[self.fmt.name](self._buf, start, final, self._json)
            if result is None:  # undecided until more text arrives
                break
            self._json = _JsonEnd()
            end, calls = result
            if calls:
                for name, arguments, call_id in calls:
                    items += self._call(name, arguments, call_id)
                self._after_call = True
            else:  # not a call: the opener is ordinary text
                end = start + len(next(o for o in self._openers if self._buf.startswith(o, start)))
                self._emit(items, self._buf[:end])
            self._buf = self._buf[end:]
        return items

    @staticmethod
    def _emit(items: list[dict], text: str) -> None:
        if text:
            items.append({"content": text})

    def _call(self, name: str, arguments: dict, call_id: str | None) -> list[dict]:
        if self.fmt.mistral_ids:
            call_id = call_id if call_id and MISTRAL_ID.fullmatch(call_id) else _random_id(9)
        else:
            call_id = "call_" + _random_id(24)
        index = len(self.calls)
        text = json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))
        self.calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": text}})
        return [{"tool_call": {"index": index, "id": call_id, "type": "function",
                               "function": {"name": name, "arguments": ""}}},
                {"tool_call": {"index": index, "function": {"arguments": text}}}]


def _random_id(length: int) -> str:
    return "".join(secrets.choice(ALNUM) for _ in range(length))


def _held(text: str, openers: tuple[str, ...]) -> int:
    """How many characters at the end of `text` could still start a call: whitespace, then the start of an opener."""
    keep = max((n for o in openers for n in range(1, len(o)) if text.endswith(o[:n])), default=0)
    return len(text) - len(text[:len(text) - keep].rstrip(_WS))


class _JsonEnd:
    """Finds where the JSON object or array starting at `start` closes, resuming where the last call stopped."""

    _STRUCTURE = re.compile(r'["{}\[\]]')
    _IN_STRING = re.compile(r'["\\]')

    def __init__(self):
        self.start, self.pos, self.depth, self.in_string, self.found = -1, 0, 0, False, None

    def end(self, text: str, start: int) -> int | None:
        """The index after the closing bracket, None if not closed yet, -1 if not within MAX_CALL_CHARS."""
        if start != self.start:
            self.start, self.pos, self.depth, self.in_string, self.found = start, start, 0, False, None
        if self.found is not None:
            return self.found
        limit = min(len(text), start + MAX_CALL_CHARS)
        while self.pos < limit:
            found = (self._IN_STRING if self.in_string else self._STRUCTURE).search(text, self.pos, limit)
            if found is None:
                self.pos = limit
                break
            char, self.pos = found.group(), found.end()
            if self.in_string:
                if char == "\\":
                    if self.pos >= limit:  # the escaped character has not arrived: look at the backslash again
                        self.pos -= 1
                        break
                    self.pos += 1
                else:
                    self.in_string = False
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            else:
                self.depth -= 1
                if self.depth == 0:
                    self.found = self.pos
                    return self.pos
        return -1 if self.pos - start >= MAX_CALL_CHARS else None


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _json_at(text: str, i: int, final: bool, scan: _JsonEnd, opening: str):
    """(value, end) of the JSON value opening with one of `opening` at text[i] (after whitespace); None when
    more text is needed; False when it is not there or not JSON."""
    i = _skip_ws(text, i)
    if i >= len(text):
        return False if final else None
    if text[i] not in opening:
        return False
    end = scan.end(text, i)
    if end is None:
        return False if final else None
    if end < 0:
        return False
    try:
        return json.loads(text[i:end]), end
    except (json.JSONDecodeError, RecursionError):
        return False


def _call_of(value, keys: tuple[str, ...], need_arguments: bool):
    """(name, arguments, id) from a call object, or None if it is not one."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    key = next((k for k in keys if k in value), None)
    arguments = value[key] if key else ({} if not need_arguments else None)
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    call_id = value.get("id")
    return value["name"], arguments, call_id if isinstance(call_id, str) else None


# Each parser reads the call whose opener is at text[start]: (end, calls) with calls [] when it is not a call,
# or None while more text could still decide. They depend on the text only, never on how it was split.

def _hermes(text: str, start: int, final: bool, scan: _JsonEnd):
    found = _json_at(text, start + len("<tool_call>"), final, scan, "{")
    if not found:
        return found if found is None else (start, [])
    value, end = found
    call = _call_of(value, ("arguments", "parameters"), need_arguments=False)
    if call is None:
        return start, []
    close = _skip_ws(text, end)
    if text.startswith("</tool_call>", close):
        return close + len("</tool_call>"), [call]
    if "</tool_call>".startswith(text[close:]):  # nothing or part of the closing tag so far
        return (len(text), [call]) if final else None
    return end, [call]  # no closing tag: the call ends with its JSON


def _llama3(text: str, start: int, final: bool, scan: _JsonEnd):
    i = start + len("<|python_tag|>") if text.startswith("<|python_tag|>", start) else start
    found = _json_at(text, i, final, scan, "{")
    if not found:
        return found if found is None else (start, [])
    call = _call_of(found[0], ("parameters", "arguments"), need_arguments=True)
    return found[1], [call] if call else []


def _mistral(text: str, start: int, final: bool, scan: _JsonEnd):
    i = _skip_ws(text, start + len("[TOOL_CALLS]"))
    if i < len(text) and text[i] in "[{":  # [TOOL_CALLS][{"name": ..., "arguments": ..., "id": ...}, ...]
        found = _json_at(text, i, final, scan, "[{")
        if not found:
            return found if found is None else (start, [])
        values = found[0] if isinstance(found[0], list) else [found[0]]
        calls = [_call_of(v, ("arguments",), need_arguments=True) for v in values]
        return found[1], calls if calls and None not in calls else []
    name = _NAME_CHARS.match(text, i, i + 65)  # [TOOL_CALLS]name[CALL_ID]id[ARGS]{...}
    i, call_id = name.end(), None
    if text.startswith("[CALL_ID]", i):
        given = _ID_CHARS.match(text, i + len("[CALL_ID]"), i + len("[CALL_ID]") + 65)
        i, call_id = given.end(), given.group()
    rest = text[i:i + len("[CALL_ID]")]
    if not text.startswith("[ARGS]", i):
        if not final and len(rest) < len("[CALL_ID]") and any(m.startswith(rest) for m in ("[ARGS]", "[CALL_ID]")):
            return None
        return start, []
    if not FUNCTION_NAME.fullmatch(name.group()) or len(call_id or "") > 64:
        return start, []
    found = _json_at(text, i + len("[ARGS]"), final, scan, "{")
    if not found:
        return found if found is None else (start, [])
    return found[1], [(name.group(), found[0], call_id)]


_PARSERS = {"hermes": _hermes, "generic": _hermes, "llama3": _llama3, "mistral": _mistral, "mistral_args": _mistral}
_OPENERS = {"hermes": ("<tool_call>",), "generic": ("<tool_call>",), "llama3": ("<|python_tag|>", '{"name"'),
            "mistral": ("[TOOL_CALLS]",), "mistral_args": ("[TOOL_CALLS]",)}

__all__ = ["parse_tool_calls", "ToolCallStream", "MAX_CALL_CHARS"]
