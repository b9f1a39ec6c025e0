"""Run a fuzz target on demand: `python -m fuzz {gguf,safetensors,template,all} --minutes N` (see README.md).

The runner (this process) starts a child per target with a memory cap (RLIMIT_AS) and watches it. The child
runs hypothesis in batches of fresh random examples until the time is up; each example runs under a time
bound (SIGALRM), and exceeding it counts as a hang. The input being run is written to a file before each
example, so a child that dies (a crash in C code, the memory cap, a hang the alarm cannot interrupt) still
leaves its input behind. Failing inputs are saved under fuzz/crashes/ (git-ignored).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

CRASHES = Path(__file__).resolve().parent / "crashes"
BATCH = 200  # examples per hypothesis run; the child checks the clock and saves its counts between runs


class ExampleTimeout(Exception):
    """One example ran longer than --example-seconds: a hang as far as the fuzzer is concerned."""


def _signature(error: BaseException) -> str:
    """Exception type and the innermost Lantern frame: one saved input per distinct bug, not per example."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:  # hypothesis's FlakyFailure wraps the error
        error = error.exceptions[0]
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "lanternlm" in f.filename]
    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "outside"
    return f"{type(error).__name__}@{where}"


def run_child(target: str, until: float, seed: int, example_seconds: float) -> None:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    from fuzz.targets import TARGETS

    strategy, check, save, _, ext = TARGETS[target]
    CRASHES.mkdir(exist_ok=True)
    inflight = CRASHES / f".inflight-{target}{ext}"
    status_path = CRASHES / f".status-{target}.json"
    status = {"executions": 0, "failures": {}}

    def on_alarm(signum, frame):
        raise ExampleTimeout(f"example took longer than {example_seconds:g} s")

    signal.signal(signal.SIGALRM, on_alarm)
    last_failing = {}

    # One failure per run (not an ExceptionGroup), so the input saved is the one the reported error came from.
    @settings(max_examples=BATCH, deadline=None, database=None, derandomize=False, print_blob=False,
              report_multiple_bugs=False,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate, Phase.shrink])
    @given(strategy())
    def one_example(data):
        status["executions"] += 1
        save(data, inflight)
        signal.setitimer(signal.ITIMER_REAL, example_seconds)
        try:
            check(data)
        except BaseException:
            last_failing["data"] = data  # shrinking re-runs failures; the last one kept is the smallest
            raise
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    batch = 0
    while time.time() < until:
        try:
            hypothesis_seed(seed + batch)(one_example)()
        except Exception as error:  # the property failed: save the (shrunk) input once per distinct bug
            sig = _signature(error)
            message = f"{type(error).__name__}: {error}"[:500]
            entry = status["failures"].setdefault(sig, {"count": 0, "message": message})
            entry["count"] += 1
            if "file" not in entry and "data" in last_failing:
                name = f"{target}-{hashlib.sha1(sig.encode()).hexdigest()[:10]}{ext}"
                save(last_failing["data"], CRASHES / name)
                entry["file"] = str(CRASHES / name)
                print(f"[{target}] FAILURE {sig}: {entry['message'][:200]}\n    input saved to {CRASHES / name}",
                      flush=True)
            last_failing.clear()
        batch += 1
        status_path.write_text(json.dumps(status))
    status_path.write_text(json.dumps(status))


def _limit_memory(megabytes: int):
    def apply() -> None:
        cap = megabytes * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    return apply


def run_target(target: str, minutes: float, seed: int, example_seconds: float, memory_mb: int) -> dict:
    """Fuzz one target for `minutes`, restarting the child after a fatal crash; returns the totals."""
    from fuzz.targets import TARGETS

    ext = TARGETS[target][4]
    CRASHES.mkdir(exist_ok=True)
    start = time.time()
    until = start + minutes * 60
    totals = {"target": target, "executions": 0, "failures": {}}
    inflight = CRASHES / f".inflight-{target}{ext}"
    status_path = CRASHES / f".status-{target}.json"
    run = 0
    while time.time() < until:
        status_path.unlink(missing_ok=True)
        inflight.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "fuzz", "--child", target, "--until", str(until),
               "--seed", str(seed + run * 10**6), "--example-seconds", str(example_seconds)]
        child = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parent.parent, preexec_fn=_limit_memory(memory_mb))
        fatal = None
        while child.poll() is None:
            time.sleep(1)
            # The alarm cannot interrupt a long call into C; a silent child is killed and its input kept.
            if inflight.exists() and time.time() - inflight.stat().st_mtime > 3 * example_seconds + 30:
                child.kill()
                child.wait()
                fatal = "hang (no progress; the per-example alarm could not interrupt it)"
        if child.returncode != 0 and fatal is None:
            fatal = f"child died with exit code {child.returncode} (memory cap {memory_mb} MB, or a crash)"
        if status_path.exists():
            status = json.loads(status_path.read_text())
            totals["executions"] += status["executions"]
            for sig, entry in status["failures"].items():
                seen = totals["failures"].setdefault(sig, {**entry, "count": 0})
                seen["count"] += entry["count"]
        if fatal and not inflight.exists():  # it died before running any example: a broken setup, not a bug
            print(f"[{target}] the fuzzing process could not start ({fatal}); stopping", flush=True)
            totals["failures"]["startup"] = {"count": 1, "message": fatal}
            break
        if fatal:
            name = CRASHES / f"{target}-fatal-{int(time.time())}{ext}"
            if inflight.exists():
                shutil.copy(inflight, name)
            totals["failures"][f"fatal-{run}"] = {"count": 1, "message": fatal, "file": str(name)}
            print(f"[{target}] FATAL {fatal}; input saved to {name}", flush=True)
        run += 1
    inflight.unlink(missing_ok=True)
    status_path.unlink(missing_ok=True)
    totals["minutes"] = round((time.time() - start) / 60, 2)
    return totals


def replay(target: str, path: Path) -> None:
    """Run one saved input through its target, showing the full traceback if it fails."""
    from fuzz.targets import TARGETS

    _, check, _, load, _ = TARGETS[target]
    check(load(path))
    print(f"{path}: passes the {target} property")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", nargs="?", choices=["gguf", "safetensors", "template", "all", "replay"])
    parser.add_argument("args", nargs="*", help="for replay: TARGET FILE")
    parser.add_argument("--minutes", type=float, default=10.0, help="per target (default 10)")
    parser.add_argument("--seed", type=int, default=None, help="first hypothesis seed (default: from the clock)")
    parser.add_argument("--example-seconds", type=float, default=20.0,
                        help="one example running longer than this is a hang (default 20)")
    parser.add_argument("--memory-mb", type=int, default=3072, help="address-space cap of the fuzzing process")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--until", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else int(time.time())
    if args.child:
        run_child(args.child, args.until, seed, args.example_seconds)
        return 0
    if args.target is None:
        parser.error("choose a target")
    if args.target == "replay":
        if len(args.args) != 2:
            parser.error("replay needs TARGET FILE")
        replay(args.args[0], Path(args.args[1]))
        return 0
    targets = ["gguf", "safetensors", "template"] if args.target == "all" else [args.target]
    failed = False
    for target in targets:  # one after another: each may use a core fully
        print(f"[{target}] fuzzing for {args.minutes:g} min (seed {seed}, {args.example_seconds:g} s per example, "
              f"{args.memory_mb} MB cap)", flush=True)
        totals = run_target(target, args.minutes, seed, args.example_seconds, args.memory_mb)
        print(f"[{target}] {totals['executions']} executions in {totals['minutes']} min, "
              f"{len(totals['failures'])} distinct failures", flush=True)
        for sig, entry in totals["failures"].items():
            print(f"    {sig} x{entry['count']}: {entry['message'][:300]}\n      input: {entry.get('file', '-')}")
        failed = failed or bool(totals["failures"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
