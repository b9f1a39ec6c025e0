"""Rank 0 and the workers at the level of one model forward.

Rank 0's sharded model is wrapped in a `Driver`: it is called exactly as `CausalLM` is (the engine, `generate`
and the API do not know), and each call first goes to the other ranks as ONE message, then runs on rank 0's own
shard. Every other rank runs `serve_forwards`: receive a call, run the same forward on its shard with the same
inputs (the model's collectives need every rank in lockstep), drop the logits, repeat until "stop".

Keys and values live in caches that rank 0's callers make (`PagedKVCache(model.config, blocks, block size,
dtype, compute dtype)`: the engine one, `generate` one per call). The first message that uses a cache carries
its shape, and each worker makes its own with the same parameters over its shard's config (its own KV heads).
When rank 0's cache is garbage-collected, its key rides on the next message and the workers free theirs.

One message, an int64 tensor broadcast from rank 0 on the `control` group (launch.py), laid out as:

    header (HEADER values):
      0 kind (STEP or STOP)        1 total length of the message, header included
      2 cache key (0: no cache)    3-6 a cache seen for the first time: blocks, block size, dtype, compute dtype
      7 R: caches released         8-9 B, T: the shape of input_ids
      10 positions given (0/1)     11 W: block table width (-1: no tables)
      12 logits_to_keep            13-15 unused (zero)
    body: R released cache keys, B*T ids, B*T positions (if given), B*W block table entries

The buffer has a fixed size (`CAPACITY` values, 32 KiB): a broadcast's size has to be known by the receivers,
and one collective per step is the point. A gloo broadcast between two local processes took 0.15-0.9 ms on the
project's 2-core VM (busy; two runs), with no trend from 128 B to 128 KiB: the cost is waking the peer, not the
bytes, so a size-then-payload pair would cost twice a fixed buffer. A decode step of 8 sequences with 256-block
tables is ~2,100 values. A longer message (a long prompt's prefill in one forward) sends the rest in a second
broadcast whose size the first one gives; that forward costs far more than a message anyway.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import deque
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import LanternError
from ..models.kv_cache import PagedKVCache
from .launch import STEP_TIMEOUT, Ranks, TensorParallelError

log = logging.getLogger("lanternlm.distributed")

STEP, STOP = 1, 2
HEADER = 16
CAPACITY = 4096
STOP_WAIT = timedelta(seconds=5)  # for idle workers to take "stop"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # a cache's dtypes travel as their index here


class Driver:
    """Rank 0's model: a sharded CausalLM whose every call is first sent to the other ranks. Same call, same
    `config` (the shard's: its KV heads size the caches), `dtype` and `device`. One call at a time (the engine's
    thread and a side request may both call): the ranks must see the calls in one order."""

    def __init__(self, model, ranks: Ranks):
        if ranks.rank != 0:
            raise ValueError("the Driver runs on rank 0; other ranks run serve_forwards")
        self.shard, self.ranks = model, ranks
        self.stopped = False
        self.interrupted = False  # Ctrl-C inside a step: the workers cannot take "stop" any more
        self._lock = threading.Lock()
        self._buffer = torch.zeros(CAPACITY, dtype=torch.int64, device=ranks.device)
        self._keys: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # rank 0's caches -> their keys
        self._next_key = 1
        self._released: deque[int] = deque()  # filled by finalizers, on whatever thread collects a cache
        self._guarded(lambda: _ready(ranks))

    # ------------------------------------------------------------------ what callers read

    @property
    def config(self):
        return self.shard.config

    @property
    def dtype(self) -> torch.dtype:
        return self.shard.dtype

    @property
    def device(self) -> torch.device:
        return self.shard.device

    @property
    def model(self):
        """Refused: a module of the shard called on rank 0 alone would wait forever in its collective."""
        raise LanternError("the model's inner layers (logit lens, attention weights, embeddings, inspect) are not "
                           "available with tensor parallelism: run without --tensor-parallel for them")

    lm_head = model  # the same refusal

    # ------------------------------------------------------------------ the call

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                 cache: PagedKVCache | None = None, slots: torch.Tensor | None = None, logits_to_keep: int = 0,
                 output_hidden_states: bool = False, output_attentions: bool = False):
        if output_attentions or output_hidden_states:  # refused before the workers see the call
            raise LanternError("hidden states and attention weights are not available with tensor parallelism")
        if cache is not None and not isinstance(cache, PagedKVCache):
            raise TypeError("a tensor-parallel forward takes a PagedKVCache")
        if slots is not None and not isinstance(slots, torch.Tensor):
            raise TypeError("a tensor-parallel forward takes block tables (a tensor) as slots")
        with self._lock:
            try:
                return self._guarded(lambda: self._step(input_ids, positions, cache, slots, logits_to_keep))
            except KeyboardInterrupt:  # the workers are left inside this step, waiting for this rank
                self.interrupted = True
                raise

    forward = __call__

    def stop(self) -> bool:
        """Tell the workers to leave their loop; whether they took it (not when the group failed, a step was
        interrupted, or they did not within STOP_WAIT: then they are to be killed). Nothing can be called after."""
        with self._lock:
            if self.stopped or self.interrupted or self.ranks.failed is not None:
                self.stopped = True
                return False
            self.stopped = True
            header = torch.zeros(HEADER, dtype=torch.int64)
            header[0], header[1] = STOP, HEADER
            try:
                self._send(header, wait=STOP_WAIT)
            except RuntimeError as e:
                log.debug("stop not delivered: %s", e)
                return False
            return True

    # ------------------------------------------------------------------ inside

    def _step(self, input_ids, positions, cache, slots, logits_to_keep):
        self._send(self._message(input_ids, positions, cache, slots, logits_to_keep))
        return self.shard(input_ids, positions, cache, slots=slots, logits_to_keep=logits_to_keep)

    def _guarded(self, work):
        """Run `work`; a failure of the group becomes the one-line reason (which rank died, when it did)."""
        if self.ranks.failed is not None:
            raise TensorParallelError(self.ranks.failed)
        if self.stopped:
            raise TensorParallelError("the tensor-parallel ranks were stopped")
        if self.interrupted:
            raise TensorParallelError("a step was interrupted, and the tensor-parallel ranks are out of step")
        try:
            return work()
        except RuntimeError as e:
            if isinstance(e, LanternError):
                raise
            text = " ".join(str(e).split())
            reason = self.ranks.cause(wait=2.0) or (
                f"a tensor-parallel rank took no part in a step for {STEP_TIMEOUT.seconds} s (hung)"
                if "timed out" in text.lower() else f"the tensor-parallel group failed: {text[:300]}")
            raise TensorParallelError(self.ranks.fail(reason)) from None

    def _message(self, input_ids, positions, cache, slots, logits_to_keep) -> torch.Tensor:
        header = [0] * HEADER
        header[0] = STEP
        if cache is not None:
            key = self._keys.get(cache)
            if key is None:
                key, self._next_key = self._next_key, self._next_key + 1
                self._keys[cache] = key
                weakref.finalize(cache, self._released.append, key)
                header[3:7] = [cache.num_blocks, cache.block_size, DTYPES.index(cache.dtype),
                               DTYPES.index(cache.compute_dtype)]
            header[2] = key
        released = []
        while self._released:
            released.append(self._released.popleft())
        B, T = input_ids.shape
        header[7], header[8], header[9] = len(released), B, T
        header[10] = int(positions is not None)
        header[11] = -1 if slots is None else slots.shape[1]
        header[12] = logits_to_keep
        device = self._buffer.device
        parts = [torch.tensor(header, dtype=torch.int64), torch.tensor(released, dtype=torch.int64)]
        parts = [p.to(device) for p in parts] + [input_ids.reshape(-1)]
        if positions is not None:
            parts.append(positions.expand(B, T).reshape(-1))
        if slots is not None:
            parts.append(slots.reshape(-1))
        parts = [p.to(device=device, dtype=torch.int64) for p in parts]
        total = sum(p.numel() for p in parts)
        flat = torch.cat(parts)
        flat[1] = total
        return flat

    def _send(self, message: torch.Tensor, wait: timedelta = STEP_TIMEOUT) -> None:
        """One broadcast (two for a message longer than the buffer), each bounded by `wait`: a worker that does
        not take it has hung."""
        n = message.numel()
        head = min(n, CAPACITY)
        self._buffer[:head] = message[:head]
        _broadcast(self._buffer, self.ranks, wait=wait)
        if n > CAPACITY:
            _broadcast(message[CAPACITY:].contiguous(), self.ranks, wait=wait)


def serve_forwards(model, ranks: Ranks) -> None:
    """A worker rank's loop: run each forward rank 0 sends on this rank's shard, until "stop". Raises
    TensorParallelError when rank 0 goes away (its broadcast fails)."""
    if ranks.rank == 0:
        raise ValueError("rank 0 drives; serve_forwards runs on the other ranks")
    try:
        _ready(ranks)
    except RuntimeError as e:
        raise TensorParallelError(f"rank {ranks.rank}: rank 0 went away before the first step "
                                  f"({' '.join(str(e).split())[:200]})") from None
    buffer = torch.zeros(CAPACITY, dtype=torch.int64, device=ranks.device)
    caches: dict[int, PagedKVCache] = {}
    with torch.inference_mode():
        while True:
            try:
                _broadcast(buffer, ranks)
                header = buffer[:HEADER].tolist()
                message = buffer
                if header[1] > CAPACITY:
                    rest = torch.empty(header[1] - CAPACITY, dtype=torch.int64, device=ranks.device)
                    _broadcast(rest, ranks)
                    message = torch.cat([buffer, rest])
            except RuntimeError as e:
                raise TensorParallelError(f"rank {ranks.rank}: rank 0 went away "
                                          f"({' '.join(str(e).split())[:200]})") from None
            if header[0] == STOP:
                return
            try:
                _run(model, ranks, caches, header, message)
            except RuntimeError as e:  # a collective inside the forward: a peer went away mid-step
                raise TensorParallelError(f"rank {ranks.rank}: a step failed "
                                          f"({' '.join(str(e).split())[:200]})") from None


def _run(model, ranks: Ranks, caches: dict[int, PagedKVCache], header: list[int], message: torch.Tensor) -> None:
    """One forward as rank 0 described it; the logits are rank 0's business."""
    key, blocks, block_size, dtype, compute = header[2:7]
    released, B, T, has_positions, W, logits_to_keep = header[7:13]
    at = HEADER
    for k in message[at:at + released].tolist():
        caches.pop(k, None)
    at += released
    if blocks:  # first sight of a cache: the same shape over this rank's config (its own KV heads)
        caches[key] = PagedKVCache(model.config, blocks, block_size, DTYPES[dtype], DTYPES[compute], ranks.device)
    ids = message[at:at + B * T].view(B, T)
    at += B * T
    positions = None
    if has_positions:
        positions = message[at:at + B * T].view(B, T)
        at += B * T
    slots = None if W < 0 else message[at:at + B * W].view(B, W)
    model(ids, positions, caches.get(key) if key else None, slots=slots, logits_to_keep=logits_to_keep)


def _ready(ranks: Ranks) -> None:
    """Every rank has loaded its shard. No time limit (a big shard loads as long as it takes), but a rank that
    dies meanwhile closes its sockets and breaks the barrier at once."""
    dist.barrier(group=ranks.control)


def _broadcast(tensor: torch.Tensor, ranks: Ranks, wait: timedelta | None = None) -> None:
    if wait is None:
        dist.broadcast(tensor, 0, group=ranks.control)
    else:
        dist.broadcast(tensor, 0, group=ranks.control, async_op=True).wait(timeout=wait)
