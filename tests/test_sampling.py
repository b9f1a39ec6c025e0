"""Sampling: each stage must match transformers' logits processors, the pipeline and the draws must
behave as documented, and bad parameters must be refused with a message naming the field."""

import math

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lanternlm.errors import LanternError
from lanternlm.generation.sampling import (
    SamplingParams,
    SamplingParamsError,
    argmax,
    make_generator,
    process_logits,
    sample,
    stages,
)

VOCAB = 1000


def random_logits(seed: int, vocab: int = VOCAB, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * scale


def reference(processor, logits: torch.Tensor, input_ids=()) -> torch.Tensor:
    """Run a transformers logits processor on one row."""
    ids = torch.tensor([list(input_ids)], dtype=torch.long)
    return processor(ids, logits[None].clone())[0]


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.isfinite(logits).nonzero().flatten().tolist())


# --- Stages against transformers.


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [1, 2, 10, 50, VOCAB - 1])
def test_top_k_matches_transformers(seed, k):
    logits = random_logits(seed)
    got = process_logits(logits, SamplingParams(top_k=k), [], [])
    assert torch.equal(got, reference(TopKLogitsWarper(top_k=k), logits))
    assert kept(got) == set(torch.topk(logits, k).indices.tolist())  # exactly the k best


def assert_same_nucleus(got: torch.Tensor, expected: torch.Tensor, logits: torch.Tensor, p: float) -> None:
    """The warper sums the whole sorted distribution in float32 from the least likely token up; Lantern sums
    only the head, from the most likely down, in float64. The two agree except on a token whose more likely
    tokens hold p to within float32 rounding (seed 1, p = 0.99: 0.98999994), which either may keep."""
    probs = logits.softmax(-1)
    for token in kept(got) ^ kept(expected):
        assert abs(probs[probs > probs[token]].double().sum().item() - p) < 1e-6, token
    agreed = torch.isfinite(got) == torch.isfinite(expected)
    assert torch.equal(got[agreed], expected[agreed]) and (~agreed).sum() <= 1


@pytest.mark.parametrize("scale", [0.3, 2.0, 8.0])
@pytest.mark.parametrize("p", [0.5, 0.9, 0.999])
def test_top_p_on_a_full_vocabulary_head_or_flat(scale, p):
    """49,152 logits (the default model's vocabulary): peaked ones decide inside a small top-k, flat ones need
    thousands of tokens and take the full sort; both keep transformers' set."""
    logits = random_logits(int(scale * 10), vocab=49152, scale=scale)
    got = process_logits(logits, SamplingParams(top_p=p), [], [])
    assert_same_nucleus(got, reference(TopPLogitsWarper(top_p=p), logits), logits, p)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9, 0.99, 0.999])
def test_top_p_matches_transformers(seed, p):
    logits = random_logits(seed)
    got = process_logits(logits, SamplingParams(top_p=p), [], [])
    assert_same_nucleus(got, reference(TopPLogitsWarper(top_p=p), logits), logits, p)
    # The kept set is the smallest set of most likely tokens whose mass reaches p.
    probs = logits.softmax(-1)
    order = probs.argsort(descending=True).tolist()
    chosen = kept(got)
    assert chosen == set(order[: len(chosen)])
    mass = probs[list(chosen)].sum().item()
    assert mass >= p - 1e-5
    assert mass - probs[order[len(chosen) - 1]].item() < p + 1e-5


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5, 1.0])
def test_min_p_matches_transformers(seed, min_p):
    logits = random_logits(seed)
    got = process_logits(logits, SamplingParams(min_p=min_p), [], [])
    assert torch.equal(got, reference(MinPLogitsWarper(min_p=min_p), logits))
    probs = logits.softmax(-1)
    assert kept(got) == set((probs >= min_p * probs.max()).nonzero().flatten().tolist())


@pytest.mark.parametrize("temperature", [0.1, 0.7, 1.5, 7.0])
def test_temperature_matches_transformers(temperature):
    logits = random_logits(1)
    got = process_logits(logits, SamplingParams(temperature=temperature), [], [])
    assert torch.equal(got, reference(TemperatureLogitsWarper(temperature), logits))


@pytest.mark.parametrize("penalty", [0.5, 1.1, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty):
    logits = random_logits(2)
    prompt, output = [5, 17, 17, 900, 3], [17, 42, 999, 0, 42]
    got = process_logits(logits, SamplingParams(repetition_penalty=penalty), prompt, output)
    assert torch.equal(got, reference(RepetitionPenaltyLogitsProcessor(penalty), logits, prompt + output))
    seen = set(prompt + output)
    changed = set((got != logits).nonzero().flatten().tolist())
    assert changed == {t for t in seen if logits[t] != 0}
    for token in seen:  # positive logits are divided, negative ones multiplied
        expected = logits[token] / penalty if logits[token] > 0 else logits[token] * penalty
        assert got[token].item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_full_pipeline_matches_transformers(seed):
    logits = random_logits(seed)
    prompt, output = [1, 2, 3, 500], [7, 7, 8]
    params = SamplingParams(repetition_penalty=1.2, temperature=0.8, top_k=100, top_p=0.9, min_p=0.02)
    pipeline = LogitsProcessorList([
        RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.8), TopKLogitsWarper(100),
        TopPLogitsWarper(0.9), MinPLogitsWarper(0.02),
    ])
    assert torch.equal(process_logits(logits, params, prompt, output), reference(pipeline, logits, prompt + output))


# --- Penalties and bias (OpenAI / vLLM formulas; transformers has no presence/frequency penalty).


def test_presence_and_frequency_penalties_follow_openai_formula():
    logits = random_logits(3)
    prompt, output = [10, 11, 12], [11, 20, 20, 20, 30]
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=1.5)
    got = process_logits(logits, params, prompt, output)
    for token in range(VOCAB):
        count = output.count(token)  # prompt tokens are not penalised
        expected = logits[token].item() - 0.5 * count - 1.5 * (count > 0)
        assert got[token].item() == pytest.approx(expected, abs=1e-5)
    # Negative values encourage repetition.
    got = process_logits(logits, SamplingParams(presence_penalty=-2.0), prompt, output)
    assert got[20].item() == pytest.approx(logits[20].item() + 2.0, abs=1e-5)
    assert got[10].item() == logits[10].item()


def test_logit_bias_bans_and_forces():
    logits = random_logits(4)
    best = int(logits.argmax())
    generator = make_generator(0)
    banned = SamplingParams(logit_bias={best: -100}, temperature=1.0)
    greedy_banned = SamplingParams(logit_bias={best: -100}, temperature=0)
    forced_token = int(logits.argmin())
    forced = SamplingParams(logit_bias={forced_token: 100}, temperature=1.0)
    for _ in range(300):
        assert sample(process_logits(logits, banned, [], []), banned, generator) != best
        assert sample(process_logits(logits, forced, [], []), forced, generator) == forced_token
    assert sample(process_logits(logits, greedy_banned, [], []), greedy_banned, None) != best
    biased = process_logits(logits, SamplingParams(logit_bias={3: 2.5, 7: -1.0}), [], [])
    assert biased[3].item() == pytest.approx(logits[3].item() + 2.5)
    assert biased[7].item() == pytest.approx(logits[7].item() - 1.0)


def test_stage_order_and_purity():
    logits = random_logits(5)
    before = logits.clone()
    params = SamplingParams(logit_bias={1: 5.0}, repetition_penalty=1.3, frequency_penalty=0.2, temperature=0.7,
                            top_k=50, top_p=0.8, min_p=0.05)
    result = stages(logits, params, [1, 2], [2, 3])
    assert [name for name, _ in result] == [
        "input", "logit_bias", "repetition_penalty", "frequency_presence_penalty", "temperature", "top_k", "top_p",
        "min_p",
    ]
    assert torch.equal(logits, before)  # stages never modify their input
    assert torch.equal(result[-1][1], process_logits(logits, params, [1, 2], [2, 3]))
    # Each stage is the previous one with that single operation applied.
    expected_top_k = reference(TopKLogitsWarper(50), result[4][1])
    assert torch.equal(result[5][1], expected_top_k)
    # Neutral parameters leave only the input stage, and float16 input comes back as float32.
    neutral = stages(logits.half(), SamplingParams().with_defaults({}), [], [])
    assert [name for name, _ in neutral] == ["input"] and neutral[0][1].dtype == torch.float32


# --- Drawing tokens.


def test_greedy_is_argmax_regardless_of_other_settings():
    for seed in range(10):
        logits = random_logits(seed)
        for params in [
            SamplingParams(temperature=0),
            SamplingParams(temperature=0, top_k=5, top_p=0.1, min_p=0.9, seed=seed),
            SamplingParams(temperature=0.0, top_p=0.5).with_defaults({"temperature": 0.9, "top_k": 3}),
        ]:
            processed = process_logits(logits, params, [], [])
            assert sample(processed, params, make_generator(seed)) == int(logits.argmax())
            assert sample(processed, params, None) == int(logits.argmax())
            assert kept(processed) == {int(logits.argmax())}
    # Greedy still sees penalties: it takes the arg-max of the penalised logits.
    logits = random_logits(0)
    best = int(logits.argmax())
    params = SamplingParams(temperature=0, repetition_penalty=100.0)
    penalised = logits.clone()
    penalised[best] = penalised[best] / 100
    assert sample(process_logits(logits, params, [best], []), params, None) == int(penalised.argmax())


def draws(logits, params, seed, n=200):
    generator = make_generator(seed)
    processed = process_logits(logits, params, [], [])
    return [sample(processed, params, generator) for _ in range(n)]


def test_seeded_sampling_repeats_and_seeds_differ():
    logits = random_logits(6, scale=1.0)
    params = SamplingParams(temperature=1.0, seed=1234)
    assert draws(logits, params, 1234) == draws(logits, params, 1234)
    assert draws(logits, params, 1234) != draws(logits, params, 4321)
    assert make_generator(None) is None


def test_sampled_frequencies_follow_processed_distribution():
    # Chi-square goodness of fit over 20,000 seeded draws from a small vocabulary.
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    params = SamplingParams(temperature=0.8, top_k=6, top_p=0.97)
    processed = process_logits(logits, params, [], [])
    probs = processed.softmax(-1)
    n = 20_000
    generator = make_generator(7)
    counts = torch.zeros(len(logits))
    for _ in range(n):
        counts[sample(processed, params, generator)] += 1
    survivors = kept(processed)
    assert set(counts.nonzero().flatten().tolist()) <= survivors  # removed tokens are never drawn
    expected = probs * n
    chi2 = sum(((counts[i] - expected[i]) ** 2 / expected[i]).item() for i in survivors)
    degrees = len(survivors) - 1
    # 99.9th percentile of chi-square (Wilson-Hilferty approximation, z = 3.09).
    critical = degrees * (1 - 2 / (9 * degrees) + 3.09 * math.sqrt(2 / (9 * degrees))) ** 3
    assert chi2 < critical


def test_input_errors():
    with pytest.raises(LanternError, match="outside the vocabulary"):
        process_logits(random_logits(0), SamplingParams(repetition_penalty=1.2), [VOCAB], [])
    with pytest.raises(LanternError, match="logit_bias.*outside the vocabulary"):
        process_logits(random_logits(0), SamplingParams(logit_bias={VOCAB + 5: 1.0}), [], [])
    with pytest.raises(LanternError, match="shape"):
        process_logits(torch.zeros(2, VOCAB), SamplingParams(), [], [])
    with pytest.raises(LanternError, match="no token is left"):
        sample(torch.full((5,), -math.inf), SamplingParams(temperature=1.0), None)
    with pytest.raises(LanternError, match="NaN"):
        sample(torch.tensor([0.0, math.nan]), SamplingParams(temperature=1.0), None)
    # Greedy finds a NaN through the arg-max itself (NaN wins it), wherever it sits and through keep_argmax
    for at in (0, 3, VOCAB - 1):
        nan_row = random_logits(at)
        nan_row[at] = math.nan
        with pytest.raises(LanternError, match="NaN"):
            sample(nan_row, SamplingParams(temperature=0), None)
        with pytest.raises(LanternError, match="NaN"):
            sample(process_logits(nan_row, SamplingParams(temperature=0), [], []), SamplingParams(temperature=0), None)


def test_argmax_is_torch_argmax_on_ties_nans_infinities_and_strided_rows():
    rows = [random_logits(s) for s in range(5)] + [
        torch.tensor([1.0, 3.0, 3.0, 2.0]),                      # ties: the first
        torch.tensor([1.0, math.nan, 3.0, math.nan]),            # a NaN wins, the first one
        torch.full((6,), -math.inf),                             # nothing left: index 0, as torch says
        torch.tensor([math.inf, 1.0, math.inf]),
        random_logits(9)[::3],                                   # a strided view
        torch.tensor([0.5]),
    ]
    for row in rows:
        assert argmax(row) == int(row.argmax())
        assert argmax(row.double()) == int(row.argmax())     # other dtypes take torch's own
    with torch.inference_mode():
        assert argmax(torch.tensor([0.0, 2.0, 1.0])) == 1
    assert argmax(torch.tensor([0.0, 2.0], requires_grad=True)) == 1


# --- Parameters.


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"min_p": -0.01}, "min_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.01}, "frequency_penalty"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"logit_bias": {1.0: 5}}, "logit_bias"),
        ({"logit_bias": {-1: 5}}, "logit_bias"),
        ({"logit_bias": {5: 100.5}}, r"logit_bias\[5\]"),
        ({"logit_bias": [1, 2]}, "logit_bias"),
        ({"seed": 1.5}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"stop": ""}, "stop"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop": [3]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
    ],
)
def test_invalid_parameters_name_the_field(kwargs, field):
    with pytest.raises(SamplingParamsError, match=field) as caught:
        SamplingParams(**kwargs)
    assert isinstance(caught.value, LanternError) and isinstance(caught.value, ValueError)


def test_parameter_normalisation():
    params = SamplingParams(stop="END", stop_token_ids=[5, 6], temperature=1, top_k=-1)
    assert params.stop == ("END",) and params.stop_token_ids == (5, 6)
    assert params.temperature == 1.0 and isinstance(params.temperature, float)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    # -1 and 0 disable top_k (vLLM): the logits pass through untouched.
    logits = random_logits(0)
    for k in (-1, 0):
        assert torch.equal(process_logits(logits, SamplingParams(top_k=k), [], []), logits)


def test_with_defaults():
    config = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1, "do_sample": True}
    filled = SamplingParams(top_p=0.5, top_k=0).with_defaults(config)
    # Explicit values (even "disabled" ones) win; the rest come from the model, then neutral values.
    assert (filled.temperature, filled.top_p, filled.top_k, filled.min_p, filled.repetition_penalty) == (
        0.6, 0.5, 0, 0.0, 1.1)
    neutral = SamplingParams().with_defaults({})
    assert (neutral.temperature, neutral.top_p, neutral.top_k, neutral.min_p, neutral.repetition_penalty) == (
        1.0, 1.0, 0, 0.0, 1.0)
    assert SamplingParams().with_defaults(None) == neutral
    assert SamplingParams().with_defaults({"do_sample": False, "temperature": 0.7}).temperature == 0.0
    assert SamplingParams(temperature=0.3).with_defaults({"do_sample": False}).temperature == 0.3
    assert SamplingParams().with_defaults({"top_k": None, "bos_token_id": 1}).top_k == 0
    with pytest.raises(SamplingParamsError, match="generation_config.*top_p"):
        SamplingParams().with_defaults({"top_p": 0})
