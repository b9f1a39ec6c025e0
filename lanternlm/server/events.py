"""A request's events, from the engine's thread to its route: they end when every choice has finished, or
early when the client leaves or the server's deadline passes, and then the choices' sequences are aborted at
once. Non-streamed answers are collected here too."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from fastapi import Request

from ..engine import Event
from .errors import APIError
from .state import ServerState


class ClientGone(APIError):
    """The client closed the connection; nothing will read an answer (499, as nginx logs it)."""

    def __init__(self):
        super().__init__(499, "the client closed the request")


class RequestTimeout(APIError):
    def __init__(self, seconds: float):
        super().__init__(408, f"the request took longer than the server's limit of {seconds:g} s "
                              "(lantern serve --request-timeout)", "timeout_error", code="request_timeout")


async def until_disconnect(request: Request) -> None:
    """Return when the client has gone. The body is read by now, so `receive` has nothing else to say."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# Put on a request's queue beside its events, so waiting for the next event is one queue.get: racing the
# queue against the disconnect watcher with asyncio.wait cost a task and a wait set per token, event-loop time
# taken from the engine's two threads on a 2-core machine.
_GONE, _TIMEOUT = object(), object()


class Events:
    """The events of one request's choices, as (choice index, Event)."""

    def __init__(self, state: ServerState, request: Request, queue: asyncio.Queue, total: int,
                 request_ids: list[str]):
        self.state, self.queue, self.total, self.request_ids = state, queue, total, request_ids
        # Watched for the whole request, streamed or not: a client that leaves stops its work at the next step.
        self.gone = asyncio.ensure_future(until_disconnect(request))
        self.gone.add_done_callback(lambda _: queue.put_nowait(_GONE))
        timeout = state.config.request_timeout
        self.timer = None if timeout is None else asyncio.get_running_loop().call_later(
            timeout, queue.put_nowait, _TIMEOUT)
        self.finished = 0

    async def next(self) -> tuple[int, Event]:
        """The next event; raises ClientGone or RequestTimeout instead when the request ends early."""
        if self.gone.done():  # events still queued have nobody to go to
            raise ClientGone()
        item = await self.queue.get()  # no suspension when an event is already waiting
        if item is _GONE:
            raise ClientGone()
        if item is _TIMEOUT:
            self.state.metrics.timeouts.inc()
            raise RequestTimeout(self.state.config.request_timeout)
        return self._count(item)

    def _count(self, item: tuple[int, Event]) -> tuple[int, Event]:
        if item[1].step is not None and item[1].step.finish_reason:
            self.finished += 1
        return item

    @property
    def done(self) -> bool:
        return self.finished >= self.total

    def close(self) -> None:
        """Stop watching; abort the choices that have not finished."""
        self.gone.cancel()
        if self.timer is not None:
            self.timer.cancel()
        if not self.done:
            self.state.abort(self.request_ids)


@dataclass
class Choice:
    """One choice of a non-streamed answer, gathered from its events."""

    index: int
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    traces: list[dict] = field(default_factory=list)
    prompt_logprobs: list | None = None   # the engine's, when asked for (see Event.prompt_logprobs)
    cached_tokens: int = 0                # prompt tokens the prefix cache served
    finish_reason: str | None = None


async def collect(events: Events) -> list[Choice]:
    """Wait for every choice to finish (non-streamed answers)."""
    choices = [Choice(i) for i in range(events.total)]
    try:
        while not events.done:
            i, event = await events.next()
            if event.error and event.request_error:
                raise APIError(400, f"generation stopped: {event.error}", code="generation_stopped")
            if event.error:
                raise APIError(500, f"generation failed: {event.error}", "server_error")
            absorb(choices[i], event)
            events.state.metrics.generation_tokens.inc()
    finally:
        events.close()
    return choices


def absorb(choice: Choice, event: Event) -> None:
    step = event.step
    choice.text.append(step.text)
    choice.token_ids.append(step.token_id)
    if event.logprob is not None:
        choice.logprobs.append((step.token_id, event.logprob, event.top_logprobs or []))
    if event.prompt_logprobs is not None:
        choice.prompt_logprobs = event.prompt_logprobs
    if event.cached_tokens:
        choice.cached_tokens = event.cached_tokens
    if event.trace is not None:
        choice.traces.append(event.trace)
    if step.finish_reason:
        choice.finish_reason = step.finish_reason
