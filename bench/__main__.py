"""`python -m bench`: check the machine is quiet, run each engine's workers in turn, then report.

Each engine runs in processes of its own (bench/workers.py in-process, bench/serving.py for its HTTP server and
llama-bench), one after another, never side by side, so they do not compete for the cores and each one's peak
RSS is its own.

The model is a .gguf file (the GGUF table: Lantern, llama.cpp, llama-bench, transformers) or a Hugging Face
folder (the folder table: Lantern with and without --quantize q8_0, vLLM's CPU backend, and llama.cpp on the
Q8_0 GGUF of the same weights).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import env, report

ENGINES = ("lantern", "lantern-q8", "llamacpp", "llama-bench", "transformers", "vllm")
GGUF_ENGINES = "lantern,llamacpp,llama-bench,transformers"
FOLDER_ENGINES = "lantern,lantern-q8,llamacpp,vllm"
IN_PROCESS = ("lantern", "lantern-q8", "llamacpp", "transformers")   # bench/workers.py
SERVED = ("lantern", "lantern-q8", "llamacpp", "vllm")               # bench/serving.py, over HTTP
GGUF_ONLY = ("llamacpp", "llama-bench", "transformers")              # on a folder: the peer GGUF instead
GGUF_HTTP = "1,4,8,16"
FOLDER_HTTP = "1,4,8,16,32"
LONG = 4096
MAX_LOAD = 0.5
RESULTS = env.BENCH_DIR / "results"


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every engine (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure, median reported (default 3)")
    p.add_argument("--streams", default="1,4,8,16",
                   help="Lantern Engine (in-process) concurrency levels ('' to skip)")
    p.add_argument("--http", default=None,
                   help=f"HTTP streams levels for every served engine (default {GGUF_HTTP}, {FOLDER_HTTP} for a "
                        "folder; '' to skip)")
    p.add_argument("--long", type=int, default=LONG,
                   help=f"tg128 after a prompt of this many tokens (default {LONG}; 0 to skip)")
    p.add_argument("--force", action="store_true", help=f"time even when the 1-minute load is above {MAX_LOAD}")


def check_options(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("streams", "http"):
        value = getattr(args, name)
        if value is None:
            continue
        try:
            setattr(args, name, ",".join(str(int(n)) for n in value.split(",") if n.strip()))
        except ValueError:
            p.error(f"--{name}: {value!r} is not a comma-separated list of numbers")
    if args.threads < 1 or args.repeats < 1 or args.long < 0:
        p.error("--threads and --repeats must be at least 1, --long at least 0")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a .gguf file or an HF folder (default: the catalogue's smollm2-135m-instruct)")
    p.add_argument("--engines", default=None,
                   help=f"comma-separated subset of {','.join(ENGINES)} (default {GGUF_ENGINES}; "
                        f"for a folder {FOLDER_ENGINES})")
    p.add_argument("--gguf", help="folder table: the GGUF llama.cpp runs (default: the folder's Q8_0 file that "
                                  "bench/files.py writes beside it)")
    add_options(p)
    args = p.parse_args(argv)
    check_options(p, args)
    if args.engines is not None:
        engines = [e.strip() for e in args.engines.split(",") if e.strip()]
        unknown = sorted(set(engines) - set(ENGINES))
        if unknown or not engines:
            p.error(f"--engines: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(ENGINES)}")
        args.engines = engines
    return args


def model_path(given: str | None) -> Path:
    from lanternlm.store import DEFAULT_MODEL, NotPulledError, pull, resolve
    if given:
        path = Path(given).expanduser()
        if not (path.is_file() and path.suffix == ".gguf") and not (path / "config.json").is_file():
            raise SystemExit(f"bench: --model {given}: neither a .gguf file nor a Hugging Face folder")
        return path.resolve()
    try:
        return resolve(DEFAULT_MODEL)
    except NotPulledError:
        env.say(f"{DEFAULT_MODEL} is not on this machine yet; pulling it")
        return pull(DEFAULT_MODEL)


def is_folder(model: Path) -> bool:
    return model.is_dir()


def peer_gguf(folder: Path, given: str | None) -> Path | None:
    """The GGUF file llama.cpp runs in a folder's table (llama.cpp does not load HF folders)."""
    if given:
        return Path(given).expanduser().resolve()
    from .files import FOLDER_PEER_GGUF
    path = FOLDER_PEER_GGUF.get(folder.name)
    return path.resolve() if path and path.is_file() else None


def has_chat_template(model: Path) -> bool:
    """Whether the model carries a chat template: the HTTP streams use chat completions if so (for every
    engine), plain completions otherwise."""
    if model.is_dir():
        if (model / "chat_template.jinja").is_file():
            return True
        config = model / "tokenizer_config.json"
        return config.is_file() and bool(json.loads(config.read_text()).get("chat_template"))
    from gguf import GGUFReader
    return "tokenizer.chat_template" in GGUFReader(model).fields


def check_quiet(force: bool) -> float:
    """Refuse to time a busy machine: other work skews every figure, and not equally for each engine."""
    load = os.getloadavg()[0]
    if load > MAX_LOAD:
        banner = "!" * 78
        print(f"{banner}\nbench: the 1-minute load average is {load:.2f} (> {MAX_LOAD}): something else is using "
              f"the CPU,\nso timings would be wrong.", file=sys.stderr)
        if not force:
            print(f"Wait until `uptime` shows it below {MAX_LOAD}, or pass --force to time anyway.\n{banner}",
                  file=sys.stderr)
            raise SystemExit(2)
        print(f"--force given: timing anyway; the results are marked as taken under load.\n{banner}",
              file=sys.stderr)
    return load


def cpu_stall_us() -> int | None:
    """Total microseconds some task waited for a CPU (Linux pressure stall info), or None if unavailable."""
    try:
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]  # "some avg10=.. avg60=.. avg300=.. total=N"
        return int(first.rsplit("total=", 1)[1])
    except (OSError, IndexError, ValueError):
        return None


def run_child(cmd: list[str], child_env: dict) -> int:
    """Run a worker and wait for it. On Ctrl-C (which the worker gets too, being in our process group) or
    SIGTERM, give it time to stop its server, then make sure it is gone; then re-raise."""
    proc = subprocess.Popen(cmd, cwd=env.REPO_DIR, env=child_env, stdout=subprocess.DEVNULL)
    try:
        return proc.wait()
    except BaseException:
        for sig, wait in ((None, 5), (signal.SIGTERM, 60), (signal.SIGKILL, None)):
            if proc.poll() is not None:
                break
            if sig is not None:
                proc.send_signal(sig)  # serving.py unwinds on SIGTERM too and stops its server
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                pass
        raise


def run_worker(module: str, engine: str, model: Path, args: argparse.Namespace, extra: list[str]) -> dict:
    threads = str(args.threads)
    # Thread pools are sized at start-up (OpenMP, MKL), so the count is also set in the environment.
    child_env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                 "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", module, engine, "--model", str(model), "--threads", threads,
               "--repeats", str(args.repeats), "--out", str(out), *extra]
        # The worker's stderr (progress, warnings) goes straight to ours, so a long run shows it is alive.
        stall, start = cpu_stall_us(), time.monotonic()
        code = run_child(cmd, child_env)
        wall, stalled = time.monotonic() - start, cpu_stall_us()
        result = json.loads(out.read_text()) if out.is_file() else {}
        if code != 0 or "error" in result or not result:
            return {"engine": engine, "error": result.get("error") or f"worker exited with status {code}"}
    # Share of the worker's wall time during which some task was kept waiting for a CPU: near 0 when the
    # worker had the cores to itself; high when other work (or more threads than cores) competed.
    if stall is not None and stalled is not None:
        result["cpu_stall_share"] = (stalled - stall) / 1e6 / wall
        if report.suspect(result):
            env.say(f"WARNING: tasks waited for a CPU {result['cpu_stall_share']:.0%} of the time while {engine} "
                    f"({module.removeprefix('bench.')}) ran: something competed for the cores, so its figures "
                    f"are suspect")
    return result


def run_engine(engine: str, model: Path, gguf: Path | None, args: argparse.Namespace, endpoint: str) -> dict:
    """One engine: its in-process worker, then its server over HTTP (or llama-bench), one after the other."""
    folder = is_folder(model)
    path = model
    if folder and engine in GGUF_ONLY:
        if gguf is None:
            return {"engine": engine, "error": f"{engine} needs a GGUF file: none given for the folder "
                                               f"(--gguf, or run `python -m bench.files`)"}
        path = gguf
    if not folder and engine == "vllm":
        return {"engine": engine, "error": "vLLM runs on the Hugging Face folder only (vLLM's GGUF loading is "
                                           "not what is measured): pass --model FOLDER"}
    env.say(f"running {engine} on {path.name} with {args.threads} threads")
    result: dict = {"engine": engine, "model": str(path)}
    if engine in IN_PROCESS:
        extra = ["--long", str(args.long)]
        if engine.startswith("lantern"):
            extra += ["--streams", args.streams]
        result.update(run_worker("bench.workers", engine, path, args, extra))
    elif engine == "llama-bench":
        result.update(run_worker("bench.serving", engine, path, args, ["--long", str(args.long)]))
    if engine in SERVED and args.http:
        env.say(f"serving {engine} over HTTP: streams {args.http}")
        result["http"] = run_worker("bench.serving", engine, path, args,
                                    ["--levels", args.http, "--endpoint", endpoint])
    return result


def warm_lantern_kernels() -> None:
    """Have Lantern's C++ kernels ready before anything is timed: when the prebuilt build does not match the
    sources, Lantern compiles them at run time (~30 s, then cached in ~/.cache/lantern/kernels), which would
    otherwise land in the first load (in-process or server) measured."""
    code = "from lanternlm.kernels import kernels, why_unavailable; kernels(quiet=True); print(why_unavailable() or '')"
    done = subprocess.run([sys.executable, "-c", code], cwd=env.REPO_DIR, capture_output=True, text=True)
    if done.returncode != 0 or done.stdout.strip():
        env.say(f"Lantern's kernels are unavailable ({(done.stdout + done.stderr).strip()[-200:]}); "
                f"it will fall back to PyTorch")


def machine(load: float, args: argparse.Namespace) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=env.REPO_DIR, capture_output=True,
                            text=True).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": args.threads, "load_1min_at_start": load,
            "load_1min_at_end": os.getloadavg()[0],
            "forced": load > MAX_LOAD, "python": platform.python_version(), "lantern_commit": commit}


def bench_model(model: Path, engines: list[str] | None, args: argparse.Namespace, load: float) -> dict:
    """Every engine on one model, in turn; returns the run (model, settings, results per engine)."""
    folder = is_folder(model)
    engines = engines or (FOLDER_ENGINES if folder else GGUF_ENGINES).split(",")
    http = args.http if args.http is not None else (FOLDER_HTTP if folder else GGUF_HTTP)
    args = argparse.Namespace(**{**vars(args), "http": http})
    gguf = peer_gguf(model, getattr(args, "gguf", None)) if folder else None
    endpoint = "chat" if has_chat_template(model) else "completions"
    if not folder:
        Path(model).read_bytes()  # into the page cache, so no engine pays the cold disk read for the others
    else:
        for f in model.iterdir():
            if f.is_file():
                f.read_bytes()
    if any(e.startswith("lantern") for e in engines):
        warm_lantern_kernels()
    results = {}
    for engine in engines:
        results[engine] = run_engine(engine, model, gguf, args, endpoint)
    kind = "folder" if folder else "gguf"
    return {"when": datetime.datetime.now().strftime("%Y%m%d-%H%M%S"), "model": str(model), "kind": kind,
            "peer_gguf": str(gguf) if gguf else None, "endpoint": endpoint,
            "settings": {"threads": args.threads, "repeats": args.repeats, "streams": args.streams, "http": http,
                         "long": args.long},
            "machine": machine(load, args), "results": results}


def title(run: dict) -> str:
    load = run["machine"]["load_1min_at_start"]
    name = Path(run["model"]).name + ("/ (HF folder)" if run["kind"] == "folder" else "")
    return f"{name}, {run['settings']['threads']} threads" + (f"  (UNDER LOAD {load:.2f})" if load > MAX_LOAD else "")


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> None:
    signal.signal(signal.SIGTERM, _interrupt)  # unwind (and stop the workers' servers) as on Ctrl-C
    args = parse_args(argv)
    if not env.inside_venv():
        env.reexec_in_venv(argv)  # does not return
    env.ensure_serve_stage()

    model = model_path(args.model)
    load = check_quiet(args.force)
    run = bench_model(model, args.engines, args, load)
    stamp = run["when"]
    RESULTS.mkdir(exist_ok=True)
    json_path = RESULTS / f"bench-{stamp}.json"
    report.save_json(run, json_path)
    results = run["results"]
    png_path = None
    if any(report.in_process(r) for r in results.values()):
        png_path = RESULTS / f"bench-{stamp}.png"
        try:
            report.save_chart(results, png_path, title(run))
        except Exception as e:  # the numbers matter more than the picture
            env.say(f"chart not written: {type(e).__name__}: {e}")
            png_path = None
    print(f"\n{title(run)}\n\n{report.full(run)}\n")
    print(f"saved {json_path}" + (f" and {png_path}" if png_path else ""))
    failed = report.failures(results)
    if failed:
        raise SystemExit(f"bench: {', '.join(failed)} failed")


def run_main(main_fn, argv: list[str]) -> None:
    """main_fn(argv), with Ctrl-C (or SIGTERM) ending in one line once every worker and server has stopped."""
    try:
        main_fn(argv)
    except KeyboardInterrupt:
        print("\nbench: interrupted; every worker and server it started has been stopped", file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
