"""Open a model the way people have it: a Hugging Face folder or a single .gguf file.

Returns everything the rest of Lantern needs in one bundle: config, built model, tokenizer, chat template
and generation defaults. Picks the device (CUDA when present) and the compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ConfigError, ModelConfig
from ..errors import ModelFileError
from ..fused import fuse_for_cpu
from ..model import CausalLM
from ..models.encoder import EncoderConfig, EncoderModel
from ..quantize import quantization_available, quantize_from_gguf, uses_kernels
from ..text.tokenizer import Tokenizer
from . import hf
from .build import build_model, meta_model
from .encoder import SentenceConfig, is_encoder_config, load_encoder
from .gguf import read_gguf
from .gguf_model import LINEAR_WEIGHTS, gguf_config, gguf_tensors
from .quants import type_name

# A GGUF file carries no generation_config.json. GGUF users expect the sampling of llama.cpp, the format's
# own runtime (its common defaults: temperature 0.8, top_k 40, top_p 0.95, min_p 0.05), so those are the
# generation defaults of a GGUF model; a request's explicit values still win.
GGUF_GENERATION_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}

EMBEDDING = "model.embed_tokens.weight"  # quantized too (from the blocks) when Lantern's kernels run

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class LoadedModel:
    path: Path
    format: str                      # "hf" or "gguf"
    config: ModelConfig | EncoderConfig
    model: CausalLM | EncoderModel
    tokenizer: Tokenizer
    chat_template: str | None
    generation_config: dict = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    gguf_types: dict[str, int] = field(default_factory=dict)  # GGUF tensor types by count, e.g. {"Q4_1": 210}
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    quantized: bool = False          # linear layers compute from quantized weights (quantize.py)
    kind: str = "generate"           # "generate" (a decoder) or "embed" (an encoder)
    sentence: SentenceConfig | None = None  # encoders: pooling, normalisation, max length, prompts


def pick_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device, stored: str) -> torch.dtype:
    """float32 on CPU (exact, and what transformers computes in there); the checkpoint's half type on GPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "auto"):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32
    return DTYPES.get(stored, torch.float16) if stored in ("bfloat16", "float16") else torch.float16


def load(path: str | Path, dtype: str | torch.dtype | None = None,
         device: str | torch.device | None = None, quantized: bool | None = None) -> LoadedModel:
    """Open a model. `quantized` (GGUF only): keep the weights quantized and compute from them (default on
    CPU when Lantern's kernels or PyTorch's int8-weight kernel can run); False dequantizes everything, the
    reference path."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelFileError(path, "no such file or folder")
    dev = pick_device(device)
    if path.is_dir():
        return _load_hf(path, dtype, dev)
    if path.suffix.lower() == ".gguf" or _looks_like_gguf(path):
        if quantized is None:
            quantized = dev.type == "cpu" and quantization_available() and dtype in (None, "auto", torch.float32)
        return _load_gguf(path, dtype, dev, quantized)
    raise ModelFileError(path, "not a model: expected a Hugging Face folder or a .gguf file")


def _looks_like_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _load_hf(folder: Path, dtype, device: torch.device) -> LoadedModel:
    raw = hf.read_config(folder)
    if is_encoder_config(raw):
        compute = pick_dtype(dtype, device, str(raw.get("torch_dtype", raw.get("dtype", "float32"))))
        config, model, tokenizer, sentence, files = load_encoder(folder, raw, compute, device)
        return LoadedModel(folder, "hf", config, model, tokenizer, None, {}, files, device=device,
                           dtype=compute, kind="embed", sentence=sentence)
    try:
        config = ModelConfig.from_hf(raw, source=str(folder / "config.json"))
    except ConfigError as e:
        raise ModelFileError(folder / "config.json", str(e).split(": ", 1)[-1]) from None
    gen = hf.read_generation_config(folder)
    files = hf.weight_files(folder)
    tokenizer = Tokenizer.from_hf_folder(folder)
    end_ids = set(config.eos_token_id) | set(_as_ids(gen.get("eos_token_id")))
    tokenizer = tokenizer.with_end_ids(end_ids)
    compute = pick_dtype(dtype, device, config.torch_dtype)
    tensors = hf.load_tensors(files, compute, device)
    model = build_model(config, tensors, folder, device)
    return LoadedModel(folder, "hf", config, model, tokenizer, tokenizer.chat_template, gen, files,
                       device=device, dtype=compute)


def _load_gguf(path: Path, dtype, device: torch.device, quantized: bool) -> LoadedModel:
    with read_gguf(path) as gguf:
        config = gguf_config(gguf)
        tokenizer = Tokenizer.from_gguf_metadata(gguf.metadata, source=str(path))
        tokenizer = tokenizer.with_end_ids(set(config.eos_token_id))
        compute = pick_dtype(dtype, device, "float16")
        deferred = frozenset()
        use_kernels = quantized and uses_kernels(gguf)
        if quantized:  # left for the quantize transform to build from the blocks
            deferred = _linear_weights(config) | ({EMBEDDING} if use_kernels else frozenset())
        tensors = gguf_tensors(gguf, config, compute, device, skip=deferred)
        types: dict[str, int] = {}
        for info in gguf.tensors.values():
            types[type_name(info.ggml_type)] = types.get(type_name(info.ggml_type), 0) + 1
        model = build_model(config, tensors, path, device, deferred=deferred)
        if quantized:
            quantize_from_gguf(model, gguf, use_kernels)
            if use_kernels:
                fuse_for_cpu(model)
    return LoadedModel(path, "gguf", config, model, tokenizer, tokenizer.chat_template,
                       dict(GGUF_GENERATION_DEFAULTS), [path], types,
                       device=device, dtype=compute, quantized=quantized)


def _linear_weights(config: ModelConfig) -> frozenset[str]:
    """The names of the linear layers' weight matrices (a tied lm_head included), as the model has them."""
    names = meta_model(config).state_dict().keys()
    return frozenset(n for n in names if n.endswith(LINEAR_WEIGHTS))


def _as_ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]
