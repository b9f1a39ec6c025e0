"""Lantern's look-inside routes (/v1/lantern/...): the logit lens, attention weights and the model's
description; and the namespaced `lantern` extension that carries a per-token trace on OpenAI's answers."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from ...errors import LanternError
from ...text.chat import validate_messages
from ...text.constraint import GrammarError, GrammarSpec
from ..errors import APIError
from ..protocol import AttentionRequest, LensRequest, message_dict
from ..state import ServerState, current

router = APIRouter(tags=["lantern"])


def lantern_grammar(req) -> GrammarSpec | None:
    """The regex or Lark grammar a chat or completions request gives in its `lantern` field, if any."""
    lantern = req.lantern
    if lantern is None or (lantern.regex is None and lantern.grammar is None):
        return None
    if lantern.regex is not None and lantern.grammar is not None:
        raise APIError(400, "give lantern.regex or lantern.grammar, not both", param="lantern")
    try:
        return GrammarSpec.regex(lantern.regex) if lantern.regex is not None else GrammarSpec.lark(lantern.grammar)
    except GrammarError as e:
        raise APIError(400, str(e), param="lantern") from None


def lantern_extra(req, traces: list, cached_tokens: int | None = None) -> dict:
    """The `lantern` extension on a choice: present only when the request asked for a trace. It also says how
    many prompt tokens came from the prefix cache (on the whole choice, or on a stream's first chunk)."""
    if not (req.lantern and req.lantern.trace):
        return {}
    extra = {"trace": [t for t in traces if t is not None]}
    if cached_tokens is not None:
        extra["cached_tokens"] = cached_tokens
    return {"lantern": extra}


def input_ids(state: ServerState, req) -> list[int]:
    if req.model is not None:
        state.check_model(req.model)
    given = [x is not None for x in (req.prompt, req.messages, req.ids)]
    if sum(given) != 1:
        raise APIError(400, "give exactly one of 'prompt', 'messages' or 'ids'", param="prompt")
    try:
        if req.messages is not None:
            return state.llm.encode_chat(validate_messages([message_dict(m) for m in req.messages]))
        return state.llm.encode(req.prompt if req.prompt is not None else req.ids)
    except LanternError as e:
        raise APIError(400, str(e), param="prompt") from None


async def off_loop(state: ServerState, fn):
    """Run an inspection forward in a worker thread, so streams keep flowing meanwhile; one at a time."""
    async with state.side_work:
        try:
            return await asyncio.get_running_loop().run_in_executor(None, fn)
        except LanternError as e:
            raise APIError(400, str(e)) from None


@router.get("/v1/lantern/inspect")
async def lantern_inspect(request: Request):
    """The model's module tree, parameter counts, config, tokenizer facts and files (`lantern inspect`)."""
    state = current(request)
    return await off_loop(state, state.llm.describe)


@router.post("/v1/lantern/lens")
async def lantern_lens(req: LensRequest, request: Request):
    """Logit lens: what each layer's hidden state at `position` would predict through the final norm and
    lm_head (top_k tokens per layer)."""
    state = current(request)
    ids = input_ids(state, req)
    return await off_loop(state, lambda: state.llm.logit_lens(ids, position=req.position, top_k=req.top_k))


@router.post("/v1/lantern/attention")
async def lantern_attention(req: AttentionRequest, request: Request):
    """Attention weights per layer and head for a prompt (a slower path that materialises them)."""
    state = current(request)
    ids = input_ids(state, req)
    return await off_loop(state, lambda: state.llm.attention(ids, layers=req.layers, heads=req.heads))
