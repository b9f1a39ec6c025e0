"""Flood `lantern serve` with abandoned requests: `python -m bench.flood [--requests 50] [--model M]`.

Starts the server (default model) on a free loopback port and:

1. times a fresh one-line chat request on the idle server (the baseline; after one warm-up request);
2. flood A: sends --requests long requests at once (max_tokens 512, ignore_eos; streamed and non-streamed, chat
   and completions) whose clients all give up after 0.5 s; then polls /metrics until running = 0, queue depth
   = 0 and lantern_engine_steps_total has stopped rising (unchanged for --still seconds). "Idle after" is the
   time from the last client giving up to the first poll of that still state;
3. flood B: the same flood again, and the moment the last client has given up, the same one-line chat request:
   its latency is compared with the baseline.

Targets: idle within 1 s, the next answer within 2 s. JSON: bench/results/flood-*.json.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import threading
import time

from .serverproc import DEFAULT_MODEL, Server, log_path, machine, write_result

QUESTION = {"role": "user", "content": "What is the capital of France?"}
TOPICS = ["dragons", "the sea", "a lighthouse keeper", "robots", "the moon", "a small village", "trains",
          "an old library", "a mountain climber", "the desert"]


def one_line_chat(client, server: Server, max_tokens: int) -> tuple[float, dict]:
    start = time.perf_counter()
    r = client.post(server.base + "/v1/chat/completions", headers=server.headers, timeout=120,
                    json={"model": server.name, "messages": [QUESTION], "temperature": 0, "max_tokens": max_tokens})
    seconds = time.perf_counter() - start
    r.raise_for_status()
    body = r.json()
    return seconds, {"text": body["choices"][0]["message"]["content"], "usage": body["usage"],
                     "finish_reason": body["choices"][0]["finish_reason"]}


def flood(server: Server, n: int, give_up: float, max_tokens: int) -> dict:
    """n clients at once, each leaving after `give_up` s; returns when all have left."""
    import httpx

    barrier = threading.Barrier(n + 1)
    results: list[dict] = [None] * n

    def client_k(k: int) -> None:
        stream, chat = k % 2 == 0, k % 4 < 2
        topic = TOPICS[k % len(TOPICS)]
        text = (f"Write a very long, detailed story about {topic}, number {k}. Describe every character, every "
                f"place and every event at great length, and do not stop early.")
        body = {"model": server.name, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.7,
                "seed": k, "stream": stream}
        if chat:
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = text
        path = "/v1/chat/completions" if chat else "/v1/completions"
        info = {"k": k, "stream": stream, "chat": chat, "chunks": 0}
        with httpx.Client(timeout=httpx.Timeout(give_up, connect=5)) as client:
            barrier.wait()
            start = time.monotonic()
            deadline = start + give_up
            try:
                if stream:
                    with client.stream("POST", server.base + path, json=body, headers=server.headers) as r:
                        info["status"] = r.status_code
                        for line in r.iter_lines():
                            if line.startswith("data: "):
                                info["chunks"] += 1
                            if time.monotonic() >= deadline:
                                break
                    info["outcome"] = "gave_up"
                else:
                    r = client.post(server.base + path, json=body, headers=server.headers)
                    info["status"] = r.status_code
                    info["outcome"] = "answered"  # should not happen: 512 tokens take longer than 0.5 s
            except httpx.TimeoutException:
                info["outcome"] = "gave_up"
            except httpx.HTTPError as e:
                info["outcome"] = f"error: {type(e).__name__}: {e}"
            info["left_s"] = time.monotonic() - start
            info["left_at"] = time.monotonic()
        results[k] = info

    threads = [threading.Thread(target=client_k, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.monotonic()
    for t in threads:
        t.join()
    last_left = max(r["left_at"] for r in results)
    outcomes: dict[str, int] = {}
    for r in results:
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
    return {"started": started, "last_left": last_left, "outcomes": outcomes,
            "statuses": sorted({r.get("status") for r in results}, key=str),
            "stream_chunks_total": sum(r["chunks"] for r in results),
            "client_left_after_s": {"min": round(min(r["left_s"] for r in results), 3),
                                    "max": round(max(r["left_s"] for r in results), 3)}}


def until_idle(server: Server, client, since: float, still: float, limit: float = 120) -> dict:
    """Poll /metrics until running = queue = 0 and the step counter has not moved for `still` seconds."""
    polls = []
    candidate = None  # (time, steps) of the first poll of the current still stretch
    while time.monotonic() - since < limit:
        t = time.monotonic()
        m = server.metrics(client)
        running, queue = m.get("lantern_running_sequences"), m.get("lantern_queue_depth")
        steps = m.get("lantern_engine_steps_total")
        polls.append((round(t - since, 3), running, queue, steps))
        if running == 0 and queue == 0:
            if candidate is None or steps != candidate[1]:
                candidate = (t, steps)
            elif t - candidate[0] >= still:
                return {"idle_after_s": round(candidate[0] - since, 3), "steps_when_idle": steps,
                        "aborted_total": m.get("lantern_requests_aborted_total"), "polls": polls}
        else:
            candidate = None
        time.sleep(0.02)
    return {"idle_after_s": None, "polls": polls}


def main(argv: list[str] | None = None) -> int:
    import httpx

    ap = argparse.ArgumentParser(prog="python -m bench.flood", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--give-up", type=float, default=0.5, help="seconds each flood client waits (default 0.5)")
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--answer-tokens", type=int, default=32, help="max_tokens of the one-line chat (default 32)")
    ap.add_argument("--still", type=float, default=0.5, help="seconds the step counter must stay still (0.5)")
    ap.add_argument("--threads", type=int, help="the server's torch threads (default: the server's own)")
    args = ap.parse_args(argv)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    log = log_path("flood", stamp)
    # --max-queue so that all of the flood is admitted (queued) rather than refused with 429.
    with Server(args.model, name="flood", threads=args.threads, log_path=log,
                extra=["--max-queue", str(max(64, args.requests))]) as server, httpx.Client() as client:
        print(f"flood: server pid {server.pid} on {server.base} (ready in {server.load_s:.1f} s; log {log})")
        one_line_chat(client, server, args.answer_tokens)  # warm-up
        base_runs = [one_line_chat(client, server, args.answer_tokens) for _ in range(3)]
        baseline = statistics.median(s for s, _ in base_runs)
        reference = base_runs[0][1]
        print(f"baseline: one-line chat {baseline * 1000:.0f} ms (median of 3; {reference['usage']['completion_tokens']}"
              f" tokens: {reference['text']!r})")

        a = flood(server, args.requests, args.give_up, args.max_tokens)
        idle = until_idle(server, client, a["last_left"], args.still)
        first_left = a["started"] + a["client_left_after_s"]["min"]
        print(f"flood A: {args.requests} requests, clients left after {a['client_left_after_s']['min']:.2f}-"
              f"{a['client_left_after_s']['max']:.2f} s, outcomes {a['outcomes']}, statuses {a['statuses']}")
        if idle["idle_after_s"] is None:
            print("  NOT IDLE within 120 s")
        else:
            print(f"  idle (running 0, queue 0, steps still for {args.still:g} s) {idle['idle_after_s'] * 1000:.0f} ms "
                  f"after the last client left ({(a['last_left'] + idle['idle_after_s'] - first_left) * 1000:.0f} ms "
                  f"after the first); aborted_total {idle['aborted_total']:.0f}")
        after_idle, after_idle_answer = one_line_chat(client, server, args.answer_tokens)

        b = flood(server, args.requests, args.give_up, args.max_tokens)
        right_after, answer = one_line_chat(client, server, args.answer_tokens)
        print(f"flood B: outcomes {b['outcomes']}; one-line chat sent as the last client left: "
              f"{right_after * 1000:.0f} ms (baseline {baseline * 1000:.0f} ms, x{right_after / baseline:.2f}); "
              f"after idle (flood A): {after_idle * 1000:.0f} ms")
        same = answer["text"] == reference["text"]
        idle_b = until_idle(server, client, time.monotonic(), args.still)
        final = server.metrics(client)
        code = server.stop()

    ok_idle = idle["idle_after_s"] is not None and idle["idle_after_s"] <= 1.0
    ok_next = right_after <= 2.0
    print(f"targets: idle within 1 s: {'PASS' if ok_idle else 'FAIL'}; next answer within 2 s: "
          f"{'PASS' if ok_next else 'FAIL'} (same greedy answer as the baseline: {same})")
    out = {"tool": "flood", "machine": machine(), "args": vars(args),
           "server_cmd": [c if c != server.api_key else "KEY" for c in server.cmd], "server_exit_code": code,
           "baseline_s": round(baseline, 4), "baseline_runs_s": [round(s, 4) for s, _ in base_runs],
           "reference_answer": reference,
           "flood_a": {**a, "idle": idle}, "answer_after_idle_s": round(after_idle, 4),
           "flood_b": b, "answer_right_after_flood_s": round(right_after, 4), "answer_right_after": answer,
           "same_answer_as_baseline": same, "idle_after_flood_b": {k: v for k, v in idle_b.items() if k != "polls"},
           "final_metrics": {k: v for k, v in final.items() if k.startswith("lantern_") and "bucket" not in k},
           "targets": {"idle_within_1s": ok_idle, "next_answer_within_2s": ok_next}}
    path = write_result("flood", out, stamp)
    print(f"result: {path}")
    return 0 if ok_idle and ok_next else 1


if __name__ == "__main__":
    sys.exit(main())
