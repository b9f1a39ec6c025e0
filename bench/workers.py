"""One engine's measurements, run in a process of its own so its peak RSS is its own.

    python -m bench.workers {lantern,lantern-q8,llamacpp,transformers} --model FILE --threads 2 --out result.json

FILE is a .gguf file, or (Lantern) a Hugging Face folder; `lantern-q8` is Lantern with `quantize="q8_0"`.

Every engine gets the same workloads through the same small interface (a runner): load, prefill N
tokens into an empty cache, greedy-decode N tokens, and the first token of a chat. Timing, warm-up and
repeats live here, once, so no engine is timed differently from another.
"""

from __future__ import annotations

import argparse
import importlib
import json
import random
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

PREFILL_LENGTHS = (128, 512)
DECODE_TOKENS = 128
CONTEXT = 1024          # every engine's KV capacity: enough for pp512 and for tg128 after a short prompt
DECODE_PROMPT = 8       # tokens before tg128, so decoding starts from an almost empty cache (as llama-bench)
STREAM_PROMPT = 16      # prompt tokens of each concurrent stream
LONG_SLACK = 64         # KV positions beyond prompt + DECODE_TOKENS for the long-context run
# About 50 tokens once the model's chat template has wrapped it (the worker records the exact count).
CHAT = [
    {"role": "system", "content": "You are a concise assistant. Answer in one short sentence."},
    {"role": "user", "content": "I am planning a weekend trip to Lyon in late spring. "
                                "What is one dish from the local cuisine I should not miss?"},
]


def token_ids(n: int, vocab: int, seed: int) -> list[int]:
    """The same n ordinary token ids for every engine (away from the low ids where specials live)."""
    rng = random.Random(seed)
    margin = min(1000, vocab // 4)
    return [rng.randrange(margin, vocab - margin) for _ in range(n)]


# --------------------------------------------------------------------------- runners


class LanternRunner:
    quantize: str | None = None

    def __init__(self, path: str, threads: int, context: int = CONTEXT):
        import torch
        torch.set_num_threads(threads)
        from lanternlm import LLM
        from lanternlm.model import KVCache
        self.torch = torch
        self.llm = LLM(path, context=context, quantize=self.quantize)
        self.vocab = self.llm.config.vocab_size
        self.trained_context = self.llm.config.max_position_embeddings
        # One cache reused by every prefill: a prefill writes positions 0..T-1 and reads only those back.
        # The cache in the model's compute dtype, as Lantern's own generate() and Engine make it.
        dtype = self.llm.model.dtype
        self.cache = KVCache(self.llm.config, slots=1, max_len=CONTEXT, dtype=dtype, device=self.llm.device)
        # quantized: whether Lantern computes from the stored weights (a GGUF's blocks, an HF folder's 2-byte
        # matrices, or blocks made at load with `quantize`) or from weights dequantized/widened at load.
        from lanternlm.kernels import build_info, isa_name
        loaded = self.llm.loaded
        self.info = {"dtype": str(dtype).removeprefix("torch."),
                     "quantized": not loaded.exact, "torch": torch.__version__,
                     "format": loaded.format, "quantize": loaded.quantize,
                     "kernels": isa_name(),  # Lantern's C++ kernels in use: avx512-vnni, avx2 or none
                     "kernels_origin": (build_info() or {}).get("origin")}  # prebuilt, or built at run time

    def prefill(self, ids: list[int]) -> None:
        torch = self.torch
        with torch.inference_mode():
            x = torch.tensor([ids], device=self.llm.device)
            positions = torch.arange(len(ids), device=self.llm.device)[None]  # (1, T)
            self.llm.model(x, positions, self.cache, logits_to_keep=1)

    def decode_times(self, ids: list[int], n: int) -> list[float]:
        from lanternlm import SamplingParams
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        return [time.perf_counter() for _ in self.llm.generate_stream(ids, params)]

    def first_chat_token(self, messages: list[dict]) -> int:
        from lanternlm import SamplingParams
        stream = self.llm.chat_stream(messages, SamplingParams(temperature=0, max_tokens=1))
        next(iter(stream))
        return len(self.llm.encode_chat(messages))


class LanternQ8Runner(LanternRunner):
    """Lantern with `quantize="q8_0"`: an HF folder's (or F16/BF16 GGUF's) weights made Q8_0 blocks at load."""
    quantize = "q8_0"


class LlamaCppRunner:
    def __init__(self, path: str, threads: int, context: int = CONTEXT):
        import llama_cpp
        # flash_attn on, as llama.cpp itself defaults to on CPU (llama-cpp-python passes off unless asked);
        # it is ~8% faster on prefill here, and the peer should run at its own best.
        self.llm = llama_cpp.Llama(model_path=path, n_ctx=context, n_batch=512, n_ubatch=512, n_threads=threads,
                                   n_threads_batch=threads, flash_attn=True, verbose=False)
        self.vocab = self.llm.n_vocab()
        self.trained_context = self.llm._model.n_ctx_train()  # the context length in the file's metadata
        self.info = {"llama_cpp_python": llama_cpp.__version__, "flash_attn": True}

    def prefill(self, ids: list[int]) -> None:
        self.llm.reset()  # forget earlier tokens, so nothing is reused as a cached prefix
        self.llm.eval(ids)

    def decode_times(self, ids: list[int], n: int) -> list[float]:
        self.llm.reset()
        times = []
        for _ in self.llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):  # greedy, never stops on EOS
            times.append(time.perf_counter())
            if len(times) == n:
                break
        return times

    def first_chat_token(self, messages: list[dict]) -> int:
        self.llm.reset()
        stream = self.llm.create_chat_completion(messages, max_tokens=1, temperature=0.0, stream=True)
        next(iter(stream))  # the first chunk comes once the first token is sampled
        prompt_tokens = self.llm.n_tokens
        for _ in stream:  # let it finish cleanly
            pass
        return prompt_tokens


class TransformersRunner:
    def __init__(self, path: str, threads: int, context: int = CONTEXT):
        import torch
        torch.set_num_threads(threads)
        import transformers
        transformers.utils.logging.disable_progress_bar()  # per-tensor bars would flood the bench's output
        transformers.utils.logging.set_verbosity_error()
        from transformers import AutoModelForCausalLM, AutoTokenizer
        self.torch = torch
        folder, name = str(Path(path).parent), Path(path).name
        self.tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        # float32, as Lantern computes on CPU: the GGUF's quantized weights are dequantized at load by both.
        self.model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
        self.vocab = self.model.config.vocab_size
        self.info = {"dtype": "float32", "transformers": transformers.__version__, "torch": torch.__version__}

    def _generate(self, input_ids, n: int, streamer=None):
        torch = self.torch
        with torch.inference_mode():
            return self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n,
                                       min_new_tokens=n, do_sample=False, streamer=streamer,
                                       pad_token_id=self.tokenizer.eos_token_id)

    def prefill(self, ids: list[int]) -> None:
        torch = self.torch
        with torch.inference_mode():
            self.model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)

    def decode_times(self, ids: list[int], n: int) -> list[float]:
        times: list[float] = []

        class Clock:  # generate() calls put() once with the prompt, then once per new token
            def put(self, value):
                times.append(time.perf_counter())

            def end(self):
                pass

        self._generate(self.torch.tensor([ids]), n, Clock())
        return times[1:]

    def first_chat_token(self, messages: list[dict]) -> int:
        enc = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True, return_tensors="pt")
        self._generate(enc["input_ids"], 1)
        return int(enc["input_ids"].shape[1])


RUNNERS = {"lantern": LanternRunner, "lantern-q8": LanternQ8Runner, "llamacpp": LlamaCppRunner,
           "transformers": TransformersRunner}
# Imported (and timed) before the load clock starts, so load_s is the model's load alone.
LIBRARIES = {"lantern": ["torch", "lanternlm"], "lantern-q8": ["torch", "lanternlm"], "llamacpp": ["llama_cpp"],
             "transformers": ["torch", "transformers", "transformers.models.llama.modeling_llama"]}
# Engines measured at long context (tg128 after a prompt of --long tokens).
LONG_ENGINES = ("lantern", "lantern-q8", "llamacpp")


# --------------------------------------------------------------------------- timing


def memory_mb() -> dict[str, float]:
    """Current and peak resident set size of this process, in MiB."""
    fields = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024  # kB
    except OSError:
        pass
    peak = fields.get("VmHWM", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # ru_maxrss: kB on Linux
    return {"rss_mb": fields.get("VmRSS", peak), "peak_rss_mb": peak}


def timed(fn, repeats: int) -> float:
    """Median wall seconds of fn() over `repeats` runs, after one untimed warm-up run."""
    fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def decode_rate(runner, repeats: int, prompt: int = DECODE_PROMPT, warm_up: bool = True) -> float:
    """Tokens/s between the first and the last of DECODE_TOKENS tokens after a prompt of `prompt` tokens: decode
    steps only, no prefill."""
    ids = token_ids(prompt, runner.vocab, seed=7)
    if warm_up:
        runner.decode_times(ids, 8)
    rates = []
    for _ in range(repeats):
        times = runner.decode_times(ids, DECODE_TOKENS)
        if len(times) != DECODE_TOKENS:
            raise RuntimeError(f"asked for {DECODE_TOKENS} tokens, got {len(times)}")
        rates.append((len(times) - 1) / (times[-1] - times[0]))
    return statistics.median(rates)


def streams_rate(runner: LanternRunner, streams: int, max_tokens: int) -> dict:
    """Aggregate decode tokens/s of `streams` concurrent requests through Lantern's Engine."""
    from lanternlm import SamplingParams
    from lanternlm.engine import Engine
    llm = runner.llm
    engine = Engine(llm.model, llm.tokenizer, context=STREAM_PROMPT + max_tokens, max_batch=streams,
                    max_queue=streams).start()
    lock, done = threading.Lock(), threading.Event()
    state = {"tokens": 0, "finished": 0, "errors": [], "first": {}, "last": 0.0}

    def on_event(event, stream):
        now = time.perf_counter()
        with lock:
            if event.error:
                state["errors"].append(event.error)
            else:
                state["tokens"] += 1
                state["first"].setdefault(stream, now)
                state["last"] = now
            if event.error or event.step.finish_reason is not None:
                state["finished"] += 1
                if state["finished"] == streams:
                    done.set()

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    try:
        start = time.perf_counter()
        for s in range(streams):
            engine.submit(token_ids(STREAM_PROMPT, runner.vocab, seed=100 + s), params,
                          lambda event, s=s: on_event(event, s))
        if not done.wait(timeout=600):
            raise RuntimeError(f"{streams} streams did not finish within 600 s")
    finally:
        engine.shutdown()
    if state["errors"]:
        raise RuntimeError(f"engine error: {state['errors'][0]}")
    wall = state["last"] - start
    # Decode-only view: from the moment every stream has its first token to the last token.
    all_started = max(state["first"].values())
    after = state["tokens"] - streams  # tokens produced after each stream's first
    return {"streams": streams, "tokens": state["tokens"], "wall_s": wall,
            "aggregate_tok_s": state["tokens"] / wall,
            "decode_tok_s": after / (state["last"] - all_started) if state["last"] > all_started else None}


def long_key(prompt: int) -> str:
    """The long-context column's name: tg128@4k for a 4096-token prompt."""
    return f"tg{DECODE_TOKENS}@{prompt // 1024}k" if prompt % 1024 == 0 else f"tg{DECODE_TOKENS}@{prompt}"


def long_context(engine: str, path: str, threads: int, repeats: int, prompt: int) -> dict:
    """tg128 after a prompt of `prompt` random tokens (the same ids for every engine), in an engine made with a
    context of prompt + DECODE_TOKENS + LONG_SLACK. Each repeat prefills the prompt again (not timed); the
    ordinary tg128 has already warmed the decode path, so there is no extra warm-up."""
    need = prompt + DECODE_TOKENS + LONG_SLACK
    runner = RUNNERS[engine](path, threads, context=need)
    out = {"long_prompt_tokens": prompt}
    if runner.trained_context < prompt + DECODE_TOKENS:
        out["long_note"] = (f"skipped: the model's context is {runner.trained_context} tokens, "
                            f"less than {prompt} + {DECODE_TOKENS}")
        return out
    out["long_tok_s"] = decode_rate(runner, repeats, prompt=prompt, warm_up=False)
    return out


def run(engine: str, path: str, threads: int, repeats: int, streams: list[int], long: int = 0) -> dict:
    result = {"engine": engine, "threads": threads}
    start = time.perf_counter()
    for module in LIBRARIES[engine]:
        importlib.import_module(module)
    result["import_s"] = time.perf_counter() - start
    result["import_rss_mb"] = memory_mb()["rss_mb"]
    start = time.perf_counter()
    runner = RUNNERS[engine](path, threads)
    result["load_s"] = time.perf_counter() - start
    result.update(runner.info)
    for n in PREFILL_LENGTHS:
        ids = token_ids(n, runner.vocab, seed=n)
        result[f"pp{n}_tok_s"] = n / timed(lambda: runner.prefill(ids), repeats)
        print(f"  {engine}: pp{n} {result[f'pp{n}_tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
    result[f"tg{DECODE_TOKENS}_tok_s"] = decode_rate(runner, repeats)
    print(f"  {engine}: tg{DECODE_TOKENS} {result[f'tg{DECODE_TOKENS}_tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
    try:
        prompt_tokens = runner.first_chat_token(CHAT)
    except Exception as e:  # e.g. Lantern on a file with no chat template (llama.cpp falls back to its own)
        result["ttft_s"], result["ttft_error"] = None, f"{type(e).__name__}: {e}"
        print(f"  {engine}: no TTFT ({result['ttft_error']})", file=sys.stderr, flush=True)
    else:
        result["ttft_s"] = timed(lambda: runner.first_chat_token(CHAT), repeats)
        result["ttft_prompt_tokens"] = prompt_tokens
    result.update(memory_mb())  # before the concurrency runs, whose bigger caches are Lantern-only
    if engine.startswith("lantern") and streams:
        streams_rate(runner, 1, 8)  # warm-up of the engine path
        result["streams"] = []
        for n in streams:
            row = streams_rate(runner, n, DECODE_TOKENS)
            result["streams"].append(row)
            print(f"  {engine}: {n} streams {row['aggregate_tok_s']:.1f} tok/s aggregate", file=sys.stderr, flush=True)
    if long and engine in LONG_ENGINES:
        del runner  # one model in memory at a time (peak RSS was recorded above)
        import gc
        gc.collect()
        result["long_key"] = long_key(long)
        try:
            result.update(long_context(engine, path, threads, repeats, long))
        except Exception as e:  # the figures above still count
            result["long_note"] = f"failed: {type(e).__name__}: {e}"
        if "long_tok_s" in result:
            print(f"  {engine}: {result['long_key']} {result['long_tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
        else:
            print(f"  {engine}: {result['long_key']} {result['long_note']}", file=sys.stderr, flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.workers")
    parser.add_argument("engine", choices=sorted(RUNNERS))
    parser.add_argument("--model", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--streams", default="")
    parser.add_argument("--long", type=int, default=0, help="tg128 after a prompt of this many tokens (0: skip)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    streams = [int(s) for s in args.streams.split(",") if s]
    try:
        result = run(args.engine, args.model, args.threads, args.repeats, streams, args.long)
    except KeyboardInterrupt:
        raise SystemExit(130)
    except Exception as e:  # reported as one line in the table; the other engines still run
        Path(args.out).write_text(json.dumps({"engine": args.engine, "error": f"{type(e).__name__}: {e}"}))
        raise SystemExit(1)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
