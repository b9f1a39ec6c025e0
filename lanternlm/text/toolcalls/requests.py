"""Checking the `tools` and `tool_choice` fields of a chat request."""

from __future__ import annotations

import copy

from ..constraint import GrammarError, GrammarSpec
from .formats import FUNCTION_NAME, ToolError

MAX_TOOLS = 128


def validate_tools(tools) -> list[dict]:
    """Normalised copies of OpenAI `tools` ({"type": "function", "function": {name, description?, parameters?,
    strict?}}); parameters default to an object with no properties. Raises ToolError (param "tools")."""
    if not isinstance(tools, (list, tuple)):
        raise ToolError(f"tools must be a list of {{'type': 'function', 'function': ...}}, got {type(tools).__name__}",
                        "tools")
    if len(tools) > MAX_TOOLS:
        raise ToolError(f"tools has {len(tools)} entries; at most {MAX_TOOLS} are accepted", "tools")
    out, seen = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise ToolError(f"{where} must be an object with type \"function\"", "tools")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise ToolError(f"{where}.function must be an object with a name", "tools")
        name = function.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
            raise ToolError(f"{where}.function.name must be 1 to 64 letters, digits, '_', '.' or '-', got {name!r}",
                            "tools")
        if name in seen:
            raise ToolError(f"{where}.function.name {name!r} is given twice", "tools")
        seen.add(name)
        clean = {"name": name}
        if function.get("description") is not None:
            if not isinstance(function["description"], str):
                raise ToolError(f"{where}.function.description must be a string", "tools")
            clean["description"] = function["description"]
        clean["parameters"] = _parameters(function.get("parameters"), f"{where}.function.parameters")
        if function.get("strict") is not None:
            if not isinstance(function["strict"], bool):
                raise ToolError(f"{where}.function.strict must be true or false", "tools")
            clean["strict"] = function["strict"]
        out.append({"type": "function", "function": clean})
    return out


def _parameters(schema, where: str) -> dict:
    if schema is None:
        return {"type": "object", "properties": {}}
    if not isinstance(schema, dict) or schema.get("type", "object") != "object":
        raise ToolError(f"{where} must be a JSON schema of type \"object\" (arguments are a JSON object)", "tools")
    try:
        GrammarSpec.json_schema(schema)
    except GrammarError as e:
        raise ToolError(f"{where}: {e}", "tools") from None
    return {"type": "object", **copy.deepcopy(schema)}


def validate_tool_choice(tool_choice, tools: list[dict]) -> str:
    """"none", "auto", "required" or the name of the one function to call. Raises ToolError (param
    "tool_choice")."""
    if tool_choice is None:
        return "auto" if tools else "none"
    if tool_choice in ("none", "auto", "required"):
        if tool_choice == "required" and not tools:
            raise ToolError("tool_choice is \"required\" but no tools are given", "tool_choice")
        return tool_choice
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not isinstance(function, dict) or tool_choice.get("type") != "function" or not isinstance(
            function.get("name"), str):
        raise ToolError("tool_choice must be \"none\", \"auto\", \"required\" or "
                        "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
    names = [tool["function"]["name"] for tool in tools]
    if function["name"] not in names:
        raise ToolError(f"tool_choice names function {function['name']!r}, which is not in tools"
                        f"{' (' + ', '.join(names) + ')' if names else ''}", "tool_choice")
    return function["name"]


__all__ = ["validate_tools", "validate_tool_choice", "MAX_TOOLS"]
