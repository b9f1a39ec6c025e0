"""Aggregate decode throughput of `lantern serve` at N concurrent streaming clients, through HTTP with the
official openai client: `python -m bench.serve_load [--model M] [--streams 1,4,8,16] [--tokens 128]`.

Starts the server itself on a free loopback port, sends one warm-up request, then for each concurrency level
runs that many greedy streams of --tokens tokens each (ignore_eos) and prints tokens/s over the wall time.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    import httpx
    import openai

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--streams", default="1,4,8,16")
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    levels = [int(x) for x in args.streams.split(",")]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "lanternlm", "serve", "-m", args.model, "--port", str(port),
                               "--served-model-name", "m", "--max-batch", str(max(levels))],
                              stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")

        def one(i: int) -> int:
            tokens = 0
            for chunk in client.chat.completions.create(
                    model="m", stream=True, max_tokens=args.tokens, temperature=0,
                    messages=[{"role": "user", "content": f"Write a long story about dragon number {i}."}],
                    extra_body={"ignore_eos": True}, stream_options={"include_usage": True}):
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
            return tokens

        one(0)
        for n in levels:
            start = time.perf_counter()
            with cf.ThreadPoolExecutor(n) as pool:
                total = sum(pool.map(one, range(n)))
            wall = time.perf_counter() - start
            print(f"{n:>3} streams: {total} tokens in {wall:.2f} s = {total / wall:.1f} tokens/s aggregate")
    finally:
        server.terminate()
        server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
