"""Which tool-call family a chat template belongs to, found by rendering it: a template is native when it renders
the `tools` it is given and writes an earlier call in a form one family's parser reads back exactly."""

from __future__ import annotations

import functools
import os

from ...errors import LanternError
from ..chat import ChatTemplate
from .formats import GENERIC, NATIVE_FORMATS, ToolFormat
from .reading import parse_tool_calls

_PROBE_TOOL = {"type": "function", "function": {
    "name": "lantern_probe", "description": "Lantern's probe of the template",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "A city"}},
                   "required": ["city"]}}}
_PROBE_CALL = {"role": "assistant", "content": "", "tool_calls": [{
    "id": "probe0001", "type": "function", "function": {"name": "lantern_probe", "arguments": {"city": "Paris"}}}]}
_PROBE_USER = {"role": "user", "content": "Hello"}


def detect_format(template_source: str | None) -> ToolFormat:
    """The family whose parser reads back the call the template writes into an assistant turn, if the template
    also renders `tools`; else GENERIC (Lantern's fallback). Never raises: a template that fails is generic.

    Detection renders the template a few times (5-70 ms), so results are kept per template text."""
    if not template_source or not template_source.strip():
        return GENERIC
    return _detect(template_source)


@functools.lru_cache(maxsize=16)
def _detect(template_source: str) -> ToolFormat:
    try:
        template = ChatTemplate(template_source, bos_token="", eos_token="")
    except LanternError:
        return GENERIC
    if "tools" in template_source and "lantern_probe" in _try_render(template, [_PROBE_USER], [_PROBE_TOOL], True):
        prompt = _try_render(template, [_PROBE_USER], [_PROBE_TOOL], False)
        turn = _try_render(template, [_PROBE_USER, _PROBE_CALL], [_PROBE_TOOL], False)
        turn = turn[len(os.path.commonprefix([prompt, turn])):]  # the assistant turn as the template writes it
        for fmt, mark in NATIVE_FORMATS:
            calls = parse_tool_calls(fmt, turn)[1] if mark in turn else []
            if [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
                    ("lantern_probe", '{"city":"Paris"}')]:
                return fmt
    system = [{"role": "system", "content": "lantern probe"}, _PROBE_USER]
    return GENERIC if "lantern probe" in _try_render(template, system, None, True) else ToolFormat(
        "generic", False, "<tool_call>", system_role=False)


def _try_render(template: ChatTemplate, messages: list[dict], tools, generation_prompt: bool) -> str:
    try:
        return template.render(messages, add_generation_prompt=generation_prompt, tools=tools)
    except LanternError:
        return ""


__all__ = ["detect_format"]
