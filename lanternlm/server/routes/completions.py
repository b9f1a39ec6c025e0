"""POST /v1/completions: OpenAI's legacy completions, with what evaluation harnesses send: a list of prompts
(text or token ids) in one request, and `echo` with `logprobs`, which scores the prompt's own tokens."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from ...engine import Event
from ...errors import LanternError
from ...generation.chat_plan import ChatOptions, ChatRequestError, output_grammar
from ...generation.guide import GuideSpec
from ...text.constraint import GrammarError
from ..errors import APIError
from ..events import Events, collect
from ..logprobs import completion_logprobs, prompt_entries, vllm_prompt_logprobs
from ..protocol import CompletionRequest, new_id, now
from ..state import api_key_id, check_stream_options, current
from ..stream import sse_response, stream, usage
from .lantern import lantern_extra, lantern_grammar

router = APIRouter()


def prompt_list(prompt) -> list:
    """A completion prompt as a list of prompts, each a str or a list of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if prompt and all(isinstance(p, list) for p in prompt):
        return [list(p) for p in prompt]
    raise APIError(400, "prompt must be a string, a list of strings, or token ids", param="prompt")


async def output_guide(state, req: CompletionRequest) -> GuideSpec | None:
    """Lantern's regex / Lark grammar for the completion, or the response_format's JSON (as vLLM accepts it on
    completions too), read as chat reads them; compiled off the event loop."""
    options = ChatOptions(grammar=lantern_grammar(req), response_format=req.response_format.model_dump(
        exclude_none=True) if req.response_format else None)
    try:
        spec = output_grammar(options)
        if spec is None:
            return None
        return GuideSpec(await asyncio.to_thread(state.llm.grammars.compile, spec))
    except ChatRequestError as e:
        raise APIError(400, str(e), param=e.param) from None
    except GrammarError as e:
        raise APIError(400, str(e), param="lantern" if options.grammar is not None else "response_format") from None


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    state = current(request)
    state.check_model(req.model)
    check_stream_options(req)
    prompts = prompt_list(req.prompt)
    try:
        encoded = [state.llm.encode(p) for p in prompts]
    except LanternError as e:
        raise APIError(400, str(e), param="prompt") from None
    guide = await output_guide(state, req)
    # echo + logprobs: the prompt's own tokens get logprobs too (how evaluation harnesses score text).
    scoring = req.echo and req.logprobs is not None
    queue, rids = state.submit(encoded, req, req.max_tokens, req.logprobs,
                               req.logprobs if scoring else req.prompt_logprobs, "prompt", guide,
                               api_key_id=api_key_id(request))
    total = len(prompts) * req.n
    events = Events(state, request, queue, total, rids)
    text = state.token_text

    def prompt_of(i: int) -> int:  # choice i answers prompt i // n
        return i // req.n

    echo_texts = [(p if isinstance(p, str) else state.llm.tokenizer.decode(ids)) if req.echo else ""
                  for p, ids in zip(prompts, encoded)]
    base = {"id": new_id("cmpl"), "created": now(), "model": state.config.served_name}
    prompt_tokens = sum(len(ids) for ids in encoded)

    if not req.stream:
        choices = await collect(events)
        out = []
        for c in choices:
            p = prompt_of(c.index)
            lp, extra = None, {}
            if scoring:  # text_offset counts from the start of the echoed prompt
                lp = completion_logprobs(prompt_entries(encoded[p], c.prompt_logprobs) + c.logprobs, 0, text)
            elif req.logprobs is not None:
                lp = completion_logprobs(c.logprobs, len(echo_texts[p]), text)
            if req.prompt_logprobs is not None and not scoring:
                extra = {"prompt_logprobs": vllm_prompt_logprobs(encoded[p], c.prompt_logprobs, text)}
            out.append({"index": c.index, "text": echo_texts[p] + "".join(c.text), "logprobs": lp,
                        "finish_reason": c.finish_reason, **extra, **lantern_extra(req, c.traces, c.cached_tokens)})
        return {**base, "object": "text_completion", "choices": out,
                "usage": usage(prompt_tokens, sum(len(c.token_ids) for c in choices),
                               sum(c.cached_tokens for c in choices if c.index % req.n == 0))}

    offsets = [len(echo_texts[prompt_of(i)]) for i in range(total)]  # text_offset of each choice's next token

    def render(i: int, event: Event) -> list[dict]:
        step, out = event.step, []
        if scoring and event.prompt_logprobs is not None:  # the echo, with the prompt's logprobs (after prefill)
            head = completion_logprobs(prompt_entries(encoded[prompt_of(i)], event.prompt_logprobs), 0, text)
            out.append({"index": i, "text": echo_texts[prompt_of(i)], "logprobs": head, "finish_reason": None})
            offsets[i] = head["text_offset"][-1] + len(head["tokens"][-1])
        lp = None
        if req.logprobs is not None:
            lp = completion_logprobs([(step.token_id, event.logprob, event.top_logprobs or [])], offsets[i], text)
        offsets[i] += len(step.text)
        if step.text or lp or step.finish_reason or event.trace:
            out.append({"index": i, "text": step.text, "logprobs": lp, "finish_reason": step.finish_reason,
                        **lantern_extra(req, [event.trace], event.cached_tokens)})
        return out

    opening = [] if scoring else [{"index": i, "text": echo_texts[prompt_of(i)], "logprobs": None,
                                   "finish_reason": None} for i in range(total) if echo_texts[prompt_of(i)]]
    return sse_response(stream({**base, "object": "text_completion"}, req, prompt_tokens, events, opening, render))
