"""Generation's text logic: stop strings never leak (not even in part), finish reasons, context limits."""

from __future__ import annotations

import random

import pytest

from lanternlm.generation.generate import ContextLengthError, OutputStream, StopMatcher, plan_lengths
from lanternlm.generation.sampling import SamplingParams
from lanternlm.text.tokenizer import Tokenizer


def run_matcher(chunks, stops):
    m = StopMatcher(tuple(stops))
    out = []
    for c in chunks:
        text, stopped = m.push(c)
        out.append(text)
        if stopped:
            return "".join(out), True
    out.append(m.flush())
    return "".join(out), False


@pytest.mark.parametrize("seed", range(200))
def test_stop_strings_never_leak_for_any_chunking(seed):
    rng = random.Random(seed)
    alphabet = "ab<|>\n "
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
    cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 10))))
    chunks = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
    emitted, stopped = run_matcher(chunks, stops)
    # A stream stops at the stop string that completes first (ties: the earlier start).
    hits = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    if hits:
        assert stopped and emitted == text[:min(hits)[1]]
    else:
        assert not stopped and emitted == text


def test_partial_stop_is_held_back_then_released():
    m = StopMatcher(("</answer>",))
    assert m.push("The end</ans") == ("The end", False)   # "</ans" might start the stop string
    assert m.push("wer") == ("", False)
    assert m.push("!") == ("</answer!", False)             # it did not: released whole


@pytest.fixture(scope="module")
def tokenizer(default_gguf):
    from lanternlm.loader.gguf import read_gguf
    with read_gguf(default_gguf) as g:
        return Tokenizer.from_gguf_metadata(g.metadata, source=str(default_gguf))


def feed(tokenizer, text, params, max_new=1000):
    ids = tokenizer.encode(text, add_special_tokens=False)
    stream = OutputStream(tokenizer, params, [1, 2, 3], max_new)
    steps = []
    for i in ids:
        steps.append(stream.append(i))
        if steps[-1].finish_reason:
            break
    return stream, steps


def test_stop_string_spanning_tokens_is_not_emitted(tokenizer):
    stream, steps = feed(tokenizer, "Hello there. STOP HERE and more text", SamplingParams(stop=["STOP HERE"]))
    assert steps[-1].finish_reason == "stop"
    assert "".join(s.text for s in steps) == "Hello there. " == stream.text
    assert not any("S" in s.text for s in steps)


def test_end_token_stops_and_is_not_shown(tokenizer):
    stream, steps = feed(tokenizer, "Yes.<|im_end|>ignored", SamplingParams())
    assert steps[-1].finish_reason == "stop" and stream.text == "Yes."
    assert stream.output_ids[-1] == 2  # the end token is reported among the ids, as vLLM does


def test_ignore_eos_and_stop_token_ids(tokenizer):
    _, steps = feed(tokenizer, "a<|im_end|>b c", SamplingParams(ignore_eos=True))
    assert all(s.finish_reason is None for s in steps)
    b_id = tokenizer.encode(" b", add_special_tokens=False)[0]
    stream, steps = feed(tokenizer, "a b c", SamplingParams(stop_token_ids=[b_id]))
    assert steps[-1].finish_reason == "stop" and stream.output_ids[-1] == b_id and stream.text == "a"


def test_length_finish(tokenizer):
    stream, steps = feed(tokenizer, "one two three four five", SamplingParams(), max_new=3)
    assert len(steps) == 3 and steps[-1].finish_reason == "length"
    assert stream.text == tokenizer.decode(stream.output_ids)


def test_multibyte_characters_are_emitted_whole(tokenizer):
    text = "日本語 😀👨‍👩‍👧 ok"
    stream, steps = feed(tokenizer, text, SamplingParams(), max_new=10**6)
    assert all("\ufffd" not in s.text for s in steps)
    assert "".join(s.text for s in steps) + stream.decoder.flush() == text


def test_context_limits():
    assert plan_lengths(10, SamplingParams(), 100) == 90
    assert plan_lengths(10, SamplingParams(max_tokens=5), 100) == 5
    with pytest.raises(ContextLengthError, match="exceeds"):
        plan_lengths(10, SamplingParams(max_tokens=95), 100)
    with pytest.raises(ContextLengthError, match="context holds"):
        plan_lengths(100, SamplingParams(), 100)
