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
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

from ..chat import validate_messages
from ..engine import Engine, EngineDeadError, Event, QueueFullError
from ..errors import LanternError, TemplateError
from ..generate import ContextLengthError
from ..sampling import SamplingParams
from .protocol import (AttentionRequest, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, LensRequest,
                       TokenizeRequest, error_body, new_id, now)

log = logging.getLogger("lanternlm.server")


class APIError(Exception):
    """An error to answer in OpenAI's shape with this status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.body, self.headers = status, error_body(message, type_, param, code), headers


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

    # ------------------------------------------------------------------ errors

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "extra_forbidden":
            message = f"unsupported field {param!r}: Lantern does not implement it"
        elif first.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        else:
            message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error")
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > config.max_body_bytes):
            return JSONResponse(error_body(f"request body larger than {config.max_body_bytes} bytes"),
                                status_code=413)
        if config.api_key and (request.url.path.startswith("/v1/") or request.url.path in ("/tokenize",
                                                                                            "/detokenize")):
            if request.headers.get("authorization") != f"Bearer {config.api_key}":
                metrics.requests.labels(request.url.path, "401").inc()
                return JSONResponse(error_body("invalid or missing API key", "authentication_error",
                                               code="invalid_api_key"), status_code=401)
        response = await call_next(request)
        metrics.requests.labels(request.url.path, str(response.status_code)).inc()
        return response

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

    def params_for(req, max_tokens: int | None, seed_offset: int, logprobs_wanted: bool) -> SamplingParams:
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

    async def run_choices(request: Request, ids: list[int], req, max_tokens: int | None,
                          logprobs: int | None) -> tuple[asyncio.Queue, list[str]]:
        """Submit the request's n choices; events arrive on one queue as (choice index, Event)."""
        eng = engine()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        request_ids: list[str] = []
        all_params = [params_for(req, max_tokens, i, logprobs is not None) for i in range(req.n)]
        try:
            for i, params in enumerate(all_params):

                def deliver(event: Event, i=i):
                    loop.call_soon_threadsafe(queue.put_nowait, (i, event))

                trace = req.lantern.top_k if req.lantern and req.lantern.trace else None
                request_ids.append(eng.submit(ids, params, deliver, logprobs=logprobs, trace_top_k=trace))
        except ContextLengthError as e:
            raise APIError(400, str(e), param="messages" if hasattr(req, "messages") else "prompt",
                           code="context_length_exceeded") from None
        except QueueFullError as e:
            for rid in request_ids:
                eng.abort(rid)
            raise APIError(429, str(e), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) \
                from None
        except EngineDeadError as e:
            raise APIError(503, str(e), "server_error", code="engine_dead") from None
        except LanternError as e:
            abort_all(request_ids)
            raise APIError(400, str(e)) from None
        metrics.prompt_tokens.inc(len(ids) * req.n)
        return queue, request_ids

    async def collect(request: Request, queue: asyncio.Queue, n: int, request_ids: list[str]) -> list[Choice]:
        """Wait for every choice to finish; abort them all if the client goes away."""
        choices = [Choice(i) for i in range(n)]
        done = 0
        try:
            while done < n:
                try:
                    i, event = await asyncio.wait_for(queue.get(), timeout=0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        raise asyncio.CancelledError
                    continue
                if event.error:
                    raise APIError(500, f"generation failed: {event.error}", "server_error")
                absorb(choices[i], event)
                if event.step.finish_reason:
                    done += 1
        except BaseException:
            abort_all(request_ids)
            raise
        return choices

    def absorb(choice: Choice, event: Event) -> None:
        step = event.step
        choice.text.append(step.text)
        choice.token_ids.append(step.token_id)
        if event.logprob is not None:
            choice.logprobs.append((step.token_id, event.logprob, event.top_logprobs or []))
        if event.trace is not None:
            choice.traces.append(event.trace)
        metrics.generation_tokens.inc()
        if step.finish_reason:
            choice.finish_reason = step.finish_reason

    def abort_all(request_ids: list[str]) -> None:
        eng = state.get("engine")
        if eng is not None:
            for rid in request_ids:
                eng.abort(rid)
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
        tokens, token_lps, tops, offsets = [], [], [], []
        for tid, lp, top in entries:
            text = token_text(tid)
            offsets.append(offset)
            offset += len(text)
            tokens.append(text)
            token_lps.append(lp)
            tops.append({token_text(t): l for t, l in top})
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def lantern_extra(req, traces: list) -> dict:
        """The `lantern` extension on a choice: present only when the request asked for a trace."""
        if not (req.lantern and req.lantern.trace):
            return {}
        return {"lantern": {"trace": [t for t in traces if t is not None]}}

    def usage(prompt: int, completion: int) -> dict:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def stream(chunk: dict, req, prompt_tokens: int, queue: asyncio.Queue, request_ids: list[str],
                     opening: list[dict], render) -> AsyncIterator[str]:
        """The SSE body of both endpoints: the opening choices, then the choices `render(i, event)` makes of
        each event, a usage chunk when asked for, and [DONE]. If the stream ends early (the client went away,
        an engine error) its sequences are aborted at once."""
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        extra = {"usage": None} if include_usage else {}
        completion_tokens, done = 0, 0
        try:
            for choice in opening:
                yield sse({**chunk, "choices": [choice], **extra})
            while done < req.n:
                i, event = await queue.get()
                if event.error:
                    yield sse(error_body(f"generation failed: {event.error}", "server_error"))
                    break
                completion_tokens += 1
                metrics.generation_tokens.inc()
                for choice in render(i, event):
                    yield sse({**chunk, "choices": [choice], **extra})
                if event.step.finish_reason:
                    done += 1
            if include_usage:
                yield sse({**chunk, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
            yield "data: [DONE]\n\n"
        finally:
            if done < req.n:
                abort_all(request_ids)

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
        eng = state.get("engine")
        if eng is not None:
            snap = eng.snapshot()
            metrics.queue_depth.set(snap.waiting)
            metrics.running.set(snap.running)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

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
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        try:
            messages = validate_messages([_message_dict(m) for m in req.messages])
            ids = llm.encode_chat(messages, add_generation_prompt=req.add_generation_prompt)
        except TemplateError as e:
            raise APIError(400, str(e), param="messages") from None
        except LanternError as e:
            raise APIError(400, str(e), param="messages") from None
        max_tokens = req.max_completion_tokens or req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        queue, rids = await run_choices(request, ids, req, max_tokens, logprobs)
        cid, created = new_id("chatcmpl"), now()
        base = {"id": cid, "created": created, "model": config.served_name}
        if not req.stream:
            choices = await collect(request, queue, req.n, rids)
            return {**base, "object": "chat.completion", "choices": [
                {"index": c.index, "message": {"role": "assistant", "content": "".join(c.text)},
                 "logprobs": chat_logprobs(c.logprobs) if req.logprobs else None,
                 "finish_reason": c.finish_reason, **lantern_extra(req, c.traces)} for c in choices],
                "usage": usage(len(ids), sum(len(c.token_ids) for c in choices))}

        def render(i: int, event: Event) -> list[dict]:
            step, out = event.step, []
            lp = chat_logprobs([(step.token_id, event.logprob, event.top_logprobs or [])]) if req.logprobs else None
            if step.text or lp or event.trace:
                out.append({"index": i, "delta": {"content": step.text}, "logprobs": lp, "finish_reason": None,
                            **lantern_extra(req, [event.trace])})
            if step.finish_reason:  # its own chunk, as OpenAI sends it
                out.append({"index": i, "delta": {}, "logprobs": None, "finish_reason": step.finish_reason})
            return out

        opening = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None} for i in range(req.n)]
        return sse_response(stream({**base, "object": "chat.completion.chunk"}, req, len(ids), queue, rids,
                                   opening, render))

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        prompts = _prompts(req.prompt)
        if len(prompts) != 1:
            raise APIError(400, "batched prompts are not supported yet: send one prompt per request",
                           param="prompt")
        prompt = prompts[0]
        try:
            ids = llm.encode(prompt)
        except LanternError as e:
            raise APIError(400, str(e), param="prompt") from None
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo together with logprobs (prompt logprobs) is not supported yet",
                           param="echo")
        echo_text = (prompt if isinstance(prompt, str) else llm.tokenizer.decode(ids)) if req.echo else ""
        queue, rids = await run_choices(request, ids, req, req.max_tokens, req.logprobs)
        cid, created = new_id("cmpl"), now()
        base = {"id": cid, "created": created, "model": config.served_name}
        if not req.stream:
            choices = await collect(request, queue, req.n, rids)
            return {**base, "object": "text_completion", "choices": [
                {"index": c.index, "text": echo_text + "".join(c.text),
                 "logprobs": completion_logprobs(c.logprobs, len(echo_text)) if req.logprobs is not None else None,
                 "finish_reason": c.finish_reason, **lantern_extra(req, c.traces)} for c in choices],
                "usage": usage(len(ids), sum(len(c.token_ids) for c in choices))}

        offsets = [len(echo_text)] * req.n  # text_offset of each choice's next token

        def render(i: int, event: Event) -> list[dict]:
            step = event.step
            lp = None
            if req.logprobs is not None:
                lp = completion_logprobs([(step.token_id, event.logprob, event.top_logprobs or [])], offsets[i])
            offsets[i] += len(step.text)
            if not (step.text or lp or step.finish_reason or event.trace):
                return []
            return [{"index": i, "text": step.text, "logprobs": lp, "finish_reason": step.finish_reason,
                     **lantern_extra(req, [event.trace])}]

        opening = [{"index": i, "text": echo_text, "logprobs": None, "finish_reason": None}
                   for i in range(req.n)] if echo_text else []
        return sse_response(stream({**base, "object": "text_completion"}, req, len(ids), queue, rids, opening,
                                   render))

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
