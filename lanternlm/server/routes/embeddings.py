"""POST /v1/embeddings, as OpenAI defines it: a string, a list of strings, token ids or lists of token ids in;
one vector per input out, as floats or base64 (little-endian float32), with usage. Inputs longer than the
model's maximum are refused unless the request opts into truncation (vLLM's `truncate_prompt_tokens`), which
the answer then reports under `lantern.truncated`."""

from __future__ import annotations

import asyncio
import base64
from dataclasses import replace

import torch
from fastapi import APIRouter, Request

from ... import embedding
from ...errors import LanternError
from ..errors import APIError
from ..events import ClientGone, until_disconnect
from ..protocol import EmbeddingRequest
from ..state import ServedModel, current

router = APIRouter()

MAX_INPUTS = 2048          # OpenAI's limit on inputs per request
MAX_TOTAL_TOKENS = 300_000  # OpenAI's limit on the tokens of one request, all inputs together
SUB_BATCH = 32             # inputs per forward; the client's presence is checked between forwards


def input_list(value) -> list:
    """The request's input as a list of items, each a str or a list of token ids."""
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(v, int) for v in value):
        return [list(value)]
    return list(value)


def token_ids(served: ServedModel, items: list, truncate: int | None) -> tuple[list[list[int]], list[int]]:
    """Token ids per input, as `LLM.embed` makes them (the model's default prompt, lower-casing, special
    tokens), and the indices of the inputs that were cut to fit `truncate` tokens (at most the model's
    maximum; vLLM's truncate_prompt_tokens)."""
    llm = served.llm
    spec = llm.embedding_spec
    if truncate is not None:
        spec = replace(spec, max_length=min(truncate, spec.max_length))
    out, cut, total = [], [], 0
    for i, item in enumerate(items):
        if isinstance(item, str) and not item:  # OpenAI refuses an empty text rather than embed [CLS][SEP]
            raise APIError(400, f"input[{i}] is an empty string", param="input")
        try:
            try:
                [ids] = embedding.token_lists([item], llm.tokenizer, spec)
            except embedding.InputTooLongError as e:
                if truncate is None:
                    raise APIError(400, f"input[{i}] has {e.length} tokens, more than the {e.maximum} this model "
                                        "embeds; shorten it, or set truncate_prompt_tokens to cut it",
                                   param="input", code="context_length_exceeded") from None
                [ids] = embedding.token_lists([item], llm.tokenizer, spec, truncate=True)
                cut.append(i)
        except LanternError as e:
            hint = "" if isinstance(item, str) else (" (token ids must be this model's own; LangChain: set "
                                                     "check_embedding_ctx_length=False so it sends text)")
            raise APIError(400, f"input[{i}]: {e}{hint}", param="input") from None
        total += len(ids)
        if total > MAX_TOTAL_TOKENS:
            raise APIError(400, f"the inputs hold more than {MAX_TOTAL_TOKENS:,} tokens; send fewer per request",
                           param="input")
        out.append(ids)
    return out, cut


@router.post("/v1/embeddings")
async def embeddings(req: EmbeddingRequest, request: Request):
    state = current(request)
    served = state.embedding_model(req.model)
    items = input_list(req.input)
    if not items:
        raise APIError(400, "input is empty: give a string or a non-empty list", param="input")
    if len(items) > MAX_INPUTS:
        raise APIError(400, f"{len(items)} inputs; at most {MAX_INPUTS} per request", param="input")
    dims = served.llm.embedding_dimensions
    if req.dimensions is not None and req.dimensions != dims:
        raise APIError(400, f"the model {served.name!r} gives {dims}-dimensional embeddings and was not trained "
                            "to be truncated; leave dimensions out", param="dimensions")
    ids, cut = token_ids(served, items, req.truncate_prompt_tokens)
    vectors = await embed(state, served, ids, request)
    if req.encoding_format == "base64":  # OpenAI's: the float32 values' little-endian bytes
        data = [base64.b64encode(v.numpy().astype("<f4").tobytes()).decode("ascii") for v in vectors]
    else:
        data = vectors.tolist()
    tokens = sum(map(len, ids))
    extra = {} if req.truncate_prompt_tokens is None else {"lantern": {"truncated": cut}}
    return {"object": "list", "model": served.name,
            "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}, **extra}


async def embed(state, served: ServedModel, ids: list[list[int]], request: Request) -> torch.Tensor:
    """(N, D) float32: forwards of SUB_BATCH inputs in a worker thread, one request's batch at a time; a
    client that leaves stops the work before the next forward."""
    loop = asyncio.get_running_loop()
    gone = asyncio.ensure_future(until_disconnect(request))
    kwargs = {"pooling": served.pooling or "last"} if served.generates else {}  # a decoder pools as marked
    parts = []
    try:
        async with state.side_work:
            for start in range(0, len(ids), SUB_BATCH):
                if gone.done():
                    raise ClientGone()
                batch = ids[start:start + SUB_BATCH]
                parts.append(await loop.run_in_executor(None, lambda b=batch: served.llm.embed_ids(b, **kwargs)))
    except LanternError as e:
        raise APIError(400, str(e), param="input") from None
    finally:
        gone.cancel()
    return torch.cat(parts).float()
