"""What a tool-call format is: a model family's name, whether its template renders tools, and the text that
starts a call; the error type of the whole package; the families Lantern knows."""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from ...errors import LanternError

FUNCTION_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # OpenAI's rule for a function's name
ALNUM = string.ascii_letters + string.digits
MISTRAL_ID = re.compile(r"[A-Za-z0-9]{9}")  # Mistral's templates refuse any other call id


class ToolError(LanternError, ValueError):
    """A tool-calling request field is invalid; `param` names it as OpenAI does ("tools", "tool_choice",
    "messages")."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolFormat:
    """How one model family writes tool calls. `native`: its template renders `tools` itself. `trigger`: the
    text that starts a call in the output. `system_role` (generic only): the template accepts a system message."""

    name: str
    native: bool
    trigger: str
    system_role: bool = True

    @property
    def mistral_ids(self) -> bool:
        """Call ids are 9 alphanumerics (both Mistral dialects)."""
        return self.name in ("mistral", "mistral_args")


GENERIC = ToolFormat("generic", False, "<tool_call>")
# In the order detection tries them, each with a text the template's call must contain besides reading back
# (both mistral dialects share one parser; a bare {"name", "arguments"} object is not llama3's format).
NATIVE_FORMATS = ((ToolFormat("mistral_args", True, "[TOOL_CALLS]"), "[ARGS]"),
                  (ToolFormat("mistral", True, "[TOOL_CALLS]"), "[TOOL_CALLS]"),
                  (ToolFormat("hermes", True, "<tool_call>"), "<tool_call>"),
                  (ToolFormat("llama3", True, '{"name": "'), '"parameters"'))


__all__ = ["ToolError", "ToolFormat", "GENERIC", "NATIVE_FORMATS", "FUNCTION_NAME", "ALNUM", "MISTRAL_ID"]
