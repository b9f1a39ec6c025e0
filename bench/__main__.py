"""`python -m bench`: check the machine is quiet, run each engine's worker in turn, then report.

Each engine runs in its own subprocess (bench/workers.py), one after another, never side by side, so
they do not compete for the cores and each one's peak RSS is its own.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import env, report

ENGINES = ("lantern", "llamacpp", "transformers")
MAX_LOAD = 0.5
RESULTS = env.BENCH_DIR / "results"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a .gguf file (default: the catalogue's smollm2-135m-instruct)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every engine (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure, median reported (default 3)")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {','.join(ENGINES)}")
    p.add_argument("--streams", default="1,4,8,16", help="Lantern Engine concurrency levels ('' to skip)")
    p.add_argument("--force", action="store_true", help=f"time even when the 1-minute load is above {MAX_LOAD}")
    args = p.parse_args(argv)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = sorted(set(args.engines) - set(ENGINES))
    if unknown or not args.engines:
        p.error(f"--engines: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(ENGINES)}")
    try:
        args.streams = ",".join(str(int(n)) for n in args.streams.split(",") if n.strip())
    except ValueError:
        p.error(f"--streams: {args.streams!r} is not a comma-separated list of numbers")
    if args.threads < 1 or args.repeats < 1:
        p.error("--threads and --repeats must be at least 1")
    return args


def model_path(given: str | None) -> Path:
    from lanternlm.store import DEFAULT_MODEL, NotPulledError, pull, resolve
    if given:
        path = Path(given).expanduser()
        if not path.is_file() or path.suffix != ".gguf":
            raise SystemExit(f"bench: --model {given}: not a .gguf file (all three engines load the same GGUF)")
        return path.resolve()
    try:
        return resolve(DEFAULT_MODEL)
    except NotPulledError:
        env.say(f"{DEFAULT_MODEL} is not on this machine yet; pulling it")
        return pull(DEFAULT_MODEL)


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


def run_worker(engine: str, model: Path, args: argparse.Namespace) -> dict:
    threads = str(args.threads)
    # Thread pools are sized at start-up (OpenMP, MKL), so the count is also set in the environment.
    child_env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                 "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "bench.workers", engine, "--model", str(model), "--threads", threads,
               "--repeats", str(args.repeats), "--out", str(out)]
        if engine == "lantern":
            cmd += ["--streams", args.streams]
        # The worker's stderr (progress, warnings) goes straight to ours, so a long run shows it is alive.
        stall, start = cpu_stall_us(), time.monotonic()
        done = subprocess.run(cmd, cwd=env.REPO_DIR, env=child_env, stdout=subprocess.DEVNULL)
        wall, stalled = time.monotonic() - start, cpu_stall_us()
        result = json.loads(out.read_text()) if out.is_file() else {}
        if done.returncode != 0 or "error" in result or not result:
            return {"engine": engine, "error": result.get("error") or f"worker exited with status {done.returncode}"}
    # Share of the worker's wall time during which some task was kept waiting for a CPU: near 0 when the
    # worker had the cores to itself; high when other work (or more threads than cores) competed.
    if stall is not None and stalled is not None:
        result["cpu_stall_share"] = (stalled - stall) / 1e6 / wall
        if report.suspect(result):
            env.say(f"WARNING: tasks waited for a CPU {result['cpu_stall_share']:.0%} of the time while {engine} "
                    f"ran: something competed for the cores, so its figures are suspect")
    return result


def machine(load: float, args: argparse.Namespace) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=env.REPO_DIR, capture_output=True,
                            text=True).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": args.threads, "load_1min_at_start": load,
            "load_1min_at_end": os.getloadavg()[0],
            "forced": load > MAX_LOAD, "python": platform.python_version(), "lantern_commit": commit}


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if not env.inside_venv():
        env.reexec_in_venv(argv)  # does not return

    model = model_path(args.model)
    load = check_quiet(args.force)
    model.read_bytes()  # into the page cache, so no engine pays the cold disk read for the others
    results = {}
    for engine in args.engines:
        env.say(f"running {engine} on {model.name} with {args.threads} threads")
        results[engine] = run_worker(engine, model, args)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run = {"when": stamp, "model": str(model), "machine": machine(load, args), "results": results}
    RESULTS.mkdir(exist_ok=True)
    json_path = RESULTS / f"bench-{stamp}.json"
    report.save_json(run, json_path)
    title = f"{model.name}, {args.threads} threads" + (f"  (UNDER LOAD {load:.2f})" if load > MAX_LOAD else "")
    failed = [e for e, r in results.items() if "error" in r]
    png_path = None
    if len(failed) < len(results):
        png_path = RESULTS / f"bench-{stamp}.png"
        try:
            report.save_chart(results, png_path, title)
        except Exception as e:  # the numbers matter more than the picture
            env.say(f"chart not written: {type(e).__name__}: {e}")
            png_path = None
    print(f"\n{title}\n\n{report.table(results)}\n")
    print(f"saved {json_path}" + (f" and {png_path}" if png_path else ""))
    if failed:
        raise SystemExit(f"bench: {', '.join(failed)} failed")


if __name__ == "__main__":
    main(sys.argv[1:])
