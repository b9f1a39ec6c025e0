"""The OpenAI-compatible wire format: pydantic request models (unknown fields are errors, never ignored) and
helpers that build responses and errors in OpenAI's shapes."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
MAX_STOP_STRINGS = 4          # OpenAI: "up to 4 sequences"
MAX_COMPLETION_LOGPROBS = 5   # OpenAI's legacy completions: "the maximum value for logprobs is 5"
MAX_TOP_LOGPROBS = 20         # chat: top_logprobs "between 0 and 20"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class ContentPart(Strict):
    type: Literal["text"]
    text: str


class FunctionCall(Strict):
    name: str
    arguments: str | dict          # OpenAI sends a JSON text; a dict (as some clients send) is accepted too


class ToolCall(Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall
    index: int | None = None       # present when a client echoes streamed calls back


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None   # an assistant's earlier thinking (templates decide whether to show it)
    reasoning: str | None = None
    refusal: str | None = None             # the openai client echoes it back (always null here)


class ResponseFormat(Strict):
    """OpenAI's response_format; `json_schema` is {"name", "description"?, "schema", "strict"?}, checked when the
    request is planned (an invalid or unenforceable schema is a 400 naming response_format)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class LanternOptions(Strict):
    """Lantern's extension to the OpenAI requests (`"lantern": {...}`): a per-token sampling trace, and a
    regex or a Lark grammar (llguidance's dialect) the output must match."""

    trace: bool = False
    top_k: int = Field(default=5, ge=1, le=20)
    regex: str | None = None
    grammar: str | None = None


class SamplingFields(Strict):
    """Fields chat and completions share (OpenAI's plus vLLM's top_k / min_p / repetition_penalty extras)."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0)
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)  # OpenAI: a 64-bit integer
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False
    # vLLM's extension: log-probabilities of the prompt's tokens, with this many alternatives each.
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    lantern: LanternOptions | None = None
    # vLLM's: requests share cached prompt blocks only under the same salt (one tenant cannot time another's).
    cache_salt: str | None = Field(default=None, max_length=256)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings (OpenAI's limit)")
        if any(not s for s in items):
            raise ValueError("stop strings must not be empty")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        for key, value in (v or {}).items():
            if not key.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            if not -100 <= value <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {value}")
        return v


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    add_generation_prompt: bool = True
    # Tools are checked when the request is planned (toolcalls.validate_tools), for errors that name the field.
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    # Most tokens a thinking model may spend in <think> before "</think>" is forced (vLLM's name).
    thinking_token_budget: int | None = Field(default=None, ge=0)


class CompletionRequest(SamplingFields):
    # A text, a list of texts, token ids, or a list of token-id lists (each its own prompt, as OpenAI batches).
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False
    response_format: ResponseFormat | None = None   # vLLM accepts it on completions too


class InputFields(Strict):
    """A text prompt, chat messages (rendered with the model's template) or token ids: exactly one."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    ids: list[int] | None = None


class LensRequest(InputFields):
    position: int = -1
    top_k: int = Field(default=5, ge=1, le=50)


class AttentionRequest(InputFields):
    layers: list[int] | None = None
    heads: list[int] | None = None


class TokenizeRequest(Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=128)   # with messages (vLLM's)
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[int]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def message_dict(message: ChatMessage) -> dict:
    """A request's chat message as the dict chat templates read (tool calls as OpenAI sends them; an assistant
    message that only calls tools keeps no content)."""
    d = message.model_dump(exclude_none=True, exclude={"refusal"})
    if isinstance(d.get("content"), list):  # text parts -> one string, as templates expect text
        d["content"] = "".join(part["text"] for part in d["content"])
    if d["role"] == "developer":  # OpenAI's newer name for the system role
        d["role"] = "system"
    for call in d.get("tool_calls", []):
        call.pop("index", None)
    if "tool_calls" not in d:
        d.setdefault("content", "")
    return d


class EmbeddingRequest(Strict):
    """OpenAI's embeddings request, plus vLLM's `truncate_prompt_tokens` (cut over-long inputs to this many
    tokens, and say so in the response, instead of refusing them)."""

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None
    truncate_prompt_tokens: int | None = Field(default=None, ge=1)


class RagAskRequest(Strict):
    """Lantern's retrieval route: a question answered from an index's documents, every step shown."""

    question: str = Field(min_length=1, max_length=10_000)
    k: int = Field(default=4, ge=1, le=50)
    index: str = "default"
    model: str | None = None              # the chat model (the server's main model)
    max_tokens: int | None = Field(default=256, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    stream: bool = False


class RagDocumentRequest(Strict):
    """A document uploaded into an index: its file name (text, Markdown or HTML) and its text."""

    index: str = "default"
    name: str = Field(min_length=1, max_length=128)
    text: str = Field(min_length=1)
