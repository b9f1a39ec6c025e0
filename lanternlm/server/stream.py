"""Server-sent events: the body of a streamed answer, shared by chat and completions."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

from fastapi.responses import StreamingResponse

from ..engine import Event
from .errors import APIError
from .events import ClientGone, Events
from .protocol import error_body


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(prompt: int, completion: int, cached: int = 0) -> dict:
    """OpenAI's usage; `cached`: prompt tokens the prefix cache served (prompt_tokens_details.cached_tokens)."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


async def stream(chunk: dict, req, prompt_tokens: int, events: Events, opening: list[dict],
                 render: Callable[[int, Event], list[dict]]) -> AsyncIterator[str]:
    """The opening choices, then the choices `render(i, event)` makes of each event, a usage chunk when asked
    for, and [DONE]. If the stream ends early (the client went away, the deadline, an engine error) its
    sequences are aborted at once."""
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    extra = {"usage": None} if include_usage else {}
    completion_tokens = cached = 0
    try:
        for choice in opening:
            yield sse({**chunk, "choices": [choice], **extra})
        while not events.done:
            try:
                i, event = await events.next()
            except ClientGone:
                return
            except APIError as e:  # the deadline: said in the stream, as the status went out long ago
                yield sse(e.body)
                return
            if event.error:
                yield sse(error_body(f"generation stopped: {event.error}", code="generation_stopped")
                          if event.request_error else error_body(f"generation failed: {event.error}", "server_error"))
                return
            completion_tokens += 1
            if event.cached_tokens and i % req.n == 0:  # once per prompt, as usage counts prompt tokens once
                cached += event.cached_tokens
            events.state.metrics.generation_tokens.inc()
            for choice in render(i, event):
                yield sse({**chunk, "choices": [choice], **extra})
        if include_usage:
            yield sse({**chunk, "choices": [], "usage": usage(prompt_tokens, completion_tokens, cached)})
        yield "data: [DONE]\n\n"
    finally:
        events.close()


def sse_response(body: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
