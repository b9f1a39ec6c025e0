"""The serving engine: continuous batching in one background thread.

Each step admits waiting requests while KV blocks are free, prefills chunks of several prompts in one forward
(at most `prefill_chunk` tokens, so a long prompt cannot stall running streams for long), then decodes every
running sequence together in one batched forward: weights are read once per step for all of them. Sequences join and leave between steps.

The seams, as in nano-vllm: `scheduler.Scheduler` decides who runs (admission by free blocks, preemption),
`block_manager.BlockManager` owns the blocks, their prefix keys and references, `runner.ModelRunner` turns a
batch into one forward over the paged cache (`models/kv_cache.py`) through the sequences' block tables,
`sequence.Sequence` holds one request's state, and `Chooser` (in generation/) picks each token. This file
is the thread, the public calls, and the events.

Front ends call `submit` (thread-safe) with a callback that receives Events; the callback runs on the
engine thread and must only hand the event over (e.g. to an asyncio queue), never block.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import LanternError
from ..generation.choose import Chooser
from ..generation.generate import ContextLengthError, OutputStream, plan_lengths
from ..generation.guide import GuideSpec
from ..generation.sampling import SamplingParams, make_generator, token_logprobs
from ..kernels import serial_torch_ops
from ..model import CausalLM
from ..models.kv_cache import BLOCK_SIZE, PagedKVCache
from ..text.tokenizer import Tokenizer
from .block_manager import BlockManager
from .runner import ModelRunner
from .scheduler import SCORING_CHUNK, QueueFullError, Scheduler
from .sequence import Event, Sequence

log = logging.getLogger("lanternlm.engine")

__all__ = ["Engine", "EngineDeadError", "EngineStats", "QueueFullError", "SCORING_CHUNK"]


class EngineDeadError(LanternError):
    """The engine thread stopped after an internal failure."""


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    requests_total: int = 0
    requests_finished: int = 0
    requests_aborted: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    steps_total: int = 0                # engine steps taken (each: one batched prefill and/or one batched decode)
    preemptions_total: int = 0          # sequences sent back to the queue when the KV pool ran out
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0             # referenced by running sequences
    kv_blocks_cached: int = 0           # unreferenced, kept for prefix reuse (evicted first come, first out)
    kv_bytes_per_block: int = 0
    prefix_query_tokens: int = 0        # prompt tokens admitted (re-admissions after preemption included)
    prefix_hit_tokens: int = 0          # of those, served from the prefix cache


class Engine:
    def __init__(self, model: CausalLM, tokenizer: Tokenizer, context: int, max_batch: int = 8,
                 max_queue: int = 64, prefill_chunk: int = 512, device: torch.device | str = "cpu",
                 observer: Callable[[str, float], None] | None = None, kv_cache_bytes: int | None = None,
                 kv_dtype: torch.dtype | None = None, block_size: int = BLOCK_SIZE, prefix_caching: bool = True):
        """`kv_cache_bytes`: the KV pool's budget (default: room for max_batch sequences of `context` tokens);
        its pages are touched only as blocks are used. `kv_dtype`: the pool's element type (default: the
        model's)."""
        self.model, self.tokenizer = model, tokenizer
        self.context, self.max_batch, self.max_queue, self.prefill_chunk = context, max_batch, max_queue, prefill_chunk
        self.device = torch.device(device)
        kv_dtype = kv_dtype or model.dtype
        per_block = PagedKVCache.block_bytes(model.config, block_size, kv_dtype)
        budget = kv_cache_bytes if kv_cache_bytes is not None else max_batch * -(-context // block_size) * per_block
        num_blocks = budget // per_block
        if num_blocks < 1:
            raise LanternError(f"the KV cache budget of {budget:,} bytes is less than one block ({per_block:,} bytes)")
        self.kv_cache = PagedKVCache(model.config, num_blocks, block_size, kv_dtype, model.dtype, self.device)
        self.blocks = BlockManager(num_blocks, block_size)
        self.runner = ModelRunner(model, self.kv_cache, self.blocks, self.device)
        config = model.config
        window = config.sliding_window if all(t == "sliding_attention" for t in config.layer_types) else None
        self.scheduler = Scheduler(max_batch, max_queue, self.blocks, prefix_caching, window)
        self.observer = observer            # (metric name, value): time_to_first_token, inter_token_latency
        self.stats = EngineStats()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._aborts: set[str] = set()
        self._stop = False
        self.dead: str | None = None
        self._thread = threading.Thread(target=self._loop, name="lantern-engine", daemon=True)

    @property
    def kv_capacity_bytes(self) -> int:
        return self.blocks.num_blocks * self.kv_cache.bytes_per_block

    # ------------------------------------------------------------------ public, thread-safe

    def start(self) -> "Engine":
        self._thread.start()
        return self

    def submit(self, prompt_ids: list[int], params: SamplingParams, on_event: Callable[[Event], None],
               request_id: str | None = None, logprobs: int | None = None, trace_top_k: int | None = None,
               prompt_logprobs: int | None = None, guide: GuideSpec | None = None, salt: str | None = None) -> str:
        """Queue a request; raises ContextLengthError / QueueFullError / EngineDeadError at once.
        `logprobs` / `prompt_logprobs`: report the generated / prompt tokens' logprobs with this many
        alternatives each. `guide`: what the tokens are constrained to (grammar, thinking budget). `salt`: the
        prefix-cache partition (requests share cached prompt blocks only under equal salts)."""
        max_new = plan_lengths(len(prompt_ids), params, self.context)
        capacity = self.blocks.num_blocks * self.blocks.block_size
        if len(prompt_ids) + max_new > capacity:
            raise ContextLengthError(f"the prompt ({len(prompt_ids)} tokens) and up to {max_new} new tokens need "
                                     f"more KV cache than this server holds ({capacity} tokens)")
        if self.dead:
            raise EngineDeadError(f"the engine stopped: {self.dead}")
        chooser = Chooser(params, make_generator(params.seed),
                          guide.start(self.tokenizer, self.model.config.vocab_size) if guide is not None else None,
                          trace_top_k)
        seq = Sequence(request_id or Sequence.new_id(), list(prompt_ids),
                       OutputStream(self.tokenizer, params, prompt_ids, max_new), chooser,
                       on_event, logprobs=logprobs, prompt_logprobs=prompt_logprobs, salt=salt)
        with self._lock:
            self.scheduler.add(seq)
            self.stats.requests_total += 1
            self._wake.notify()
        return seq.request_id

    def abort(self, request_id: str) -> None:
        """Stop a request (client gone): its blocks are freed before the next step."""
        with self._lock:
            self._aborts.add(request_id)
            self._wake.notify()

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Finish the steps in flight, abort what remains, and stop the thread."""
        with self._lock:
            self._stop = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def snapshot(self) -> EngineStats:
        with self._lock:
            self.stats.running = len(self.scheduler.running)
            self.stats.waiting = len(self.scheduler.waiting)
            b = self.blocks
            self.stats.kv_blocks_total, self.stats.kv_blocks_used = b.num_blocks, b.num_used
            self.stats.kv_blocks_cached, self.stats.kv_bytes_per_block = b.num_cached, self.kv_cache.bytes_per_block
            self.stats.prefix_query_tokens, self.stats.prefix_hit_tokens = b.query_tokens, b.hit_tokens
            return EngineStats(**vars(self.stats))

    # ------------------------------------------------------------------ engine thread

    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self._lock:
                        while not self._stop and self.scheduler.idle and not self._aborts:
                            self._wake.wait()
                        if self._stop:
                            break
                    self.step()
        except LanternError as e:  # a failure that says what it is (a tensor-parallel rank gone): one line
            log.error("engine stopped: %s", e)
            self.dead = f"{type(e).__name__}: {e}"
        except Exception as e:  # keep serving errors visible: /health turns 503 and every request ends
            log.exception("engine failure")
            self.dead = f"{type(e).__name__}: {e}"
        with self._lock:
            leftovers = self.scheduler.drain()
        for seq in leftovers:
            self._emit(seq, Event(seq.request_id, error=self.dead or "the server is shutting down"))

    def step(self) -> None:
        """One engine step: aborts, admission, one batched prefill, one batched decode, releases."""
        with self._lock:  # the waiting queue is shared with submit(); the running batch is this thread's
            aborts, self._aborts = self._aborts, set()
            self.stats.requests_aborted += self.scheduler.abort(aborts)
        self._release()
        with self._lock:
            self.scheduler.admit()
        if not self.scheduler.running:  # everything was aborted: no forward at all
            return
        self.stats.steps_total += 1
        prefills = self.scheduler.prefills(self.prefill_chunk)
        if prefills:
            for (seq, count), logits in zip(prefills, self.runner.prefill(prefills)):
                self._prefilled(seq, logits, count)
        decoding = self.scheduler.decoding()
        if decoding:
            for seq, row in zip(decoding, self.runner.decode(decoding)):
                self.scheduler.written(seq, seq.length)  # the fed token's keys are in; the new one's are not
                self._sample_and_emit(seq, row)
        self.stats.preemptions_total = self.scheduler.preemptions
        self._release()

    def _prefilled(self, seq: Sequence, logits: torch.Tensor, count: int) -> None:
        start = seq.computed
        if seq.scoring:
            if start == 0:
                seq.prompt_lp.append(None)  # nothing predicts the first token
            # Row j predicts prompt token start + j + 1; the chunk's last row predicts the next chunk's first.
            targets = seq.prompt_ids[start + 1:start + 1 + count]
            seq.prompt_lp.extend(token_logprobs(logits[:len(targets)], targets, seq.prompt_logprobs))
        seq.computed += count
        self.stats.prompt_tokens_total += count
        self.scheduler.written(seq, seq.computed)
        if not seq.prefilling:  # the prompt is in: its last logits give the first token
            self._sample_and_emit(seq, logits[-1])

    def _sample_and_emit(self, seq: Sequence, logits: torch.Tensor) -> None:
        try:
            token, trace = seq.chooser.choose(logits, seq.prompt_ids, seq.stream.output_ids, self.tokenizer)
        except LanternError as e:  # this request's own failure (its grammar gave up): it ends, the rest go on
            log.warning("request %s stopped: %s", seq.request_id, e)
            seq.aborted = True
            self._emit(seq, Event(seq.request_id, error=str(e), request_error=True))
            return
        step = seq.stream.append(token, trace)
        now = time.monotonic()
        if self.observer:
            if seq.first_token_at is None:
                self.observer("time_to_first_token", now - seq.arrived)
            else:
                self.observer("inter_token_latency", now - seq.last_token_at)
        seq.first_token_at = seq.first_token_at or now
        seq.last_token_at = now
        self.stats.generation_tokens_total += 1
        event = Event(seq.request_id, step, trace=trace)
        if seq.logprobs is not None:  # of the model's own distribution, before sampling transforms (as vLLM)
            with serial_torch_ops():  # one row: see Chooser.choose
                [(event.logprob, _, event.top_logprobs)] = token_logprobs(logits[None], [token], seq.logprobs)
        if len(seq.stream.output_ids) == 1:
            event.cached_tokens = seq.cached_tokens
            if seq.prompt_logprobs is not None:
                event.prompt_logprobs = seq.prompt_lp
        self._emit(seq, event)

    def _emit(self, seq: Sequence, event: Event) -> None:
        try:
            seq.on_event(event)
        except Exception:  # a consumer's failure must not take the engine down
            log.exception("event callback failed for %s", seq.request_id)
            seq.aborted = True

    def _release(self) -> None:
        for seq in self.scheduler.release_finished():
            if seq.aborted and not seq.finished:
                self.stats.requests_aborted += 1
            else:
                self.stats.requests_finished += 1
