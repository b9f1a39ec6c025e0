"""Tool calls (OpenAI `tools`): the format each model family writes calls in, checking requests, preparing a
conversation for the model's template, the grammar a call must match, and reading calls back from the output.

Families, recognised by how the model's own template writes a call (see `detect_format`):

- "hermes" (Hermes 2 Pro / 3, Qwen2.5, Qwen3, Granite 4): ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n
  </tool_call>``, one block per call, separated by a newline;
- "llama3" (Llama 3.1 / 3.2 / 3.3): a bare ``{"name": ..., "parameters": {...}}``, sometimes after
  ``<|python_tag|>``; the template renders one call per assistant message;
- "mistral" (Mistral Nemo and other v3 templates): ``[TOOL_CALLS][{"name": ..., "arguments": {...}, "id": ...}]``
  with 9-character alphanumeric ids;
- "mistral_args" (Mistral Small 3.2, Devstral, Ministral 3): ``[TOOL_CALLS]name[ARGS]{...}`` per call.

The fallback, "generic", is what Lantern does for every other template (one that ignores `tools`, such as
SmolLM2's or Gemma's, or one that writes calls in a format not listed above): the template gets no `tools`.
Instead Lantern adds the tool list and its one call format (the hermes one: ``<tool_call>`` blocks of
``{"name": ..., "arguments": ...}`` JSON) to the system message (or, for a template that refuses a system message,
to the start of the first user message). Earlier assistant calls are written into their message's text in that
format, and each run of `tool` results becomes one user message of ``<tool_response>{"name": ..., "content": ...}
</tool_response>`` blocks (merged with a user message that directly follows, so that templates demanding
alternating roles still render); when the conversation ends with results, that message closes with
`messages.RESULTS_PROMPT`, asking for an answer from them.

Reading output back is one incremental scanner (`ToolCallStream`); `parse_tool_calls` is that scanner fed the
whole text, so streamed and whole answers cannot differ. A call becomes a call only once it is complete and its
JSON parses; text that cannot be a call stays in the content, whitespace next to a call is dropped.
"""

from .detect import detect_format
from .formats import GENERIC, NATIVE_FORMATS, ToolError, ToolFormat
from .grammars import call_grammar
from .messages import prepare_messages
from .reading import ToolCallStream, parse_tool_calls
from .requests import MAX_TOOLS, validate_tool_choice, validate_tools

__all__ = ["ToolError", "ToolFormat", "GENERIC", "NATIVE_FORMATS", "detect_format", "validate_tools",
           "validate_tool_choice", "MAX_TOOLS", "prepare_messages", "call_grammar", "parse_tool_calls",
           "ToolCallStream"]
