"""Retrieval figures, on demand (never in CI): index throughput and search latency of `lanternlm.retrieval`.

    python -m bench.rag_bench                    # 10k chunks, 200 queries, 64 real chunks through MiniLM
    python -m bench.rag_bench --chunks 50000 --real 0

Three figures, each in a fresh index under a temporary $LANTERN_HOME:
- write throughput: chunks/s of `VectorIndex.replace_document` alone (random unit vectors, 10 chunks per
  document, one transaction per document, as `lantern rag add` commits);
- search latency at N chunks: median and p95 ms of one k=4 cosine query over the `vec0` table (random
  vectors: sqlite-vec's k-NN is an exact scan, so its cost does not depend on the values);
- end-to-end index throughput with the real embedding model (all-MiniLM-L6-v2): chunking + embedding +
  commit, chunks/s, and one real question's embed + search time. Embedding dominates.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def unit(rng, n, d):
    v = rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def bench_store(chunks: int, queries: int, dim: int = 384, per_doc: int = 10) -> dict:
    from lanternlm.retrieval.chunking import Chunk
    from lanternlm.retrieval.index import VectorIndex

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        index = VectorIndex(Path(tmp) / "index.db", "bench")
        index.record_model({"name": "random", "dimensions": dim, "fingerprint": "0" * 64}, {})
        text = "lorem ipsum " * 80  # ~1 KB per chunk, like a 254-token chunk
        started = time.perf_counter()
        for doc in range(chunks // per_doc):
            rows = [Chunk(i, text, 0, len(text), 1, 1, 200) for i in range(per_doc)]
            index.replace_document(Path(f"/bench/doc{doc}.txt"), "text", f"{doc:064}", 1000, 1000, rows,
                                   [None] * per_doc, unit(rng, per_doc, dim))
        write = time.perf_counter() - started
        times = []
        for q in unit(rng, queries, dim):
            t0 = time.perf_counter()
            hits = index.search(q, 4)
            times.append((time.perf_counter() - t0) * 1000)
        assert len(hits) == 4
        size = os.path.getsize(index.path) + sum(os.path.getsize(p) for p in Path(tmp).glob("index.db-*"))
        index.close()
    times.sort()
    return {"chunks": chunks, "write_chunks_per_s": chunks / write, "search_median_ms": statistics.median(times),
            "search_p95_ms": times[int(0.95 * (len(times) - 1))], "file_mb": size / 1e6}


def bench_real(n_chunks: int) -> dict:
    from lanternlm import LLM
    from lanternlm.retrieval import Rag

    llm = LLM("all-minilm-l6-v2")
    llm.embed(["warm up"])
    sentences = [f"Sentence {i} says something about lanterns, rivers, bridges and the year {1800 + i}." for i in
                 range(40 * n_chunks)]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LANTERN_HOME"] = tmp
        folder = Path(tmp) / "docs"
        folder.mkdir()
        for d in range(max(1, n_chunks // 8)):  # ~8 full-size chunks per file
            (folder / f"doc{d}.txt").write_text(" ".join(sentences[d * 110:(d + 1) * 110]))
        rag = Rag("bench", embedding_llm=llm)
        started = time.perf_counter()
        reports = rag.add([folder])
        elapsed = time.perf_counter() - started
        made = sum(r["chunks"] for r in reports)
        t0 = time.perf_counter()
        rag.search("Which sentence mentions the year 1850?", 4)
        ask = (time.perf_counter() - t0) * 1000
        rag.close()
    return {"real_chunks": made, "index_chunks_per_s": made / elapsed, "question_embed_and_search_ms": ask}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--real", type=int, default=64, help="chunks through the real model (0 skips)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    store = bench_store(args.chunks, args.queries)
    print(f"index of {store['chunks']} chunks (384-d): writes {store['write_chunks_per_s']:.0f} chunks/s, "
          f"file {store['file_mb']:.1f} MB; k=4 search median {store['search_median_ms']:.2f} ms, "
          f"p95 {store['search_p95_ms']:.2f} ms")
    if args.real:
        real = bench_real(args.real)
        print(f"real add (chunk + all-MiniLM-L6-v2 embed + commit), {real['real_chunks']} chunks: "
              f"{real['index_chunks_per_s']:.1f} chunks/s; a question's embed + search: "
              f"{real['question_embed_and_search_ms']:.1f} ms")


if __name__ == "__main__":
    main()
