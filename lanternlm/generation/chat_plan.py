"""From a chat request to what the engine runs, and from the tokens it returns to an OpenAI message.

`plan_chat` renders the messages with the model's own template (tools included: natively when the template
knows them, else Lantern's documented fallback, see `toolcalls`), and builds the `GuideSpec` that constrains
the output:

- ``response_format`` (json_object, json_schema) or a regex / Lark grammar: the answer matches it;
- ``tool_choice`` "required" or a named function: the answer is a valid call (one, or several when parallel
  calls are allowed) whose arguments match the function's parameters;
- ``tool_choice`` "auto": free text, and once the model starts a call (its format's trigger) the call's
  grammar holds until the call is complete;
- a template that thinks (``<think>``): no grammar inside the thought, and ``thinking_token_budget`` forces
  the close tag when the thought reaches that many tokens.

`ChatPlan.reader()` reads the output back, streamed or whole, the same way: thinking to ``reasoning_content``,
tool calls to ``tool_calls``, the rest to ``content``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import LanternError
from ..text.chat import ChatTemplate
from ..text.constraint import GrammarError, GrammarSpec
from ..text.reasoning import ReasoningSplitter, ThinkFormat, detect_thinking, starts_inside
from ..text.tokenizer import Tokenizer
from ..text.toolcalls import (
    ToolCallStream,
    ToolError,
    ToolFormat,
    call_grammar,
    detect_format,
    prepare_messages,
    validate_tool_choice,
    validate_tools,
)
from .grammar import GrammarCompiler
from .guide import GuideSpec, Thinking
from .sampling import SamplingParams


class ChatRequestError(LanternError, ValueError):
    """A chat request's option is invalid; `param` names the request field (OpenAI's error `param`)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ChatOptions:
    """What a chat request asks for besides its messages and sampling parameters (OpenAI's names)."""

    tools: list[dict] | None = None
    tool_choice: Any = None                   # "none" | "auto" | "required" | {"type": "function", ...}
    parallel_tool_calls: bool = True
    response_format: dict | None = None       # {"type": "text" | "json_object" | "json_schema", ...}
    grammar: GrammarSpec | None = None        # a regex or Lark grammar (Lantern's extension)
    chat_template_kwargs: dict | None = None  # extra template variables, e.g. {"enable_thinking": False}
    thinking_token_budget: int | None = None  # most tokens of thinking before "</think>" is forced
    add_generation_prompt: bool = True


@dataclass(frozen=True)
class ChatPlan:
    prompt_text: str
    prompt_ids: list[int]
    guide: GuideSpec | None
    tool_format: ToolFormat | None            # None: this request's output is not parsed for tool calls
    thinking: ThinkFormat | None
    thinking_inside: bool = False
    schema: dict | None = field(default=None, compare=False)  # the response_format's schema, when it has one
    # The output must be decoded with special tokens shown: the call's trigger is one (Mistral's [TOOL_CALLS]).
    keep_special_tokens: bool = False

    def sampling(self, params: SamplingParams) -> SamplingParams:
        """`params` as this plan needs them decoded."""
        return replace(params, skip_special_tokens=False) if self.keep_special_tokens else params

    def reader(self) -> OutputReader:
        return OutputReader(self)

    def message(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """The assistant message for a whole output, and the finish reason ("tool_calls" when it called)."""
        reader = self.reader()
        items = reader.push(text) + reader.finish()
        return reader.message(items), reader.finish_reason(finish_reason)


class OutputReader:
    """Splits streamed output text into OpenAI delta items: {"reasoning_content": str}, {"content": str} and
    {"tool_call": {...}} (index, id and name first, then argument fragments)."""

    def __init__(self, plan: ChatPlan):
        self.thinking = ReasoningSplitter(plan.thinking, plan.thinking_inside) if plan.thinking else None
        self.tools = ToolCallStream(plan.tool_format) if plan.tool_format else None

    def push(self, text: str) -> list[dict]:
        if self.thinking is None:
            return self._content(text)
        reasoning, content = self.thinking.push(text)
        return ([{"reasoning_content": reasoning}] if reasoning else []) + self._content(content)

    def finish(self) -> list[dict]:
        items = []
        if self.thinking is not None:
            reasoning, content = self.thinking.flush()
            items = ([{"reasoning_content": reasoning}] if reasoning else []) + self._content(content)
        return items + (self.tools.finish() if self.tools is not None else [])

    def _content(self, text: str) -> list[dict]:
        if not text:
            return []
        return self.tools.push(text) if self.tools is not None else [{"content": text}]

    @property
    def calls(self) -> list[dict]:
        return self.tools.calls if self.tools is not None else []

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if reason == "stop" and self.calls else reason

    def message(self, items: list[dict]) -> dict:
        """The whole message from all the items of one output."""
        reasoning = "".join(i["reasoning_content"] for i in items if "reasoning_content" in i)
        content = "".join(i["content"] for i in items if "content" in i)
        message: dict = {"role": "assistant", "content": content}
        if self.thinking is not None and reasoning:
            message["reasoning_content"] = message["reasoning"] = reasoning
        if self.calls:
            message["tool_calls"] = [dict(call) for call in self.calls]
            message["content"] = content or None  # OpenAI: null content beside tool calls
        return message


def plan_chat(template: ChatTemplate, tokenizer: Tokenizer, grammars: GrammarCompiler, messages: list[dict],
              options: ChatOptions) -> ChatPlan:
    """Render and constrain one chat request; raises ChatRequestError (with the field at fault)."""
    try:
        tools = validate_tools(options.tools) if options.tools else []
        choice = validate_tool_choice(options.tool_choice, tools)
    except ToolError as e:
        raise ChatRequestError(str(e), e.param) from None
    constraint = output_grammar(options)
    if constraint is not None and tools and choice != "none":
        raise ChatRequestError("response_format (or a grammar) cannot be combined with tools unless tool_choice "
                               "is \"none\": a tool call and a constrained answer are two different outputs",
                               "response_format")
    fmt = detect_format(template.source)
    try:
        rendered_messages, template_tools = prepare_messages(messages, tools or None, fmt)
    except ToolError as e:
        raise ChatRequestError(str(e), e.param) from None
    text = template.render(rendered_messages, add_generation_prompt=options.add_generation_prompt,
                           tools=template_tools, extra_context=options.chat_template_kwargs)
    ids = tokenizer.encode(text, add_special_tokens=False)  # the template writes the BOS itself

    think_format = detect_thinking(template.source)
    inside = think_format is not None and starts_inside(think_format, text)
    thinking = None
    # A prompt that ends with a closed thought (Qwen3 with enable_thinking false) wants no thinking: the guide
    # then gives no room to open one, so a required call or a schema starts at the first token.
    if think_format is not None and not text.rstrip().endswith(think_format.close):
        thinking = Thinking(think_format.open, think_format.close, _single_token(tokenizer, think_format.open),
                            tuple(tokenizer.encode("\n" + think_format.close + "\n\n", add_special_tokens=False)),
                            inside, options.thinking_token_budget)

    guide, keep_special = None, False
    try:
        if constraint is not None:
            guide = GuideSpec(grammars.compile(constraint), thinking=thinking)
        elif tools and choice != "none":
            trigger_id = _single_token(tokenizer, fmt.trigger)
            markers = {m: i for m in ("</tool_call>", "[ARGS]", "[CALL_ID]")
                       if (i := _single_token(tokenizer, m)) is not None}
            keep_special = trigger_id is not None and tokenizer.decode([trigger_id], skip_special_tokens=True) == ""
            if choice == "auto":
                source = call_grammar(fmt, tools, choice, options.parallel_tool_calls, after_trigger=True,
                                      trigger_id=trigger_id, marker_ids=markers)
                guide = GuideSpec(grammars.compile(GrammarSpec.lark(source)),
                                  trigger=None if trigger_id is not None else fmt.trigger, trigger_id=trigger_id,
                                  rearm=options.parallel_tool_calls, thinking=thinking)
            else:
                source = call_grammar(fmt, tools, choice, options.parallel_tool_calls, after_trigger=False,
                                      trigger_id=trigger_id, marker_ids=markers)
                guide = GuideSpec(grammars.compile(GrammarSpec.lark(source)), thinking=thinking)
        elif thinking is not None and options.thinking_token_budget is not None:
            guide = GuideSpec(thinking=thinking)
    except GrammarError as e:
        param = "response_format" if constraint is not None and options.grammar is None else (
            "tools" if tools else "lantern")
        raise ChatRequestError(str(e), param) from None
    schema = None
    if options.response_format and options.response_format.get("type") == "json_schema":
        schema = options.response_format["json_schema"].get("schema")
    return ChatPlan(text, ids, guide, fmt if tools and choice != "none" else None, think_format, inside, schema,
                    keep_special)


def output_grammar(options: ChatOptions) -> GrammarSpec | None:
    """The grammar the whole answer must match, from response_format or Lantern's grammar field."""
    fmt = options.response_format
    if fmt is not None and options.grammar is not None:
        raise ChatRequestError("give response_format or a regex/grammar, not both", "response_format")
    if options.grammar is not None:
        return options.grammar
    if fmt is None:
        return None
    kind = fmt.get("type")
    try:
        if kind == "text":
            return None
        if kind == "json_object":
            return GrammarSpec.json_object()
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or "schema" not in spec:
                raise ChatRequestError("response_format json_schema needs json_schema.schema", "response_format")
            return GrammarSpec.json_schema(spec["schema"])
    except GrammarError as e:
        raise ChatRequestError(str(e), "response_format") from None
    raise ChatRequestError(f"response_format type must be text, json_object or json_schema, got {kind!r}",
                           "response_format")


def _single_token(tokenizer: Tokenizer, text: str) -> int | None:
    """The id of the one token that spells `text` exactly, if the vocabulary has one."""
    token_id = tokenizer.token_to_id(text)
    if token_id is None or tokenizer.encode(text, add_special_tokens=False) != [token_id]:
        return None
    return token_id


__all__ = ["ChatOptions", "ChatPlan", "ChatRequestError", "OutputReader", "output_grammar", "plan_chat"]
