"""`lantern serve` under bad input and abandoned work: every bad body gets OpenAI's error envelope (never a 5xx),
clients that leave stop their work at the next engine step, a flood of abandoned requests leaves the engine
idle, `/metrics` sits behind the key, a request deadline, a graceful SIGTERM, and the completions features
evaluation harnesses use (echo + logprobs over the prompt, batched and token-id prompts, /tokenizer_info),
checked against transformers' own log-softmax."""

from __future__ import annotations

import concurrent.futures as cf
import json
import signal
import threading
import time

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving import KEY, MSG, Server, tiny_chat_folder

H = {"Authorization": f"Bearer {KEY}"}
LONG = 3000  # tokens: far more than a client that gives up after a moment will wait for


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_chat_folder(tmp_path_factory.mktemp("tiny-4k"), context=4096)


@pytest.fixture(scope="module")
def server(folder):
    s = Server(str(folder), "--api-key", KEY, "--max-batch", "8")
    yield s
    assert s.stop() == 0


def good(server: Server) -> None:
    """After every bad case, an ordinary request still works."""
    r = httpx.post(f"{server.url}/v1/chat/completions", headers=H, timeout=60,
                   json={"model": "tiny", "messages": MSG, "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def metrics(server: Server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", headers=H).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_idle(server: Server, aborted: float | None = None, polls: int = 600) -> dict[str, float]:
    """Poll until nothing runs or waits (and, if given, the aborted count has reached `aborted`): a bounded
    loop guarding against a hang, not a timing assertion."""
    for _ in range(polls):
        m = metrics(server)
        if m["lantern_running_sequences"] == 0 and m["lantern_queue_depth"] == 0 and \
                (aborted is None or m["lantern_requests_aborted_total"] >= aborted):
            return m
        time.sleep(0.05)
    raise AssertionError(f"the engine never went idle: {m}")


def envelope(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "Error" not in err["message"] or "internal" not in err["message"]  # no exception type leaks
    if param is not None:
        assert err["param"] == param, err
    return err


# ---------------------------------------------------------------------------------------------- bad bodies

RAW = [
    # (body bytes, param)
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi \\ud800 there"}]}', "messages.0.content"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 2}',
     "messages.0.content"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "caf\xe9"}]}', "body"),  # Latin-1, not UTF-8
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}', "body"),
    (b"[" * 50_000 + b"]" * 50_000, "body"),
    (b'{"model": "tiny", "messages": ' + b"[" * 100 + b"]" * 100 + b"}", "messages.0.0"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', "body"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 1e999}', "temperature"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": ' + b"9" * 5000 + b"}",
     "body"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}]', "body"),  # truncated
    (b'"just a string"', "body"),
    (b"null", "body"),
]


@pytest.mark.parametrize("body, param", RAW, ids=[f"raw{i}" for i in range(len(RAW))])
def test_bad_bytes_get_the_openai_envelope_with_a_param(server, body, param):
    r = httpx.post(f"{server.url}/v1/chat/completions", content=body,
                   headers={**H, "Content-Type": "application/json"})
    envelope(r, 400, param)
    good(server)


def test_lone_surrogates_everywhere_text_goes_in(server):
    # A surrogate in a completion prompt, a prompt list, /tokenize, and the Python API's tokenizer.
    for route, body, param in [
        ("/v1/completions", b'{"model": "tiny", "prompt": "a\\ud83d"}', "prompt"),
        ("/v1/completions", b'{"model": "tiny", "prompt": ["ok", "\\ud83d"]}', "prompt.1"),
        ("/tokenize", b'{"prompt": "\\ud800"}', "prompt"),
        ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], '
                                 b'"stop": ["\\ud800"]}', "stop.0"),
    ]:
        envelope(httpx.post(f"{server.url}{route}", content=body, headers=H), 400, param)
    import tempfile

    from lanternlm.errors import LanternError
    from lanternlm.text.tokenizer import Tokenizer

    from test_hf_folder import tiny_tokenizer
    with tempfile.TemporaryDirectory() as d:
        tiny_tokenizer().save_pretrained(d)
        with pytest.raises(LanternError, match="surrogate"):
            Tokenizer.from_hf_folder(__import__("pathlib").Path(d)).encode("x\ud800")
    # A surrogate *pair* is a real character (U+1F600) and goes through.
    r = httpx.post(f"{server.url}/tokenize", content=b'{"prompt": "\\ud83d\\ude00"}', headers=H)
    assert r.status_code == 200 and r.json()["count"] >= 1


def test_unknown_routes_methods_and_chunked_bodies(server):
    envelope(httpx.get(f"{server.url}/v1/nope", headers=H), 404)
    envelope(httpx.get(f"{server.url}/v1/chat/completions", headers=H), 405)

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(5 * 1024):
            yield b"x" * 1024
    r = httpx.post(f"{server.url}/v1/completions", content=chunks(), headers=H)
    envelope(r, 413, "body")
    good(server)


def test_metrics_need_the_key_unless_public(server, folder):
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    assert httpx.get(f"{server.url}/metrics", headers=H).status_code == 200
    assert httpx.get(f"{server.url}/tokenizer_info").status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200  # probes stay open
    public = Server(str(folder), "--api-key", KEY, "--public-metrics")
    try:
        assert httpx.get(f"{public.url}/metrics").status_code == 200
        assert httpx.get(f"{public.url}/v1/models").status_code == 401
    finally:
        assert public.stop() == 0


# A fuzzed corpus: valid requests with fields replaced by arbitrary JSON, plus arbitrary JSON bodies.
_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                  max_size=4), max_leaves=12)
_FIELDS = ["model", "messages", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed",
           "logprobs", "top_logprobs", "echo", "stream", "stream_options", "logit_bias", "response_format",
           "presence_penalty", "prompt_logprobs", "lantern", "tokens", "position", "ids", "layers"]
_ROUTES = ["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize", "/v1/lantern/lens"]
_BASE = {"/v1/chat/completions": {"model": "tiny", "messages": MSG, "max_tokens": 4},
         "/v1/completions": {"model": "tiny", "prompt": "Hello", "max_tokens": 4},
         "/tokenize": {"prompt": "Hello"}, "/detokenize": {"tokens": [1, 2]},
         "/v1/lantern/lens": {"prompt": "Hello"}}


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(route=st.sampled_from(_ROUTES), replace=st.dictionaries(st.sampled_from(_FIELDS), _json, max_size=3),
       whole=st.one_of(st.none(), _json))
def test_fuzzed_bodies_never_get_a_server_error(server, route, replace, whole):
    body = whole if whole is not None else {**_BASE[route], **replace}
    if isinstance(body, dict) and route.startswith("/v1/c"):
        # Keep generation short (the point is parsing, not decoding); out-of-range values stay as drawn.
        if "max_tokens" not in replace or (isinstance(body["max_tokens"], int) and 16 < body["max_tokens"] < 4096):
            body["max_tokens"] = 4
    r = httpx.post(f"{server.url}{route}", json=body, headers=H, timeout=120)
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        envelope(r, r.status_code)
    elif body.get("stream") is not True:
        assert isinstance(r.json(), dict)


# ---------------------------------------------------------------------------------------------- abandoned work

def test_a_non_streamed_client_that_gives_up_stops_its_work(server):
    before = metrics(server)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.url}/v1/chat/completions", headers=H, timeout=0.5,
                   json={"model": "tiny", "messages": MSG, "max_tokens": LONG, "ignore_eos": True})
    after = wait_idle(server)
    assert after["lantern_requests_aborted_total"] == before["lantern_requests_aborted_total"] + 1
    generated = after["lantern_generation_tokens_total"] - before["lantern_generation_tokens_total"]
    assert generated < LONG  # stopped, not run to max_tokens


@pytest.mark.slow
def test_a_flood_of_abandoned_requests_leaves_the_engine_idle(server):
    # 50 long requests, streamed and not, whose clients give up after half a second.
    def abandon(i: int) -> None:
        body = {"model": "tiny", "messages": [{"role": "user", "content": f"request {i}"}], "max_tokens": LONG,
                "ignore_eos": True, "stream": i % 2 == 0}
        give_up = time.monotonic() + 0.5
        try:
            with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=H, timeout=0.5) as r:
                for _ in r.iter_bytes():  # a stream keeps the read timeout fed: leave it by hand
                    if time.monotonic() > give_up:
                        return
        except httpx.TimeoutException:
            return
        raise AssertionError("a 3000-token request finished within its client's half-second patience")

    before = metrics(server)
    with cf.ThreadPoolExecutor(50) as pool:
        list(pool.map(abandon, range(50)))
    idle = wait_idle(server, aborted=before["lantern_requests_aborted_total"] + 50)
    assert idle["lantern_requests_aborted_total"] - before["lantern_requests_aborted_total"] == 50
    # Nothing is left for the engine: a fresh request's steps are its own. The step that prefills its prompt
    # gives the first token and decodes the second; each later step gives one more: 5 tokens, 4 steps.
    r = httpx.post(f"{server.url}/v1/chat/completions", headers=H, timeout=60,
                   json={"model": "tiny", "messages": MSG, "max_tokens": 5, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    done = metrics(server)
    assert done["lantern_engine_steps_total"] - idle["lantern_engine_steps_total"] == 4
    assert done["lantern_running_sequences"] == 0


def test_request_timeout_stops_the_request_with_a_408(folder):
    s = Server(str(folder), "--request-timeout", "0.3")
    try:
        for stream in (False, True):
            body = {"model": "tiny", "messages": MSG, "max_tokens": LONG, "ignore_eos": True, "stream": stream}
            r = httpx.post(f"{s.url}/v1/chat/completions", json=body, timeout=60)
            if stream:  # the status went out with the first byte: the stream ends with the error instead
                last = [line for line in r.text.split("\n\n") if line.strip()][-1]
                assert json.loads(last[len("data: "):])["error"]["code"] == "request_timeout"
            else:
                assert envelope(r, 408)["code"] == "request_timeout"
        assert wait_idle(s)["lantern_requests_timed_out_total"] == 2
        good(s)
    finally:
        assert s.stop() == 0


@pytest.mark.slow
def test_sigterm_lets_in_flight_requests_finish(folder):
    s = Server(str(folder))
    result = {}

    def long_request():
        result["r"] = httpx.post(f"{s.url}/v1/chat/completions", timeout=120, json={
            "model": "tiny", "messages": MSG, "max_tokens": 400, "ignore_eos": True})

    t = threading.Thread(target=long_request)
    t.start()
    try:
        for _ in range(600):  # until the request is running
            if metrics(s)["lantern_running_sequences"] == 1:
                break
            time.sleep(0.02)
        s.proc.send_signal(signal.SIGTERM)
        t.join(120)
        assert s.proc.wait(60) == 0
    finally:
        s.stop()
    r = result["r"]
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 400
    assert r.json()["choices"][0]["finish_reason"] == "length"


# ---------------------------------------------------------------------------------------------- scoring

@pytest.fixture(scope="module")
def reference(folder):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def ref_logprobs(model, ids: list[int]) -> torch.Tensor:
    """transformers' log-softmax of each prompt token given the ones before it: (T-1,)."""
    logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def tokenize(server: Server, text: str) -> list[int]:
    return httpx.post(f"{server.url}/tokenize", json={"prompt": text}, headers=H).json()["tokens"]


def test_echo_with_logprobs_scores_the_prompt_like_transformers(server, reference):
    # lm-eval's loglikelihood request: echo + logprobs + max_tokens 1, prompts as a list of token-id lists.
    texts = ["The quick brown fox jumps", "Hello world! How are you today?"]
    ids = [tokenize(server, t) for t in texts]
    r = httpx.post(f"{server.url}/v1/completions", headers=H, json={
        "model": "tiny", "prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0, "seed": 1})
    assert r.status_code == 200, r.text
    out = r.json()
    assert [c["index"] for c in out["choices"]] == [0, 1]
    assert out["usage"]["prompt_tokens"] == sum(map(len, ids)) and out["usage"]["completion_tokens"] == 2
    for choice, prompt in zip(out["choices"], ids):
        lp = choice["logprobs"]
        n = len(prompt) + 1  # the prompt's tokens, then the one generated
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        expected = ref_logprobs(reference, prompt)
        got = torch.tensor(lp["token_logprobs"][1:len(prompt)])
        assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
        for value, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
            assert len(top) >= 1 and max(top.values()) >= value - 1e-6  # the best alternative is the best
        assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
        assert choice["text"].startswith(httpx.post(f"{server.url}/detokenize", headers=H,
                                                    json={"tokens": prompt}).json()["prompt"])
    # The same prompts as text, one request each, give the same numbers; streaming gives the same too.
    for text, choice in zip(texts, out["choices"]):
        one = httpx.post(f"{server.url}/v1/completions", headers=H, json={
            "model": "tiny", "prompt": text, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}).json()
        assert one["choices"][0]["logprobs"]["token_logprobs"] == choice["logprobs"]["token_logprobs"]
        assert one["choices"][0]["text"].startswith(text)  # echo gives the prompt as sent
        chunks = []
        with httpx.stream("POST", f"{server.url}/v1/completions", headers=H, json={
                "model": "tiny", "prompt": text, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0,
                "stream": True}) as s:
            for line in s.iter_lines():
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[6:]))
        streamed = [v for c in chunks for v in (c["choices"][0]["logprobs"] or {}).get("token_logprobs", [])]
        assert streamed == one["choices"][0]["logprobs"]["token_logprobs"]
        assert "".join(c["choices"][0]["text"] for c in chunks) == one["choices"][0]["text"]


def test_batched_prompts_number_their_choices_like_openai(server):
    c = server.client()
    prompts = ["The quick brown", "Hello world"]
    solo = [c.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0).choices[0].text
            for p in prompts]
    r = c.completions.create(model="tiny", prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert [ch.text for ch in r.choices] == [solo[0], solo[0], solo[1], solo[1]]
    streamed = ["", "", "", ""]
    for chunk in c.completions.create(model="tiny", prompt=prompts, max_tokens=6, temperature=0, n=2, stream=True):
        for ch in chunk.choices:
            streamed[ch.index] += ch.text
    assert streamed == [ch.text for ch in r.choices]


def test_chat_prompt_logprobs_in_vllm_shape(server, reference):
    r = httpx.post(f"{server.url}/v1/chat/completions", headers=H, json={
        "model": "tiny", "messages": MSG, "max_tokens": 2, "prompt_logprobs": 2, "temperature": 0}).json()
    ids = httpx.post(f"{server.url}/tokenize", headers=H, json={"messages": MSG}).json()["tokens"]
    plp = r["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    expected = ref_logprobs(reference, ids)
    for entry, tid, want in zip(plp[1:], ids[1:], expected.tolist()):
        own = entry[str(tid)]
        assert abs(own["logprob"] - want) < 1e-4 and own["rank"] >= 1
        ranks = sorted(v["rank"] for k, v in entry.items() if k != str(tid) or v["rank"] <= 2)
        assert ranks[:2] == [1, 2]


def test_tokenizer_info_lets_a_client_tokenize_through_the_server(server):
    info = httpx.get(f"{server.url}/tokenizer_info", headers=H).json()
    assert info["eos_token"] == "<|im_end|>" and info["model_max_length"] == 4096
    assert "messages" in info["chat_template"]
    # lm-eval's remote tokenizer finds the eos id by tokenizing the eos text without special tokens.
    eos = httpx.post(f"{server.url}/tokenize", headers=H,
                     json={"prompt": info["eos_token"], "add_special_tokens": False}).json()["tokens"]
    assert eos == [2] and 2 in info["end_token_ids"]
