"""Tensor parallelism on this machine: one process (TP=1) against the model split over N ranks (TP=N), the same
file and greedy tokens, one run after the other.

    .venv/bin/python -m bench.tp                                  # the default model, TP 1 and 2
    .venv/bin/python -m bench.tp --model path/to/model.gguf --tp 1,2 --repeats 3

For each TP it reports:
- prefill (tok/s over a `--prompt`-token prompt, the time to its first token) and decode (tok/s over `--tokens`
  greedy tokens), the median of `--repeats` runs after a warm-up, through `LLM(..., tensor_parallel=N)`: rank 0
  is this process, the other ranks are the processes it starts (each on its own share of the cores);
- communication per decode step: the time rank 0 spends inside torch.distributed's collectives (the model's
  all-reduces and all-gathers, and the driver's one broadcast per step), counted by wrapping them in this process;
  the rest of the step is compute (and the waits for the slowest rank that a collective absorbs);
- memory per rank: the resident set of every rank's process after the runs (`VmRSS`), and the part of it that
  is model weights (the sum of the model's tensors on rank 0).

On a 2-core machine TP=2 cannot be faster: the two ranks share the cores one process already uses, and every
layer adds two all-reduces. What it shows is what a split costs and what it saves (memory per rank); the README
works out from these figures what TP gives where ranks have cores and memory bandwidth of their own.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from lanternlm import LLM, SamplingParams
from lanternlm.store import resolve

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_single", "broadcast")


class CommClock:
    """Wraps torch.distributed's collectives in this process and adds up the time spent inside them."""

    def __init__(self):
        self.seconds, self.calls = 0.0, 0
        self._originals = {}

    def __enter__(self) -> "CommClock":
        for name in COLLECTIVES:
            original = getattr(dist, name)
            self._originals[name] = original

            def timed(*args, _original=original, **kwargs):
                start = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - start
                    self.calls += 1
            setattr(dist, name, timed)
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def weights_mb(model) -> float:
    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    for module in model.modules():  # quantized layers keep their blocks as plain tensor attributes
        tensors += [t for t in vars(module).values() if isinstance(t, torch.Tensor)]
        blocks = getattr(module, "weight_blocks", None)
        if callable(blocks):
            tensors += blocks().tensors()
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.device.type != "meta" and key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total / 2**20


def measure(path: str, tp: int, prompt_len: int, tokens: int, repeats: int, clock: CommClock) -> dict:
    llm = LLM(path, tensor_parallel=tp)
    try:
        vocab = llm.config.vocab_size
        prompt = [(7919 * i + 13) % (vocab - 10) + 5 for i in range(prompt_len)]  # fixed, no special tokens
        greedy = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        first = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        llm.generate(prompt[:32], greedy)  # warm-up: kernels, the decode stack, the workers' caches
        prefill, decode, comm_share, comm_step, calls = [], [], [], [], []
        for _ in range(repeats):
            start = time.perf_counter()
            llm.generate(prompt, first)
            prefill.append(prompt_len / (time.perf_counter() - start))
            stamps = []
            for _step in llm.stream_ids(prompt[:16], greedy):
                stamps.append(time.perf_counter())
                if len(stamps) == 1:  # the prompt's forward is done: count the decode steps' collectives only
                    clock.reset()
            steps = len(stamps) - 1  # one forward per token after the first
            elapsed = stamps[-1] - stamps[0]
            decode.append(steps / elapsed)
            comm_step.append(clock.seconds / steps * 1e3)
            comm_share.append(clock.seconds / elapsed)
            calls.append(clock.calls / steps)
        ranks = [os.getpid()] + (llm.ranks.pids if llm.ranks else [])
        return {"tp": tp, "prefill": statistics.median(prefill), "decode": statistics.median(decode),
                "comm_ms": statistics.median(comm_step), "comm_share": statistics.median(comm_share),
                "calls": statistics.median(calls), "rss": [rss_mb(pid) for pid in ranks],
                "weights": weights_mb(getattr(llm.model, "shard", llm.model))}  # TP: the Driver's own shard
    finally:
        close = getattr(llm, "close", None)
        if close:
            close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--tp", default="1,2", help="comma-separated rank counts (default 1,2)")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--force", action="store_true", help="time even when the 1-minute load average is above 0.5")
    args = p.parse_args(argv)
    load = os.getloadavg()[0]
    if load > 0.5 and not args.force:
        print(f"bench.tp: the 1-minute load average is {load:.2f} (> 0.5): something else is using the CPU; wait "
              "for `uptime` to show it below 0.5, or pass --force", file=sys.stderr)
        return 2
    path = str(resolve(args.model))
    rows = []
    with CommClock() as clock:
        for tp in (int(t) for t in args.tp.split(",")):
            rows.append(measure(path, tp, args.prompt, args.tokens, args.repeats, clock))
            print(f"bench.tp: TP={tp} done", file=sys.stderr)
    base = rows[0]
    print(f"{os.path.basename(path)}, {os.cpu_count()} CPUs, median of {args.repeats}; ratios against TP={base['tp']}")
    print("| TP | pp{0} tok/s | tg{1} tok/s | comm per decode step | comm share of a step | collectives per step "
          "| weights on rank 0 MiB | RSS per rank MiB |".format(args.prompt, args.tokens))
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tp']} | {r['prefill']:.1f} ({r['prefill'] / base['prefill']:.2f}x) | "
              f"{r['decode']:.1f} ({r['decode'] / base['decode']:.2f}x) | {r['comm_ms']:.2f} ms | "
              f"{100 * r['comm_share']:.0f}% | {r['calls']:.0f} | {r['weights']:.1f} | "
              f"{' / '.join(f'{m:.0f}' for m in r['rss'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
