"""The engine's paged KV cache with prefix caching and preemption (issue 14), on tiny random models of every
architecture through the exact (float32) path: outputs must not depend on whether a prompt's blocks came from
the cache, on how the pool is laid out, or on a sequence being preempted and recomputed."""

from __future__ import annotations

import threading

import pytest
import torch
from test_model import lantern_from_hf

from lanternlm.engine import Engine
from lanternlm.generation.sampling import SamplingParams
from lanternlm.models.kv_cache import PagedKVCache

from tiny_models import ARCHS, make_hf_model


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The tests' tiny byte-level tokenizer (320 ids, as the tiny models), with no end-of-turn ids: every run
    here ends by length."""
    from dataclasses import replace

    from lanternlm.text.tokenizer import Tokenizer

    from test_hf_folder import tiny_tokenizer
    folder = tmp_path_factory.mktemp("tok")
    tiny_tokenizer().save_pretrained(folder)
    return replace(Tokenizer.from_hf_folder(folder), end_token_ids=frozenset())


def run(engine: Engine, prompts: list[list[int]], params: list[SamplingParams], salts=None,
        prompt_logprobs=None) -> list[dict]:
    """Submit all at once; wait for all. Per request: token ids, cached_tokens, prompt logprobs."""
    return wait_all(submit_all(engine, prompts, params, salts, prompt_logprobs))


def submit_all(engine: Engine, prompts: list[list[int]], params: list[SamplingParams], salts=None,
               prompt_logprobs=None) -> list[dict]:
    """Submit every prompt; the returned records fill in as the engine runs (see wait_all)."""
    results = [{"ids": [], "cached": None, "plp": None, "done": threading.Event()} for _ in prompts]

    def collector(r):
        def on_event(event):
            if event.error:
                r["error"] = event.error
                r["done"].set()
                return
            r["ids"].append(event.step.token_id)
            if len(r["ids"]) == 1:
                r["cached"], r["plp"] = event.cached_tokens, event.prompt_logprobs
            if event.step.finish_reason:
                r["done"].set()
        return on_event

    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.submit(prompt, p, collector(results[i]), salt=salts[i] if salts else None,
                      prompt_logprobs=prompt_logprobs)
    return results


def wait_all(results: list[dict]) -> list[dict]:
    for r in results:
        assert r["done"].wait(120), "a request never finished"
        assert "error" not in r, r.get("error")
    return results


@pytest.fixture(scope="module", params=sorted(ARCHS))
def model(request):
    return lantern_from_hf(make_hf_model(request.param))


def engine_for(model, tokenizer, **kwargs) -> Engine:
    return Engine(model, tokenizer, context=256, **kwargs).start()


def prompts_sharing_a_prefix(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    system = torch.randint(0, vocab, (40,), generator=g).tolist()  # 2.5 blocks of 16
    return [system + torch.randint(0, vocab, (n,), generator=g).tolist() for n in (5, 17, 33)]


def test_cached_prefixes_give_the_same_tokens(model, tokenizer):
    """Greedy and seeded runs of prompts that share a 40-token prefix, one after another: with the prefix cache
    the later prompts are served 32 cached tokens (two full blocks), and every token equals the run without the
    cache. The first prompt again, last: all its full blocks but the last token's come from the cache."""
    vocab = model.config.vocab_size
    prompts = prompts_sharing_a_prefix(vocab)
    prompts.append(list(prompts[0]))
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=7, max_tokens=12, ignore_eos=True)]
    for p in params:
        outputs = {}
        for caching in (True, False):
            engine = engine_for(model, tokenizer, prefix_caching=caching)
            try:
                outputs[caching] = [run(engine, [prompt], [p])[0] for prompt in prompts]
            finally:
                engine.shutdown()
        assert [r["ids"] for r in outputs[True]] == [r["ids"] for r in outputs[False]]
        assert [r["cached"] for r in outputs[False]] == [0, 0, 0, 0]
        assert [r["cached"] for r in outputs[True]] == [0, 32, 32, 32]


def test_preemption_under_a_small_budget_keeps_every_text(model, tokenizer):
    """32 concurrent requests against a pool of 12 blocks (192 token positions, 8 running at once): sequences
    are preempted and recomputed, every request finishes, and each output equals its solo run."""
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, vocab, (int(n),), generator=g).tolist()
               for n in torch.randint(4, 30, (32,), generator=g)]
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True) if i % 2 else
              SamplingParams(temperature=0.8, seed=i, max_tokens=20, ignore_eos=True) for i in range(32)]
    per_block = PagedKVCache.block_bytes(model.config, 16, model.dtype)
    solo_engine = engine_for(model, tokenizer, max_batch=1)
    try:
        solo = [run(solo_engine, [pr], [pa])[0]["ids"] for pr, pa in zip(prompts, params)]
    finally:
        solo_engine.shutdown()
    engine = engine_for(model, tokenizer, max_batch=8, max_queue=64, kv_cache_bytes=12 * per_block)
    try:
        together = run(engine, prompts, params)
        stats = engine.snapshot()
    finally:
        engine.shutdown()
    assert [r["ids"] for r in together] == solo
    assert stats.preemptions_total > 0 and stats.kv_blocks_total == 12


def test_salts_partition_the_cache_and_scoring_bypasses_it(model, tokenizer):
    """The same prompt under another salt is not served from the cache; under the same salt it is. A request
    that wants its prompt's logprobs computes every position (cached_tokens 0) and gets the same logprobs."""
    vocab = model.config.vocab_size
    prompt = prompts_sharing_a_prefix(vocab)[2]
    p = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    engine = engine_for(model, tokenizer)
    try:
        first = run(engine, [prompt], [p], salts=["alice"])[0]
        other = run(engine, [prompt], [p], salts=["bob"])[0]
        again = run(engine, [prompt], [p], salts=["alice"])[0]
        scored = run(engine, [prompt], [p], salts=["alice"], prompt_logprobs=1)[0]
        fresh = engine_for(model, tokenizer, prefix_caching=False)
        try:
            reference = run(fresh, [prompt], [p], prompt_logprobs=1)[0]
        finally:
            fresh.shutdown()
    finally:
        engine.shutdown()
    assert (first["cached"], other["cached"], again["cached"], scored["cached"]) == (0, 0, 64, 0)
    assert first["ids"] == other["ids"] == again["ids"] == scored["ids"]
    assert scored["plp"] == reference["plp"] and len(scored["plp"]) == len(prompt)


def test_a_request_larger_than_the_pool_is_refused_at_once(model, tokenizer):
    """A prompt plus max_tokens that could never fit the pool gets an error at submit, not a wait forever."""
    from lanternlm.generation.generate import ContextLengthError
    per_block = PagedKVCache.block_bytes(model.config, 16, model.dtype)
    engine = engine_for(model, tokenizer, kv_cache_bytes=2 * per_block)
    try:
        with pytest.raises(ContextLengthError, match="KV cache"):
            engine.submit(list(range(20)), SamplingParams(max_tokens=20), lambda e: None)
    finally:
        engine.shutdown()


def test_choices_of_one_prompt_share_its_blocks(model, tokenizer):
    """Three choices of one prompt submitted together (n = 3): the first computes the prompt, the others wait
    for it and take its full blocks from the cache, so the engine prefills 40 + 2 x 8 positions instead of
    3 x 40, and the outputs equal three separate runs without the cache."""
    prompt = prompts_sharing_a_prefix(model.config.vocab_size)[0][:40]  # 2 full blocks and 8 tokens
    params = [SamplingParams(temperature=0.9, seed=s, max_tokens=6, ignore_eos=True) for s in range(3)]
    engine = engine_for(model, tokenizer)
    try:
        together = run(engine, [prompt] * 3, params)
        prefilled = engine.snapshot().prompt_tokens_total
    finally:
        engine.shutdown()
    fresh = engine_for(model, tokenizer, prefix_caching=False)
    try:
        separate = [run(fresh, [prompt], [p])[0] for p in params]
    finally:
        fresh.shutdown()
    assert sorted(r["cached"] for r in together) == [0, 32, 32]
    assert prefilled == 40 + 2 * 8
    assert [r["ids"] for r in together] == [r["ids"] for r in separate]


@pytest.mark.parametrize("shared,own,waits", [(16, 24, False), (40, 8, True)])
def test_a_burst_waits_for_a_twin_only_for_most_of_its_prompt(shared, own, waits, tokenizer):
    """Four prompts of `shared` tokens in common and `own` of their own, submitted before the engine starts.
    Sharing one block of 40 tokens (as a chat template's default system prompt), they prefill together in one
    forward, each computing that block; sharing 2 full blocks of 48, the first prefills alone and the other three
    then take its 2 blocks from the cache, together: the wait is not passed on from one to the next. Tokens
    equal runs without the cache."""
    model = lantern_from_hf(make_hf_model("llama"))
    g = torch.Generator().manual_seed(3)
    head = torch.randint(0, model.config.vocab_size, (shared,), generator=g).tolist()
    prompts = [head + torch.randint(0, model.config.vocab_size, (own,), generator=g).tolist() for _ in range(4)]
    params = [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)] * 4
    engine = Engine(model, tokenizer, context=256)
    calls = []
    prefill = engine.runner.prefill
    engine.runner.prefill = lambda batch: calls.append([count for _, count in batch]) or prefill(batch)
    results = submit_all(engine, prompts, params)
    engine.start()
    try:
        wait_all(results)
    finally:
        engine.shutdown()
    full = len(prompts[0])
    if waits:
        assert calls == [[full], [full - 32] * 3]
        assert [r["cached"] for r in results] == [0, 32, 32, 32]
    else:
        assert calls == [[full] * 4]
        assert [r["cached"] for r in results] == [0, 0, 0, 0]
    fresh = engine_for(model, tokenizer, prefix_caching=False)
    try:
        assert [r["ids"] for r in results] == [r["ids"] for r in run(fresh, prompts, params)]
    finally:
        fresh.shutdown()


def test_blocks_outside_a_sliding_window_are_released_and_change_nothing(tokenizer):
    """Mistral (every layer windowed, 5 positions here): the engine releases the blocks that fell out of the
    window, and a 60-token generation still equals generate()'s, which keeps every block. Holding 2 blocks at
    most, two such sequences run together in a pool of 5 blocks, which holds only one of them whole."""
    from lanternlm.generation.generate import generate
    model = lantern_from_hf(make_hf_model("mistral"))
    prompt = prompts_sharing_a_prefix(model.config.vocab_size)[0][:20]
    p = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    alone = [s.token_id for s in generate(model, tokenizer, prompt, p, context=256)]
    per_block = PagedKVCache.block_bytes(model.config, 16, model.dtype)
    engine = engine_for(model, tokenizer, kv_cache_bytes=5 * per_block, prefix_caching=False)
    try:
        together = run(engine, [prompt, prompt], [p, p])
    finally:
        # after the engine's thread has stopped: it releases a finished sequence's blocks at the end of the step
        # that emitted its last token, which can come after run() has seen that token (a race CI once lost)
        engine.shutdown()
    assert engine.blocks.num_used == 0 and engine.snapshot().preemptions_total == 0
    assert together[0]["ids"] == together[1]["ids"] == alone
