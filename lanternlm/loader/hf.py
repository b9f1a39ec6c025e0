"""Hugging Face folders: config.json, generation_config.json and safetensors weights (single file or shards).

Weights are read through `safetensors.safe_open`, which memory-maps the file and validates its header and
offsets; each tensor is copied once, from the map into its final dtype (the fast path's matrices: into the
model's buffer, one at a time, see LazyTensors). Pickled checkpoints
(pytorch_model.bin, *.pt) are refused: loading them would execute code from the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..errors import ModelFileError

MAX_JSON_BYTES = 64 * 1024 * 1024  # config, index and tokenizer files are far smaller; refuse absurd ones


def read_json(path: Path) -> Any:
    """Parse a JSON file, naming the file in any error."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ModelFileError(path, f"cannot read: {e.strerror or e}") from None
    if size > MAX_JSON_BYTES:
        raise ModelFileError(path, f"{size} bytes is too large for a JSON metadata file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ModelFileError(path, "not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ModelFileError(path, f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelFileError(folder, "no config.json: not a Hugging Face model folder")
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise ModelFileError(path, "expected a JSON object")
    return cfg


def read_generation_config(folder: Path) -> dict:
    """generation_config.json if present (sampling defaults, eos ids), else {}."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return {}
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise ModelFileError(path, "expected a JSON object")
    return cfg


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding the weights: the shards an index lists, or model.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelFileError(index, "no 'weight_map' object")
        files = []
        for name in dict.fromkeys(weight_map.values()):
            # A shard name is untrusted: it must be a plain file name inside this folder.
            if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
                raise ModelFileError(index, f"invalid shard file name {name!r}")
            if not (folder / name).is_file():
                raise ModelFileError(index, f"lists shard {name!r}, which is missing from the folder")
            files.append(folder / name)
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    if pickles:
        raise ModelFileError(folder, f"only safetensors weights are loaded; refusing pickled {pickles[0]} "
                                     "(convert it to safetensors)")
    raise ModelFileError(folder, "no model.safetensors or model.safetensors.index.json")


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, Path, Any]]:
    """Yield (name, file, open handle) for every tensor; the handle reads it on demand."""
    seen: dict[str, Path] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    if name in seen:
                        raise ModelFileError(path, f"tensor {name!r} is also in {seen[name].name}")
                    seen[name] = path
                    yield name, path, handle
        except SafetensorError as e:
            raise ModelFileError(path, f"invalid safetensors file: {e}") from None
        except OSError as e:
            raise ModelFileError(path, f"cannot read: {e.strerror or e}") from None


def load_tensors(files: list[Path], dtype: torch.dtype, device: torch.device | str,
                 skip: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """All tensors but those named in `skip`, converted to `dtype` on `device` (one copy out of the memory map)."""
    out = {}
    for name, path, handle in iter_tensors(files):
        if name in skip:
            continue
        try:
            tensor = handle.get_tensor(name)
        except SafetensorError as e:
            raise ModelFileError(path, f"tensor {name!r}: {e}") from None
        if not tensor.is_floating_point():
            raise ModelFileError(path, f"tensor {name!r} has dtype {tensor.dtype}; expected floating point weights")
        # get_tensor returns a view of the map; .to() copies only to convert or move (a tensor stored in `dtype`
        # stays a view of the map)
        out[name] = tensor.to(device=device, dtype=dtype)
    return out


# safetensors' dtype names for the floating point types weights come in
FLOAT_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


class LazyTensors:
    """The tensors named `names` in safetensors files, each read when it is popped, in its stored type, through a
    handle opened for it alone.

    Why a handle each: the fast path copies every matrix into the model's own buffer, and with one handle for
    the whole file each page read stayed mapped, and counted as resident, until the end, on top of the copies
    (peak RSS 816 MB for a steady 559 on the default model's bf16 folder). A tensor's handle unmaps its pages
    once the tensor is dropped. Opening costs ~0.3 ms per tensor. `items()` gives meta tensors (shape and dtype,
    no data) for sizing and checks."""

    def __init__(self, files: list[Path], names: frozenset[str]):
        self._where: dict[str, Path] = {}
        self._meta: dict[str, torch.Tensor] = {}
        for name, path, handle in iter_tensors(files):
            if name not in names:
                continue
            piece = handle.get_slice(name)
            dtype = FLOAT_DTYPES.get(piece.get_dtype())
            if dtype is None:
                raise ModelFileError(path, f"tensor {name!r} has dtype {piece.get_dtype()}; expected floating point "
                                           "weights")
            self._where[name] = path
            self._meta[name] = torch.empty(piece.get_shape(), dtype=dtype, device="meta")

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def items(self):
        return self._meta.items()

    def pop(self, name: str) -> torch.Tensor:
        path = self._where.pop(name)
        self._meta.pop(name)
        try:
            with safe_open(str(path), framework="pt") as handle:
                return handle.get_tensor(name)
        except SafetensorError as e:
            raise ModelFileError(path, f"tensor {name!r}: {e}") from None
        except OSError as e:
            raise ModelFileError(path, f"cannot read: {e.strerror or e}") from None
