"""POST /v1/chat/completions: messages through the model's chat template, streamed or not."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ...chat import validate_messages
from ...engine import Event
from ...errors import LanternError
from ..errors import APIError
from ..events import Events, collect
from ..logprobs import chat_logprobs, vllm_prompt_logprobs
from ..protocol import ChatCompletionRequest, message_dict, new_id, now
from ..state import check_stream_options, current
from ..stream import sse_response, stream, usage
from .lantern import lantern_extra

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request):
    state = current(request)
    state.check_model(req.model)
    check_stream_options(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
    try:
        messages = validate_messages([message_dict(m) for m in req.messages])
        ids = state.llm.encode_chat(messages, add_generation_prompt=req.add_generation_prompt)
    except LanternError as e:
        raise APIError(400, str(e), param="messages") from None
    max_tokens = req.max_completion_tokens or req.max_tokens
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    queue, rids = state.submit([ids], req, max_tokens, logprobs, req.prompt_logprobs, "messages")
    events = Events(state, request, queue, req.n, rids)
    text = state.token_text
    base = {"id": new_id("chatcmpl"), "created": now(), "model": state.config.served_name}
    if not req.stream:
        choices = await collect(events)
        extra = {} if req.prompt_logprobs is None else {
            "prompt_logprobs": vllm_prompt_logprobs(ids, choices[0].prompt_logprobs, text)}
        return {**base, "object": "chat.completion", "choices": [
            {"index": c.index, "message": {"role": "assistant", "content": "".join(c.text)},
             "logprobs": chat_logprobs(c.logprobs, text) if req.logprobs else None,
             "finish_reason": c.finish_reason, **lantern_extra(req, c.traces)} for c in choices],
            "usage": usage(len(ids), sum(len(c.token_ids) for c in choices)), **extra}

    def render(i: int, event: Event) -> list[dict]:
        step, out = event.step, []
        lp = chat_logprobs([(step.token_id, event.logprob, event.top_logprobs or [])], text) if req.logprobs else None
        if step.text or lp or event.trace or event.prompt_logprobs is not None:
            delta = {"index": i, "delta": {"content": step.text}, "logprobs": lp, "finish_reason": None,
                     **lantern_extra(req, [event.trace])}
            if event.prompt_logprobs is not None:  # computed at prefill: they ride on the first chunk
                delta["prompt_logprobs"] = vllm_prompt_logprobs(ids, event.prompt_logprobs, text)
            out.append(delta)
        if step.finish_reason:  # its own chunk, as OpenAI sends it
            out.append({"index": i, "delta": {}, "logprobs": None, "finish_reason": step.finish_reason})
        return out

    opening = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
               for i in range(req.n)]
    return sse_response(stream({**base, "object": "chat.completion.chunk"}, req, len(ids), events, opening, render))
