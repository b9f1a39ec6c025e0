"""The bench's own interpreter: create bench/.venv on first use and re-run the bench inside it.

The peers (llama-cpp-python, transformers) must not leak into Lantern's own environment, so they live
in a venv next to this file. llama-cpp-python is compiled here from source for this CPU; AMX is turned
off because llama.cpp's AMX kernels crash on the VMs we run on.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
VENV_DIR = BENCH_DIR / ".venv"
VENV_PYTHON = VENV_DIR / "bin" / "python"
# Written only after every install step succeeded; its text is the install plan, so changing the plan
# below makes the next run install again.
READY_STAMP = VENV_DIR / ".bench-ready"
# The second stage (HTTP): Lantern's server needs its runtime dependencies, the bench's client needs openai. A
# stamp of its own, so that adding it to an existing venv does not rerun the first stage (which rebuilds
# Lantern's kernels in place).
SERVE_STAMP = VENV_DIR / ".bench-serve-ready"
CLIENT = ["openai>=1.30", "httpx"]

# torch is always pinned: an unpinned torch resolves to a CUDA build and several GB of wheels.
TORCH = "torch==2.13.0"
PEERS = ["transformers", "accelerate", "gguf", "numpy", "matplotlib", "psutil"]
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
LLAMA_CMAKE_ARGS = f"-DGGML_NATIVE=ON -DCMAKE_C_FLAGS='{NO_AMX}' -DCMAKE_CXX_FLAGS='{NO_AMX}'"


def install_plan() -> list[tuple[list[str], dict[str, str]]]:
    """(pip arguments, extra environment) for each install step, in order."""
    return [
        (["install", "--upgrade", "pip"], {}),
        (["install", TORCH], {}),
        (["install", TORCH, *PEERS], {}),  # torch named again so no peer can move it
        # The repo's own runtime needs (tokenizers, safetensors, jinja2, ...) arrive with the peers above;
        # its server extras are not needed for benchmarking.
        # --no-build-isolation: the install compiles Lantern's kernels (setup.py) against the torch above,
        # rather than a second torch pip would fetch into an isolated build environment.
        (["install", "setuptools>=68", "ninja"], {}),
        (["install", "--no-deps", "--no-build-isolation", "-e", str(REPO_DIR)], {}),
        # The runtime needs the peers do not bring and `import lanternlm` does (constrained decoding).
        (["install", TORCH, "llguidance>=1.9", "jsonschema>=4.18"], {}),
        (["install", "--no-cache-dir", "--no-binary", "llama-cpp-python", "llama-cpp-python"],
         {"CMAKE_ARGS": LLAMA_CMAKE_ARGS, "FORCE_CMAKE": "1"}),
    ]


def serve_plan() -> list[str]:
    """pip arguments of the HTTP stage: the repo's runtime dependencies (from pyproject.toml: `lantern serve`
    needs fastapi, uvicorn, ...), torch pinned again, and the openai client."""
    import tomllib
    deps = tomllib.loads((REPO_DIR / "pyproject.toml").read_text())["project"]["dependencies"]
    return ["install", TORCH, *(d for d in deps if not d.replace(" ", "").startswith("torch")), *CLIENT]


def _plan_text() -> str:
    return "\n".join(" ".join(args) + "  " + repr(env) for args, env in install_plan()) + "\n"


def inside_venv() -> bool:
    return Path(sys.prefix).resolve() == VENV_DIR.resolve()


def ensure_venv() -> None:
    """Create and fill bench/.venv unless a previous run already finished doing so."""
    if READY_STAMP.is_file() and READY_STAMP.read_text() == _plan_text():
        return
    if not VENV_PYTHON.exists():
        say(f"creating the bench's own environment in {VENV_DIR} (first use; later runs reuse it)")
        subprocess.run([sys.executable, "-m", "venv", str(VENV_DIR)], check=True)
    log = VENV_DIR / "install.log"
    say(f"installing the peers into {VENV_DIR}; llama-cpp-python is compiled for this CPU, which takes "
        f"~10 min on 2 cores (progress: tail -f {log})")
    with open(log, "a") as out:
        for args, extra in install_plan():
            say("  pip " + " ".join(args))
            done = subprocess.run([str(VENV_PYTHON), "-m", "pip", *args], env={**os.environ, **extra},
                                  stdout=out, stderr=subprocess.STDOUT)
            if done.returncode != 0:
                raise SystemExit(f"bench: 'pip {' '.join(args)}' failed (exit {done.returncode}); see {log}")
    READY_STAMP.write_text(_plan_text())


def ensure_serve_stage() -> None:
    """The HTTP stage in bench/.venv (see SERVE_STAMP), installed unless done already."""
    plan = " ".join(serve_plan()) + "\n"
    if SERVE_STAMP.is_file() and SERVE_STAMP.read_text() == plan:
        return
    log = VENV_DIR / "install.log"
    say(f"installing Lantern's server dependencies and the openai client into {VENV_DIR} (log: {log})")
    with open(log, "a") as out:
        done = subprocess.run([str(VENV_PYTHON), "-m", "pip", *serve_plan()], stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"bench: 'pip {' '.join(serve_plan())}' failed (exit {done.returncode}); see {log}")
    SERVE_STAMP.write_text(plan)


def reexec_in_venv(argv: list[str], module: str = "bench") -> None:
    """Replace this process with `python -m MODULE argv...` run by the venv's interpreter."""
    ensure_venv()
    ensure_serve_stage()
    say(f"re-running inside {VENV_DIR}")
    os.chdir(REPO_DIR)
    os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), "-m", module, *argv])


def say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)
