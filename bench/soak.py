"""Soak `lantern serve`: `python -m bench.soak [--minutes 60] [--clients 4] [--model M]`.

Starts the server (default model, one torch thread so the other core stays free, an API key) on a free loopback
port, then runs --clients threads for --minutes, each sending a random mix of requests:

* chat and completions, streamed and not, some with logprobs / top_logprobs, some `echo` + `logprobs`
  (prompt-token logprobs in OpenAI's legacy shape), batched prompts and token-id prompts;
* deliberately abandoned requests: a stream closed after a few chunks, a non-streamed request whose client
  gives up after 0.3 s;
* bad requests that must get their 4xx with OpenAI's error envelope {"error": {message, type, param, code}};
* now and then /metrics, /v1/models, /tokenize, /tokenizer_info.

Every answer is checked (shape, finish_reason, usage, logprobs lengths, SSE framing, error envelopes); a 5xx
is always invalid. Every 10 s the server's resident memory (VmRSS) is sampled. The report compares RSS after
the warm-up (--warmup-minutes, default 5) with RSS at the end, counts requests by outcome and lists every
invalid answer with its request. JSON: bench/results/soak-*.json (rewritten every minute while it runs).
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import statistics
import sys
import threading
import time

from .serverproc import DEFAULT_MODEL, Server, log_path, machine, write_result

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about lanterns.",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers.",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
    "Name a famous painting by Leonardo da Vinci.",
    "Tell me a short joke about computers.",
    "Ünïcödé test: 東京 is the capital of which country? 🚀",
]
TEXTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The quick brown fox jumps over the lazy dog. The",
    "1, 2, 3, 4, 5,",
    "Café au lait, naïve façade — ",
]
FINISH = {"stop", "length"}


class Invalid(Exception):
    pass


def need(cond, what: str) -> None:
    if not cond:
        raise Invalid(what)


# ---------------------------------------------------------------- validators


def check_envelope(r, status: int | tuple[int, ...]) -> None:
    want = (status,) if isinstance(status, int) else status
    need(r.status_code in want, f"status {r.status_code}, expected {want}")
    try:
        body = r.json()
    except ValueError:
        raise Invalid("error body is not JSON") from None
    err = body.get("error") if isinstance(body, dict) else None
    need(isinstance(err, dict), "no 'error' object")
    need(set(err) >= {"message", "type", "param", "code"}, f"error keys {sorted(err)}")
    need(isinstance(err["message"], str) and err["message"], "error.message empty")
    need(isinstance(err["type"], str) and err["type"], "error.type empty")
    need(err["param"] is None or isinstance(err["param"], str), "error.param not str/null")
    need(err["code"] is None or isinstance(err["code"], str), "error.code not str/null")
    need("Traceback" not in err["message"], "traceback in error message")


def check_usage(usage, max_total: int | None) -> None:
    need(isinstance(usage, dict), "no usage")
    p, c, t = usage.get("prompt_tokens"), usage.get("completion_tokens"), usage.get("total_tokens")
    need(isinstance(p, int) and p > 0, f"usage.prompt_tokens {p}")
    need(isinstance(c, int) and c >= 1, f"usage.completion_tokens {c}")
    need(t == p + c, f"usage.total_tokens {t} != {p}+{c}")
    if max_total is not None:
        need(c <= max_total, f"completion_tokens {c} > {max_total}")


def check_finish(reason, tokens: int | None, req: dict) -> None:
    need(reason in FINISH, f"finish_reason {reason!r}")
    mt = req.get("max_tokens") or req.get("max_completion_tokens")
    if tokens is not None and mt is not None:
        if reason == "length":
            need(tokens == mt, f"finish_reason length after {tokens} tokens, max_tokens {mt}")
        else:
            need(tokens <= mt, f"{tokens} tokens > max_tokens {mt}")
    if req.get("ignore_eos") and not req.get("stop"):
        need(reason == "length", f"ignore_eos but finish_reason {reason!r}")


def check_chat_logprobs(lp, top: int, tokens: int | None) -> None:
    need(isinstance(lp, dict) and isinstance(lp.get("content"), list), "chat logprobs.content missing")
    for e in lp["content"]:
        need(isinstance(e.get("token"), str), "logprob token not str")
        need(isinstance(e.get("logprob"), (int, float)) and e["logprob"] <= 1e-4, f"logprob {e.get('logprob')}")
        need(isinstance(e.get("bytes"), list), "logprob bytes missing")
        need(isinstance(e.get("top_logprobs"), list) and len(e["top_logprobs"]) == top,
             f"top_logprobs has {len(e.get('top_logprobs') or [])}, expected {top}")
        vals = [t["logprob"] for t in e["top_logprobs"]]
        need(vals == sorted(vals, reverse=True), "top_logprobs not in descending order")
    if tokens is not None:
        need(len(lp["content"]) == tokens, f"{len(lp['content'])} logprob entries for {tokens} tokens")


def check_legacy_logprobs(lp, n_alt: int, expect_len: int | None, echo: bool, base_offset: int) -> None:
    need(isinstance(lp, dict), "logprobs missing")
    keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    need(all(isinstance(lp.get(k), list) for k in keys), f"logprobs keys {sorted(lp)}")
    lens = {len(lp[k]) for k in keys}
    need(len(lens) == 1, f"logprobs lists of different lengths {[len(lp[k]) for k in keys]}")
    if expect_len is not None:
        need(len(lp["tokens"]) == expect_len, f"{len(lp['tokens'])} logprob tokens, expected {expect_len}")
    for k, (tok, l, top, off) in enumerate(zip(*(lp[k] for k in keys))):
        need(isinstance(tok, str), "token not str")
        if echo and k == 0:
            need(l is None and top is None, "first echoed token has a logprob (expected null)")
            need(off == 0, f"first text_offset {off}")
            continue
        need(isinstance(l, (int, float)) and l <= 1e-4, f"token_logprob {l}")
        need(isinstance(top, dict) and (1 <= len(top) <= n_alt + 1 if n_alt else len(top) <= 1),
             f"top_logprobs entry {top!r} for logprobs={n_alt}")
        need(all(v <= 1e-4 for v in top.values()), "top logprob > 0")
    offs = lp["text_offset"]
    if offs and not echo:
        need(offs[0] == base_offset, f"first text_offset {offs[0]}, expected {base_offset}")
    for a, b, tok in zip(offs, offs[1:], lp["tokens"]):
        need(b == a + len(tok), "text_offset not cumulative")


def parse_sse(lines) -> tuple[list[dict], bool]:
    """(JSON chunks, saw [DONE]); every non-empty line must be `data: ...`."""
    chunks, done = [], False
    for line in lines:
        if not line:
            continue
        need(line.startswith("data: "), f"SSE line {line[:80]!r}")
        data = line[6:]
        need(not done, "data after [DONE]")
        if data == "[DONE]":
            done = True
            continue
        try:
            chunks.append(json.loads(data))
        except ValueError:
            raise Invalid(f"SSE data not JSON: {data[:80]!r}") from None
    return chunks, done


def check_stream_chunks(chunks: list[dict], done: bool, req: dict, kind: str, total_choices: int) -> None:
    need(done, "stream ended without [DONE]")
    need(chunks, "no chunks")
    for c in chunks:
        need("error" not in c, f"error in stream: {c.get('error')}")
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    need(all(c.get("object") == obj for c in chunks), "chunk object")
    need(len({c.get("id") for c in chunks}) == 1, "chunk ids differ")
    include_usage = (req.get("stream_options") or {}).get("include_usage")
    body = chunks[:-1] if include_usage else chunks
    finishes = collections.Counter()
    counts = collections.Counter()
    after_finish = set()
    for c in body:
        need(c.get("choices"), "chunk without choices")
        for ch in c["choices"]:
            i = ch["index"]
            need(0 <= i < total_choices, f"choice index {i}")
            need(i not in after_finish, f"choice {i} continues after its finish_reason")
            if kind == "chat":
                need(isinstance(ch.get("delta"), dict), "no delta")
                if req.get("logprobs") and ch.get("logprobs"):
                    check_chat_logprobs(ch["logprobs"], req.get("top_logprobs") or 0, None)
                    counts[i] += len(ch["logprobs"]["content"])
            else:
                need(isinstance(ch.get("text"), str), "no text")
            if ch.get("finish_reason"):
                need(ch["finish_reason"] in FINISH, f"finish_reason {ch['finish_reason']!r}")
                finishes[i] += 1
                after_finish.add(i)
    need(set(finishes) == set(range(total_choices)) and all(v == 1 for v in finishes.values()),
         f"finish_reasons per choice {dict(finishes)}")
    if include_usage:
        last = chunks[-1]
        need(last.get("choices") == [], "usage chunk has choices")
        check_usage(last.get("usage"), None)
        if kind == "chat" and req.get("logprobs") and total_choices == 1:
            need(counts[0] == last["usage"]["completion_tokens"], "streamed logprob entries != completion_tokens")


# ---------------------------------------------------------------- the traffic


class Soak:
    def __init__(self, server: Server, args):
        self.server, self.args = server, args
        self.name = server.name
        self.counts: collections.Counter = collections.Counter()
        self.latency: dict[str, list[float]] = collections.defaultdict(list)
        self.invalid: list[dict] = []
        self.invalid_total = 0
        self.lock = threading.Lock()
        self.stop_at = 0.0

    def url(self, path: str) -> str:
        return self.server.base + path

    def record(self, kind: str, outcome: str, seconds: float) -> None:
        with self.lock:
            self.counts[f"{kind}:{outcome}"] += 1
            self.counts[f"outcome:{outcome}"] += 1
            if outcome == "ok" and len(self.latency[kind]) < 100000:
                self.latency[kind].append(seconds)

    def bad(self, kind: str, why: str, request: dict, response) -> None:
        with self.lock:
            self.invalid_total += 1
            self.counts[f"{kind}:invalid"] += 1
            self.counts["outcome:invalid"] += 1
            if len(self.invalid) < 100:
                self.invalid.append({"time_s": round(time.monotonic() - self.t0, 1), "kind": kind, "why": why,
                                     "request": request, "response": response})
        print(f"  INVALID {kind}: {why}", file=sys.stderr, flush=True)

    # ---- request builders (rng per thread)

    def sampling(self, rng: random.Random, req: dict) -> dict:
        req["max_tokens"] = rng.randint(16, self.args.max_tokens)
        r = rng.random()
        if r < 0.4:
            req["temperature"] = 0
        elif r < 0.8:
            req.update(temperature=round(rng.uniform(0.3, 1.2), 2), top_p=0.9, seed=rng.randint(0, 10**6))
        else:
            req.update(temperature=0.8, top_k=20, min_p=0.05, repetition_penalty=1.1)
        if rng.random() < 0.2:
            req["ignore_eos"] = True
        if rng.random() < 0.1:
            req["stop"] = ["\n\n", "."]
        return req

    def chat_req(self, rng, stream: bool) -> dict:
        req = {"model": self.name, "messages": [{"role": "user", "content": rng.choice(PROMPTS)}]}
        if rng.random() < 0.2:
            req["messages"].insert(0, {"role": "system", "content": "You are a terse assistant."})
        self.sampling(rng, req)
        if rng.random() < 0.3:
            req.update(logprobs=True, top_logprobs=rng.randint(0, 5))
        if rng.random() < 0.1:
            req["n"] = 2
        if stream:
            req["stream"] = True
            if rng.random() < 0.7:
                req["stream_options"] = {"include_usage": True}
        return req

    def completion_req(self, rng, stream: bool) -> dict:
        r = rng.random()
        if r < 0.15:
            prompt = [rng.choice(TEXTS), rng.choice(TEXTS)]
        elif r < 0.3:
            prompt = [rng.randint(100, 20000) for _ in range(rng.randint(1, 12))]
        else:
            prompt = rng.choice(TEXTS)
        req = self.sampling(rng, {"model": self.name, "prompt": prompt})
        if rng.random() < 0.4:
            req["logprobs"] = rng.randint(0, 5)
            if rng.random() < 0.5:
                req["echo"] = True
        elif rng.random() < 0.1:
            req["echo"] = True
        if stream:
            req["stream"] = True
            if rng.random() < 0.7:
                req["stream_options"] = {"include_usage": True}
        return req

    # ---- one request each

    def do_chat(self, client, rng) -> None:
        stream = rng.random() < 0.5
        req = self.chat_req(rng, stream)
        kind = "chat_stream" if stream else "chat"
        self.post_and_check(client, kind, "/v1/chat/completions", req)

    def do_completion(self, client, rng) -> None:
        stream = rng.random() < 0.5
        req = self.completion_req(rng, stream)
        kind = "completion_stream" if stream else "completion"
        self.post_and_check(client, kind, "/v1/completions", req)

    def post_and_check(self, client, kind: str, path: str, req: dict) -> None:
        start = time.perf_counter()
        text = None
        status = None
        try:
            if req.get("stream"):
                with client.stream("POST", self.url(path), json=req, headers=self.server.headers) as r:
                    status = r.status_code
                    if status != 200:
                        r.read()
                        text = r.text
                        self.non_200(kind, req, r)
                        return
                    lines = list(r.iter_lines())
                text = "\n".join(lines)
                chunks, done = parse_sse(lines)
                n_choices = (len(req["prompt"]) if isinstance(req.get("prompt"), list) and req["prompt"]
                             and isinstance(req["prompt"][0], (str, list)) else 1) * req.get("n", 1)
                check_stream_chunks(chunks, done, req, "chat" if kind.startswith("chat") else "completion", n_choices)
            else:
                r = client.post(self.url(path), json=req, headers=self.server.headers)
                status, text = r.status_code, r.text
                if status != 200:
                    self.non_200(kind, req, r)
                    return
                if kind == "chat":
                    self.check_chat(r.json(), req)
                else:
                    self.check_completion(client, r.json(), req)
            self.record(kind, "ok", time.perf_counter() - start)
        except Invalid as e:
            self.bad(kind, str(e), req, {"status": status, "body": (text or "")[:4000]})
        except Exception as e:  # a transport error on a request we did not abandon
            self.bad(kind, f"{type(e).__name__}: {e}", req, {"status": status, "body": (text or "")[:4000]})

    def non_200(self, kind: str, req: dict, r) -> None:
        if r.status_code == 429:  # the queue was full: allowed, if in the envelope with Retry-After
            try:
                check_envelope(r, 429)
                need("retry-after" in r.headers, "429 without Retry-After")
                self.record(kind, "rate_limited", 0)
            except Invalid as e:
                self.bad(kind, str(e), req, {"status": r.status_code, "body": r.text[:4000]})
            return
        self.bad(kind, f"unexpected status {r.status_code}", req, {"status": r.status_code, "body": r.text[:4000]})

    def check_chat(self, body: dict, req: dict) -> None:
        n = req.get("n", 1)
        need(body.get("object") == "chat.completion", f"object {body.get('object')!r}")
        need(str(body.get("id", "")).startswith("chatcmpl"), "id")
        need(body.get("model") == self.name, "model")
        need(isinstance(body.get("created"), int), "created")
        ch = body.get("choices")
        need(isinstance(ch, list) and len(ch) == n, f"{len(ch or [])} choices, expected {n}")
        need([c["index"] for c in ch] == list(range(n)), "choice indices")
        check_usage(body.get("usage"), n * (req.get("max_tokens") or 10**9))
        for c in ch:
            m = c.get("message") or {}
            need(m.get("role") == "assistant" and isinstance(m.get("content"), str), f"message {m!r}")
            tokens = body["usage"]["completion_tokens"] if n == 1 else None
            if req.get("logprobs"):
                check_chat_logprobs(c.get("logprobs"), req.get("top_logprobs") or 0, tokens)
                if tokens is None:
                    tokens = len(c["logprobs"]["content"])
            else:
                need(c.get("logprobs") is None, "logprobs present though not asked")
            check_finish(c.get("finish_reason"), tokens, req)

    def check_completion(self, client, body: dict, req: dict) -> None:
        prompt = req["prompt"]
        prompts = prompt if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) else [prompt]
        n = req.get("n", 1)
        need(body.get("object") == "text_completion", f"object {body.get('object')!r}")
        need(str(body.get("id", "")).startswith("cmpl"), "id")
        ch = body.get("choices")
        need(isinstance(ch, list) and len(ch) == len(prompts) * n, f"{len(ch or [])} choices")
        need([c["index"] for c in ch] == list(range(len(ch))), "choice indices")
        check_usage(body.get("usage"), len(ch) * req["max_tokens"])
        one = len(ch) == 1
        for c in ch:
            p = prompts[c["index"] // n]
            need(isinstance(c.get("text"), str), "text")
            if req.get("echo") and isinstance(p, str):
                need(c["text"].startswith(p), "echo: text does not start with the prompt")
            tokens = body["usage"]["completion_tokens"] if one else None
            lp = c.get("logprobs")
            if req.get("logprobs") is not None:
                prompt_len = body["usage"]["prompt_tokens"] if one else None
                expect = (prompt_len + tokens) if (req.get("echo") and one) else tokens
                base = len(p) if (req.get("echo") and isinstance(p, str)) else 0
                check_legacy_logprobs(lp, req["logprobs"], expect, bool(req.get("echo")), base)
                if tokens is None and not req.get("echo"):
                    tokens = len(lp["tokens"])
            else:
                need(lp is None, "logprobs present though not asked")
            check_finish(c.get("finish_reason"), tokens, req)

    def do_abandon_stream(self, client, rng) -> None:
        chat = rng.random() < 0.5
        req = self.chat_req(rng, True) if chat else self.completion_req(rng, True)
        req.update(max_tokens=self.args.max_tokens, ignore_eos=True)
        req.pop("stop", None)
        path = "/v1/chat/completions" if chat else "/v1/completions"
        keep = rng.randint(1, 4)
        try:
            with client.stream("POST", self.url(path), json=req, headers=self.server.headers) as r:
                if r.status_code != 200:
                    r.read()
                    return self.non_200("abandoned_stream", req, r)
                got = 0
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        need(not line[6:].startswith('{"error"'), f"error chunk {line[:200]}")
                        got += 1
                        if got >= keep:
                            break  # leaving the block closes the connection mid-stream
            self.record("abandoned_stream", "cancelled", 0)
        except Invalid as e:
            self.bad("abandoned_stream", str(e), req, None)
        except Exception as e:
            self.bad("abandoned_stream", f"{type(e).__name__}: {e}", req, None)

    def do_abandon_timeout(self, client, rng) -> None:
        import httpx

        chat = rng.random() < 0.5
        req = self.chat_req(rng, False) if chat else self.completion_req(rng, False)
        req.update(max_tokens=self.args.max_tokens, ignore_eos=True, n=1)
        req.pop("stop", None)
        path = "/v1/chat/completions" if chat else "/v1/completions"
        start = time.perf_counter()
        try:
            r = client.post(self.url(path), json=req, headers=self.server.headers, timeout=0.3)
        except httpx.TimeoutException:
            return self.record("abandoned_timeout", "cancelled", 0)
        except Exception as e:
            return self.bad("abandoned_timeout", f"{type(e).__name__}: {e}", req, None)
        # It answered within 0.3 s: check it like any other answer.
        try:
            if r.status_code != 200:
                return self.non_200("abandoned_timeout", req, r)
            self.check_chat(r.json(), req) if chat else self.check_completion(client, r.json(), req)
            self.record("abandoned_timeout", "ok", time.perf_counter() - start)
        except Invalid as e:
            self.bad("abandoned_timeout", str(e), req, {"status": r.status_code, "body": r.text[:4000]})

    def bad_requests(self) -> list[tuple[str, str, str, object, dict | None, int | tuple]]:
        """(label, method, path, json body or raw bytes, headers override, expected status)."""
        n, long = self.name, "word " * 5000
        msgs = [{"role": "user", "content": "Hi"}]
        return [
            ("unknown model", "POST", "/v1/chat/completions", {"model": "nope", "messages": msgs}, None, 404),
            ("no messages", "POST", "/v1/chat/completions", {"model": n}, None, 400),
            ("empty messages", "POST", "/v1/chat/completions", {"model": n, "messages": []}, None, 400),
            ("bad role", "POST", "/v1/chat/completions", {"model": n, "messages": [{"role": "x", "content": "a"}]},
             None, 400),
            ("temperature 5", "POST", "/v1/chat/completions", {"model": n, "messages": msgs, "temperature": 5}, None,
             400),
            ("max_tokens 0", "POST", "/v1/completions", {"model": n, "prompt": "a", "max_tokens": 0}, None, 400),
            ("unknown field", "POST", "/v1/chat/completions", {"model": n, "messages": msgs, "frobnicate": 1}, None,
             400),
            ("logprobs 6", "POST", "/v1/completions", {"model": n, "prompt": "a", "logprobs": 6}, None, 400),
            ("top_logprobs w/o logprobs", "POST", "/v1/chat/completions",
             {"model": n, "messages": msgs, "top_logprobs": 2}, None, 400),
            ("stream_options w/o stream", "POST", "/v1/completions",
             {"model": n, "prompt": "a", "stream_options": {"include_usage": True}}, None, 400),
            ("logit_bias out of vocab", "POST", "/v1/completions",
             {"model": n, "prompt": "a", "logit_bias": {"99999999": 1}}, None, 400),
            ("5 stop strings", "POST", "/v1/completions",
             {"model": n, "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, None, 400),
            ("prompt too long", "POST", "/v1/completions", {"model": n, "prompt": long, "max_tokens": 16}, None, 400),
            ("token id out of vocab", "POST", "/v1/completions", {"model": n, "prompt": [1, 99999999]}, None, 400),
            ("empty prompt list", "POST", "/v1/completions", {"model": n, "prompt": []}, None, 400),
            ("mixed prompt list", "POST", "/v1/completions", {"model": n, "prompt": ["a", 1]}, None, 400),
            ("invalid JSON", "POST", "/v1/chat/completions", b'{"model": "m", "messages": [', None, 400),
            ("not UTF-8", "POST", "/v1/completions", b'{"model": "m", "prompt": "\xff\xfe"}', None, 400),
            ("lone surrogate", "POST", "/v1/completions", b'{"model": "m", "prompt": "\\ud800"}', None, 400),
            ("deep JSON", "POST", "/v1/completions", b'{"a": ' + b"[" * 200 + b"]" * 200 + b"}", None, 400),
            ("n too large", "POST", "/v1/chat/completions", {"model": n, "messages": msgs, "n": 100}, None, 400),
            ("no API key", "POST", "/v1/chat/completions", {"model": n, "messages": msgs}, {}, 401),
            ("wrong API key", "POST", "/v1/completions", {"model": n, "prompt": "a"},
             {"Authorization": "Bearer wrong"}, 401),
            ("metrics w/o key", "GET", "/metrics", None, {}, 401),
            ("unknown route", "GET", "/v1/nothing-here", None, None, 404),
            ("GET on a POST route", "GET", "/v1/chat/completions", None, None, 405),
            ("detokenize out of vocab", "POST", "/detokenize", {"tokens": [-1]}, None, 400),
            ("tokenize both", "POST", "/tokenize", {"prompt": "a", "messages": msgs}, None, 400),
        ]

    def do_bad(self, client, rng) -> None:
        label, method, path, body, headers, status = rng.choice(self.bad_requests())
        hdrs = self.server.headers if headers is None else headers
        req = {"label": label, "method": method, "path": path,
               "body": body.decode("latin-1") if isinstance(body, bytes) else body}
        try:
            if isinstance(body, bytes):
                r = client.request(method, self.url(path), content=body,
                                   headers={**hdrs, "Content-Type": "application/json"})
            elif body is None:
                r = client.request(method, self.url(path), headers=hdrs)
            else:
                r = client.request(method, self.url(path), json=body, headers=hdrs)
        except Exception as e:
            return self.bad("bad_request", f"{type(e).__name__}: {e}", req, None)
        try:
            check_envelope(r, status)
            self.record("bad_request", "rejected_4xx", 0)
        except Invalid as e:
            self.bad("bad_request", f"{label}: {e}", req, {"status": r.status_code, "body": r.text[:4000]})

    def do_misc(self, client, rng) -> None:
        which = rng.choice(["metrics", "models", "tokenize", "tokenizer_info", "detokenize"])
        req = {"route": which}
        start = time.perf_counter()
        try:
            if which == "metrics":
                r = client.get(self.url("/metrics"), headers=self.server.headers)
                need(r.status_code == 200 and "lantern_running_sequences" in r.text, f"metrics {r.status_code}")
            elif which == "models":
                r = client.get(self.url("/v1/models"), headers=self.server.headers)
                need(r.status_code == 200 and r.json()["data"][0]["id"] == self.name, f"models {r.status_code}")
            elif which == "tokenize":
                r = client.post(self.url("/tokenize"), json={"prompt": rng.choice(TEXTS)}, headers=self.server.headers)
                b = r.json()
                need(r.status_code == 200 and b["count"] == len(b["tokens"]), f"tokenize {r.status_code}")
            elif which == "detokenize":
                r = client.post(self.url("/detokenize"), json={"tokens": [504, 3575, 282]}, headers=self.server.headers)
                need(r.status_code == 200 and isinstance(r.json().get("prompt"), str), f"detokenize {r.status_code}")
            else:
                r = client.get(self.url("/tokenizer_info"), headers=self.server.headers)
                need(r.status_code == 200 and "vocab_size" in r.json(), f"tokenizer_info {r.status_code}")
            self.record("misc", "ok", time.perf_counter() - start)
        except Invalid as e:
            self.bad("misc", str(e), req, {"status": r.status_code, "body": r.text[:2000]})
        except Exception as e:
            self.bad("misc", f"{type(e).__name__}: {e}", req, None)

    def worker(self, k: int) -> None:
        import httpx

        rng = random.Random(self.args.seed * 1000 + k)
        actions = [(self.do_chat, 30), (self.do_completion, 30), (self.do_abandon_stream, 10),
                   (self.do_abandon_timeout, 8), (self.do_bad, 15), (self.do_misc, 7)]
        fns, weights = zip(*actions)
        with httpx.Client(timeout=httpx.Timeout(120, connect=10)) as client:
            while time.monotonic() < self.stop_at:
                rng.choices(fns, weights)[0](client, rng)

    # ---- the run

    def run(self) -> dict:
        args = self.args
        self.t0 = time.monotonic()
        self.stop_at = self.t0 + args.minutes * 60
        warmup_s = min(args.warmup_minutes * 60, args.minutes * 60 / 4)
        samples: list[tuple[float, float]] = []
        metric_samples: list[dict] = []
        threads = [threading.Thread(target=self.worker, args=(k,), daemon=True) for k in range(args.clients)]
        for t in threads:
            t.start()
        next_write = self.t0 + 60
        while any(t.is_alive() for t in threads):
            now = time.monotonic()
            rss = self.server.rss_mb()
            if rss is None:
                print("  the server process is gone", file=sys.stderr)
                break
            samples.append((round(now - self.t0, 1), round(rss, 1)))
            if len(samples) % 6 == 1:
                try:
                    m = self.server.metrics()
                    metric_samples.append({"t": round(now - self.t0), "running": m.get("lantern_running_sequences"),
                                           "queue": m.get("lantern_queue_depth"),
                                           "aborted": m.get("lantern_requests_aborted_total"),
                                           "steps": m.get("lantern_engine_steps_total")})
                except Exception as e:
                    metric_samples.append({"t": round(now - self.t0), "error": repr(e)})
                done = sum(v for k, v in self.counts.items() if k.startswith("outcome:"))
                print(f"  {now - self.t0:7.0f} s  RSS {rss:7.1f} MiB  requests {done}  invalid {self.invalid_total}",
                      flush=True)
            if now >= next_write:
                write_result("soak", self.summary(samples, metric_samples, warmup_s, running=True), self.stamp)
                next_write += 60
            time.sleep(max(0.0, 10 - (time.monotonic() - now)))
        for t in threads:
            t.join(timeout=180)
        # The clients are done: the server must go idle (nothing left running or queued).
        idle = None
        for _ in range(100):
            m = self.server.metrics()
            if m.get("lantern_running_sequences") == 0 and m.get("lantern_queue_depth") == 0:
                idle = {"running": 0, "queue": 0, "aborted_total": m.get("lantern_requests_aborted_total"),
                        "steps_total": m.get("lantern_engine_steps_total")}
                break
            time.sleep(0.1)
        rss = self.server.rss_mb()
        if rss is not None:
            samples.append((round(time.monotonic() - self.t0, 1), round(rss, 1)))
        out = self.summary(samples, metric_samples, warmup_s, running=False)
        out["idle_after"] = idle or "NOT IDLE 10 s after the clients stopped"
        return out

    def summary(self, samples, metric_samples, warmup_s: float, running: bool) -> dict:
        after = [s for s in samples if s[0] >= warmup_s]
        warm = after[0][1] if after else None
        end = samples[-1][1] if samples else None
        growth = None if not warm or end is None else round((end - warm) / warm * 100, 2)
        slope = None
        if len(after) >= 3:
            xs, ys = [s[0] for s in after], [s[1] for s in after]
            mx, my = statistics.fmean(xs), statistics.fmean(ys)
            den = sum((x - mx) ** 2 for x in xs)
            slope = round(sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den * 3600, 2) if den else None
        with self.lock:
            counts = dict(sorted(self.counts.items()))
            lat = {k: {"n": len(v), "median_s": round(statistics.median(v), 3),
                       "p95_s": round(sorted(v)[int(0.95 * (len(v) - 1))], 3)} for k, v in self.latency.items() if v}
            invalid = list(self.invalid)
        return {"tool": "soak", "status": "running" if running else "finished", "minutes": self.args.minutes,
                "clients": self.args.clients, "max_tokens": self.args.max_tokens, "threads": self.args.threads,
                "model": str(self.args.model),
                "server_cmd": [c if c != self.server.api_key else "KEY" for c in self.server.cmd],
                "machine": self.mach, "warmup_s": warmup_s,
                "rss_mb": {"start": samples[0][1] if samples else None, "after_warmup": warm, "end": end,
                           "max": max((s[1] for s in samples), default=None), "growth_pct": growth,
                           "slope_mb_per_hour_after_warmup": slope},
                "counts": counts, "latency_ok": lat, "invalid_total": self.invalid_total, "invalid": invalid,
                "rss_samples": samples, "metrics_samples": metric_samples}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=60)
    ap.add_argument("--warmup-minutes", type=float, default=5)
    ap.add_argument("--clients", type=int, default=4, help="concurrent client threads (default 4)")
    ap.add_argument("--max-tokens", type=int, default=64, help="largest max_tokens sent (default 64; at least 16)")
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads (default 1)")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    import datetime

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    log = log_path("soak", stamp)
    with Server(args.model, name="soak", threads=args.threads, log_path=log) as server:
        soak = Soak(server, args)
        soak.stamp, soak.mach = stamp, machine()
        print(f"soak: {args.minutes:g} min, {args.clients} clients, server pid {server.pid} on {server.base} "
              f"(ready in {server.load_s:.1f} s; log {log})", flush=True)
        out = soak.run()
        code = server.stop()
    out["server_exit_code_after_sigterm"] = code
    path = write_result("soak", out, stamp)
    r = out["rss_mb"]
    print(f"\nsoak finished: {args.minutes:g} min, {args.clients} clients")
    print(f"RSS MiB: start {r['start']}, after warm-up ({out['warmup_s'] / 60:g} min) {r['after_warmup']}, "
          f"end {r['end']}, max {r['max']}; growth {r['growth_pct']}% "
          f"(trend after warm-up {r['slope_mb_per_hour_after_warmup']} MiB/h)")
    outcomes = {k.split(":", 1)[1]: v for k, v in out["counts"].items() if k.startswith("outcome:")}
    print("requests by outcome:", outcomes)
    print("by kind:", {k: v for k, v in out["counts"].items() if not k.startswith("outcome:")})
    print("server idle afterwards:", out["idle_after"], "; exit code after SIGTERM:", code)
    print(f"invalid responses: {out['invalid_total']}")
    for bad in out["invalid"][:10]:
        print("  ", json.dumps(bad)[:1500])
    print(f"result: {path}")
    return 1 if out["invalid_total"] else 0


if __name__ == "__main__":
    sys.exit(main())
