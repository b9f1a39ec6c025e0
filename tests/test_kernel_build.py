"""Choosing between the prebuilt kernels (compiled by setup.py into the package) and a run-time build.

A prebuilt extension is loaded only when it was built from the same sources (so an edited .cpp in an editable
checkout never loads a stale build) and against the same PyTorch release, C++ ABI and Python; otherwise the
run-time build takes over, and without a compiler `why_unavailable()` says both why the prebuilt one was not used
and why none could be built. Nothing is compiled here: the loader's pieces run on fake folders and modules.
scripts/check-wheel is the end-to-end check (a real wheel, installed where there is no compiler).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest

import lanternlm.kernels as lk


def write_sources(folder, **files):
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def fake_kernels(isa=2):
    return types.SimpleNamespace(isa=lambda: isa, __file__="/somewhere/_lantern_kernels.so")


def test_the_sources_hash_follows_every_cpp_and_header_and_nothing_else(tmp_path):
    folder = write_sources(tmp_path, **{"a.cpp": "int a;", "b.cpp": "int b;", "c.h": "#pragma once"})
    first = lk.sources_hash(folder)
    assert [p.name for p in lk.source_files(folder)] == ["a.cpp", "b.cpp", "c.h"]
    write_sources(folder, **{"__init__.py": "x = 1", "blocks.py": "y = 2", "notes.txt": "z"})
    assert lk.sources_hash(folder) == first  # Python files are not compiled into the extension
    write_sources(folder, **{"b.cpp": "int b; "})
    assert lk.sources_hash(folder) != first  # one edited byte
    write_sources(folder, **{"b.cpp": "int b;", "c.h": "#pragma once\n"})
    assert lk.sources_hash(folder) != first  # a header too
    (folder / "c.h").write_text("#pragma once")
    assert lk.sources_hash(folder) == first
    write_sources(folder, **{"d.cpp": ""})
    assert lk.sources_hash(folder) != first  # a new, even empty, source


def test_the_sources_hash_covers_names_not_only_bytes(tmp_path):
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    one = write_sources(tmp_path / "one", **{"a.cpp": "x", "b.cpp": "y"})
    two = write_sources(tmp_path / "two", **{"a.cpp": "xy", "b.cpp": ""})  # the same bytes, split differently
    assert lk.sources_hash(one) != lk.sources_hash(two)


def test_setup_py_sees_the_same_hash_and_environment_as_the_loader():
    # setup.py runs lanternlm/kernels/__init__.py on its own, outside the package, to record what it built.
    spec = importlib.util.spec_from_file_location("_standalone_kernels", lk.HERE / "__init__.py")
    alone = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(alone)
    assert alone.sources_hash() == lk.sources_hash()
    assert alone.environment() == lk.environment()
    assert [p.name for p in alone.source_files()] == [p.name for p in lk.source_files()]
    assert any(p.suffix == ".cpp" for p in lk.source_files())


def test_a_matching_build_is_accepted():
    env = lk.environment()
    assert set(env) == {"torch", "cxx11_abi", "python", "machine"}
    assert "+" not in env["torch"]  # 2.13.0+cpu and 2.13.0+cu128 are one release
    assert lk.prebuilt_mismatch({**env, "sources_hash": "abc", "cflags": "-O3"}, "abc", env) is None


@pytest.mark.parametrize("change,words", [
    ({"sources_hash": "old"}, ["other sources"]),
    ({"torch": "2.12.1"}, ["PyTorch 2.12.1", "this is 2.13.0"]),
    ({"cxx11_abi": False}, ["C++ ABI False", "this is True"]),
    ({"python": "3.12"}, ["Python 3.12", "this is 3.11"]),
    ({"machine": "aarch64"}, ["machine aarch64"]),
])
def test_a_build_from_other_sources_or_for_another_torch_is_refused(change, words):
    env = {"torch": "2.13.0", "cxx11_abi": True, "python": "3.11", "machine": "x86_64"}
    why = lk.prebuilt_mismatch({**env, "sources_hash": "new", **change}, "new", env)
    assert why and all(w in why for w in words), why


def test_missing_keys_are_a_mismatch_not_a_crash():
    assert "other sources" in lk.prebuilt_mismatch({}, "abc", lk.environment())
    assert "PyTorch None" in lk.prebuilt_mismatch({"sources_hash": "abc"}, "abc", lk.environment())


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """lanternlm.kernels looking at a fake package folder, with fresh state; importing the module is spied on."""
    write_sources(tmp_path, **{"quant_cpu.cpp": "int q;", "pool.cpp": "int p;"})
    monkeypatch.setattr(lk, "HERE", tmp_path)
    monkeypatch.setattr(lk, "_state", {})
    imported = []

    def import_module(name):
        imported.append(name)
        return fake_kernels()

    monkeypatch.setattr(lk.importlib, "import_module", import_module)
    monkeypatch.setattr(lk, "_compile", lambda quiet: pytest.fail("a test must never compile"))
    return types.SimpleNamespace(path=tmp_path, imported=imported)


def record(folder, **change):
    """Write the _build_info.json setup.py would have written for these sources, with `change` applied."""
    info = {**lk.environment(), "sources_hash": lk.sources_hash(folder.path), "torch_version": "2.13.0+cpu",
            "cflags": "-O3", **change}
    (folder.path / lk.BUILD_INFO).write_text(json.dumps(info))


def test_the_prebuilt_module_is_imported_when_it_matches(folder):
    record(folder)
    module, why = lk._load_prebuilt()
    assert why is None and module is not None
    assert folder.imported == ["lanternlm.kernels._lantern_kernels"]
    assert lk._state["origin"]["origin"] == "prebuilt" and lk._state["origin"]["cflags"] == "-O3"


@pytest.mark.parametrize("change,words", [({"sources_hash": "stale"}, "other sources"),
                                          ({"torch": "2.12.0"}, "PyTorch 2.12.0")])
def test_a_stale_prebuilt_module_is_never_imported(folder, change, words):
    record(folder, **change)
    module, why = lk._load_prebuilt()
    assert module is None and words in why
    assert folder.imported == []  # a .so built against another torch must not even be dlopen()ed


def test_an_edited_source_makes_the_prebuilt_module_stale(folder):
    record(folder)
    (folder.path / "pool.cpp").write_text("int p; // edited")
    module, why = lk._load_prebuilt()
    assert module is None and "other sources" in why and folder.imported == []


def test_no_build_info_or_an_unreadable_one(folder):
    assert lk._load_prebuilt() == (None, "the package was installed without prebuilt kernels")
    (folder.path / lk.BUILD_INFO).write_text("{not json")
    module, why = lk._load_prebuilt()
    assert module is None and "unreadable" in why


def test_an_unloadable_prebuilt_module_is_a_reason(folder, monkeypatch):
    record(folder)

    def broken(name):
        raise ImportError("undefined symbol: _ZN3c10...")

    monkeypatch.setattr(lk.importlib, "import_module", broken)
    module, why = lk._load_prebuilt()
    assert module is None and "do not load" in why and "undefined symbol" in why


def test_without_a_usable_prebuilt_build_the_run_time_build_takes_over(folder, monkeypatch):
    record(folder, sources_hash="stale")
    compiled = fake_kernels()
    monkeypatch.setattr(lk.shutil, "which", lambda name: "/usr/bin/c++")
    monkeypatch.setattr(lk, "_compile", lambda quiet: compiled)
    monkeypatch.delenv("LANTERN_NO_KERNELS", raising=False)
    monkeypatch.setattr(lk.platform, "machine", lambda: "x86_64")
    assert lk.kernels(quiet=True) is compiled and lk.why_unavailable() is None
    assert folder.imported == []


def test_without_a_prebuilt_build_or_a_compiler_the_reason_names_both(folder, monkeypatch):
    record(folder, torch="2.12.0")
    monkeypatch.setattr(lk.shutil, "which", lambda name: None)
    monkeypatch.delenv("LANTERN_NO_KERNELS", raising=False)
    monkeypatch.setattr(lk.platform, "machine", lambda: "x86_64")
    assert lk.kernels(quiet=True) is None
    why = lk.why_unavailable()
    assert "PyTorch 2.12.0" in why and "no C++ compiler" in why, why
    assert lk.isa_name() == "none" and lk.build_info() is None


def test_a_prebuilt_build_on_a_cpu_without_avx2_is_not_used(folder, monkeypatch):
    record(folder)
    monkeypatch.setattr(lk.importlib, "import_module", lambda name: fake_kernels(isa=0))
    monkeypatch.delenv("LANTERN_NO_KERNELS", raising=False)
    monkeypatch.setattr(lk.platform, "machine", lambda: "x86_64")
    assert lk.kernels(quiet=True) is None and lk.why_unavailable() == "this CPU lacks AVX2/FMA"


def test_lantern_no_kernels_wins_over_a_prebuilt_build(folder, monkeypatch):
    record(folder)
    monkeypatch.setenv("LANTERN_NO_KERNELS", "1")
    monkeypatch.setattr(lk.platform, "machine", lambda: "x86_64")
    assert lk.kernels(quiet=True) is None and lk.why_unavailable() == "LANTERN_NO_KERNELS is set"
    assert folder.imported == []


@pytest.fixture
def run_time_cache(tmp_path, monkeypatch):
    """An empty run-time build cache, and a torch loader that records being asked instead of compiling."""
    import torch.utils.cpp_extension as cpp

    real = lk.kernels()  # before anything is faked
    monkeypatch.setattr(lk, "_state", {})
    monkeypatch.setattr(lk, "cache_dir", lambda: tmp_path)
    asked = []
    monkeypatch.setattr(cpp, "load", lambda **kw: asked.append(kw["name"]) or fake_kernels())
    return types.SimpleNamespace(path=tmp_path, asked=asked, real=real)


def test_a_finished_run_time_build_is_imported_without_torchs_loader(run_time_cache, monkeypatch):
    monkeypatch.setattr(lk, "_build_name", lambda: ("key", "key_abc"))
    (run_time_cache.path / "key_abc").mkdir()
    built = run_time_cache.path / "key_abc" / "key_abc.so"
    built.write_bytes(b"a build")
    imported, module = [], fake_kernels()
    monkeypatch.setattr(lk, "_import_built", lambda name, path: imported.append((name, path)) or module)
    assert lk._compile(quiet=True) is module
    # torch's loader (cpp_extension, setuptools, ninja) was not needed
    assert imported == [("key_abc", built)] and run_time_cache.asked == []
    assert lk._state["origin"]["origin"] == "built at run time"


def test_a_built_extension_imports_by_its_file(run_time_cache):
    # The kernels this process runs on, imported again from their file under their own name (Python hands back
    # the module it has: a second copy of the library would register its classes twice, which pybind11 refuses).
    real = run_time_cache.real
    if real is None:
        pytest.skip(f"no kernels here: {lk.why_unavailable()}")
    before = sys.modules.get(real.__name__)
    try:
        module = lk._import_built(real.__name__, Path(real.__file__))
    finally:  # the module object must stay the one the rest of the process uses
        if before is None:
            sys.modules.pop(real.__name__, None)
        else:
            sys.modules[real.__name__] = before
    assert module is not None and module.isa() == real.isa()


def test_a_run_time_build_that_does_not_import_is_built_again(run_time_cache, monkeypatch):
    monkeypatch.setattr(lk, "_build_name", lambda: ("key", "key_abc"))
    (run_time_cache.path / "key_abc").mkdir()
    (run_time_cache.path / "key_abc" / "key_abc.so").write_bytes(b"cut short by a killed build")
    module = lk._compile(quiet=True)
    assert run_time_cache.asked == ["key_abc"] and module.isa() == 2
