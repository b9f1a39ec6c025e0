"""The BERT-family encoder, read top to bottom: BertModel and the sentence-transformers models built on it
(all-MiniLM, BGE, E5).

Parameter names are Hugging Face's BertModel names (embeddings.word_embeddings, encoder.layer.N.attention.
self.query, ...), so a transformers state dict loads as it is and `print(model)` shows the tree people know.
Unlike the decoder, every token sees every other token (no causal mask, no KV cache); a padded batch masks
the padding keys only. Variants are flags on EncoderConfig. The encoder never opens files.

Shapes: B batch, T tokens, C hidden size, H heads, D head_dim, I intermediate size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LanternError

# model_type values this encoder runs, with the transformers class each corresponds to.
SUPPORTED_ENCODERS = {"bert": "BertModel"}
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


class EncoderConfigError(LanternError):
    """config.json does not describe an encoder Lantern can run."""


@dataclass(frozen=True)
class EncoderConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    type_vocab_size: int = 2          # 0: the model has no token-type embeddings
    pad_token_id: int = 0
    pooler: bool = True               # the [CLS] dense + tanh head (BertModel has it, BertForMaskedLM drops it)
    torch_dtype: str = "float32"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def architecture(self) -> str:
        return SUPPORTED_ENCODERS.get(self.model_type, self.model_type)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str = "config.json", pooler: bool = True) -> EncoderConfig:
        """Read a BERT config.json; every value is checked, as the file is untrusted."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_ENCODERS:
            raise EncoderConfigError(f"{source}: model_type {model_type!r} is not an encoder Lantern runs "
                                     f"(supported: {', '.join(SUPPORTED_ENCODERS)})")

        def need(key, kind=int, minimum=1, default=None):
            value = cfg.get(key, default)
            if value is None:
                raise EncoderConfigError(f"{source}: missing {key!r}")
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise EncoderConfigError(f"{source}: {key} must be an integer, got {value!r}")
            if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise EncoderConfigError(f"{source}: {key} must be a number, got {value!r}")
            if not minimum <= value <= (1 << 24 if kind is int else 1.0):
                raise EncoderConfigError(f"{source}: {key} = {value!r} is out of range")
            return value

        position_type = cfg.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise EncoderConfigError(f"{source}: position_embedding_type {position_type!r} is not supported "
                                     "(only 'absolute')")
        act = cfg.get("hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise EncoderConfigError(f"{source}: hidden_act {act!r} is not supported ({', '.join(ACTIVATIONS)})")
        hidden, heads = need("hidden_size"), need("num_attention_heads")
        if hidden % heads:
            raise EncoderConfigError(f"{source}: hidden_size {hidden} is not a multiple of "
                                     f"num_attention_heads {heads}")
        pad = cfg.get("pad_token_id", 0)
        dtype = cfg.get("torch_dtype", cfg.get("dtype", "float32"))
        return cls(model_type=model_type, vocab_size=need("vocab_size"), hidden_size=hidden,
                   num_hidden_layers=need("num_hidden_layers"), num_attention_heads=heads,
                   intermediate_size=need("intermediate_size"),
                   max_position_embeddings=need("max_position_embeddings"), hidden_act=act,
                   layer_norm_eps=need("layer_norm_eps", float, 0.0, 1e-12),
                   type_vocab_size=need("type_vocab_size", int, 0, 2),
                   pad_token_id=pad if isinstance(pad, int) and not isinstance(pad, bool) else 0,
                   pooler=pooler, torch_dtype=dtype if isinstance(dtype, str) else "float32")


def activation(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()                      # BERT's exact erf GELU
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return nn.GELU(approximate="tanh")
    return nn.ReLU()


class Embeddings(nn.Module):
    """word + absolute position (+ token type) embeddings, then LayerNorm."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        C = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, C)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, C)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, C) if config.type_vocab_size else None
        self.LayerNorm = nn.LayerNorm(C, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device)  # right padding: a sequence starts at position 0
        h = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]  # (B, T, C)
        if self.token_type_embeddings is not None:
            if token_type_ids is None:  # a single segment: type 0 everywhere, as tokenizers give one text
                h = h + self.token_type_embeddings.weight[0]
            else:
                h = h + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(h)


class SelfAttention(nn.Module):
    """query, key and value projections and bidirectional scaled dot-product attention."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        C = config.hidden_size
        self.n_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.query = nn.Linear(C, C)
        self.key = nn.Linear(C, C)
        self.value = nn.Linear(C, C)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
                   for proj in (self.query, self.key, self.value))
        # mask (B, 1, 1, T): True where the key is a real token. Padding queries still see the real keys, so
        # no row is all -inf; their outputs are garbage nobody pools.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0 / math.sqrt(self.head_dim))
        return out.transpose(1, 2).reshape(B, T, C)


class DenseNorm(nn.Module):
    """dense, then LayerNorm of (dense output + residual): BERT's post-norm. Named `output` in HF's tree."""

    def __init__(self, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        # `self` is the HF name of the attention proper: attention.self.query, attention.output.dense
        self.add_module("self", SelfAttention(config))
        self.output = DenseNorm(config.hidden_size, config.hidden_size, config.layer_norm_eps)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(getattr(self, "self")(h, mask), h)


class Intermediate(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(x))  # (B, T, I)


class EncoderLayer(nn.Module):
    """Post-norm block: h = LN(h + attn(h)); h = LN(h + down(act(up(h))))."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.attention = Attention(config)
        self.intermediate = Intermediate(config)
        self.output = DenseNorm(config.intermediate_size, config.hidden_size, config.layer_norm_eps)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        h = self.attention(h, mask)
        return self.output(self.intermediate(h), h)


class Encoder(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.layer = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))


class Pooler(nn.Module):
    """BERT's sentence head: tanh(dense(h[:, 0])). sentence-transformers does not use it."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(h[:, 0]))


class EncoderOutput(NamedTuple):
    last_hidden_state: torch.Tensor                     # (B, T, C)
    pooler_output: torch.Tensor | None                  # (B, C), when the model has a pooler
    hidden_states: tuple[torch.Tensor, ...] | None      # embeddings + each layer's output


class EncoderModel(nn.Module):
    """transformers' BertModel: embeddings, encoder.layer.N, optional pooler."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.pooler = Pooler(config) if config.pooler else None

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.LayerNorm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embeddings.LayerNorm.weight.device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, output_hidden_states: bool = False) -> EncoderOutput:
        """input_ids, attention_mask (1 real, 0 padding), token_type_ids: (B, T), right-padded."""
        T = input_ids.shape[1]
        if T > self.config.max_position_embeddings:
            raise LanternError(f"{T} tokens is more than the model's {self.config.max_position_embeddings} positions")
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        h = self.embeddings(input_ids, token_type_ids)
        hidden = [h] if output_hidden_states else None
        for layer in self.encoder.layer:
            h = layer(h, mask)
            if hidden is not None:
                hidden.append(h)
        pooled = self.pooler(h) if self.pooler is not None else None
        return EncoderOutput(h, pooled, tuple(hidden) if hidden is not None else None)
