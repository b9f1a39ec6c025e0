"""Encoder folders: a BERT config.json and safetensors weights, plus sentence-transformers' own files.

sentence-transformers describes its pipeline in small JSON files beside the model:
- modules.json: the modules in order (Transformer, Pooling, optionally Normalize);
- 1_Pooling/config.json (or wherever modules.json points): pooling_mode_* flags;
- sentence_bert_config.json: max_seq_length, do_lower_case;
- config_sentence_transformers.json: prompts (E5/BGE query/passage prefixes), default_prompt_name,
  similarity_fn_name.
All of them are untrusted: each value is checked and any problem is one ModelFileError naming the file.
A folder without modules.json is a plain BertModel: mean pooling, no normalisation, as sentence-transformers
would wrap it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch

from ..errors import ModelFileError
from ..models.encoder import SUPPORTED_ENCODERS, EncoderConfig, EncoderConfigError, EncoderModel
from ..text.tokenizer import Tokenizer
from . import hf
from .build import _skip_random_init

SIMILARITIES = ("cosine", "dot", "euclidean", "manhattan")
# pooling_mode_* flags -> Lantern's pooling names; the other flags (max, mean_sqrt_len, weightedmean) are refused
POOLING_FLAGS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_lasttoken": "last"}
POOLING_NAMES = {"cls": "cls", "mean": "mean", "lasttoken": "last"}
UNSUPPORTED_FLAGS = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                     "pooling_mode_weightedmean_tokens")
MAX_MODULES = 64
# Tensors some checkpoints carry that are buffers, not weights (int64 position / token-type id ranges).
BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
HEADS = ("cls.",)  # BertForMaskedLM / BertForPreTraining heads: not part of the encoder


@dataclass(frozen=True)
class SentenceConfig:
    """How token states become one embedding, from sentence-transformers' files (or the plain defaults)."""

    pooling: str = "mean"                 # "mean" | "cls" | "last"
    normalize: bool = False               # a Normalize module follows the pooling
    max_seq_length: int | None = None     # None: the model's max_position_embeddings
    do_lower_case: bool = False           # lower-case texts before tokenizing
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    similarity_fn_name: str = "cosine"
    files: tuple[Path, ...] = ()          # the sentence-transformers files read


def is_encoder_config(raw: dict) -> bool:
    return raw.get("model_type") in SUPPORTED_ENCODERS


def _object(path: Path) -> dict:
    data = hf.read_json(path)
    if not isinstance(data, dict):
        raise ModelFileError(path, f"expected a JSON object, found {type(data).__name__}")
    return data


def _flag(data: dict, key: str, path: Path, default: bool = False) -> bool:
    value = data.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ModelFileError(path, f"{key} must be true or false, got {value!r}")
    return value


def _inside(folder: Path, relative: object, path: Path) -> Path:
    """A module path from modules.json: a plain relative path inside the folder (no '..', not absolute)."""
    if not isinstance(relative, str) or len(relative) > 256:
        raise ModelFileError(path, f"module path must be a short string, got {relative!r}")
    parts = PurePosixPath(relative.replace("\\", "/")).parts
    if relative.startswith(("/", "\\")) or any(p in ("..", "") or ":" in p for p in parts):
        raise ModelFileError(path, f"module path {relative!r} leaves the model folder")
    return folder.joinpath(*parts)


def read_pooling(path: Path, hidden_size: int) -> str:
    data = _object(path)
    dim = data.get("word_embedding_dimension")
    if dim is not None and dim != hidden_size:
        raise ModelFileError(path, f"word_embedding_dimension {dim!r} differs from the model's hidden_size "
                                   f"{hidden_size}")
    if data.get("include_prompt", True) is not True:
        raise ModelFileError(path, "include_prompt false (pooling that skips the prompt) is not supported")
    mode = data.get("pooling_mode")
    if mode is not None:  # newer sentence-transformers write one name
        if mode not in POOLING_NAMES:
            raise ModelFileError(path, f"pooling_mode {mode!r} is not supported (cls, mean, lasttoken)")
        return POOLING_NAMES[mode]
    for key in UNSUPPORTED_FLAGS:
        if _flag(data, key, path):
            raise ModelFileError(path, f"{key} is not supported (cls, mean or last-token pooling only)")
    chosen = [name for key, name in POOLING_FLAGS.items() if _flag(data, key, path)]
    if len(chosen) != 1:
        raise ModelFileError(path, f"expected exactly one of {', '.join(POOLING_FLAGS)} to be true, "
                                   f"found {len(chosen)}")
    return chosen[0]


def read_sentence_config(folder: Path, config: EncoderConfig) -> SentenceConfig:
    modules_path = folder / "modules.json"
    if not modules_path.is_file():
        return SentenceConfig()
    modules = hf.read_json(modules_path)
    if not isinstance(modules, list) or not modules or len(modules) > MAX_MODULES:
        raise ModelFileError(modules_path, f"expected a list of 1 to {MAX_MODULES} modules")
    files = [modules_path]
    pooling, normalize, seen_transformer = None, False, False
    for i, module in enumerate(modules):
        if not isinstance(module, dict) or not isinstance(module.get("type"), str):
            raise ModelFileError(modules_path, f"module {i} must be an object with a 'type' string")
        kind = module["type"].rsplit(".", 1)[-1]
        where = _inside(folder, module.get("path", ""), modules_path)
        if kind == "Transformer" and i == 0:
            if where != folder:
                raise ModelFileError(modules_path, f"the Transformer module in subfolder {module.get('path')!r} "
                                                   "is not supported (expected the folder itself)")
            seen_transformer = True
        elif kind == "Pooling" and pooling is None and seen_transformer:
            pool_path = where / "config.json"
            if not pool_path.is_file():
                raise ModelFileError(pool_path, "missing: modules.json lists a Pooling module here")
            pooling = read_pooling(pool_path, config.hidden_size)
            files.append(pool_path)
        elif kind == "Normalize" and pooling is not None and i == len(modules) - 1:
            normalize = True  # sentence-transformers' Normalize has no files of its own
        else:
            raise ModelFileError(modules_path, f"module {i} ({module['type']}) is not supported: Lantern runs "
                                               "Transformer, then Pooling, then optionally Normalize")
    if pooling is None:
        raise ModelFileError(modules_path, "no Pooling module after the Transformer")

    max_len, lower = None, False
    st_path = folder / "sentence_bert_config.json"
    if st_path.is_file():
        data = _object(st_path)
        max_len = data.get("max_seq_length")
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
            raise ModelFileError(st_path, f"max_seq_length must be a positive integer, got {max_len!r}")
        if max_len is not None:
            # sentence-transformers never feeds more than the position table holds either
            max_len = min(max_len, config.max_position_embeddings)
        lower = _flag(data, "do_lower_case", st_path)
        files.append(st_path)

    prompts, default_prompt, similarity = {}, None, "cosine"
    cst_path = folder / "config_sentence_transformers.json"
    if cst_path.is_file():
        data = _object(cst_path)
        raw_prompts = data.get("prompts") or {}
        if not isinstance(raw_prompts, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in raw_prompts.items()):
            raise ModelFileError(cst_path, "prompts must be an object mapping names to prompt strings")
        prompts = dict(raw_prompts)
        default_prompt = data.get("default_prompt_name")
        if default_prompt is not None and default_prompt not in prompts:
            raise ModelFileError(cst_path, f"default_prompt_name {default_prompt!r} is not one of the prompts")
        similarity = data.get("similarity_fn_name") or "cosine"
        if similarity not in SIMILARITIES:
            raise ModelFileError(cst_path, f"similarity_fn_name {similarity!r} is not one of "
                                           f"{', '.join(SIMILARITIES)}")
        files.append(cst_path)
    return SentenceConfig(pooling=pooling, normalize=normalize, max_seq_length=max_len, do_lower_case=lower,
                          prompts=prompts, default_prompt_name=default_prompt, similarity_fn_name=similarity,
                          files=tuple(files))


def _hf_name(name: str) -> str | None:
    """The BertModel name of a checkpoint tensor, or None for tensors the encoder does not use."""
    if name.startswith("bert."):  # BertForMaskedLM and friends keep the encoder under `bert.`
        name = name[len("bert."):]
    elif name.startswith(HEADS):
        return None
    if name in BUFFERS:
        return None
    # checkpoints converted from the original TensorFlow BERT name LayerNorm's parameters gamma and beta
    if name.endswith(".gamma"):
        name = name[:-len("gamma")] + "weight"
    elif name.endswith(".beta"):
        name = name[:-len("beta")] + "bias"
    return name


def read_weights(files: list[Path], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, path, handle in hf.iter_tensors(files):
        target = _hf_name(name)
        if target is None:
            continue
        try:
            tensor = handle.get_tensor(name)
        except Exception as e:  # safetensors' error type for a bad tensor
            raise ModelFileError(path, f"tensor {name!r}: {e}") from None
        if not tensor.is_floating_point():
            raise ModelFileError(path, f"tensor {name!r} has dtype {tensor.dtype}; expected floating point weights")
        if target in out:
            raise ModelFileError(path, f"tensor {target!r} appears twice (with and without the 'bert.' prefix)")
        out[target] = tensor.to(device=device, dtype=dtype)
    return out


def build_encoder(config: EncoderConfig, tensors: dict[str, torch.Tensor], source) -> EncoderModel:
    """Assign the checkpoint's tensors into an encoder built on the meta device, checking names and shapes."""
    with torch.device("meta"), _skip_random_init():
        model = EncoderModel(config)
    expected = dict(model.state_dict(keep_vars=True))
    unexpected = [n for n in tensors if n not in expected]
    if unexpected:
        raise ModelFileError(source, f"unexpected tensor {unexpected[0]!r} for {config.architecture}"
                                     f"{f' (and {len(unexpected) - 1} more)' if len(unexpected) > 1 else ''}")
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise ModelFileError(source, f"missing tensor {missing[0]!r}"
                                     f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}")
    for name, param in expected.items():
        if tuple(tensors[name].shape) != tuple(param.shape):
            raise ModelFileError(source, f"tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                                         f"config says {tuple(param.shape)}")
    model.load_state_dict(tensors, strict=True, assign=True)
    model.requires_grad_(False)
    return model.eval()


def load_encoder(folder: Path, raw: dict, dtype: torch.dtype, device: torch.device):
    """(config, model, tokenizer, sentence config, weight files) for an encoder folder."""
    files = hf.weight_files(folder)
    tensors = read_weights(files, dtype, device)
    try:
        config = EncoderConfig.from_hf(raw, source=str(folder / "config.json"),
                                       pooler="pooler.dense.weight" in tensors)
    except EncoderConfigError as e:
        raise ModelFileError(folder / "config.json", str(e).split(": ", 1)[-1]) from None
    if config.type_vocab_size and "embeddings.token_type_embeddings.weight" not in tensors:
        raise ModelFileError(files[0], f"missing tensor 'embeddings.token_type_embeddings.weight' (config.json "
                                       f"says type_vocab_size {config.type_vocab_size}; 0 means none)")
    model = build_encoder(config, tensors, files[0] if len(files) == 1 else folder)
    sentence = read_sentence_config(folder, config)
    tokenizer = Tokenizer.from_hf_folder(folder)
    if tokenizer.vocab_size > config.vocab_size:
        raise ModelFileError(folder / "tokenizer.json", f"the tokenizer has {tokenizer.vocab_size} tokens, more "
                                                        f"than the model's {config.vocab_size} embeddings")
    return config, model, tokenizer, sentence, files
