"""`python -m bench.all`: the whole table in one run: the default model, every GGUF file in bench/files/ and the
HF folder there, one after another, each as `python -m bench` would measure it; then one combined table.

Writes bench/results/all-YYYYmmdd-HHMMSS.json (every run) and .md (the combined table, each model's tables and
goals). Missing files in bench/files/ are written first (`python -m bench.files`).
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
from pathlib import Path

from . import env, report
from .__main__ import (FOLDER_ENGINES, GGUF_ENGINES, RESULTS, _interrupt, add_options, bench_model, check_options,
                       check_quiet, machine, model_path, run_main, title)

FILES = env.BENCH_DIR / "files"
ALL_GGUF_ENGINES = "lantern,llamacpp,llama-bench"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.all", description=__doc__.splitlines()[0])
    p.add_argument("--gguf-engines", default=ALL_GGUF_ENGINES,
                   help=f"engines for each GGUF file (default {ALL_GGUF_ENGINES}; `python -m bench` also knows "
                        f"{GGUF_ENGINES})")
    p.add_argument("--folder-engines", default=FOLDER_ENGINES, help=f"engines for the folder (default {FOLDER_ENGINES})")
    p.add_argument("--only", default=None, help="only models whose file or folder name contains this")
    p.add_argument("--skip-folder", action="store_true", help="GGUF files only")
    add_options(p)
    args = p.parse_args(argv)
    check_options(p, args)
    args.gguf = None
    return args


def ensure_files() -> None:
    from .files import FOLDER, FOLDER_PEER_GGUF, SHAPES, OUT
    wanted = [FOLDER, *FOLDER_PEER_GGUF.values(), OUT / "smollm2-135m-f16.gguf", OUT / "smollm2-135m-q4_k_m.gguf",
              *(OUT / f"{name}-q4_k_m.gguf" for name in SHAPES), OUT / "llama-1b-shape-q3_k_m.gguf",
              OUT / "llama-1b-shape-q2_k.gguf", OUT / "llama-1b-shape-iq4_xs.gguf"]
    missing = [p.name for p in wanted if not p.exists()]
    if missing:
        env.say(f"writing the bench's files first ({', '.join(missing)} missing): python -m bench.files")
        subprocess.run([sys.executable, "-m", "bench.files"], cwd=env.REPO_DIR, check=True)


def models(args: argparse.Namespace) -> list[Path]:
    found = [model_path(None), *sorted(FILES.glob("*.gguf"))]
    if not args.skip_folder:
        found += sorted(p for p in FILES.iterdir() if (p / "config.json").is_file())
    return [m for m in found if not args.only or args.only in m.name]


def main(argv: list[str]) -> None:
    signal_setup()
    args = parse_args(argv)
    if not env.inside_venv():
        env.reexec_in_venv(argv, module="bench.all")  # does not return
    env.ensure_serve_stage()
    ensure_files()
    load = check_quiet(args.force)
    todo = models(args)
    env.say(f"{len(todo)} models: {', '.join(m.name for m in todo)}")
    runs = []
    for model in todo:
        engines = (args.folder_engines if model.is_dir() else args.gguf_engines).split(",")
        env.say(f"=== {model.name} ===")
        run = bench_model(model, [e.strip() for e in engines if e.strip()], args, load)
        runs.append(run)
        print(f"\n{title(run)}\n\n{report.full(run)}\n", flush=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(exist_ok=True)
    json_path, md_path = RESULTS / f"all-{stamp}.json", RESULTS / f"all-{stamp}.md"
    everything = {"when": stamp, "machine": machine(load, args), "runs": runs}
    report.save_json(everything, json_path)
    md_path.write_text(report.markdown(everything, [title(r) for r in runs]))
    print(report.summary(runs))
    print(f"\nsaved {json_path} and {md_path}")
    failed = [f"{Path(r['model']).name}: {e}" for r in runs for e in report.failures(r["results"])]
    if failed:
        raise SystemExit("bench.all: failed: " + "; ".join(failed))


def signal_setup() -> None:
    import signal
    signal.signal(signal.SIGTERM, _interrupt)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
