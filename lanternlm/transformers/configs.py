"""`model.config` and `model.generation_config` under transformers' field names.

For an HF folder the config is config.json as written; a GGUF file has none, so its fields are spelled from
Lantern's ModelConfig (whose names are transformers'). The generation config starts from transformers'
defaults (greedy, max_length 20, top_k 50 when sampling) and takes generation_config.json's values; it never
takes Lantern's catalogue or llama.cpp sampling settings, so `generate` decodes as transformers would.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace

from ..loader import hf


class PretrainedConfig:
    """Attribute access over a config dict (`config.hidden_size`), printed as transformers prints it."""

    def __init__(self, values: dict):
        self.__dict__.update(values)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def __repr__(self) -> str:
        name = self.__dict__.get("model_type", "").replace("_text", "_Text").title().replace("_", "")
        return f"{name}Config {json.dumps(self.to_dict(), indent=2, sort_keys=True)}\n"


def model_config(llm) -> PretrainedConfig:
    """config.json for an HF folder; for a GGUF, the same fields spelled from the parsed metadata."""
    if llm.loaded.format == "hf":
        return PretrainedConfig(hf.read_config(llm.path))
    c = llm.config
    ends = list(c.eos_token_id)
    rope = c.rope_for("full_attention")
    return PretrainedConfig({
        "architectures": [c.architecture], "model_type": c.model_type, "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
        "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
        "hidden_act": c.hidden_act, "tie_word_embeddings": c.tie_word_embeddings,
        "rope_parameters": {"rope_type": rope.rope_type, "rope_theta": rope.rope_theta},
        "sliding_window": c.sliding_window, "bos_token_id": c.bos_token_id,
        "eos_token_id": ends[0] if len(ends) == 1 else ends, "pad_token_id": llm.tokenizer.pad_token_id,
        "torch_dtype": str(llm.loaded.dtype).removeprefix("torch."),
    })


@dataclass(frozen=True)
class GenerationConfig:
    """The generate() settings Lantern honours, with transformers' defaults."""

    max_length: int | None = None          # None: transformers' default of 20 new tokens
    max_new_tokens: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    @classmethod
    def from_dict(cls, values: dict) -> GenerationConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names and v is not None})

    def update(self, **changes) -> GenerationConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def eos_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def generation_config(llm, config: PretrainedConfig) -> GenerationConfig:
    """generation_config.json's values (HF folder) over transformers' defaults; ids from config.json (or the
    GGUF metadata) where the file leaves them out, as transformers fills them."""
    written = dict(llm.loaded.generation_config) if llm.loaded.format == "hf" else {}
    ids = {key: getattr(config, key, None) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return GenerationConfig.from_dict({**ids, **written})
