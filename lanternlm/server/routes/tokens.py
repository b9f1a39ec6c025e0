"""Models and tokens: GET /v1/models, POST /tokenize and /detokenize (vLLM's shapes), and GET
/tokenizer_info (vLLM's route, which lm-eval's remote tokenizer reads)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ...errors import LanternError
from ...generation.chat_plan import ChatOptions, ChatRequestError
from ...text.chat import validate_messages
from ..errors import APIError
from ..protocol import DetokenizeRequest, TokenizeRequest, message_dict, now
from ..state import current

router = APIRouter()


def model_for(state, name: str | None):
    """The LLM whose tokenizer a request names (any served model), else the main one."""
    return state.models[0].llm if name is None else state.find(name).llm


@router.get("/v1/models")
async def models(request: Request):
    state = current(request)
    return {"object": "list", "data": [
        {"id": m.name, "object": "model", "created": now(), "owned_by": "lantern",
         "max_model_len": state.config.context if m.generates else m.llm.embedding_max_length,
         "root": str(m.llm.path), "lantern": {"generates": m.generates, "embeds": m.embedding}}
        for m in state.models]}


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, request: Request):
    state = current(request)
    llm = model_for(state, req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give exactly one of 'prompt' or 'messages'", param="prompt")
    try:
        if req.messages is not None:  # rendered as a chat request would be: tools and template kwargs included
            messages = validate_messages([message_dict(m) for m in req.messages])
            ids = llm.plan_chat(messages, ChatOptions(
                tools=req.tools, chat_template_kwargs=req.chat_template_kwargs,
                add_generation_prompt=req.add_generation_prompt)).prompt_ids
        else:
            ids = llm.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    except ChatRequestError as e:
        raise APIError(400, str(e), param=e.param) from None
    except LanternError as e:
        raise APIError(400, str(e), param="messages" if req.messages is not None else "prompt") from None
    return {"tokens": ids, "count": len(ids), "max_model_len": state.config.context,
            "token_strs": llm.tokenizer.tokens(ids)}


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, request: Request):
    llm = model_for(current(request), req.model)
    bad = [t for t in req.tokens if not 0 <= t < llm.config.vocab_size]
    if bad:
        raise APIError(400, f"token id {bad[0]} is outside the vocabulary", param="tokens")
    return {"prompt": llm.tokenizer.decode(req.tokens)}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request):
    """The tokenizer's facts: special tokens, context, vocabulary size, end-of-turn ids, chat template."""
    state = current(request)
    tok = state.llm.tokenizer
    return {"tokenizer_class": "lantern", "model_max_length": state.config.context, "vocab_size": tok.vocab_size,
            "bos_token": tok.bos_token, "eos_token": tok.eos_token,
            "pad_token": None if tok.pad_token_id is None else state.token_text(tok.pad_token_id),
            "add_bos_token": tok.add_bos_token, "end_token_ids": sorted(tok.end_token_ids),
            "chat_template": state.llm.loaded.chat_template}
