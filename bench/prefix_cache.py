"""The paged KV cache and prefix caching, measured on the default model (issue 14), in one run:

1. A 10-turn chat whose history reaches about 2,000 tokens: time to first token of the 10th turn with the
   prefix cache on and off (each turn a fresh request with the whole history, as clients send it).
2. 32 requests sharing a 1,000-token system prompt, submitted together: aggregate time to first token (the
   time until every request has its first token) on and off.
3. KV bytes per token of the default model in float32, bf16 and int8, and what 1 GiB holds.
4. Idle RSS of `lantern serve` with its defaults (batch 8, context 4096), pages of the pool untouched.
5. Greedy agreement on the fast path, cold vs cached: the cached run prefills fewer rows at once, which may
   round differently; reported over 20 prompts.
6. What bf16 storage does to the fast path's tokens: greedy, 20 prompts x 64 tokens, KV in float32 vs bf16.
7. A burst of 16 short distinct prompts (about 30 tokens each) submitted together: time until every one has
   its first token, with their prefills batched into one forward vs one prompt per step (the engine before
   issue 14's batched prefill, emulated by keeping only the first of each step's prefills).

`python -m bench.prefix_cache` (the engine runs in this process for 1, 2 and 5; 4 starts a server). Writes
bench/results/prefix-<time>.json. Time it only on an idle machine (`uptime`).
"""

from __future__ import annotations

import threading
import time

import torch

from .serverproc import Server, machine, write_result

WORDS = ("river mountain library engine garden theory planet market signal language harbor winter protein "
         "circuit orchestra desert bridge archive lantern compass").split()


def filler(n_words: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n_words,), generator=g))


def first_token_times(engine, prompts: list[list[int]], max_tokens: int = 1) -> list[float]:
    """Submit all prompts at once; seconds from submission to each one's first token."""
    from lanternlm.generation.sampling import SamplingParams
    start = time.perf_counter()
    times = [None] * len(prompts)
    done = threading.Semaphore(0)

    def on(i):
        def event(e):
            if times[i] is None:
                times[i] = time.perf_counter() - start
            if e.error or (e.step and e.step.finish_reason):
                done.release()
        return event

    for i, ids in enumerate(prompts):
        engine.submit(ids, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), on(i))
    for _ in prompts:
        done.acquire()
    return times


def greedy(engine, ids: list[int], tokens: int) -> list[int]:
    """One greedy request's token ids, `tokens` of them."""
    from lanternlm.generation.sampling import SamplingParams
    got, done = [], threading.Event()

    def on(e):
        got.append(e.step.token_id)
        if e.step.finish_reason:
            done.set()
    engine.submit(ids, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True), on)
    done.wait()
    return got


def equal_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens two runs share before their first difference."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def chat_turns(llm, turns: int = 10, target_tokens: int = 2000) -> list[list[int]]:
    """The prompts of a chat growing to ~target_tokens by the last turn (each answer stands in as text)."""
    history, prompts = [], []
    per_turn = target_tokens // turns
    for t in range(turns):
        history.append({"role": "user", "content": f"Turn {t}: " + filler(per_turn // 2 - 4, t)})
        prompts.append(llm.encode_chat(history))
        history.append({"role": "assistant", "content": filler(per_turn // 2 - 4, 100 + t)})
    return prompts


def main() -> None:
    torch.set_num_threads(2)
    from lanternlm.api import LLM
    from lanternlm.engine import Engine
    from lanternlm.models.kv_cache import PagedKVCache

    llm = LLM("smollm2-135m-instruct")
    results: dict = {"machine": machine()}

    def engine(caching: bool, **kw):
        return Engine(llm.model, llm.tokenizer, context=4096, prefill_chunk=512, prefix_caching=caching,
                      kv_dtype=llm.kv_dtype, **kw).start()  # as `lantern serve` runs it

    # 1. ten-turn chat
    prompts = chat_turns(llm)
    chat = {}
    for caching in (False, True):
        eng = engine(caching)
        try:
            per_turn = [first_token_times(eng, [p])[0] for p in prompts]
        finally:
            eng.shutdown()
        chat["on" if caching else "off"] = per_turn
    results["chat_turn10"] = {"prompt_tokens": len(prompts[-1]), "ttft_off_s": chat["off"][-1],
                              "ttft_on_s": chat["on"][-1], "speedup": chat["off"][-1] / chat["on"][-1]}

    # 2. shared system prompt
    system = {"role": "system", "content": filler(960, 999)}  # about 1,000 tokens
    shared = [llm.encode_chat([system, {"role": "user", "content": f"Question {i}: " + filler(12, i)}])
              for i in range(32)]
    agg = {}
    for caching in (False, True):
        eng = engine(caching, max_batch=8, max_queue=64)
        try:
            if caching:  # the system prompt is in the cache once one request has been served
                first_token_times(eng, shared[:1])
            times = first_token_times(eng, shared)
        finally:
            eng.shutdown()
        agg["on" if caching else "off"] = max(times)
    results["shared_system_prompt"] = {"requests": 32, "prompt_tokens": len(shared[0]),
                                       "all_first_tokens_off_s": agg["off"], "all_first_tokens_on_s": agg["on"],
                                       "speedup": agg["off"] / agg["on"]}

    # 3. bytes per token
    per_token = {name: PagedKVCache.block_bytes(llm.config, 1, dtype)
                 for name, dtype in (("float32", torch.float32), ("bf16", torch.bfloat16))}
    per_token["int8"] = per_token["bf16"] // 2  # one byte per value (scales per block not counted)
    results["kv_bytes_per_token"] = per_token
    results["sequences_of_2k_in_1GiB"] = {k: (1 << 30) / (v * 2048) for k, v in per_token.items()}

    # 5. greedy agreement, cold vs cached, fast path
    questions = [[{"role": "system", "content": filler(60, 5)}, {"role": "user", "content": f"Tell me about {w}."}]
                 for w in WORDS]
    agree = total = 0
    eng = engine(True)
    try:
        for q in questions:
            ids = llm.encode_chat(q)
            outs = [greedy(eng, ids, 32) for _ in range(2)]  # the second finds the prompt's full blocks cached
            agree += equal_prefix(*outs)
            total += len(outs[0])
    finally:
        eng.shutdown()
    results["greedy_agreement_cold_vs_cached"] = {"prompts": len(questions), "tokens_equal_before_divergence": agree,
                                                  "tokens": total}

    # 6. bf16 vs float32 keys and values, fast path, greedy
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        eng = Engine(llm.model, llm.tokenizer, context=2048, kv_dtype=dtype, prefix_caching=False).start()
        try:
            runs[dtype] = [greedy(eng, llm.encode_chat([{"role": "user", "content": f"Tell me about {w} in detail."}]),
                                  64) for w in WORDS]
        finally:
            eng.shutdown()
    pairs = list(zip(runs[torch.float32], runs[torch.bfloat16]))
    results["bf16_vs_float32_kv"] = {
        "prompts": len(pairs), "identical_sequences": sum(a == b for a, b in pairs), "tokens": 64 * len(pairs),
        "tokens_equal_before_divergence": sum(equal_prefix(a, b) for a, b in pairs)}

    # 7. a burst of short prompts: batched prefill vs one per step
    burst = [llm.encode(f"{i * 7919}: a short note about {WORDS[i]} and {WORDS[-1 - i]}, for the record.")
             for i in range(16)]
    bursts = {}
    for batched in (True, False, True, False):
        eng = engine(False, max_batch=16)
        if not batched:
            whole = eng.scheduler.prefills
            eng.scheduler.prefills = lambda budget, whole=whole: whole(budget)[:1]
        try:
            first_token_times(eng, burst[:1])  # warm
            bursts.setdefault(batched, []).append(max(first_token_times(eng, burst)))
        finally:
            eng.shutdown()
    results["burst_of_short_prompts"] = {
        "requests": len(burst), "prompt_tokens": [len(b) for b in burst],
        "all_first_tokens_batched_s": min(bursts[True]), "all_first_tokens_one_per_step_s": min(bursts[False]),
        "speedup": min(bursts[False]) / min(bursts[True])}

    # 4. idle RSS of the server with its defaults
    with Server() as server:
        time.sleep(2)  # let the process settle after startup; a measurement pause, not a test assertion
        results["serve_idle_rss_mb"] = server.rss_mb()

    c, s = results["chat_turn10"], results["shared_system_prompt"]
    print(f"{results['machine']}")
    print(f"10-turn chat, turn 10 ({c['prompt_tokens']} prompt tokens): TTFT {c['ttft_off_s'] * 1e3:.0f} ms off, "
          f"{c['ttft_on_s'] * 1e3:.0f} ms on: {c['speedup']:.1f}x (goal >= 5x)")
    print(f"32 requests sharing a {s['prompt_tokens']}-token prompt: all first tokens after "
          f"{s['all_first_tokens_off_s']:.2f} s off, {s['all_first_tokens_on_s']:.2f} s on: {s['speedup']:.1f}x")
    print("KV bytes per token: " + ", ".join(f"{k} {v:,}" for k, v in per_token.items()) +
          "; 2k-token sequences in 1 GiB: " + ", ".join(f"{k} {v:.1f}" for k, v in
                                                      results["sequences_of_2k_in_1GiB"].items()))
    g = results["greedy_agreement_cold_vs_cached"]
    print(f"greedy tokens equal cold vs cached (up to the first difference): {g['tokens_equal_before_divergence']} "
          f"of {g['tokens']} over {g['prompts']} prompts")
    k = results["bf16_vs_float32_kv"]
    print(f"bf16 vs float32 KV, greedy: {k['identical_sequences']} of {k['prompts']} sequences identical over 64 "
          f"tokens; {k['tokens_equal_before_divergence']} of {k['tokens']} tokens equal before the first difference")
    b = results["burst_of_short_prompts"]
    print(f"burst of {b['requests']} short prompts ({min(b['prompt_tokens'])}-{max(b['prompt_tokens'])} tokens): "
          f"all first tokens after {b['all_first_tokens_batched_s'] * 1e3:.0f} ms batched, "
          f"{b['all_first_tokens_one_per_step_s'] * 1e3:.0f} ms one per step: {b['speedup']:.1f}x")
    print(f"idle RSS of `lantern serve` (defaults): {results['serve_idle_rss_mb']:.0f} MB (goal <= 870 MB)")
    print(f"wrote {write_result('prefix', results)}")


if __name__ == "__main__":
    main()
