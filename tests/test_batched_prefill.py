"""Prefill of several sequences in one forward (issue 14): the scheduler packs waiting prompts into one padded
batch within the step's token budget, chunking long ones; the runner left-pads rows and the cache ignores the
padding. On the exact path every output equals the sequence's solo run."""

from __future__ import annotations

import pytest
import torch
from test_model import lantern_from_hf
from test_prefix_cache import engine_for, run, submit_all, tokenizer, wait_all  # noqa: F401  (a fixture)

from lanternlm.engine import Engine
from lanternlm.engine.block_manager import BlockManager
from lanternlm.engine.scheduler import SCORING_CHUNK, Scheduler
from lanternlm.engine.sequence import Sequence
from lanternlm.generation.sampling import SamplingParams

from tiny_models import ARCHS, make_hf_model


def waiting(lengths: list[int], scoring: set[int] = frozenset()) -> Scheduler:
    """A scheduler whose running list holds sequences with prompts of these lengths, nothing computed yet."""
    scheduler = Scheduler(max_batch=16, max_queue=16, blocks=BlockManager(64, 16))
    for i, n in enumerate(lengths):
        seq = Sequence(f"r{i}", list(range(n)), stream=None, chooser=None, on_event=None,
                       prompt_logprobs=1 if i in scoring else None)
        scheduler.running.append(seq)
    return scheduler


def plan(scheduler: Scheduler, budget: int) -> list[tuple[str, int]]:
    return [(seq.request_id, count) for seq, count in scheduler.prefills(budget)]


def test_short_prompts_share_one_forward_within_the_budget():
    # 5 prompts of at most 40 tokens: rows x longest = 5 x 40 = 200 <= 256, all in one forward.
    assert plan(waiting([10, 40, 25, 3, 40]), 256) == [("r0", 10), ("r1", 40), ("r2", 25), ("r3", 3), ("r4", 40)]
    # A 7th row would make 7 x 40 > 256: six rows fit at a chunk of 256 // 6 = 42 >= 40.
    assert len(plan(waiting([40] * 9), 256)) == 6


def test_a_long_prompt_is_chunked_and_shares_the_budget():
    assert plan(waiting([1000]), 256) == [("r0", 256)]
    # The second prompt is longer than what is left: both get 128 (2 x 128 = 256), the rest comes later.
    assert plan(waiting([30, 1000]), 256) == [("r0", 30), ("r1", 128)]
    # A first long prompt takes the whole budget; nobody else fits this step.
    assert plan(waiting([1000, 5]), 256) == [("r0", 256)]


def test_a_scoring_request_runs_alone_in_small_chunks():
    assert plan(waiting([500, 10], scoring={0}), 256) == [("r0", SCORING_CHUNK)]
    assert plan(waiting([10, 500, 20], scoring={1}), 256) == [("r0", 10), ("r2", 20)]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_a_burst_prefilled_together_gives_each_its_solo_tokens(arch, tokenizer):  # noqa: F811
    """Eight prompts of 3 to 37 tokens submitted together are prefilled in one forward of 8 left-padded rows
    (the runner is watched); greedy and seeded outputs equal each prompt's solo run."""
    model = lantern_from_hf(make_hf_model(arch))
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist()
               for n in (3, 37, 12, 20, 5, 30, 16, 9)]
    params = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True) if i % 2 else
              SamplingParams(temperature=0.8, seed=i, max_tokens=8, ignore_eos=True) for i in range(8)]
    solo_engine = engine_for(model, tokenizer, max_batch=1, prefix_caching=False)
    try:
        solo = [run(solo_engine, [pr], [pa])[0]["ids"] for pr, pa in zip(prompts, params)]
    finally:
        solo_engine.shutdown()
    # Not started until all are queued, so that the first step admits them all.
    engine = Engine(model, tokenizer, context=256, max_batch=8, prefix_caching=False)
    rows = []
    prefill = engine.runner.prefill
    engine.runner.prefill = lambda batch: rows.append(len(batch)) or prefill(batch)
    try:
        pending = submit_all(engine, prompts, params)
        engine.start()
        together = wait_all(pending)
    finally:
        engine.shutdown()
    assert [r["ids"] for r in together] == solo
    assert rows == [8]
