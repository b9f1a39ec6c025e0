"""What every route shares: the server's configuration, its metrics, the loaded model and the running engine,
and the steps from a request to the engine (model check, sampling parameters, submitting choices, aborting).
The routes reach it through `current(request)`; nothing here is global."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field, replace

from fastapi import Request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..engine import Engine, EngineDeadError, Event, QueueFullError
from ..errors import LanternError
from ..generation.generate import ContextLengthError
from ..generation.guide import GuideSpec
from ..generation.sampling import SamplingParams
from .errors import APIError


@dataclass
class ServerConfig:
    served_name: str
    aliases: tuple[str, ...] = ()
    api_keys: tuple[str, ...] = ()           # any of them opens the /v1 routes; none: no key needed
    max_batch: int = 8
    max_queue: int = 64
    context: int = 2048
    max_body_bytes: int = 4 * 1024 * 1024
    prefill_chunk: int = 512
    public_metrics: bool = False             # /metrics without the API key (it is behind the key otherwise)
    kv_cache_bytes: int | None = None        # the KV pool's budget (None: max_batch sequences of `context`)
    prefix_caching: bool = True
    prefix_cache_per_key: bool = False       # requests share cached prompt blocks only under the same API key
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
        self.queue_depth = Gauge("lantern_queue_depth", "Requests waiting for a place in the batch", registry=r)
        self.running = Gauge("lantern_running_sequences", "Sequences in the running batch", registry=r)
        self.steps = Counter("lantern_engine_steps", "Engine steps taken (a prefill chunk and/or a batched decode)",
                             registry=r)
        self.timeouts = Counter("lantern_requests_timed_out", "Requests stopped by --request-timeout", registry=r)
        # Mirrors of the engine's own counters (gauges set from its snapshot at each scrape).
        self.preemptions = Gauge("lantern_preemptions_total", "Sequences preempted (KV pool full) and recomputed",
                                 registry=r)
        self.kv_capacity = Gauge("lantern_kv_cache_capacity_bytes", "The KV pool's budget", registry=r)
        self.kv_used = Gauge("lantern_kv_cache_used_bytes", "KV blocks held by running sequences", registry=r)
        self.kv_cached = Gauge("lantern_kv_cache_cached_bytes", "Unreferenced KV blocks kept for prefix reuse",
                               registry=r)
        self.prefix_queries = Gauge("lantern_prefix_cache_query_tokens_total", "Prompt tokens admitted", registry=r)
        self.prefix_hits = Gauge("lantern_prefix_cache_hit_tokens_total",
                                 "Prompt tokens served from the prefix cache (hit rate = hits / queries)", registry=r)
        self.ttft = Histogram("lantern_time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.itl = Histogram("lantern_inter_token_latency_seconds", "Time between tokens of a stream", registry=r,
                             buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5))

    def observe(self, name: str, value: float) -> None:
        (self.ttft if name == "time_to_first_token" else self.itl).observe(value)


@dataclass(frozen=True)
class ServedModel:
    """A model this server answers for, under its name and aliases."""

    name: str
    llm: object                       # lanternlm.api.LLM
    aliases: tuple[str, ...] = ()
    embedding: bool = False           # answers /v1/embeddings (an encoder always; a decoder when marked)
    pooling: str | None = None        # how a decoder that embeds pools its hidden states: "last" or "mean"

    @property
    def generates(self) -> bool:
        return getattr(self.llm, "kind", "generate") == "generate"

    def answers_to(self, name: str) -> bool:
        return name == self.name or name in self.aliases


@dataclass
class ServerState:
    llm: object                       # lanternlm.api.LLM: the main (-m) model, its tokenizer and template
    config: ServerConfig
    models: list[ServedModel] = field(default_factory=list)  # every model served, the main one first
    metrics: Metrics = field(default_factory=Metrics)
    engine: Engine | None = None      # set while the app runs (its lifespan)
    steps_seen: int = 0               # engine steps already mirrored into metrics.steps
    # Set once a client has been told that the engine is dead (/health's 503, a request's): a server that
    # exits when its engine dies (tensor parallelism: cli.py) waits for that, or a while, so the reason is seen.
    dead_reported: threading.Event = field(default_factory=threading.Event)
    # Forwards outside the engine (lens, attention, embeddings) run one at a time beside it: a burst of them
    # queues here instead of starting a thread each.
    side_work: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(1))

    def running_engine(self) -> Engine:
        eng = self.engine
        if eng is None or eng.dead:
            self.dead_reported.set()
            raise APIError(503, f"the engine is not running{': ' + eng.dead if eng and eng.dead else ''}",
                           "server_error", code="engine_dead")
        return eng

    def engine_failed(self, reason: str) -> None:
        """The engine's work cannot go on (a tensor-parallel rank failed while it idled): from now on it answers
        with `reason` (/health and requests: 503). A reason the engine gave itself stays."""
        if self.engine is not None and not self.engine.dead:
            self.engine.dead = reason

    def find(self, name: str) -> ServedModel:
        for served in self.models:
            if served.answers_to(name):
                return served
        names = ", ".join(repr(m.name) for m in self.models)
        raise APIError(404, f"the model {name!r} does not exist; this server serves {names}", param="model",
                       code="model_not_found")

    def check_model(self, name: str) -> None:
        """A model that generates (chat, completions, the look-inside routes)."""
        if not self.find(name).generates:
            raise APIError(400, f"the model {name!r} is an embedding model: it answers /v1/embeddings, not "
                                "chat or completions", param="model", code="wrong_model_type")

    def embedding_model(self, name: str) -> ServedModel:
        served = self.find(name)
        if not served.embedding:
            raise APIError(400, f"the model {name!r} does not serve embeddings (serve an embedding model with "
                                "--embedding-model, or mark this one with --embedding)", param="model",
                           code="wrong_model_type")
        return served

    def token_text(self, token_id: int) -> str:
        return self.llm.tokenizer.decode([token_id])

    def params_for(self, req, max_tokens: int | None, seed_offset: int) -> SamplingParams:
        bias = {int(k): v for k, v in (req.logit_bias or {}).items()}
        if any(not 0 <= k < self.llm.config.vocab_size for k in bias):
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
        return params.with_defaults(self.llm.generation_config)

    def submit(self, prompts: list[list[int]], req, max_tokens: int | None, logprobs: int | None,
               prompt_logprobs: int | None, param: str, guide: GuideSpec | None = None,
               keep_special_tokens: bool = False, api_key_id: str | None = None) -> tuple[asyncio.Queue, list[str]]:
        """Submit n choices for each prompt; events arrive on one queue as (choice index, Event), choice
        index = prompt index * n + j, as OpenAI numbers a batch's choices. Call on the event loop.
        `guide` constrains every choice (each walks its own copy). `api_key_id`: which key the request came
        with (see Guard), the prefix cache's partition when it is partitioned per key."""
        eng = self.running_engine()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        request_ids: list[str] = []
        if len(prompts) * req.n > self.config.max_queue:
            raise APIError(400, f"{len(prompts)} prompt(s) x n={req.n} is more than this server queues at once "
                                f"({self.config.max_queue})", param=param)
        all_params = [self.params_for(req, max_tokens, j) for j in range(req.n)]
        if keep_special_tokens:  # a tool call's trigger is a special token (see ChatPlan.keep_special_tokens)
            all_params = [replace(p, skip_special_tokens=False) for p in all_params]
        trace = req.lantern.top_k if req.lantern and req.lantern.trace else None
        salt = getattr(req, "cache_salt", None)
        if self.config.prefix_cache_per_key and api_key_id is not None:
            salt = f"key:{api_key_id}\x00{salt or ''}"  # a tenant's own salt partitions further within its key
        try:
            for p, ids in enumerate(prompts):
                for j, params in enumerate(all_params):

                    def deliver(event: Event, i=p * req.n + j):
                        loop.call_soon_threadsafe(queue.put_nowait, (i, event))

                    request_ids.append(eng.submit(ids, params, deliver, logprobs=logprobs, trace_top_k=trace,
                                                  prompt_logprobs=prompt_logprobs, guide=guide,
                                                  salt=salt))
        except ContextLengthError as e:
            self.abort(request_ids, count=False)
            raise APIError(400, str(e), param=param, code="context_length_exceeded") from None
        except QueueFullError as e:
            self.abort(request_ids, count=False)
            raise APIError(429, str(e), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) \
                from None
        except EngineDeadError as e:
            self.abort(request_ids, count=False)
            self.dead_reported.set()
            raise APIError(503, str(e), "server_error", code="engine_dead") from None
        except LanternError as e:
            self.abort(request_ids, count=False)
            raise APIError(400, str(e), param=param) from None
        self.metrics.prompt_tokens.inc(sum(len(ids) for ids in prompts) * req.n)
        return queue, request_ids

    def abort(self, request_ids: list[str], count: bool = True) -> None:
        if self.engine is not None:
            for rid in request_ids:
                self.engine.abort(rid)
            if count:
                self.metrics.aborted.inc(len(request_ids))


def current(request: Request) -> ServerState:
    """The state of the app serving this request."""
    return request.app.state.lantern


def api_key_id(request: Request) -> str | None:
    """Which API key the request came with (set by the Guard), or None when the server needs no key."""
    return getattr(request.state, "api_key_id", None)


def check_stream_options(req) -> None:
    """pydantic checks each field alone; this one spans two."""
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
