"""Builds, caches and loads Lantern's C++ CPU kernels (quant_cpu.cpp, decode_cpu.cpp, pool.cpp), or says why
they are unavailable.

The extension is compiled once per (sources, PyTorch installation, Python version) with torch's cpp_extension
into `$XDG_CACHE_HOME/lantern/kernels/lantern_quant_<environment>_<sources>/` (~/.cache/lantern/kernels) and
loaded from there afterwards. It is deliberately not under $LANTERN_HOME, the model store: a build belongs to
this machine and Python, not to a set of models, and a fresh store must not mean another half-minute compile.
The name hashes the sources, so an edited kernel rebuilds and an old build is never loaded by mistake. Without a C++ compiler, on a non-x86 CPU or on
one without AVX2/FMA, `kernels()` returns None and the callers keep PyTorch's own kernels; `why_unavailable()`
says which of these happened.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import shutil
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

_SOURCES = ("quant_cpu.cpp", "decode_cpu.cpp", "pool.cpp")
_lock = threading.Lock()
_state: dict[str, object] = {}


def cache_dir() -> Path:
    """Where built kernels live."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lantern" / "kernels"


def _build_name() -> tuple[str, str]:
    """(environment key, build name): the build name adds a hash of the sources to the environment's key."""
    env = hashlib.sha256(f"{torch.__version__} {torch.__file__} {sys.version_info[:2]} {platform.machine()}".encode())
    src = hashlib.sha256()
    for name in _SOURCES:
        src.update((Path(__file__).parent / name).read_bytes())
    # The environment is part of the name because torch's loader rebuilds whenever include paths differ:
    # two virtualenvs sharing one build directory would rebuild it on every alternate run.
    key = f"lantern_quant_{env.hexdigest()[:8]}"
    return key, f"{key}_{src.hexdigest()[:12]}"


def _compile(quiet: bool) -> ModuleType:
    from torch.utils.cpp_extension import load

    key, name = _build_name()
    build = cache_dir() / name
    build.mkdir(parents=True, exist_ok=True)
    # torch's loader guards a build with a `lock` file that it deletes when done; a process killed while
    # building leaves it behind, and every later load would wait for it forever. Builds are serialised here
    # with an OS lock instead, which the kernel releases when its holder dies: under it, a `lock` file can
    # only be such a leftover, and is removed.
    with open(build / ".lantern-build-lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        (build / "lock").unlink(missing_ok=True)
        if not quiet and not (build / f"{name}.so").exists():
            print("lantern: compiling the CPU kernels (once, about 30 s)...", file=sys.stderr, flush=True)
        sources = [str(Path(__file__).parent / s) for s in _SOURCES]
        module = load(name=name, sources=sources, build_directory=str(build), extra_cflags=["-O3", "-fopenmp"],
                      extra_ldflags=["-fopenmp"], verbose=False)  # at::parallel_for runs serially without OpenMP
    for old in cache_dir().glob(f"{key}_*"):  # this environment's builds of older sources
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return module


def kernels(quiet: bool = False) -> ModuleType | None:
    """The loaded extension, compiling it on first use; None when this machine cannot have it."""
    if "module" in _state:  # the hot path: modules call this on every forward
        return _state["module"]  # type: ignore[return-value]
    with _lock:
        if "module" in _state:
            return _state["module"]  # type: ignore[return-value]
        module, why = None, None
        if platform.machine().lower() not in ("x86_64", "amd64"):
            why = f"the kernels are x86-64 only (this is {platform.machine()})"
        elif os.environ.get("LANTERN_NO_KERNELS"):
            why = "LANTERN_NO_KERNELS is set"
        elif shutil.which(os.environ.get("CXX", "c++")) is None:
            why = "no C++ compiler found (install g++ to build them)"
        else:
            try:
                module = _compile(quiet)
            except Exception as exc:  # a failed build must not stop the model from running
                why = f"building them failed: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}"
            else:
                if module.isa() == 0:
                    why, module = "this CPU lacks AVX2/FMA", None
        _state["module"], _state["why"] = module, why
        return module


def why_unavailable() -> str | None:
    """None when the kernels are loaded, else one line on why not (after kernels() has been tried)."""
    kernels(quiet=True)
    return _state.get("why")  # type: ignore[return-value]


def isa_name() -> str:
    """The instruction set the kernels run with on this CPU, or 'none'."""
    module = kernels(quiet=True)
    return {0: "none", 1: "avx2", 2: "avx512-vnni"}[module.isa() if module else 0]
