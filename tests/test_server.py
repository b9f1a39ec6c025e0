"""`lantern serve` as a subprocess on a free port, driven by the official openai client (and httpx for the raw
protocol): chat and completions, streaming, n>1, stops, seeds, logprobs, errors, auth, concurrency,
disconnects, a burst beyond the queue, and SIGTERM."""

from __future__ import annotations

import concurrent.futures as cf
import json
import time

import httpx
import openai
import pytest

from serving import KEY, MSG, OTHER_KEY, Server, tiny_chat_folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return tiny_chat_folder(tmp_path_factory.mktemp("tiny-server"))


@pytest.fixture(scope="module")
def server(tiny_folder):
    s = Server(str(tiny_folder), "--api-key", KEY, "--api-key", OTHER_KEY, "--prefix-cache-per-key",
               "--max-batch", "8")
    yield s
    assert s.stop() == 0  # SIGTERM: graceful shutdown, exit 0


def test_chat_completion_shape(server):
    r = server.client().chat.completions.create(model="tiny", messages=MSG, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.model == "tiny" and r.id.startswith("chatcmpl-")
    assert len(r.choices) == 1 and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 12 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stream_equals_non_stream_and_follows_the_sse_rules(server):
    c = server.client()
    full = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=20, temperature=0)
    chunks = list(c.chat.completions.create(model="tiny", messages=MSG, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert len({ch.id for ch in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finishes) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content


def test_raw_sse_framing_ends_with_done(server):
    body = {"model": "tiny", "messages": MSG, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events[:-1])


def test_completions_prompt_forms_echo_and_stream(server):
    c = server.client()
    a = c.completions.create(model="tiny", prompt="The quick brown", max_tokens=8, temperature=0)
    assert a.object == "text_completion" and a.choices[0].finish_reason in ("stop", "length")
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": "The quick brown"},
                     headers={"Authorization": f"Bearer {KEY}"}).json()["tokens"]
    b = c.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)
    assert b.choices[0].text == a.choices[0].text
    e = c.completions.create(model="tiny", prompt="The quick brown", max_tokens=8, temperature=0, echo=True)
    assert e.choices[0].text == "The quick brown" + a.choices[0].text
    s = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny", prompt="The quick brown", max_tokens=8, temperature=0, stream=True) if ch.choices)
    assert s == a.choices[0].text


def test_n_choices_and_seed_reproducibility(server):
    c = server.client()
    kw = dict(model="tiny", messages=MSG, max_tokens=10, temperature=1.0, seed=42, n=3)
    r1, r2 = c.chat.completions.create(**kw), c.chat.completions.create(**kw)
    assert [ch.index for ch in r1.choices] == [0, 1, 2]
    assert [ch.message.content for ch in r1.choices] == [ch.message.content for ch in r2.choices]
    assert len({ch.message.content for ch in r1.choices}) > 1  # the choices are different draws


def test_stop_strings_are_not_returned(server):
    c = server.client()
    base = c.completions.create(model="tiny", prompt="Hello", max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
    text = base.choices[0].text
    stop = text[5:8]
    assert stop and len(stop) == 3
    r = c.completions.create(model="tiny", prompt="Hello", max_tokens=30, temperature=0, stop=[stop],
                             extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == text[:text.find(stop)]


def test_logprobs_shapes(server):
    c = server.client()
    r = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=6, temperature=0, logprobs=True,
                                  top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-6  # greedy takes the best
    p = c.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0, logprobs=2)
    lp = p.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == \
        p.usage.completion_tokens


def test_models_and_tokenize_round_trip(server):
    models = server.client().models.list().data
    assert models[0].id == "tiny" and models[0].owned_by == "lantern"
    assert models[0].model_extra["max_model_len"] == 256
    h = {"Authorization": f"Bearer {KEY}"}
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": "The quick brown fox"}, headers=h).json()
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": ids["tokens"]}, headers=h).json()
    assert back["prompt"] == "The quick brown fox" and ids["count"] == len(ids["tokens"])


BAD = [
    ("/v1/chat/completions", {"model": "tiny"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400, None),
    ("/v1/chat/completions", {"model": "tiny", "messages": MSG, "temperature": -1}, 400, "temperature"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MSG, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MSG, "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MSG, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MSG, "n": 0}, 400, "n"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MSG, "tools": [{"type": "function"}]}, 400, "tools"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MSG, "response_format": {"type": "xml"}}, 400,
     "response_format.type"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MSG, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}}},
     400, "response_format"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MSG, "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MSG, "logit_bias": {"999999": 1}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MSG, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MSG, "stop": [""]}, 400, "stop"),
    ("/v1/chat/completions", {"model": "nope", "messages": MSG}, 404, "model"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MSG, "max_tokens": 10_000}, 400, "messages"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "suffix": "x"}, 400, "suffix"),
    ("/v1/completions", {"model": "tiny", "prompt": [999999]}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "x" * 2000}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "presence_penalty": 5}, 400, "presence_penalty"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    # The OpenAI spec's own bounds.
    ("/v1/chat/completions", {"model": "tiny", "messages": MSG, "seed": 2**63}, 400, "seed"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MSG, "seed": -2**63 - 1}, 400, "seed"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "logprobs": 6}, 400, "logprobs"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MSG, "top_logprobs": 21, "logprobs": True}, 400,
     "top_logprobs"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MSG, "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "stream": False,
                         "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/completions", {"model": "tiny", "prompt": [[1, 2], [999999]]}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": ["hi", "x" * 2000]}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": ["hi"] * 20, "n": 4}, 400, "prompt"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MSG, "prompt_logprobs": 21}, 400, "prompt_logprobs"),
]


@pytest.mark.parametrize("route,body,status,param", BAD, ids=[f"{i}-{b[0].rsplit('/', 1)[1]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_openai_errors_and_the_server_keeps_working(server, route, body, status, param):
    r = httpx.post(f"{server.url}{route}", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param:
        assert err["param"] == param, err
    ok = server.client().chat.completions.create(model="tiny", messages=MSG, max_tokens=3)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_invalid_json_body_and_context_overflow_code(server):
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b"{nope", headers=h)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{server.url}/v1/chat/completions", headers=h,
                   json={"model": "tiny", "messages": MSG, "max_tokens": 10_000})
    assert r.json()["error"]["code"] == "context_length_exceeded"
    big = httpx.post(f"{server.url}/v1/completions", headers=h, content=b"x" * (5 * 1024 * 1024))
    assert big.status_code == 413


def test_api_key_is_required(server):
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").chat.completions.create(model="tiny", messages=MSG, max_tokens=2)
    r = httpx.get(f"{server.url}/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_eight_concurrent_streams_equal_their_solo_runs(server):
    c = server.client()
    prompts = [[{"role": "user", "content": f"Hello world {'fox ' * i}"}] for i in range(8)]

    def run(messages, stream):
        kw = dict(model="tiny", messages=messages, max_tokens=24, temperature=0)
        if not stream:
            return c.chat.completions.create(**kw).choices[0].message.content
        return "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(**kw, stream=True)
                       if ch.choices)

    solo = [run(p, False) for p in prompts]
    with cf.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: run(p, True), prompts))
    assert together == solo


def test_disconnect_mid_stream_frees_the_sequence(server):
    aborted_before = server.metric("lantern_requests_aborted_total")
    body = {"model": "tiny", "messages": MSG, "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if server.metric("lantern_running_sequences") == 0 and \
                server.metric("lantern_requests_aborted_total") > aborted_before:
            break
        time.sleep(0.1)
    assert server.metric("lantern_running_sequences") == 0
    assert server.metric("lantern_requests_aborted_total") > aborted_before


def test_burst_beyond_the_queue_gets_429_then_recovers(tiny_folder):
    s = Server(str(tiny_folder), "--max-batch", "1", "--max-queue", "1")
    try:
        c = s.client()

        def one(_):
            try:
                c.chat.completions.create(model="tiny", messages=MSG, max_tokens=120,
                                          extra_body={"ignore_eos": True})
                return 200
            except openai.RateLimitError as e:
                assert e.response.headers.get("retry-after") == "1"
                return 429

        with cf.ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(one, range(8)))
        assert codes.count(429) >= 1 and codes.count(200) >= 1
        assert c.chat.completions.create(model="tiny", messages=MSG, max_tokens=3).choices
        assert s.metric('lantern_requests_total{route="/v1/chat/completions",status="429"}') >= 1
    finally:
        assert s.stop() == 0


def test_default_model_smoke(default_gguf):
    s = Server(str(default_gguf), name="smollm2-135m-instruct")
    try:
        r = s.client().chat.completions.create(
            model="smollm2-135m-instruct", temperature=0, max_tokens=30,
            messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in r.choices[0].message.content
        assert json.loads(httpx.get(f"{s.url}/health").text)["status"] == "ok"
    finally:
        assert s.stop() == 0


def test_lantern_trace_extension_in_the_stream_and_not(server):
    # The extension is namespaced: standard fields stay OpenAI-exact, the trace rides under "lantern".
    h = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "tiny", "messages": MSG, "max_tokens": 6, "temperature": 0, "logprobs": True,
            "top_logprobs": 2, "lantern": {"trace": True, "top_k": 3}}
    full = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=h).json()
    traces = full["choices"][0]["lantern"]["trace"]
    content = full["choices"][0]["logprobs"]["content"]
    assert len(traces) == len(content) == full["usage"]["completion_tokens"]
    for trace, lp in zip(traces, content):
        assert trace["chosen"]["raw_rank"] == 1  # greedy
        assert abs(trace["candidates"][0]["logprob"] - lp["logprob"]) < 1e-4  # both: the model's raw logprob
    chunks = []
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True}, headers=h) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
    streamed = [c["choices"][0]["lantern"]["trace"][0] for c in chunks if c["choices"] and "lantern" in c["choices"][0]]
    assert [t["chosen"]["id"] for t in streamed] == [t["chosen"]["id"] for t in traces]
    plain = httpx.post(f"{server.url}/v1/chat/completions", json={k: v for k, v in body.items() if k != "lantern"},
                       headers=h).json()
    assert "lantern" not in plain["choices"][0]
    assert plain["choices"][0]["message"] == full["choices"][0]["message"]  # the trace changes nothing


def test_lantern_lens_attention_and_inspect_routes(server):
    h = {"Authorization": f"Bearer {KEY}"}
    lens = httpx.post(f"{server.url}/v1/lantern/lens", json={"prompt": "The quick brown", "top_k": 2}, headers=h)
    assert lens.status_code == 200
    depths = lens.json()["depths"]
    assert len(depths) == 4 and all(len(d["top"]) == 2 for d in depths)  # embeddings + 3 layers
    att = httpx.post(f"{server.url}/v1/lantern/attention", json={"prompt": "The quick brown", "layers": [0]},
                     headers=h).json()
    rows = att["layers"][0]["heads"][0]  # T x T
    assert all(abs(sum(row) - 1) < 1e-4 for row in rows)
    info = httpx.get(f"{server.url}/v1/lantern/inspect", headers=h).json()
    assert info["parameters"]["total"] > 0 and "DecoderLayer" in info["module_tree"]
    bad = httpx.post(f"{server.url}/v1/lantern/lens", json={"prompt": "x", "ids": [1]}, headers=h)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"
    schema = httpx.get(f"{server.url}/openapi.json").json()
    assert "/v1/lantern/lens" in schema["paths"] and "lantern" in json.dumps(schema["components"])


def test_tokenize_renders_messages_as_a_chat_request_would(server):
    """/tokenize with messages takes `tools` and `chat_template_kwargs` (vLLM's fields), so the prompt a
    client sees is the one its chat request gets: here the tools appear in it."""
    h = {"Authorization": f"Bearer {KEY}"}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    plain = httpx.post(f"{server.url}/tokenize", json={"messages": MSG}, headers=h).json()
    with_tools = httpx.post(f"{server.url}/tokenize", json={"messages": MSG, "tools": tools}, headers=h).json()
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": with_tools["tokens"]}, headers=h).json()["prompt"]
    assert with_tools["count"] > plain["count"] and "get_weather" in text
    bad = httpx.post(f"{server.url}/tokenize", json={"messages": MSG, "tools": [{"type": "function"}]}, headers=h)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tools"


def test_cached_tokens_are_reported_and_counted(server):
    """A prompt sent twice: the second answer's usage says how many prompt tokens the prefix cache served
    (OpenAI's usage.prompt_tokens_details.cached_tokens, read by the openai client), streamed and not, and
    /metrics counts the hits and shows the KV pool."""
    c = server.client()
    long = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 6}]
    first = c.chat.completions.create(model="tiny", messages=long, max_tokens=3, temperature=0)
    second = c.chat.completions.create(model="tiny", messages=long, max_tokens=3, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < second.usage.prompt_tokens and cached % 16 == 0
    assert second.choices[0].message.content == first.choices[0].message.content
    chunks = list(c.chat.completions.create(model="tiny", messages=long, max_tokens=3, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == cached
    assert server.metric("lantern_prefix_cache_hit_tokens_total") >= 2 * cached
    traced = c.chat.completions.create(model="tiny", messages=long, max_tokens=2, temperature=0,
                                       extra_body={"lantern": {"trace": True}})
    assert traced.choices[0].model_extra["lantern"]["cached_tokens"] == cached  # the look-inside view says so
    assert server.metric("lantern_kv_cache_capacity_bytes") > 0


def test_the_prefix_cache_is_partitioned_per_api_key(server):
    """The server runs with two keys and --prefix-cache-per-key: a prompt cached under one key is computed
    afresh under the other (one tenant cannot time another's prompts), then cached for that key too; a
    wrong key is still refused."""
    long = [{"role": "user", "content": "Pack my box with five dozen liquor jugs, said the sphinx. " * 5}]
    mine, theirs = server.client(), server.client(OTHER_KEY)
    first = mine.chat.completions.create(model="tiny", messages=long, max_tokens=2, temperature=0)
    again = mine.chat.completions.create(model="tiny", messages=long, max_tokens=2, temperature=0)
    other = theirs.chat.completions.create(model="tiny", messages=long, max_tokens=2, temperature=0)
    other_again = theirs.chat.completions.create(model="tiny", messages=long, max_tokens=2, temperature=0)
    cached = [r.usage.prompt_tokens_details.cached_tokens for r in (first, again, other, other_again)]
    assert cached[0] == 0 and cached[1] > 0 and cached[2] == 0 and cached[3] == cached[1], cached
    assert len({r.choices[0].message.content for r in (first, again, other, other_again)}) == 1
    with pytest.raises(openai.AuthenticationError):
        server.client("not-a-key").models.list()


def test_completions_take_a_regex_or_a_response_format_but_not_both(server):
    """/v1/completions reads Lantern's regex and the response_format as chat does: the text matches the regex;
    giving both, or a schema it cannot enforce, is a 400 naming the field."""
    import re
    h = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{server.url}/v1/completions", headers=h, json={
        "model": "tiny", "prompt": "Number:", "max_tokens": 12, "temperature": 0, "lantern": {"regex": "[0-9]{3}"}})
    assert r.status_code == 200 and re.fullmatch("[0-9]{3}", r.json()["choices"][0]["text"])
    both = httpx.post(f"{server.url}/v1/completions", headers=h, json={
        "model": "tiny", "prompt": "x", "lantern": {"regex": "a"}, "response_format": {"type": "json_object"}})
    assert both.status_code == 400 and both.json()["error"]["param"] == "response_format"
    bad = httpx.post(f"{server.url}/v1/completions", headers=h, json={
        "model": "tiny", "prompt": "x", "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "array", "uniqueItems": True}}}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format"
    assert "uniqueItems" in bad.json()["error"]["message"]
