"""`from_pretrained`'s arguments: where the model is and how transformers' loading options map onto Lantern's.

A name is a catalogue name ("smollm2-135m-instruct"), an HF folder, a .gguf file, or a folder plus
`gguf_file=`. Harmless options are accepted: `device_map` picks the device, `torch_dtype`/`dtype` the compute
dtype (as `LLM(dtype=...)`: on a GGUF, float32 or "auto" keeps the quantized fast path, another dtype
dequantizes), `trust_remote_code` changes nothing (Lantern never runs code shipped with a model). Lantern's own
options pass through to `LLM` as given: `exact=True` for the exact float32 path that
equals transformers, `quantize=`, `context=`, `kv_dtype=`. Any other option is refused by name.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..api import LLM
from ..loader import hf
from ..loader.gguf import read_gguf
from ..loader.gguf_model import gguf_config
from ..store import resolve
from ..text.tokenizer import Tokenizer
from .errors import UnsupportedArgumentError, refuse_set, refuse_unknown

# Accepted and without effect on the result, with the reason (the docstrings quote these).
IGNORED = {
    "trust_remote_code": "Lantern never runs code shipped with a model",
    "low_cpu_mem_usage": "Lantern always loads tensor by tensor",
    "local_files_only": "Lantern never downloads while loading (see `lantern pull`)",
    "use_cache": "generation always uses a KV cache",
    "use_fast": "Lantern's tokenizer is always the fast one (tokenizer.json or the GGUF vocabulary)",
}
LANTERN_OPTIONS = {"exact", "quantize", "context", "kv_dtype"}
MODEL_OPTIONS = {"gguf_file", "device_map", "torch_dtype", "dtype", "attn_implementation", "use_safetensors",
                 "revision"} | set(IGNORED) | LANTERN_OPTIONS
TOKENIZER_OPTIONS = {"gguf_file", "padding_side", "revision", "clean_up_tokenization_spaces"} | set(IGNORED)


def model_path(where: str, name, gguf_file: str | None) -> Path:
    """The file or folder to open; a missing one raises the store's or loader's error naming it."""
    if gguf_file is None:
        return resolve(name)
    folder = Path(str(name)).expanduser()
    if not folder.exists():
        folder = resolve(name)  # a hub id's local snapshot
    if not folder.is_dir():
        raise UnsupportedArgumentError(where, "gguf_file", f"{str(name)!r} is not a folder to find "
                                                           f"{gguf_file!r} in")
    return folder / gguf_file


def device_from_map(where: str, device_map) -> str | None:
    """transformers' device_map as one device: None/"auto" (Lantern's choice), a device, or {"": device}."""
    if isinstance(device_map, dict):
        if set(device_map) != {""}:
            raise UnsupportedArgumentError(where, "device_map", "Lantern runs a model on one device; give "
                                                                "'cpu', 'cuda', 'auto' or {'': device}")
        device_map = device_map[""]
    if device_map is None or device_map == "auto":
        return None
    if isinstance(device_map, int):  # a GPU index, as accelerate takes it
        return f"cuda:{device_map}"
    return str(device_map)


def _dtype(where: str, kwargs: dict):
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    if isinstance(dtype, str) and dtype.startswith("torch."):
        dtype = dtype[len("torch."):]
    if dtype is None or isinstance(dtype, torch.dtype) or isinstance(dtype, str):
        return dtype
    raise UnsupportedArgumentError(where, "torch_dtype", f"expected a torch.dtype or a name, got {dtype!r}")


def open_llm(where: str, name, kwargs: dict) -> LLM:
    """Check `from_pretrained`'s keywords and load the model through Lantern's own front door."""
    refuse_unknown(where, kwargs, MODEL_OPTIONS)
    refuse_set(where, "attn_implementation", kwargs.get("attn_implementation"), (None, "sdpa", "eager"),
               "Lantern computes attention its own way (sdpa and eager give the same numbers)")
    refuse_set(where, "use_safetensors", kwargs.get("use_safetensors"), (None, True),
               "Lantern never unpickles weights")
    refuse_set(where, "revision", kwargs.get("revision"), (None, "main"), "Lantern opens local files only")
    # A name goes to LLM as given (it resolves catalogue names itself, and keeps the name for messages).
    target = name if kwargs.get("gguf_file") is None else model_path(where, name, kwargs["gguf_file"])
    options = {key: kwargs[key] for key in LANTERN_OPTIONS if key in kwargs}
    return LLM(str(target), dtype=_dtype(where, kwargs), device=device_from_map(where, kwargs.get("device_map")),
               **options)


def open_tokenizer(where: str, name, kwargs: dict) -> tuple[Tokenizer, dict]:
    """The model's tokenizer alone (no weights are read) and its tokenizer_config.json settings ({} for GGUF)."""
    refuse_unknown(where, kwargs, TOKENIZER_OPTIONS)
    refuse_set(where, "revision", kwargs.get("revision"), (None, "main"), "Lantern opens local files only")
    path = model_path(where, name, kwargs.get("gguf_file"))
    if path.is_dir():
        tokenizer = Tokenizer.from_hf_folder(path)
        # The end-of-turn ids the model loader adds too: config.json's and generation_config.json's eos.
        ends = _ids(hf.read_config(path).get("eos_token_id")) if (path / "config.json").is_file() else []
        if (path / "generation_config.json").is_file():
            ends += _ids(hf.read_generation_config(path).get("eos_token_id"))
        settings = hf.read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
        return tokenizer.with_end_ids(ends), settings
    with read_gguf(path) as gguf:
        tokenizer = Tokenizer.from_gguf_metadata(gguf.metadata, source=str(path))
        return tokenizer.with_end_ids(gguf_config(gguf).eos_token_id), {}


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]
