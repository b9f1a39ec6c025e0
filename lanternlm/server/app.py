"""The OpenAI-compatible HTTP server: FastAPI routes over the engine. It never touches tensors: requests
become token ids and SamplingParams, the engine turns them into Events, and this file turns those into
OpenAI-shaped JSON or server-sent events.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

from ..chat import validate_messages
from ..engine import Engine, EngineDeadError, Event, QueueFullError
from ..errors import LanternError
from ..generate import ContextLengthError
from ..sampling import SamplingParams
from .errors import APIError, install_error_handlers
from .guard import Guard
from .protocol import (AttentionRequest, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, LensRequest,
                       TokenizeRequest, error_body, new_id, now)

log = logging.getLogger("lanternlm.server")


class ClientGone(APIError):
    """The client closed the connection; nothing will read an answer (499, as nginx logs it)."""

    def __init__(self):
        super().__init__(499, "the client closed the request")


class RequestTimeout(APIError):
    def __init__(self, seconds: float):
        super().__init__(408, f"the request took longer than the server's limit of {seconds:g} s "
                              "(lantern serve --request-timeout)", "timeout_error", code="request_timeout")


@dataclass
class ServerConfig:
    served_name: str
    aliases: tuple[str, ...] = ()
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    context: int = 2048
    max_body_bytes: int = 4 * 1024 * 1024
    prefill_chunk: int = 512
    public_metrics: bool = False             # /metrics without the API key (it is behind the key otherwise)
    request_timeout: float | None = None     # seconds a request may take before it is stopped (408)


class Metrics:
    """Prometheus metrics in the app's own registry (no process-global state)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lantern_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.prompt_tokens = Counter("lantern_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.generation_tokens = Counter("lantern_generation_tokens", "Tokens generated", registry=r)
        self.aborted = Counter("lantern_requests_aborted", "Requests aborted (client gone, shutdown)", registry=r)
        self.queue_depth = Gauge("lantern_queue_depth", "Requests waiting for a slot", registry=r)
        self.running = Gauge("lantern_running_sequences", "Sequences in the running batch", registry=r)
        self.steps = Counter("lantern_engine_steps", "Engine steps taken (a prefill chunk and/or a batched decode)",
                             registry=r)
        self.timeouts = Counter("lantern_requests_timed_out", "Requests stopped by --request-timeout", registry=r)
        self.ttft = Histogram("lantern_time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.itl = Histogram("lantern_inter_token_latency_seconds", "Time between tokens of a stream", registry=r,
                             buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5))

    def observe(self, name: str, value: float) -> None:
        (self.ttft if name == "time_to_first_token" else self.itl).observe(value)


@dataclass
class Choice:
    index: int
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    traces: list[dict] = field(default_factory=list)
    prompt_logprobs: list | None = None   # the engine's, when asked for (see Event.prompt_logprobs)
    finish_reason: str | None = None


def create_app(llm, config: ServerConfig) -> FastAPI:
    metrics = Metrics()
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine = Engine(llm.model, llm.tokenizer, context=config.context, max_batch=config.max_batch,
                        max_queue=config.max_queue, prefill_chunk=config.prefill_chunk, device=llm.device,
                        observer=metrics.observe)
        state["engine"] = engine.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)

    app = FastAPI(title="Lantern", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API for a local model, served by Lantern.")

    install_error_handlers(app)
    route_paths: set[str] = set()  # filled once the routes below exist
    app.add_middleware(Guard, api_key=config.api_key, max_body_bytes=config.max_body_bytes,
                       public_metrics=config.public_metrics, routes=lambda: route_paths,
                       count=lambda route, status: metrics.requests.labels(route, str(status)).inc())

    # ------------------------------------------------------------------ helpers

    def engine() -> Engine:
        eng = state.get("engine")
        if eng is None or eng.dead:
            raise APIError(503, f"the engine is not running{': ' + eng.dead if eng and eng.dead else ''}",
                           "server_error", code="engine_dead")
        return eng

    def check_model(name: str) -> None:
        if name not in (config.served_name, *config.aliases):
            raise APIError(404, f"the model {name!r} does not exist; this server serves {config.served_name!r}",
                           param="model", code="model_not_found")

    def params_for(req, max_tokens: int | None, seed_offset: int) -> SamplingParams:
        bias = {int(k): v for k, v in (req.logit_bias or {}).items()}
        if any(not 0 <= k < llm.config.vocab_size for k in bias):
            raise APIError(400, "logit_bias has a token id outside the vocabulary", param="logit_bias")
        try:
            params = SamplingParams(
                temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
                repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty, logit_bias=bias or None,
                seed=None if req.seed is None else req.seed + seed_offset, max_tokens=max_tokens,
                stop=req.stop or (), ignore_eos=req.ignore_eos)
        except LanternError as e:
            raise APIError(400, str(e)) from None
        return params.with_defaults(llm.generation_config)

    def check_request(req) -> None:
        """Checks that span several fields (pydantic checks each field alone)."""
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")

    async def run_choices(prompts: list[list[int]], req, max_tokens: int | None, logprobs: int | None,
                          prompt_logprobs: int | None, param: str) -> tuple[asyncio.Queue, list[str]]:
        """Submit n choices for each prompt; events arrive on one queue as (choice index, Event), choice
        index = prompt index * n + j, as OpenAI numbers a batch's choices."""
        eng = engine()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        request_ids: list[str] = []
        if len(prompts) * req.n > config.max_queue:
            raise APIError(400, f"{len(prompts)} prompt(s) x n={req.n} is more than this server queues at once "
                                f"({config.max_queue})", param=param)
        all_params = [params_for(req, max_tokens, j) for j in range(req.n)]
        trace = req.lantern.top_k if req.lantern and req.lantern.trace else None
        try:
            for p, ids in enumerate(prompts):
                for j, params in enumerate(all_params):

                    def deliver(event: Event, i=p * req.n + j):
                        loop.call_soon_threadsafe(queue.put_nowait, (i, event))

                    request_ids.append(eng.submit(ids, params, deliver, logprobs=logprobs, trace_top_k=trace,
                                                  prompt_logprobs=prompt_logprobs))
        except ContextLengthError as e:
            abort_all(request_ids, count=False)
            raise APIError(400, str(e), param=param, code="context_length_exceeded") from None
        except QueueFullError as e:
            abort_all(request_ids, count=False)
            raise APIError(429, str(e), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) \
                from None
        except EngineDeadError as e:
            abort_all(request_ids, count=False)
            raise APIError(503, str(e), "server_error", code="engine_dead") from None
        except LanternError as e:
            abort_all(request_ids, count=False)
            raise APIError(400, str(e), param=param) from None
        metrics.prompt_tokens.inc(sum(len(ids) for ids in prompts) * req.n)
        return queue, request_ids

    async def until_disconnect(request: Request) -> None:
        """Return when the client has gone. The body is read by now, so `receive` has nothing else to say."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    class Events:
        """The events of one request's choices, ended early by a client that leaves or by the deadline; the
        choices' sequences are aborted whenever the events end before every choice finished."""

        def __init__(self, request: Request, queue: asyncio.Queue, total: int, request_ids: list[str]):
            self.queue, self.total, self.request_ids = queue, total, request_ids
            self.gone = asyncio.ensure_future(until_disconnect(request))
            self.deadline = None if config.request_timeout is None else \
                asyncio.get_running_loop().time() + config.request_timeout
            self.finished = 0

        async def next(self) -> tuple[int, Event]:
            get = asyncio.ensure_future(self.queue.get())
            timeout = None if self.deadline is None else max(0.0, self.deadline - asyncio.get_running_loop().time())
            done, _ = await asyncio.wait({get, self.gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
                if self.gone in done:
                    raise ClientGone()
                metrics.timeouts.inc()
                raise RequestTimeout(config.request_timeout)
            i, event = get.result()
            if event.step is not None and event.step.finish_reason:
                self.finished += 1
            return i, event

        @property
        def done(self) -> bool:
            return self.finished >= self.total

        def close(self) -> None:
            self.gone.cancel()
            if not self.done:
                abort_all(self.request_ids)

    async def collect(events: Events) -> list[Choice]:
        """Wait for every choice to finish (non-streamed answers)."""
        choices = [Choice(i) for i in range(events.total)]
        try:
            while not events.done:
                i, event = await events.next()
                if event.error:
                    raise APIError(500, f"generation failed: {event.error}", "server_error")
                absorb(choices[i], event)
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
        if event.trace is not None:
            choice.traces.append(event.trace)
        metrics.generation_tokens.inc()
        if step.finish_reason:
            choice.finish_reason = step.finish_reason

    def abort_all(request_ids: list[str], count: bool = True) -> None:
        eng = state.get("engine")
        if eng is not None:
            for rid in request_ids:
                eng.abort(rid)
            if count:
                metrics.aborted.inc(len(request_ids))

    def token_text(token_id: int) -> str:
        return llm.tokenizer.decode([token_id])

    def chat_logprobs(entries) -> dict:
        def one(tid, lp):
            text = token_text(tid)
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
        return {"content": [{**one(tid, lp), "top_logprobs": [one(t, l) for t, l in top]}
                            for tid, lp, top in entries], "refusal": None}

    def completion_logprobs(entries, offset: int) -> dict:
        """OpenAI's legacy shape: parallel lists. `entries`: (token id, logprob or None, alternatives or None);
        None marks the prompt's first token, which nothing predicts (OpenAI and vLLM report null there)."""
        tokens, token_lps, tops, offsets = [], [], [], []
        for tid, lp, top in entries:
            text = token_text(tid)
            offsets.append(offset)
            offset += len(text)
            tokens.append(text)
            token_lps.append(lp)
            tops.append(None if top is None else {token_text(t): l for t, l in top})
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def prompt_entries(ids: list[int], scored: list) -> list[tuple[int, float | None, list | None]]:
        """The engine's prompt logprobs as completion_logprobs entries."""
        return [(tid, None, None) if s is None else (tid, s[0], s[2]) for tid, s in zip(ids, scored)]

    def vllm_prompt_logprobs(ids: list[int], scored: list) -> list[dict | None]:
        """vLLM's `prompt_logprobs`: per prompt token, null for the first, else {token id: {logprob, rank,
        decoded_token}} for the token itself and its top alternatives."""
        out = []
        for tid, s in zip(ids, scored):
            if s is None:
                out.append(None)
                continue
            lp, rank, top = s
            entry = {str(t): {"logprob": l, "rank": r + 1, "decoded_token": token_text(t)}
                     for r, (t, l) in enumerate(top)}
            entry[str(tid)] = {"logprob": lp, "rank": rank, "decoded_token": token_text(tid)}
            out.append(entry)
        return out

    def lantern_extra(req, traces: list) -> dict:
        """The `lantern` extension on a choice: present only when the request asked for a trace."""
        if not (req.lantern and req.lantern.trace):
            return {}
        return {"lantern": {"trace": [t for t in traces if t is not None]}}

    def usage(prompt: int, completion: int) -> dict:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def stream(chunk: dict, req, prompt_tokens: int, events: Events, opening: list[dict],
                     render) -> AsyncIterator[str]:
        """The SSE body of both endpoints: the opening choices, then the choices `render(i, event)` makes of
        each event, a usage chunk when asked for, and [DONE]. If the stream ends early (the client went away,
        the deadline, an engine error) its sequences are aborted at once."""
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        extra = {"usage": None} if include_usage else {}
        completion_tokens = 0
        try:
            for choice in opening:
                yield sse({**chunk, "choices": [choice], **extra})
            while not events.done:
                try:
                    i, event = await events.next()
                except ClientGone:
                    return
                except APIError as e:  # the deadline: say so in the stream, as the status is long sent
                    yield sse(e.body)
                    return
                if event.error:
                    yield sse(error_body(f"generation failed: {event.error}", "server_error"))
                    return
                completion_tokens += 1
                metrics.generation_tokens.inc()
                for choice in render(i, event):
                    yield sse({**chunk, "choices": [choice], **extra})
            if include_usage:
                yield sse({**chunk, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
            yield "data: [DONE]\n\n"
        finally:
            events.close()

    def sse_response(body: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(body, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------ routes

    web = Path(__file__).parent / "web"

    @app.get("/", include_in_schema=False)
    async def page():
        """The built-in web page: chat with per-token probabilities, model page, tokenizer playground."""
        return FileResponse(web / "index.html")

    app.mount("/static", StaticFiles(directory=web), name="static")

    @app.get("/health")
    async def health():
        eng = state.get("engine")
        if eng is None or eng.dead:
            return JSONResponse({"status": "dead", "error": eng.dead if eng else "not started"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        """Prometheus metrics; behind the API key unless the server runs with --public-metrics."""
        eng = state.get("engine")
        if eng is not None:
            snap = eng.snapshot()
            metrics.queue_depth.set(snap.waiting)
            metrics.running.set(snap.running)
            metrics.steps.inc(snap.steps_total - state.get("steps_seen", 0))  # the engine counts, we mirror
            state["steps_seen"] = snap.steps_total
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        """The tokenizer's facts (vLLM's route of the same name, which lm-eval's remote tokenizer reads)."""
        tok = llm.tokenizer
        return {"tokenizer_class": "lantern", "model_max_length": config.context, "vocab_size": tok.vocab_size,
                "bos_token": tok.bos_token, "eos_token": tok.eos_token,
                "pad_token": None if tok.pad_token_id is None else token_text(tok.pad_token_id),
                "add_bos_token": tok.add_bos_token, "end_token_ids": sorted(tok.end_token_ids),
                "chat_template": llm.loaded.chat_template}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.served_name, "object": "model", "created": now(),
                                            "owned_by": "lantern", "max_model_len": config.context,
                                            "root": str(llm.path)}]}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        if req.model is not None:
            check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of 'prompt' or 'messages'", param="prompt")
        try:
            if req.messages is not None:
                messages = validate_messages([m.model_dump(exclude_none=True) for m in req.messages])
                ids = llm.encode_chat(messages, add_generation_prompt=req.add_generation_prompt)
            else:
                ids = llm.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        except LanternError as e:
            raise APIError(400, str(e)) from None
        return {"tokens": ids, "count": len(ids), "max_model_len": config.context,
                "token_strs": llm.tokenizer.tokens(ids)}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        if req.model is not None:
            check_model(req.model)
        bad = [t for t in req.tokens if not 0 <= t < llm.config.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary", param="tokens")
        return {"prompt": llm.tokenizer.decode(req.tokens)}

    # ------------------------------------------------------------------ Lantern's look inside (/v1/lantern/...)

    def input_ids(req) -> list[int]:
        if req.model is not None:
            check_model(req.model)
        given = [x is not None for x in (req.prompt, req.messages, req.ids)]
        if sum(given) != 1:
            raise APIError(400, "give exactly one of 'prompt', 'messages' or 'ids'", param="prompt")
        try:
            if req.messages is not None:
                return llm.encode_chat(validate_messages([_message_dict(m) for m in req.messages]))
            return llm.encode(req.prompt if req.prompt is not None else req.ids)
        except LanternError as e:
            raise APIError(400, str(e), param="prompt") from None

    async def off_loop(fn, *args):
        """Run an inspection forward in a worker thread, so streams keep flowing meanwhile."""
        try:
            return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
        except LanternError as e:
            raise APIError(400, str(e)) from None

    @app.get("/v1/lantern/inspect", tags=["lantern"])
    async def lantern_inspect():
        """The model's module tree, parameter counts, config, tokenizer facts and files (`lantern inspect`)."""
        return await off_loop(llm.describe)

    @app.post("/v1/lantern/lens", tags=["lantern"])
    async def lantern_lens(req: LensRequest):
        """Logit lens: what each layer's hidden state at `position` would predict through the final norm
        and lm_head (top_k tokens per layer)."""
        ids = input_ids(req)
        return await off_loop(lambda: llm.logit_lens(ids, position=req.position, top_k=req.top_k))

    @app.post("/v1/lantern/attention", tags=["lantern"])
    async def lantern_attention(req: AttentionRequest):
        """Attention weights per layer and head for a prompt (a slower path that materialises them)."""
        ids = input_ids(req)
        return await off_loop(lambda: llm.attention(ids, layers=req.layers, heads=req.heads))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        check_request(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        try:
            messages = validate_messages([_message_dict(m) for m in req.messages])
            ids = llm.encode_chat(messages, add_generation_prompt=req.add_generation_prompt)
        except LanternError as e:
            raise APIError(400, str(e), param="messages") from None
        max_tokens = req.max_completion_tokens or req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        queue, rids = await run_choices([ids], req, max_tokens, logprobs, req.prompt_logprobs, "messages")
        events = Events(request, queue, req.n, rids)
        cid, created = new_id("chatcmpl"), now()
        base = {"id": cid, "created": created, "model": config.served_name}
        if not req.stream:
            choices = await collect(events)
            extra = {} if req.prompt_logprobs is None else {
                "prompt_logprobs": vllm_prompt_logprobs(ids, choices[0].prompt_logprobs)}
            return {**base, "object": "chat.completion", "choices": [
                {"index": c.index, "message": {"role": "assistant", "content": "".join(c.text)},
                 "logprobs": chat_logprobs(c.logprobs) if req.logprobs else None,
                 "finish_reason": c.finish_reason, **lantern_extra(req, c.traces)} for c in choices],
                "usage": usage(len(ids), sum(len(c.token_ids) for c in choices)), **extra}

        def render(i: int, event: Event) -> list[dict]:
            step, out = event.step, []
            lp = chat_logprobs([(step.token_id, event.logprob, event.top_logprobs or [])]) if req.logprobs else None
            if step.text or lp or event.trace or event.prompt_logprobs is not None:
                out.append({"index": i, "delta": {"content": step.text}, "logprobs": lp, "finish_reason": None,
                            **lantern_extra(req, [event.trace])})
            if step.finish_reason:  # its own chunk, as OpenAI sends it
                out.append({"index": i, "delta": {}, "logprobs": None, "finish_reason": step.finish_reason})
            return out

        opening = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None} for i in range(req.n)]
        chunk = {**base, "object": "chat.completion.chunk"}
        if req.prompt_logprobs is None:
            return sse_response(stream(chunk, req, len(ids), events, opening, render))

        def render_with_prompt(i: int, event: Event) -> list[dict]:
            # The prompt's logprobs come with the first event (after prefill): they ride on its first chunk.
            out = render(i, event)
            if event.prompt_logprobs is not None and out:
                out[0] = {**out[0], "prompt_logprobs": vllm_prompt_logprobs(ids, event.prompt_logprobs)}
            return out
        return sse_response(stream(chunk, req, len(ids), events, opening, render_with_prompt))

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        check_request(req)
        prompts = _prompts(req.prompt)
        try:
            encoded = [llm.encode(p) for p in prompts]
        except LanternError as e:
            raise APIError(400, str(e), param="prompt") from None
        # echo + logprobs: the prompt's own tokens get logprobs too (how evaluation harnesses score text).
        scoring = req.echo and req.logprobs is not None
        prompt_logprobs = req.logprobs if scoring else req.prompt_logprobs
        queue, rids = await run_choices(encoded, req, req.max_tokens, req.logprobs, prompt_logprobs, "prompt")
        total = len(prompts) * req.n
        events = Events(request, queue, total, rids)

        def prompt_of(i: int) -> int:
            return i // req.n

        echo_texts = [(p if isinstance(p, str) else llm.tokenizer.decode(ids)) if req.echo else ""
                      for p, ids in zip(prompts, encoded)]
        cid, created = new_id("cmpl"), now()
        base = {"id": cid, "created": created, "model": config.served_name}
        prompt_tokens = sum(len(ids) for ids in encoded)

        def echo_logprobs(i: int, scored: list) -> dict:
            ids = encoded[prompt_of(i)]
            return completion_logprobs(prompt_entries(ids, scored), 0)

        if not req.stream:
            choices = await collect(events)
            out = []
            for c in choices:
                p = prompt_of(c.index)
                lp = None
                if req.logprobs is not None:
                    if scoring:
                        head = prompt_entries(encoded[p], c.prompt_logprobs)
                        lp = completion_logprobs(head + c.logprobs, 0)
                    else:
                        lp = completion_logprobs(c.logprobs, len(echo_texts[p]))
                extra = {} if req.prompt_logprobs is None or scoring else {
                    "prompt_logprobs": vllm_prompt_logprobs(encoded[p], c.prompt_logprobs)}
                out.append({"index": c.index, "text": echo_texts[p] + "".join(c.text), "logprobs": lp,
                            "finish_reason": c.finish_reason, **extra, **lantern_extra(req, c.traces)})
            return {**base, "object": "text_completion", "choices": out,
                    "usage": usage(prompt_tokens, sum(len(c.token_ids) for c in choices))}

        offsets = [len(echo_texts[prompt_of(i)]) for i in range(total)]  # text_offset of each choice's next token

        def render(i: int, event: Event) -> list[dict]:
            step, out = event.step, []
            if scoring and event.prompt_logprobs is not None:  # the echo, with the prompt's logprobs
                head = echo_logprobs(i, event.prompt_logprobs)
                out.append({"index": i, "text": echo_texts[prompt_of(i)], "logprobs": head, "finish_reason": None})
                offsets[i] = head["text_offset"][-1] + len(head["tokens"][-1]) if head["tokens"] else 0
            lp = None
            if req.logprobs is not None:
                lp = completion_logprobs([(step.token_id, event.logprob, event.top_logprobs or [])], offsets[i])
            offsets[i] += len(step.text)
            if step.text or lp or step.finish_reason or event.trace:
                out.append({"index": i, "text": step.text, "logprobs": lp, "finish_reason": step.finish_reason,
                            **lantern_extra(req, [event.trace])})
            return out

        opening = [] if scoring else [{"index": i, "text": echo_texts[prompt_of(i)], "logprobs": None,
                                       "finish_reason": None} for i in range(total) if echo_texts[prompt_of(i)]]
        return sse_response(stream({**base, "object": "text_completion"}, req, prompt_tokens, events, opening,
                                   render))

    route_paths.update(route.path for route in app.routes)
    return app


def _message_dict(message) -> dict:
    d = message.model_dump(exclude_none=True)
    if isinstance(d.get("content"), list):  # text parts -> one string, as templates expect text
        d["content"] = "".join(part["text"] for part in d["content"])
    if d["role"] == "developer":  # OpenAI's newer name for the system role
        d["role"] = "system"
    d.setdefault("content", "")
    return d


def _prompts(prompt) -> list:
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
