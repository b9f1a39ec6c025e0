"""Embeddings: inputs (texts or token ids) -> checked id lists -> padded, masked forwards -> pooled vectors.

Encoders (BERT family) pool their last hidden state as their sentence-transformers files say. Decoders embed
too, as llama.cpp's `--embedding` does: the final hidden state (after the final norm) pooled over the real
tokens. A decoder needs no padding mask: its attention is causal, so with right padding no real token ever
sees a pad token, and pooling skips the pads.

Nothing is cut silently: an input longer than the maximum is an error unless the caller asks to truncate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import LanternError
from .models.pooling import POOLINGS, pool
from .models.pooling import normalize as l2_normalize
from .text.tokenizer import Tokenizer

SUB_BATCH = 32  # sequences per forward; inputs are sorted by length first so a sub-batch pads little


class EmbeddingInputError(LanternError):
    """An embedding input is malformed: wrong type, empty, an id outside the vocabulary."""


class InputTooLongError(EmbeddingInputError):
    """An input has more tokens than the model's maximum and truncation was not asked for."""

    def __init__(self, index: int, length: int, maximum: int):
        self.index, self.length, self.maximum = index, length, maximum
        super().__init__(f"input {index} has {length} tokens, more than the model's maximum of {maximum}; "
                         "shorten it or ask for truncation")


@dataclass(frozen=True)
class EmbeddingSpec:
    """What an embedding of this model is: the defaults `embed` uses and what callers may ask about."""

    kind: str                       # "embed" (an encoder) or "generate" (a decoder embedding on request)
    pooling: str                    # "mean" | "cls" | "last"
    normalize: bool
    max_length: int                 # tokens per input, special tokens included
    dimensions: int
    vocab_size: int
    pad_id: int
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    do_lower_case: bool = False
    similarity: str = "cosine"


def spec_for(loaded, context: int) -> EmbeddingSpec:
    """The embedding defaults of a loaded model. Decoders: last-token pooling (under causal attention only the
    last token has seen the whole input) and L2 normalisation, as llama.cpp's embedding output has."""
    cfg, tok = loaded.config, loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    if loaded.kind == "embed":
        s = loaded.sentence
        return EmbeddingSpec("embed", s.pooling, s.normalize, s.max_seq_length or cfg.max_position_embeddings,
                             cfg.hidden_size, cfg.vocab_size, pad, dict(s.prompts), s.default_prompt_name,
                             s.do_lower_case, s.similarity_fn_name)
    return EmbeddingSpec("generate", "last", True, context, cfg.hidden_size, cfg.vocab_size, pad)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def token_lists(inputs, tokenizer: Tokenizer, spec: EmbeddingSpec, truncate: bool = False,
                prompt_name: str | None = None) -> list[list[int]]:
    """A str, a list of str, a list of token ids or a list of token-id lists -> checked id lists.

    Texts get the prompt named `prompt_name` (else the model's default prompt, as sentence-transformers'
    encode does; most models have none) in front, and the tokenizer's special tokens ([CLS] ... [SEP])."""
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, (list, tuple)):
        raise EmbeddingInputError(f"input must be a string, a list of strings, a list of token ids or a list of "
                                  f"token-id lists, got {type(inputs).__name__}")
    if not inputs:
        raise EmbeddingInputError("input is empty: give at least one text or token list")
    if all(isinstance(x, str) for x in inputs):
        name = prompt_name if prompt_name is not None else spec.default_prompt_name
        if name is not None and name not in spec.prompts:
            raise EmbeddingInputError(f"unknown prompt name {name!r}; the model has "
                                      f"{', '.join(spec.prompts) or 'no prompts'}")
        prefix = spec.prompts[name] if name is not None else ""
        return [_encode_text(prefix + text, tokenizer, spec, truncate, i) for i, text in enumerate(inputs)]
    if all(_is_int(x) for x in inputs):
        return [check_ids(list(inputs), spec, truncate, 0)]
    if all(isinstance(x, (list, tuple)) for x in inputs):
        return [check_ids(list(x), spec, truncate, i) for i, x in enumerate(inputs)]
    bad = next((i for i, x in enumerate(inputs) if not isinstance(x, (str, list, tuple)) and not _is_int(x)), None)
    where = f" (item {bad} is {type(inputs[bad]).__name__})" if bad is not None else ""
    raise EmbeddingInputError("input must be all strings, all token ids or all token-id lists, not a mix" + where)


def _encode_text(text: str, tokenizer: Tokenizer, spec: EmbeddingSpec, truncate: bool, index: int) -> list[int]:
    if spec.do_lower_case:
        text = text.lower()
    ids = tokenizer.encode(text)  # validates the text (lone surrogates) and adds [CLS]/[SEP] or BOS
    if len(ids) <= spec.max_length:
        return ids
    if not truncate:
        raise InputTooLongError(index, len(ids), spec.max_length)
    # Cut the text's tokens, then add the special tokens again, as the tokenizers library truncates (and so
    # sentence-transformers): [CLS] + the first tokens + [SEP], never a text cut after its [SEP].
    specials = len(tokenizer.encode("a")) - len(tokenizer.encode("a", add_special_tokens=False))
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    encoding.truncate(max(spec.max_length - specials, 1))
    return tokenizer.backend.post_process(encoding, None, True).ids[:spec.max_length]


def check_ids(ids: list, spec: EmbeddingSpec, truncate: bool, index: int) -> list[int]:
    if not ids:
        raise EmbeddingInputError(f"input {index} is an empty token list")
    for t in ids:
        if not _is_int(t) or not 0 <= t < spec.vocab_size:
            raise EmbeddingInputError(f"input {index}: token id {t!r} is outside the vocabulary "
                                      f"(0..{spec.vocab_size - 1})")
    if len(ids) > spec.max_length:
        if not truncate:
            raise InputTooLongError(index, len(ids), spec.max_length)
        ids = ids[:spec.max_length]
    return ids


@torch.inference_mode()
def embed_batch(model, spec: EmbeddingSpec, batch: list[list[int]], pooling: str | None = None,
                normalize: bool | None = None, sub_batch: int = SUB_BATCH) -> torch.Tensor:
    """Checked id lists -> (N, D) float32 embeddings, in the order given."""
    pooling = pooling or spec.pooling
    if pooling not in POOLINGS:
        raise EmbeddingInputError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLINGS)}")
    normalize = spec.normalize if normalize is None else normalize
    device = model.device
    out = torch.empty(len(batch), spec.dimensions, dtype=torch.float32)
    order = sorted(range(len(batch)), key=lambda i: len(batch[i]), reverse=True)
    for start in range(0, len(order), sub_batch):
        rows = order[start:start + sub_batch]
        T = len(batch[rows[0]])
        ids = torch.full((len(rows), T), spec.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for r, i in enumerate(rows):  # right padding
            ids[r, :len(batch[i])] = torch.tensor(batch[i], dtype=torch.long)
            mask[r, :len(batch[i])] = 1
        ids, mask = ids.to(device), mask.to(device)
        padded = bool((mask == 0).any())
        if spec.kind == "embed":
            hidden = model(ids, attention_mask=mask if padded else None).last_hidden_state  # (b, T, C)
        else:
            hidden = model.model(ids).last_hidden_state  # after the final norm; causal, so pads need no mask
        vectors = pool(hidden.float(), mask, pooling)
        if normalize:
            vectors = l2_normalize(vectors)
        out[torch.tensor(rows)] = vectors.cpu()
    return out
