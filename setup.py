"""Compiles Lantern's C++ CPU kernels into the package when it is built or installed (the metadata is pyproject.toml's).

The extension, `lanternlm.kernels._lantern_kernels`, is built with torch's CppExtension/BuildExtension from every
.cpp in lanternlm/kernels/, with the same flags as the run-time build and no -march: the AMX, AVX-512 VNNI and AVX2+FMA
paths carry their own target attributes and are chosen from CPUID at load, so one binary runs on any x86-64 CPU.
Beside it goes `_build_info.json`: the sources' hash, the PyTorch/Python versions and the compiler flags, which
lanternlm.kernels checks before loading it (see its docstring).

LANTERN_BUILD_KERNELS chooses what happens:
  auto (default)  build them if a C++ compiler is found; if not, or if the build fails, say so and install without
                  them (Lantern then builds them at first use, or runs on PyTorch's kernels);
  1               build them or fail (scripts/check-wheel, release wheels);
  0               do not build them.

Building needs the PyTorch the package will run with. `pip install --no-build-isolation -e .` (what scripts/setup
runs) builds against the torch already in the environment; with build isolation pip installs
pyproject.toml's pinned torch==2.13.0 into a temporary environment instead.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
KERNELS = Path("lanternlm") / "kernels"  # relative: setuptools wants relative source paths
MODULE = "lanternlm.kernels._lantern_kernels"
MODE = os.environ.get("LANTERN_BUILD_KERNELS", "auto").strip().lower()
KEEP = {"-shared", "-fPIC", "-pthread", "-DNDEBUG"}  # of Python's compile and link commands (see build_extensions)
FLAGS = {"cxx": ["-O3", "-fopenmp"], "link": ["-fopenmp"]}  # at::parallel_for runs serially without OpenMP


def say(message: str) -> None:
    print(f"lantern: {message}", file=sys.stderr, flush=True)


def kernel_sources():
    """lanternlm/kernels/__init__.py run on its own (not the package): source_files, sources_hash, environment."""
    spec = importlib.util.spec_from_file_location("_lantern_kernel_sources", ROOT / KERNELS / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def why_not_build() -> str | None:
    if MODE in ("0", "no", "false", "off"):
        return "LANTERN_BUILD_KERNELS=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the kernels are x86-64 only (this is {platform.machine()})"
    if MODE == "auto" and shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler found"
    return None


def extension_setup() -> dict:
    """setup() arguments for the extension, or {} when it is not built here."""
    why = why_not_build()
    if why:
        say(f"not building the CPU kernels ({why}); Lantern builds them at first use when it can")
        return {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    sources = kernel_sources()

    class BuildKernels(BuildExtension):
        """BuildExtension that records what it built with, and in `auto` mode goes on without the kernels on failure."""

        def finalize_options(self) -> None:
            super().finalize_options()
            if self.inplace or getattr(self, "editable_mode", False):
                # pip builds an editable install in a new temporary folder each time; keeping the objects in the
                # checkout's build/ lets ninja recompile only what changed when scripts/setup runs again.
                self.build_temp = str(ROOT / "build" / "kernels")

        def build_extensions(self) -> None:
            # Python's own CFLAGS/LDSHARED (sysconfig) would add -g (an 18 MB .so), -fwrapv (signed overflow
            # defined: slower loops), warnings and an rpath to Python's prefix. Keep what the run-time build has.
            for name in ("compiler_so", "compiler_so_cxx", "linker_so", "linker_so_cxx"):
                cmd = getattr(self.compiler, name, None)
                if cmd:
                    self.compiler.set_executable(name, [cmd[0], *(f for f in cmd[1:] if f in KEEP or f[:2] == "-I")])
            super().build_extensions()

        def run(self) -> None:
            try:
                super().run()
            except Exception as exc:
                if MODE != "auto":
                    raise
                say(f"building the CPU kernels failed ({str(exc).strip().splitlines()[-1:] or exc!r}); installing "
                    "without them: Lantern builds them at first use when it can, else runs on PyTorch's kernels")
                self.extensions, self.distribution.ext_modules = [], []
                return
            for ext in self.extensions:
                self.info_path(ext).write_text(json.dumps(self.build_info(ext), indent=1) + "\n")

        def info_path(self, ext) -> Path:
            return Path(self.get_ext_fullpath(ext.name)).parent / "_build_info.json"

        def build_info(self, ext) -> dict:
            import torch

            ninja = Path(self.build_temp) / "build.ninja"  # the exact compile lines, when ninja compiled them
            lines = ninja.read_text().splitlines() if ninja.exists() else []
            rules = {k.strip(): v.strip() for k, _, v in (ln.partition("=") for ln in lines)
                     if k.strip() in ("cxx", "cflags", "post_cflags")}
            compiler = getattr(self.compiler, "compiler_so", None) or []
            return {**sources.environment(), "sources_hash": sources.sources_hash(ROOT / KERNELS),
                    "torch_version": torch.__version__, "compiler": rules.get("cxx") or " ".join(compiler[:1]),
                    "cflags": rules.get("cflags") or " ".join(compiler[1:]), "post_cflags": rules.get("post_cflags", ""),
                    "ldflags": " ".join([*(getattr(self.compiler, "linker_so", None) or []), *ext.extra_link_args])}

        def get_outputs(self) -> list[str]:
            return [*super().get_outputs(), *(str(self.info_path(ext)) for ext in self.extensions)]

    ext = CppExtension(MODULE, [str(p.relative_to(ROOT)) for p in sources.source_files(ROOT / KERNELS)
                                if p.suffix == ".cpp"],
                       extra_compile_args=FLAGS["cxx"], extra_link_args=FLAGS["link"])
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildKernels}}


setup(**extension_setup())
