"""The "see inside" views against the references: trace probabilities and kept sets against transformers'
logits and logits processors, seeded draws that reproduce, the logit lens against transformers' hidden states,
attention weights against transformers' eager attention, and explain_generate against generate."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lanternlm.config import ModelConfig
from lanternlm.errors import LanternError
from lanternlm.explain import attention, explain_generate, logit_lens, trace_step
from lanternlm.generation.generate import generate
from lanternlm.generation.sampling import SamplingParams, make_generator, process_logits, sample
from lanternlm.loader.build import build_model
from lanternlm.text.tokenizer import Tokenizer

from test_hf_folder import tiny_tokenizer
from tiny_models import make_hf_model


def strict_json(value):
    """The structure survives strict JSON (no NaN/inf, only plain types) unchanged."""
    return json.loads(json.dumps(value, allow_nan=False))


def lantern_from_hf(hf_model):
    config = ModelConfig.from_hf(hf_model.config.to_dict())
    return build_model(config, {k: v.clone() for k, v in hf_model.state_dict().items()}, "test")


@pytest.fixture(scope="module")
def hf_tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def tok(hf_tok, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    hf_tok.save_pretrained(folder)
    return Tokenizer.from_hf_folder(folder)


@pytest.fixture(scope="module")
def tiny_cache(hf_tok):
    """(arch, config overrides) -> (transformers model with eager attention, our model), built once each."""
    built = {}

    def get(arch, overrides=()):
        key = (arch, tuple(sorted(dict(overrides).items())))
        if key not in built:
            hf = make_hf_model(arch, vocab_size=len(hf_tok), **dict(overrides))
            hf.set_attn_implementation("eager")  # the only transformers path that returns attention weights
            built[key] = (hf, lantern_from_hf(hf))
        return built[key]
    return get


@pytest.fixture(scope="module")
def prompt(hf_tok):
    return hf_tok.encode("The quick brown fox jumps over the lazy dog. Hello world!")


@pytest.fixture(scope="module")
def real(default_gguf):
    # The exact (dequantized) path: identities such as "the lens's last layer is the model's distribution"
    # hold to float precision there. The quantized path rounds logits to bf16, and a 1-row product may round
    # differently from a 5-row one (see quantize.py).
    from lanternlm.api import LLM
    return LLM(str(default_gguf), exact=True)


# ---------------------------------------------------------------------- trace_step


def test_greedy_trace_agrees_with_transformers_logits(tiny_cache, tok, hf_tok, prompt):
    hf, ours = tiny_cache("llama")
    ref = hf(torch.tensor([prompt])).logits[0, -1]  # (V,)
    logits = ours(torch.tensor([prompt])).logits[0, -1]
    token, trace = trace_step(logits, SamplingParams(temperature=0), prompt, [], None, tok, top_k=5)
    assert strict_json(trace) == trace

    ref_probs = ref.softmax(-1)
    ref_top = torch.topk(ref_probs, 5)
    assert [c["id"] for c in trace["candidates"]] == ref_top.indices.tolist()
    for c, p, i in zip(trace["candidates"], ref_top.values, ref_top.indices):
        assert c["prob"] == pytest.approx(float(p), abs=1e-5)
        assert c["logit"] == pytest.approx(float(ref[i]), abs=1e-4)
        assert c["logprob"] == pytest.approx(math.log(float(p)), abs=1e-4)
        assert c["text"] == hf_tok.decode([int(i)])
        assert c["piece"] == hf_tok.convert_ids_to_tokens(int(i))

    assert token == int(ref.argmax()) == trace["chosen"]["id"]
    assert trace["greedy"] is True and trace["draw"] is None
    assert trace["chosen"]["rank"] == trace["chosen"]["raw_rank"] == 1
    assert trace["chosen"]["prob"] == 1.0
    assert trace["chosen"]["raw_prob"] == pytest.approx(float(ref_probs.max()), abs=1e-5)
    assert [(s["name"], s["kept"]) for s in trace["stages"]] == [("input", len(hf_tok)), ("greedy", 1)]


@pytest.mark.parametrize("seed", range(30))
def test_greedy_trace_picks_what_sample_picks(seed, tok):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tok.vocab_size, generator=gen) * 3
    logits[seed % 7] = logits.max()  # a tie with the maximum: argmax's first-index rule must hold
    prompt, output = [5, 9, 9, 40], [9, 12]
    params = SamplingParams(temperature=0, repetition_penalty=1.4, frequency_penalty=0.5, presence_penalty=0.3,
                            logit_bias={17: 2.0})
    token, trace = trace_step(logits, params, prompt, output, None, tok)
    assert token == sample(process_logits(logits, params, prompt, output), params, None)
    assert [s["name"] for s in trace["stages"]] == ["input", "logit_bias", "repetition_penalty",
                                                    "frequency_presence_penalty", "greedy"]


def hf_processed(logits, params, prompt, output):
    """transformers' processors in the order sampling.py documents: the reference kept set and distribution."""
    scores = logits[None].clone()
    seen = torch.tensor([prompt + output])
    scores = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(seen, scores)
    scores = TemperatureLogitsWarper(params.temperature)(seen, scores)
    scores = TopKLogitsWarper(params.top_k)(seen, scores)
    scores = TopPLogitsWarper(params.top_p)(seen, scores)
    scores = MinPLogitsWarper(params.min_p)(seen, scores)
    return scores[0]


SAMPLED = SamplingParams(temperature=0.7, top_k=40, top_p=0.9, min_p=0.1, repetition_penalty=1.3, seed=1234)


def test_each_stage_keeps_a_renormalised_set_matching_transformers(tiny_cache, tok, prompt):
    _, ours = tiny_cache("llama")
    logits = ours(torch.tensor([prompt])).logits[0, -1]
    output = prompt[-3:]
    token, trace = trace_step(logits, SAMPLED, prompt, output, make_generator(0), tok, top_k=1000)
    assert strict_json(trace) == trace
    names = [s["name"] for s in trace["stages"]]
    assert names == ["input", "repetition_penalty", "temperature", "top_k", "top_p", "min_p"]

    previous = None
    for stage in trace["stages"]:
        probs = {e["id"]: e["prob"] for e in stage["top"]}
        assert len(probs) == stage["kept"]  # top_k=1000 >= V: the list is the whole kept set
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
        if stage["name"] in ("top_k", "top_p", "min_p"):  # truncation: the survivors' old probs, renormalised
            assert stage["kept_mass"] == pytest.approx(sum(previous[i] for i in probs), abs=1e-5)
            for i, p in probs.items():
                assert p == pytest.approx(previous[i] / stage["kept_mass"], rel=1e-4, abs=1e-7)
        previous = probs
    assert trace["stages"][3]["kept"] == 40 > trace["stages"][4]["kept"] > trace["stages"][5]["kept"] > 1

    ref = hf_processed(logits, SAMPLED, prompt, output)
    final = {e["id"]: e["prob"] for e in trace["stages"][-1]["top"]}
    assert set(final) == set(torch.nonzero(ref > -math.inf).flatten().tolist())
    ref_probs = ref.softmax(-1)
    for i, p in final.items():
        assert p == pytest.approx(float(ref_probs[i]), abs=1e-5)
    assert token in final and trace["chosen"]["prob"] == pytest.approx(final[token])


def test_seeded_sampled_trace_repeats_and_its_draw_reproduces_the_choice(tiny_cache, tok, prompt):
    _, ours = tiny_cache("llama")
    logits = ours(torch.tensor([prompt])).logits[0, -1]
    params = SamplingParams(temperature=1.5, top_k=50, seed=7)
    runs = [trace_step(logits, params, prompt, [], make_generator(7), tok) for _ in range(2)]
    assert runs[0] == runs[1]
    token, trace = runs[0]
    draw = trace["draw"]
    assert trace["greedy"] is False and draw["method"] == "inverse_cdf"
    # The draw is the generator's first uniform number...
    assert draw["uniform"] == float(torch.rand((), generator=make_generator(7), dtype=torch.float64))
    # ...and inverting the CDF of the final distribution (recomputed here) at it gives the chosen token.
    final = process_logits(logits, params, prompt, []).softmax(-1).double()
    cdf = final.cumsum(-1)
    target = draw["uniform"] * float(cdf[-1])
    assert token == int((cdf <= target).sum())
    assert draw["low"] <= target < draw["high"]
    assert draw["high"] - draw["low"] == pytest.approx(float(final[token]), abs=1e-6)
    assert trace["chosen"]["rank"] == 1 + int((final > final[token]).sum())


def test_sampled_choices_follow_the_final_distribution(tok):
    # Inverse-CDF draws must be distributed as the final probabilities (a wrong interval would skew them).
    logits = torch.full((tok.vocab_size,), -5.0)
    logits[[3, 10, 11, 50, 60]] = torch.tensor([2.0, 1.0, 0.5, 0.0, 1.5])
    params = SamplingParams(temperature=1.0, top_k=4)
    want = process_logits(logits, params, [], []).softmax(-1)
    gen = make_generator(99)
    n = 3000
    counts = torch.zeros_like(want)
    for _ in range(n):
        counts[trace_step(logits, params, [], [], gen, tok, top_k=1)[0]] += 1
    assert counts[50] == 0  # removed by top_k: never drawn
    assert (counts / n - want).abs().max() < 0.03


# ---------------------------------------------------------------------- explain_generate


def test_explain_generate_greedy_equals_generate_and_transformers(tiny_cache, tok, prompt):
    hf, ours = tiny_cache("qwen2")
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, repetition_penalty=1.2)
    plain = list(generate(ours, tok, prompt, params, context=256))
    traced = list(explain_generate(ours, tok, prompt, params, context=256, top_k=3))
    assert [s for s, _ in traced] == plain
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, repetition_penalty=1.2,
                      eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert [s.token_id for s in plain] == ref
    for i, (step, trace) in enumerate(traced):
        assert strict_json(trace) == trace
        assert (trace["index"], trace["position"], trace["chosen"]["id"]) == (i, len(prompt) + i, step.token_id)
        assert (trace["text"], trace["finish_reason"]) == (step.text, step.finish_reason)
        assert len(trace["candidates"]) == 3
    assert traced[-1][1]["finish_reason"] == "length"


def test_explain_generate_seeded_sampling_repeats_with_stop_strings(tiny_cache, tok, prompt):
    _, ours = tiny_cache("llama")
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=3, max_tokens=20, ignore_eos=True)
    a = list(explain_generate(ours, tok, prompt, params, context=256))
    b = list(explain_generate(ours, tok, prompt, params, context=256))
    assert a == b and len(a) == 20 and a[-1][0].finish_reason == "length"
    # Turning the trace off changes nothing: plain generation draws the same tokens from the same seed.
    assert [s for s, _ in a] == list(generate(ours, tok, prompt, params, context=256))
    for _, t in a:
        assert t["draw"]["low"] <= t["draw"]["uniform"] * t["draw"]["total"] < t["draw"]["high"]
    # A stop string taken from that text: same draws up to it, and the text ends right before it.
    full = tok.decode([s.token_id for s, _ in a], skip_special_tokens=True)
    stop = full[len(full) // 2:len(full) // 2 + 2]
    stopped = list(explain_generate(ours, tok, prompt, replace(params, stop=(stop,)), context=256))
    assert stopped[-1][0].finish_reason == "stop" and len(stopped) <= len(a)
    assert [s.token_id for s, _ in stopped] == [s.token_id for s, _ in a[:len(stopped)]]
    assert "".join(s.text for s, _ in stopped) == full[:full.index(stop)]


def test_real_model_explain_generate_equals_generate(real):
    ids = real.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    params = SamplingParams(temperature=0, max_tokens=8).with_defaults(real.generation_config)
    plain = list(generate(real.model, real.tokenizer, ids, params, real.context))
    traced = list(explain_generate(real.model, real.tokenizer, ids, params, real.context))
    assert [s for s, _ in traced] == plain
    first = traced[0][1]
    assert first["chosen"]["id"] == first["candidates"][0]["id"]
    assert first["candidates"][0]["text"] == real.tokenizer.decode([first["chosen"]["id"]])


# ---------------------------------------------------------------------- logit lens


@pytest.mark.parametrize("arch,overrides", [
    ("llama", {}), ("qwen2", {}), ("gemma3", {}),
    ("gemma3", {"final_logit_softcapping": 2.0}),  # the lens must soft-cap as the model's head does
])
@pytest.mark.parametrize("position", [4, -1])
def test_logit_lens_against_transformers_hidden_states(arch, overrides, position, tiny_cache, tok, prompt):
    hf, ours = tiny_cache(arch, overrides)
    lens = logit_lens(ours, tok, prompt, position=position, top_k=4)
    assert strict_json(lens) == lens
    n = hf.config.num_hidden_layers
    assert [d["depth"] for d in lens["depths"]] == list(range(n + 1)) and lens["num_layers"] == n
    pos = position % len(prompt)
    assert lens["position"] == pos and lens["token"]["id"] == prompt[pos]

    out = hf(torch.tensor([prompt]), output_hidden_states=True)
    # transformers' hidden states: embeddings, layer outputs, and the last one already through the final norm.
    ref = [hf.lm_head(hf.model.norm(h[0, pos])) for h in out.hidden_states[:-1]]
    cap = getattr(hf.config, "final_logit_softcapping", None)
    ref = [r if cap is None else torch.tanh(r / cap) * cap for r in ref] + [out.logits[0, pos]]
    for depth, ref_logits in zip(lens["depths"], ref):
        ref_probs = ref_logits.softmax(-1)
        top = torch.topk(ref_probs, 4)
        assert [e["id"] for e in depth["top"]] == top.indices.tolist(), (arch, depth["depth"])
        for e, p in zip(depth["top"], top.values):
            assert e["prob"] == pytest.approx(float(p), abs=1e-5)
        entropy = float(-(ref_probs * ref_probs.log()).sum())
        assert depth["entropy"] == pytest.approx(entropy, abs=1e-4)
    final = int(out.logits[0, pos].argmax())
    assert lens["final_token"]["id"] == final
    assert lens["depths"][-1]["final_token_rank"] == 1
    assert lens["depths"][-1]["final_token_prob"] == pytest.approx(float(out.logits[0, pos].softmax(-1)[final]),
                                                                   abs=1e-5)


def test_real_model_logit_lens_last_depth_is_the_next_token_distribution(real):
    ids = real.encode("The capital of France is")
    lens = logit_lens(real.model, real.tokenizer, ids, top_k=5)
    probs = real.model(torch.tensor([ids])).logits[0, -1].softmax(-1)
    top = torch.topk(probs, 5)
    last = lens["depths"][-1]
    assert [e["id"] for e in last["top"]] == top.indices.tolist()
    for e, p in zip(last["top"], top.values):
        assert e["prob"] == pytest.approx(float(p), abs=1e-5)
    assert len(lens["depths"]) == real.config.num_hidden_layers + 1
    assert lens["depths"][0]["name"] == "embed_tokens" and last["name"] == f"layers.{real.config.num_hidden_layers - 1}"
    assert strict_json(lens) == lens


# ---------------------------------------------------------------------- attention


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma3", "phi3"])
def test_attention_matches_transformers_and_respects_masks(arch, tiny_cache, tok, hf_tok, prompt):
    hf, ours = tiny_cache(arch)
    view = attention(ours, tok, prompt)
    assert strict_json(view) == view
    T = len(prompt)
    assert view["tokens"] == [hf_tok.decode([i]) for i in prompt]
    assert view["pieces"] == hf_tok.convert_ids_to_tokens(prompt)
    ref = hf(torch.tensor([prompt]), output_attentions=True).attentions  # per layer (1, H, T, T)
    assert len(view["layers"]) == len(ref) == hf.config.num_hidden_layers
    for layer, ref_w in zip(view["layers"], ref):
        w = torch.tensor(layer["heads"])  # (H, T, T)
        assert w.shape == (hf.config.num_attention_heads, T, T)
        assert (w - ref_w[0]).abs().max() <= 1e-5, (arch, layer["layer"])
        assert torch.allclose(w.sum(-1), torch.ones(()), atol=1e-5)
        allowed = torch.ones(T, T, dtype=torch.bool).tril()
        if layer["type"] == "sliding_attention":
            assert layer["window"] == hf.config.sliding_window
            allowed &= ~torch.ones(T, T, dtype=torch.bool).tril(-layer["window"])
        else:
            assert layer["window"] is None
        assert torch.all(w[:, ~allowed] == 0)
        assert torch.all(w[:, allowed] > 0)  # random weights: every allowed weight is positive
    types = [layer["type"] for layer in view["layers"]]
    if arch in ("mistral", "gemma3"):
        assert "sliding_attention" in types


def test_attention_selection_and_limits(tiny_cache, tok, prompt):
    _, ours = tiny_cache("llama")
    full = attention(ours, tok, prompt)
    part = attention(ours, tok, prompt, layers=[2, 0], heads=[3])
    assert [layer["layer"] for layer in part["layers"]] == [2, 0] and part["head_indices"] == [3]
    assert part["layers"][0]["heads"][0] == full["layers"][2]["heads"][3]
    with pytest.raises(LanternError, match="max_weights"):
        attention(ours, tok, prompt, max_weights=100)
    with pytest.raises(LanternError, match="layers contains 3"):
        attention(ours, tok, prompt, layers=[3])
    with pytest.raises(LanternError, match="at most"):
        attention(ours, tok, [5] * 4000)


def test_real_model_attention_rows(real):
    ids = real.encode("Paris is the capital of")
    view = attention(real.model, real.tokenizer, ids, layers=[0, 29])
    assert view["tokens"] == [real.tokenizer.decode([i]) for i in ids]
    for layer in view["layers"]:
        w = torch.tensor(layer["heads"])
        assert w.shape == (real.config.num_attention_heads, len(ids), len(ids))
        assert torch.allclose(w.sum(-1), torch.ones(()), atol=1e-5)
        assert torch.all(w.triu(1) == 0)


# ---------------------------------------------------------------------- bad input


def test_bad_input_gives_one_clear_error(tiny_cache, tok, prompt):
    _, ours = tiny_cache("llama")
    V = ours.config.vocab_size
    greedy = SamplingParams(temperature=0)
    cases = [
        (lambda: trace_step(torch.zeros(2, V), greedy, [], [], None, tok), "one row"),
        (lambda: trace_step(torch.full((V,), float("nan")), greedy, [], [], None, tok), "NaN"),
        (lambda: trace_step(torch.zeros(V), greedy, [], [], None, tok, top_k=0), "top_k"),
        (lambda: trace_step(torch.full((V,), -math.inf), SamplingParams(temperature=1.0), [], [], None, tok),
         "no token is left"),
        (lambda: logit_lens(ours, tok, prompt, position=len(prompt)), "outside the prompt"),
        (lambda: logit_lens(ours, tok, [], position=0), "empty"),
        (lambda: logit_lens(ours, tok, [1, V]), f"{V}, which is not a token id"),
        (lambda: logit_lens(ours, tok, "hello"), "list of token ids"),
        (lambda: attention(ours, tok, prompt, heads=[]), "heads"),
        (lambda: list(explain_generate(ours, tok, [1, -2], greedy, context=64)), "-2"),
        (lambda: list(explain_generate(ours, tok, prompt, SamplingParams(max_tokens=500), context=64)), "context"),
    ]
    for call, message in cases:
        with pytest.raises(LanternError, match=message):
            call()


def test_llm_explain_and_generate_trace_flag(real):
    from lanternlm import LLM
    from lanternlm import SamplingParams as SP

    from model_files import default_gguf_path
    llm = LLM(str(default_gguf_path()))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    params = SP(temperature=0, max_tokens=10)
    found = llm.explain(messages, params, top_k=3)
    assert json.loads(json.dumps(found)) == found
    plain = llm.chat(messages, params)
    assert found["token_ids"] == plain.token_ids and found["text"] == plain.text
    traced = llm.generate(llm.encode_chat(messages), params, trace=True)
    assert traced.token_ids == plain.token_ids and len(traced.trace) == len(plain.token_ids)
