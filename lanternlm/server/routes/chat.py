"""POST /v1/chat/completions: messages through the model's chat template, streamed or not, with tools,
response_format and thinking kept apart from the answer (see chat_plan)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from ...engine import Event
from ...errors import LanternError
from ...generation.chat_plan import ChatOptions, ChatPlan, ChatRequestError
from ...text.chat import validate_messages
from ..errors import APIError
from ..events import Events, collect
from ..logprobs import chat_logprobs, vllm_prompt_logprobs
from ..protocol import ChatCompletionRequest, message_dict, new_id, now
from ..state import ServerState, api_key_id, check_stream_options, current
from ..stream import sse_response, stream, usage
from .lantern import lantern_extra, lantern_grammar

router = APIRouter()


def options_of(req: ChatCompletionRequest) -> ChatOptions:
    return ChatOptions(
        tools=req.tools, tool_choice=req.tool_choice, parallel_tool_calls=req.parallel_tool_calls,
        response_format=req.response_format.model_dump(exclude_none=True) if req.response_format else None,
        grammar=lantern_grammar(req), chat_template_kwargs=req.chat_template_kwargs,
        thinking_token_budget=req.thinking_token_budget, add_generation_prompt=req.add_generation_prompt)


async def plan(state: ServerState, req: ChatCompletionRequest) -> ChatPlan:
    """Render and constrain the request; compiling a grammar runs off the event loop (llguidance releases
    the GIL), bounded by its counted limits."""
    options = options_of(req)
    try:
        messages = validate_messages([message_dict(m) for m in req.messages])
        return await asyncio.to_thread(state.llm.plan_chat, messages, options)
    except ChatRequestError as e:
        raise APIError(400, str(e), param=e.param) from None
    except LanternError as e:
        raise APIError(400, str(e), param="messages") from None


def deltas(items: list[dict]) -> list[dict]:
    """The reader's items as OpenAI delta objects (thinking under both names clients read)."""
    out = []
    for item in items:
        if "reasoning_content" in item:
            out.append({"reasoning_content": item["reasoning_content"], "reasoning": item["reasoning_content"]})
        elif "tool_call" in item:
            out.append({"tool_calls": [item["tool_call"]]})
        else:
            out.append({"content": item["content"]})
    return out


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request):
    state = current(request)
    state.check_model(req.model)
    check_stream_options(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
    chat = await plan(state, req)
    ids = chat.prompt_ids
    max_tokens = req.max_completion_tokens or req.max_tokens
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    queue, rids = state.submit([ids], req, max_tokens, logprobs, req.prompt_logprobs, "messages", chat.guide,
                               chat.keep_special_tokens, api_key_id(request))
    events = Events(state, request, queue, req.n, rids)
    text = state.token_text
    base = {"id": new_id("chatcmpl"), "created": now(), "model": state.config.served_name}
    if not req.stream:
        choices = await collect(events)
        extra = {} if req.prompt_logprobs is None else {
            "prompt_logprobs": vllm_prompt_logprobs(ids, choices[0].prompt_logprobs, text)}
        out = []
        for c in choices:
            message, reason = chat.message("".join(c.text), c.finish_reason)
            out.append({"index": c.index, "message": message,
                        "logprobs": chat_logprobs(c.logprobs, text) if req.logprobs else None,
                        "finish_reason": reason, **lantern_extra(req, c.traces, c.cached_tokens)})
        return {**base, "object": "chat.completion", "choices": out,
                "usage": usage(len(ids), sum(len(c.token_ids) for c in choices), choices[0].cached_tokens), **extra}

    readers = [chat.reader() for _ in range(req.n)]

    def render(i: int, event: Event) -> list[dict]:
        step, reader = event.step, readers[i]
        items = reader.push(step.text) + (reader.finish() if step.finish_reason else [])
        found = deltas(items)
        lp = chat_logprobs([(step.token_id, event.logprob, event.top_logprobs or [])], text) if req.logprobs else None
        if not found and (lp or event.trace or event.prompt_logprobs is not None):
            found = [{"content": ""}]  # this token's logprobs or trace still need a chunk to ride on
        out = []
        for k, delta in enumerate(found):
            choice = {"index": i, "delta": delta, "logprobs": lp if k == 0 else None, "finish_reason": None}
            if k == 0:
                choice.update(lantern_extra(req, [event.trace], event.cached_tokens))
                if event.prompt_logprobs is not None:  # computed at prefill: they ride on the first chunk
                    choice["prompt_logprobs"] = vllm_prompt_logprobs(ids, event.prompt_logprobs, text)
            out.append(choice)
        if step.finish_reason:  # its own chunk, as OpenAI sends it
            out.append({"index": i, "delta": {}, "logprobs": None,
                        "finish_reason": reader.finish_reason(step.finish_reason)})
        return out

    opening = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
               for i in range(req.n)]
    return sse_response(stream({**base, "object": "chat.completion.chunk"}, req, len(ids), events, opening, render))
