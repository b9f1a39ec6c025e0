"""Open a model the way people have it: a Hugging Face folder or a single .gguf file.

Returns everything the rest of Lantern needs in one bundle: config, built model, tokenizer, chat template
and generation defaults. Picks the device (CUDA when present) and the compute dtype, and is the one place
that decides which transforms (quantize.py, fused.py, distributed/shard.py) a built model gets. It sits above
`loader/` (the formats) and the transforms, so neither imports the other's package back.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import ConfigError, ModelConfig
from .distributed.plan import Shard
from .distributed.shard import matrix_parts, parallelize, shard_model, slice_model
from .errors import LanternError, ModelFileError
from .fused import fuse_for_cpu
from .kernels import kernels, why_unavailable
from .loader import hf
from .loader.build import build_model, meta_model
from .loader.encoder import SentenceConfig, is_encoder_config, load_encoder
from .loader.gguf import read_gguf
from .loader.gguf_model import LINEAR_WEIGHTS, gguf_config, gguf_tensors
from .loader.quants import type_name
from .model import CausalLM
from .models.encoder import EncoderConfig, EncoderModel
from .quantize import QUANTIZE_TYPES, gguf_weights, quantization_available, quantize_from_float, quantize_from_gguf
from .store import cache_dir
from .text.tokenizer import Tokenizer

# A GGUF file carries no generation_config.json. GGUF users expect the sampling of llama.cpp, the format's
# own runtime (its common defaults: temperature 0.8, top_k 40, top_p 0.95, min_p 0.05), so those are the
# generation defaults of a GGUF model; a request's explicit values still win.
GGUF_GENERATION_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}

EMBEDDING = "model.embed_tokens.weight"  # quantized too (from the blocks) when Lantern's kernels run
HALF_TYPES = ("bfloat16", "float16")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class LoadedModel:
    path: Path
    format: str                      # "hf" or "gguf"
    config: ModelConfig | EncoderConfig  # the whole model's, also when `model` is one tensor-parallel rank's part
    model: CausalLM | EncoderModel
    tokenizer: Tokenizer
    chat_template: str | None
    generation_config: dict = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    gguf_types: dict[str, int] = field(default_factory=dict)  # GGUF tensor types by count, e.g. {"Q4_1": 210}
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    exact: bool = True               # False: linear layers compute from blocks or 2-byte weights (quantize.py)
    quantize: str | None = None      # the block type float weights were quantized to at load (q8_0, ...)
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


def read_config(path: str | Path) -> ModelConfig:
    """The decoder config of a GGUF file or an HF folder, from its metadata or config.json alone (no weights are
    read): what a tensor-parallel launcher plans the split from before it loads."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelFileError(path, "no such file or folder")
    if path.is_dir():
        raw = hf.read_config(path)
        if is_encoder_config(raw):
            raise ModelFileError(path, "an embedding (encoder) model, not a decoder")
        try:
            return ModelConfig.from_hf(raw, source=str(path / "config.json"))
        except ConfigError as e:
            raise ModelFileError(path / "config.json", str(e).split(": ", 1)[-1]) from None
    if path.suffix.lower() == ".gguf" or _looks_like_gguf(path):
        with read_gguf(path) as gguf:
            return gguf_config(gguf)
    raise ModelFileError(path, "not a model: expected a Hugging Face folder or a .gguf file")


def load(path: str | Path, dtype: str | torch.dtype | None = None,
         device: str | torch.device | None = None, exact: bool | None = None,
         quantize: str | None = None, shard: Shard | None = None) -> LoadedModel:
    """Open a model.

    `exact`: True computes in `dtype` (float32 on CPU) from weights dequantized or widened to it, the reference
    path that equals transformers. False, the default on CPU (with float32 or "auto" dtype) wherever the
    kernels run, keeps the weights as stored and computes from them (quantize.py): a GGUF's blocks, an HF
    folder's bf16/fp16 matrices (Lantern's C++ kernels only), an F16/BF16 GGUF's matrices alike. An HF folder
    stored in float32 stays on the exact path unless exact=False is asked for: its users expect float32
    numbers, and the fast path's dense prefill computes in bf16.
    `quantize` ("q8_0", "q4_0", "q4_1"): quantize float weights (an HF folder's, an F16/BF16 GGUF's) to those
    blocks at load, as `ollama create -q` does; implies exact=False.
    `shard` (distributed/plan.py: Shard(plan_shards(read_config(path), rank, world), group)): load one
    tensor-parallel rank's part of a decoder, its collectives on `group` (distributed/shard.py). A GGUF file on
    the fast path is read for that part only, into memory sized for it. An HF folder, and the exact path, load
    the whole model and then slice it (simpler; the whole model's memory is needed once, during the load); on an
    HF folder's fast path only each float matrix is whole, one at a time. The returned `config` stays the whole
    model's; `model.config` is the rank's (its heads), which a KV cache is sized from."""
    path = Path(path).expanduser()
    if quantize is not None and quantize not in QUANTIZE_TYPES:
        raise LanternError(f"unknown quantization type {quantize!r}: use one of {', '.join(QUANTIZE_TYPES)}")
    if quantize and exact:
        raise LanternError("quantize and exact exclude each other: the exact path computes in float")
    if not path.exists():
        raise ModelFileError(path, "no such file or folder")
    dev = pick_device(device)
    plain = dev.type == "cpu" and dtype in (None, "auto", torch.float32)  # the fast paths compute in float32
    on_kernels = plain and kernels() is not None
    if (quantize or (path.is_dir() and exact is False)) and not on_kernels:
        raise LanternError(f"{'quantize' if quantize else 'an HF folder with exact=False'} needs the CPU, float32 "
                           "compute and Lantern's kernels "
                           f"({why_unavailable() or 'another device or dtype was asked for'})")
    if path.is_dir():
        if exact is None and not on_kernels:
            exact = True
        return _load_hf(path, dtype, dev, exact, quantize, shard)  # None: decided by the stored type
    if path.suffix.lower() == ".gguf" or _looks_like_gguf(path):
        if exact is None:
            exact = not (plain and quantization_available())
        return _load_gguf(path, dtype, dev, exact, quantize, shard)
    raise ModelFileError(path, "not a model: expected a Hugging Face folder or a .gguf file")


def _looks_like_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _load_hf(folder: Path, dtype, device: torch.device, exact: bool | None, quantize: str | None,
             shard: Shard | None) -> LoadedModel:
    raw = hf.read_config(folder)
    if is_encoder_config(raw) and shard is not None:
        raise LanternError(f"{folder.name}: an embedding (encoder) model; tensor parallelism splits decoders")
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
    if exact is None:
        exact = config.torch_dtype not in HALF_TYPES and not quantize
    if exact:
        tensors = hf.load_tensors(files, compute, device)
        model = build_model(config, tensors, folder, device)
        if shard is not None:
            shard_model(model, shard.plan, shard.group)
    else:
        # The weight matrices and the embedding stay in their stored type (bf16/fp16; fp32 stays fp32) for
        # the kernels; norms and biases are float32, as the fast path computes.
        matrices = _linear_weights(config) | {EMBEDDING}
        tensors = hf.load_tensors(files, compute, device, skip=matrices | {"lm_head.weight"})
        # some tied checkpoints store the lm_head's copy anyway: it is not read
        kept = hf.LazyTensors(files, matrices - ({"lm_head.weight"} if config.tie_word_embeddings else set()))
        model = build_model(config, tensors, folder, device, deferred=matrices)
        _check_deferred(dict(kept.items()), model, folder)
        if shard is None:
            quantize_from_float(model, kept, quantize)
        else:  # the meta model cut to the rank's part first, then each matrix cut as it is read
            slice_model(model, shard.plan)
            quantize_from_float(model, kept, quantize, matrix_parts(config, shard.plan))
            parallelize(model, shard.plan, shard.group)
        fuse_for_cpu(model)
    return LoadedModel(folder, "hf", config, model, tokenizer, tokenizer.chat_template, gen, files,
                       device=device, dtype=compute, exact=exact, quantize=quantize)


def _check_deferred(kept: dict[str, torch.Tensor], model: CausalLM, source: Path) -> None:
    """The matrices left out of build_model (`kept`) are all there, with the shapes the model expects."""
    config = model.config
    shapes = {name: tuple(p.shape) for name, p in meta_model(config).state_dict().items()}
    for name in sorted(_linear_weights(config) | {EMBEDDING}):
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name not in kept:
            raise ModelFileError(source, f"missing tensor {name!r}")
        if tuple(kept[name].shape) != shapes[name]:
            raise ModelFileError(source, f"tensor {name!r} has shape {tuple(kept[name].shape)}, "
                                         f"config says {shapes[name]}")


def _load_gguf(path: Path, dtype, device: torch.device, exact: bool, quantize: str | None,
               shard: Shard | None) -> LoadedModel:
    with read_gguf(path) as gguf, ThreadPoolExecutor(1, thread_name_prefix="lantern-tokenizer") as side:
        config = gguf_config(gguf)
        matrices = {type_name(i.ggml_type) for i in gguf.tensors.values() if len(i.shape) == 2}
        if quantize and not matrices & {"F32", "F16", "BF16"}:
            # checked before anything is read. Blocks quantized again would only add error, and doing nothing
            # would leave the flag a silent no-op.
            raise LanternError(f"{path.name}: --quantize {quantize} quantizes float weights (an HF folder, an "
                               f"F16/BF16/F32 GGUF); this file's matrices are {', '.join(sorted(matrices))} already")
        # The tokenizer is built from the metadata on a side thread: its vocabulary and merges are Python and Rust
        # work that holds the GIL (~0.26 s for 151k tokens). Meanwhile this thread reserves the weights' memory and
        # has the kernel fault it in (gguf_weights: one system call that releases the GIL, ~0.2 s for 0.5 GB on the
        # project's VM), which the copies out of the file would otherwise pay page by page.
        pending = side.submit(Tokenizer.from_gguf_metadata, gguf.metadata, source=str(path),
                              cache_dir=cache_dir() / "tokenizers")
        # A tensor-parallel rank reads only its part of each matrix (the `parts`), into an arena sized for them.
        parts = None if shard is None else matrix_parts(config, shard.plan)
        weights = None if exact else gguf_weights(gguf, config.model_type, quantize, parts)
        compute = pick_dtype(dtype, device, "float16")
        deferred = frozenset()
        on_kernels = weights is not None and weights.use_kernels
        if not exact:  # left for the quantize transform to build from the blocks
            deferred = _linear_weights(config) | ({EMBEDDING} if on_kernels else frozenset())
        tensors = gguf_tensors(gguf, config, compute, device, skip=deferred)
        types: dict[str, int] = {}
        for info in gguf.tensors.values():
            types[type_name(info.ggml_type)] = types.get(type_name(info.ggml_type), 0) + 1
        model = build_model(config, tensors, path, device, deferred=deferred)
        if shard is not None:  # the deferred matrices are still on the meta device: cutting them costs nothing
            slice_model(model, shard.plan)
        if not exact:
            quantize_from_gguf(model, weights)
        if shard is not None:
            parallelize(model, shard.plan, shard.group)
        if not exact and on_kernels:
            fuse_for_cpu(model)
        tokenizer = pending.result().with_end_ids(set(config.eos_token_id))
    return LoadedModel(path, "gguf", config, model, tokenizer, tokenizer.chat_template,
                       dict(GGUF_GENERATION_DEFAULTS), [path], types,
                       device=device, dtype=compute, exact=exact, quantize=quantize)


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
