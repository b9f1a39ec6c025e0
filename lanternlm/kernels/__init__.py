"""Loads Lantern's C++ CPU kernels (every *.cpp file in this folder, one extension), or says why they are unavailable.

Two places a build can come from, tried in this order:

1. **Prebuilt**: `lanternlm.kernels._lantern_kernels`, compiled by setup.py when the package is built or installed
   (a platform wheel, `pip install .`, `pip install -e .`). Beside it, `_build_info.json` records the hash of the
   sources, the PyTorch and Python versions and the compiler flags it was built with. It is loaded only when its
   sources hash equals that of the .cpp files beside it (an edited kernel in an editable checkout never loads a
   stale build) and PyTorch's release and C++ ABI are the ones it was built against (a C++ extension is tied to
   them: another torch would fail to load it, or worse).
2. **Built at run time**, when there is no usable prebuilt one: compiled once per (sources, PyTorch installation,
   Python version) with torch's cpp_extension into `$XDG_CACHE_HOME/lantern/kernels/lantern_quant_<env>_<sources>/`
   (~/.cache/lantern/kernels; about 30 s, needs g++ and ninja) and loaded from there afterwards. It is deliberately
   not under $LANTERN_HOME, the model store: a build belongs to this machine and Python, not to a set of models.

Either way one binary serves every x86-64 CPU: nothing is compiled with -march=native, and the AVX-512 VNNI and
AVX2+FMA code paths are compiled with per-function target attributes and picked at load from CPUID. On a non-x86
CPU, one without AVX2/FMA, or with no prebuilt build and no compiler, `kernels()` returns None and the callers keep
PyTorch's own kernels; `why_unavailable()` says which of these happened.

setup.py executes this file on its own (not as part of the package) for `source_files`, `sources_hash` and
`environment`: keep its imports absolute and free of the rest of lanternlm.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import importlib.util
import json
import os
import platform
import shutil
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch

HERE = Path(__file__).resolve().parent
PREBUILT_MODULE = "_lantern_kernels"  # lanternlm.kernels._lantern_kernels
BUILD_INFO = "_build_info.json"  # written beside the prebuilt module by setup.py
_lock = threading.Lock()
# The same flags as setup.py's build: no -march, so the build runs on any x86-64 CPU; at::parallel_for needs OpenMP.
RUNTIME_CFLAGS = "-O3 -fopenmp"
_state: dict[str, object] = {}


def source_files(folder: Path | None = None) -> list[Path]:
    """The files the extension is compiled from (and whose bytes name a build): every .cpp and .h here."""
    folder = folder or HERE
    return sorted([*folder.glob("*.cpp"), *folder.glob("*.h")], key=lambda p: p.name)


def sources_hash(folder: Path | None = None) -> str:
    """A hash of the sources' names and bytes: a build made from other sources is never loaded."""
    digest = hashlib.sha256()
    for path in source_files(folder):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def environment() -> dict[str, object]:
    """What a compiled extension is tied to: PyTorch's release and C++ ABI, Python's version, the machine."""
    return {"torch": torch.__version__.split("+")[0],  # 2.13.0+cpu and 2.13.0+cu128 share the C++ ABI of CPU ops
            "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
            "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
            "machine": platform.machine().lower()}


def prebuilt_mismatch(info: dict, sources: str, env: dict) -> str | None:
    """None when a prebuilt extension described by `info` (its _build_info.json) may be loaded here, else why not."""
    if info.get("sources_hash") != sources:
        return "the prebuilt kernels were built from other sources than the ones installed (edited since?)"
    for key, what in (("torch", "PyTorch"), ("cxx11_abi", "PyTorch's C++ ABI"), ("python", "Python"),
                      ("machine", "machine")):
        if info.get(key) != env.get(key):
            return f"the prebuilt kernels were built for {what} {info.get(key)}, this is {env.get(key)}"
    return None


def _load_prebuilt() -> tuple[ModuleType | None, str | None]:
    """(the prebuilt module, None), or (None, why it cannot be used)."""
    try:
        info = json.loads((HERE / BUILD_INFO).read_text())
    except FileNotFoundError:
        return None, "the package was installed without prebuilt kernels"
    except (OSError, ValueError) as exc:
        return None, f"the prebuilt kernels' {BUILD_INFO} is unreadable ({exc})"
    why = prebuilt_mismatch(info, sources_hash(), environment())
    if why:
        return None, why
    try:  # only now: importing a .so built against another torch can fail in the dynamic loader, or crash later
        module = importlib.import_module(f"{__name__}.{PREBUILT_MODULE}")
    except ImportError as exc:
        return None, f"the prebuilt kernels do not load ({exc})"
    _state["origin"] = {"origin": "prebuilt", "path": module.__file__, **info}
    return module, None


def cache_dir() -> Path:
    """Where kernels built at run time live."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lantern" / "kernels"


def _build_name() -> tuple[str, str]:
    """(environment key, build name): the build name adds a hash of the sources to the environment's key."""
    env = hashlib.sha256(f"{torch.__version__} {torch.__file__} {sys.version_info[:2]} {platform.machine()} "
                         f"{RUNTIME_CFLAGS}".encode())
    # The environment is part of the name because torch's loader rebuilds whenever include paths differ:
    # two virtualenvs sharing one build directory would rebuild it on every alternate run.
    key = f"lantern_quant_{env.hexdigest()[:8]}"
    return key, f"{key}_{sources_hash()[:12]}"


def _import_built(name: str, path: Path) -> ModuleType | None:
    """The extension module built earlier at `path`, imported directly (None if it does not import): torch's
    loader would first import cpp_extension and setuptools (~0.06 s of every load) only to find it up to date. The
    name already pins the sources, flags, Python and torch, so a file there is the build the loader would make."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        return None
    try:
        module = importlib.util.module_from_spec(spec)  # an extension module is dlopen()ed here
        spec.loader.exec_module(module)
    except ImportError:  # e.g. a file cut short by a killed build: torch's loader builds it again
        return None
    sys.modules[name] = module
    return module


def _compile(quiet: bool) -> ModuleType:
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
        built = build / f"{name}.so"
        module = _import_built(name, built) if built.is_file() else None
        if module is None:
            from torch.utils.cpp_extension import load
            if not quiet and not built.exists():
                print("lantern: compiling the CPU kernels (once, about 30 s)...", file=sys.stderr, flush=True)
            module = load(name=name, sources=[str(p) for p in source_files() if p.suffix == ".cpp"],
                          build_directory=str(build), extra_cflags=RUNTIME_CFLAGS.split(),
                          extra_ldflags=["-fopenmp"], verbose=False)
    for old in cache_dir().glob(f"{key}_*"):  # this environment's builds of older sources
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    _state["origin"] = {"origin": "built at run time", "path": module.__file__}
    return module


def _find(quiet: bool) -> tuple[ModuleType | None, str | None]:
    """(the module, None) or (None, why not): prebuilt first, else built (or taken from the cache) at run time."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"the kernels are x86-64 only (this is {platform.machine()})"
    if os.environ.get("LANTERN_NO_KERNELS"):
        return None, "LANTERN_NO_KERNELS is set"
    module, no_prebuilt = _load_prebuilt()
    if module is not None:
        return module, None
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return None, f"{no_prebuilt}, and no C++ compiler was found to build them (install g++)"
    try:
        return _compile(quiet), None
    except Exception as exc:  # a failed build must not stop the model from running
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
        return None, f"{no_prebuilt}, and building them failed: {last}"


def kernels(quiet: bool = False) -> ModuleType | None:
    """The loaded extension (prebuilt, or compiled on first use); None when this machine cannot have it."""
    if "module" in _state:  # the hot path: modules call this on every forward
        return _state["module"]  # type: ignore[return-value]
    with _lock:
        if "module" in _state:
            return _state["module"]  # type: ignore[return-value]
        module, why = _find(quiet)
        if module is not None and module.isa() == 0:
            why, module = "this CPU lacks AVX2/FMA", None
        _state["module"], _state["why"] = module, why
        return module


def why_unavailable() -> str | None:
    """None when the kernels are loaded, else one line on why not (after kernels() has been tried)."""
    kernels(quiet=True)
    return _state.get("why")  # type: ignore[return-value]


def build_info() -> dict | None:
    """Where the loaded kernels came from: {"origin": "prebuilt" | "built at run time", "path": ..., and for a
    prebuilt one the versions and compiler flags recorded at build time}; None when none is loaded."""
    return _state.get("origin") if kernels(quiet=True) is not None else None  # type: ignore[return-value]


def isa_name() -> str:
    """The instruction set the kernels run with on this CPU, or 'none'."""
    module = kernels(quiet=True)
    return {0: "none", 1: "avx2", 2: "avx512-vnni"}[module.isa() if module else 0]


@contextmanager
def serial_torch_ops() -> Iterator[None]:
    """Inside the block, PyTorch's own ops on the calling thread run on that thread alone (its OpenMP thread count
    is 1, then restored; other threads and the kernels' own splitting are unaffected). For per-token work on a
    vocabulary row (sampling, logprobs): a few microseconds each, where a parallel op can cost a worker's wake-up,
    tens of microseconds, and more on a thread other than the first (pool.cpp, set_torch_threads). A no-op where
    the kernels are not loaded."""
    module = kernels(quiet=True)
    if module is None:
        yield
        return
    before = module.set_torch_threads(1)
    try:
        yield
    finally:
        module.set_torch_threads(before)
