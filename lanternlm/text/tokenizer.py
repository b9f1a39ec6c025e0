"""Text <-> token ids: builds one `tokenizers.Tokenizer` from a Hugging Face folder or from GGUF metadata, and turns
a stream of generated ids back into text without ever cutting a multi-byte character in half.

Hugging Face folders are taken exactly as `tokenizer.json` defines them (normalizer, pre-tokenizer, model, decoder,
added tokens), with the special-token and BOS/EOS settings of `tokenizer_config.json` applied the way transformers
applies them. GGUF files carry only a vocabulary, so the pipeline is rebuilt the way the model was trained and the
way llama.cpp reads the same file: byte-level BPE with the pre-tokenizer named by `tokenizer.ggml.pre`, or a
SentencePiece-style BPE whose merge order comes from the piece scores.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import operator
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from ..errors import LanternError, ModelFileError

# Refuse absurd files before reading them: the largest real tokenizer.json files are a few tens of MiB.
MAX_TOKENIZER_JSON_BYTES = 256 * 1024 * 1024
MAX_SIDE_FILE_BYTES = 64 * 1024 * 1024  # tokenizer_config.json, special_tokens_map.json, chat_template.jinja
MAX_VOCAB = 4_000_000  # far above any real vocabulary (Gemma: 262k); guards against corrupt array lengths

# GGUF `tokenizer.ggml.token_type` values (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_TOKEN_TYPES = frozenset({NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE})

SPIECE_SPACE = "\u2581"  # "▁", SentencePiece's visible stand-in for a space
REPLACEMENT_CHAR = "\ufffd"  # what a decoder yields for bytes that are not (yet) valid UTF-8

# Byte-level pre-tokenizer regexes, as the models' own tokenizer.json files define them. Each GGUF variant is a
# chain: every regex splits the pieces left by the previous one, keeping matches and the gaps between them as
# separate pieces (llama.cpp's unicode_regex_split, which is `Split(behavior="isolated")` in `tokenizers`).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_ONE_DIGIT = r"\p{N}"
# Qwen3.5 adds combining marks (\p{M}) to the letter runs; its reference ids keep "e" + U+0301 as two tokens, so
# there is no NFC step before it (unlike Qwen2).
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# DeepSeek (LLM and Coder, v1) split with a sequence of Split pre-tokenizers in tokenizer.json: line breaks, letter
# runs, punctuation runs, CJK runs, digits. Characters beyond ASCII are written as escapes: several in the LLM's
# letter ranges (Greek with singleton decompositions, the Kelvin and Ohm signs) would change if the source file
# were ever NFC-normalized, and a range whose ends swap is an Oniguruma error.
_DEEPSEEK_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_DEEPSEEK_CODER = (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _DEEPSEEK_CJK, _ONE_DIGIT)
_DEEPSEEK_LLM = (
    r"[\r\n]",
    ("\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373"
     "\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f"
     "\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77"
     "\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d"
     "\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4"
     "\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
     "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d"
     "\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a"
     "\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2"
     "\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+"),
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    r"\s+$",
    _DEEPSEEK_CJK,
    r"\p{N}+",
)


@dataclass(frozen=True)
class _BytePre:
    """How one `tokenizer.ggml.pre` variant splits text before byte-level BPE."""

    patterns: tuple[str, ...]
    ignore_merges: bool = False  # a pre-token that is already a whole vocabulary entry skips the merges
    add_bos: bool = False  # llama.cpp's default when the file has no tokenizer.ggml.add_bos_token
    # The HF tokenizer.json has an NFC normalizer, which GGUF does not carry: without it text with combining accents
    # ("e" + U+0301) gets other ids than the same text precomposed ("é"), unlike the model's own tokenizer.
    nfc: bool = False


_LLAMA3_PRE = _BytePre((_LLAMA3,), ignore_merges=True, add_bos=True)
_QWEN2_PRE = _BytePre((_QWEN2,), nfc=True)
_GPT2_PRE = _BytePre((_GPT2,))
_SMOLLM_PRE = _BytePre((_ONE_DIGIT, _GPT2))  # digits one by one, then GPT-2 (SmolLM2/StarCoder's Digits+ByteLevel)

# Names as llama.cpp's convert script writes them. An unknown name is an error (as in llama.cpp): guessing GPT-2
# would silently give token ids the model never saw in training, which only shows up as worse output.
BYTE_LEVEL_PRE_TOKENIZERS: MappingProxyType[str, _BytePre] = MappingProxyType({
    # llama.cpp's fallback for files without a pre-tokenizer name: punctuation runs, GPT-2, number runs, 3 digits.
    "default": _BytePre((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")),
    "gpt-2": _GPT2_PRE, "phi-2": _GPT2_PRE, "olmo": _GPT2_PRE, "jais": _GPT2_PRE,
    "mpt": _BytePre((_GPT2,), nfc=True),  # GPT-NeoX-20B's tokenizer, which NFC-normalizes
    "smollm": _SMOLLM_PRE, "starcoder": _SMOLLM_PRE, "refact": _SMOLLM_PRE,
    "command-r": _BytePre((_ONE_DIGIT, _GPT2), nfc=True),  # Cohere's tokenizer.json: NFC, digits, ByteLevel
    "codeshell": _SMOLLM_PRE, "exaone": _SMOLLM_PRE,
    "llama-bpe": _LLAMA3_PRE, "llama3": _LLAMA3_PRE, "llama-v3": _LLAMA3_PRE, "falcon3": _LLAMA3_PRE,
    "pixtral": _LLAMA3_PRE,
    "dbrx": _BytePre((_LLAMA3,)), "smaug-bpe": _BytePre((_LLAMA3,)),
    "qwen2": _QWEN2_PRE, "deepseek-r1-qwen": _QWEN2_PRE, "stablelm2": _BytePre((_QWEN2,)),
    "qwen35": _BytePre((_QWEN35,)),
    "deepseek-coder": _BytePre(_DEEPSEEK_CODER), "deepseek-llm": _BytePre(_DEEPSEEK_LLM),
    "falcon": _BytePre((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]")),
})

_NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


@dataclass(frozen=True, eq=False)
class Tokenizer:
    """A model's tokenizer: encode/decode plus the special tokens the rest of Lantern needs.

    `vocab_size` counts every id the tokenizer can produce or decode, added tokens included.
    `end_token_ids` holds the ids that end a turn; the loader merges in generation_config's via `with_end_ids`.
    """

    backend: tokenizers.Tokenizer
    bos_token: str | None
    bos_token_id: int | None
    eos_token: str | None
    eos_token_id: int | None
    pad_token_id: int | None
    unk_token_id: int | None
    add_bos_token: bool
    end_token_ids: frozenset[int]
    chat_template: str | None
    special_ids: frozenset[int]
    vocab_size: int

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_hf_folder(cls, folder: Path) -> Tokenizer:
        """tokenizer.json as written, plus tokenizer_config.json / special_tokens_map.json / chat_template.jinja."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelFileError(folder, "not a directory")
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelFileError(path, "missing: Lantern needs the fast-tokenizer file tokenizer.json "
                                       "(folders with only tokenizer.model or vocab.json/merges.txt are not supported)")
        backend = _parse_tokenizer_json(path)
        # Lantern never pads or truncates prompts behind the caller's back (transformers turns these off per call).
        backend.no_truncation()
        backend.no_padding()

        config = _read_json_object(folder / "tokenizer_config.json")
        if "added_tokens_decoder" not in config:
            # Older folders: transformers lets special_tokens_map.json override the config's named tokens.
            config.update(_read_json_object(folder / "special_tokens_map.json"))
        named = {key: _token_content(config.get(key), key, folder / "tokenizer_config.json")
                 for key in _NAMED_SPECIALS}
        _register_added_tokens(backend, config, named, folder / "tokenizer_config.json")

        # add_bos_token / add_eos_token in the config are ignored: with a tokenizer.json, transformers drops them
        # and the file's post-processor alone decides which special tokens encode() adds.
        bos, eos = named["bos_token"], named["eos_token"]
        return _finish(backend, bos=bos, eos=eos, pad=named["pad_token"], unk=named["unk_token"],
                       chat_template=_hf_chat_template(folder, config), extra_end_ids=())

    @classmethod
    def from_gguf_metadata(cls, metadata: dict[str, Any], source: str = "gguf",
                           cache_dir: str | Path | None = None) -> Tokenizer:
        """Rebuild the tokenizer a GGUF file describes (`tokenizer.ggml.*` keys), as llama.cpp would read it.
        `cache_dir`: where merges derived from a SentencePiece vocabulary's scores are kept between loads."""
        return _GGUFVocab(metadata, source, cache_dir).build()

    def with_end_ids(self, ids: Iterable[int]) -> Tokenizer:
        """A copy whose end-of-turn set also contains `ids` (e.g. generation_config.json's eos_token_id list)."""
        extra = frozenset(_as_token_id(i, self.vocab_size) for i in ids)
        return replace(self, end_token_ids=self.end_token_ids | extra)

    # ------------------------------------------------------------------ use

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`; special tokens written in the text match whole, as in transformers."""
        if not isinstance(text, str):
            raise LanternError(f"can only tokenize text (str), got {type(text).__name__}")
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate, e.g. from JSON's "\ud800": not a character
                raise LanternError(f"the text contains a lone UTF-16 surrogate (U+{ord(text[e.start]):04X}) at "
                                   f"character {e.start}; it is not a character and cannot be tokenized") from None
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`; ids with no token (e.g. a model's padded embedding rows) decode to nothing."""
        return self.backend.decode(_id_list(ids), skip_special_tokens=skip_special_tokens)

    def tokens(self, ids: Iterable[int]) -> list[str]:
        """The vocabulary pieces of `ids`, as stored (e.g. 'Ġworld', '▁world', '<0x0A>')."""
        pieces = []
        for i in _id_list(ids):
            piece = self.backend.id_to_token(i)
            if piece is None:
                raise LanternError(f"token id {i} is not in the vocabulary (ids run from 0 to {self.vocab_size - 1})")
            pieces.append(piece)
        return pieces

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"add_bos={self.add_bos_token}, end_ids={sorted(self.end_token_ids)})")


class IncrementalDecoder:
    """Turns generated ids into text as they arrive.

    It decodes a small window: the tokens already shown (`_ids[:_read]`, context) plus those not yet shown. Text
    is released only when it grows and does not end in U+FFFD, i.e. once a character split across tokens is
    complete. Context is kept because a token's text can depend on its neighbours (a SentencePiece '▁' at the
    very start is stripped, elsewhere it is a space), so the window always starts where the full decode would
    agree with it. Concatenating every `push` and the final `flush` equals `decode(all ids)`; with `prompt_ids`
    it equals the text that the generated ids add after the prompt.
    """

    _PROMPT_CONTEXT = 4  # prompt tokens used as left context
    _MAX_CONTEXT = 64  # how far back to look for a prompt token that starts a character
    _MAX_PENDING = 16  # tokens held back before their text is treated as invalid rather than unfinished

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True, prompt_ids: list[int] | None = None):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        prompt = _id_list(prompt_ids or [])
        # The window must start on a character boundary: started inside a character split over byte tokens, its
        # first bytes would decode as U+FFFD (and SentencePiece's byte fallback then garbles the whole byte run).
        start = max(0, len(prompt) - self._PROMPT_CONTEXT)
        lowest = max(0, len(prompt) - self._MAX_CONTEXT)
        while start > lowest and not self._starts_character(prompt, start):
            start -= 1
        self._ids: list[int] = prompt[start:]
        self._read = len(self._ids)  # _ids[:_read] is already shown (or is prompt): it is context only
        self._shown = self._decode(self._ids)  # the text of the context
        if self._shown.endswith(REPLACEMENT_CHAR):
            # The prompt ends inside a character: leave the tokens holding its first bytes (at most 3) pending, so
            # the generated token that completes it releases the whole character. What counts as already shown is
            # the longer of the text before those tokens and the prompt's text up to the broken character (a
            # byte-level token can carry a space and then the first bytes of an emoji).
            visible = self._shown.rstrip(REPLACEMENT_CHAR)
            while self._read > 0 and len(self._ids) - self._read < 3 and self._shown.endswith(REPLACEMENT_CHAR):
                self._read -= 1
                self._shown = self._decode(self._ids[:self._read])
            if len(visible) > len(self._shown):
                self._shown = visible

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes (often "", e.g. half of an emoji)."""
        token_id = _as_token_id(token_id, None)
        if self._skip and token_id in self._tokenizer.special_ids:
            return ""  # a skipped special token decodes to nothing wherever it stands: keep it out of the window
        self._ids.append(token_id)
        text = self._decode(self._ids)
        if len(text) > len(self._shown) and not text.endswith(REPLACEMENT_CHAR):
            return self._release(text, len(self._ids))
        if len(self._ids) - self._read > self._MAX_PENDING:
            # Held back this long, the bytes are not one unfinished character but invalid output (a UTF-8
            # character spans at most 4 tokens): release all but the last few tokens, cut where the text is clean
            # if possible, so that garbage cannot make each step decode an ever longer window.
            ends = range(len(self._ids) - 3, len(self._ids) - 7, -1)
            end = next((e for e in ends if not self._decode(self._ids[:e]).endswith(REPLACEMENT_CHAR)), ends[0])
            return self._release(self._decode(self._ids[:end]), end)
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character at the end shows as U+FFFD)."""
        if len(self._ids) == self._read:
            return ""
        return self._release(self._decode(self._ids), len(self._ids))

    def _release(self, text: str, end: int) -> str:
        """Return the new part of `text` (the decode of `_ids[:end]`) and make those tokens the only context:
        the window slides, so each step decodes a few tokens whatever the length of the output."""
        new = text[len(self._shown):]
        context, pending = self._ids[self._read:end], self._ids[end:]
        self._ids = context + pending
        self._read = len(context)
        self._shown = self._decode(context)
        return new

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.backend.decode(ids, skip_special_tokens=self._skip)

    def _starts_character(self, ids: list[int], i: int) -> bool:
        """Whether ids[i] begins a character: it, or it with the next few tokens (a UTF-8 character has at most
        4 bytes), decodes to text that does not begin with U+FFFD. Tokens that decode to nothing count too."""
        for end in range(i + 1, min(i + 4, len(ids)) + 1):
            text = self._decode(ids[i:end])
            if not text.startswith(REPLACEMENT_CHAR):
                return True
        return False


# ---------------------------------------------------------------------- shared helpers


def _finish(backend: tokenizers.Tokenizer, *, bos: str | None, eos: str | None, pad: str | None, unk: str | None,
            chat_template: str | None, extra_end_ids: Iterable[int]) -> Tokenizer:
    """Resolve names to ids and read back what the built pipeline really does."""
    bos_id = backend.token_to_id(bos) if bos is not None else None
    eos_id = backend.token_to_id(eos) if eos is not None else None
    pad_id = backend.token_to_id(pad) if pad is not None else None
    unk_id = backend.token_to_id(unk) if unk is not None else None
    end_ids = frozenset({eos_id} if eos_id is not None else set()) | frozenset(extra_end_ids)
    special_ids = frozenset(i for i, tok in backend.get_added_tokens_decoder().items() if tok.special)
    # Whether BOS is prepended is whatever the post-processor does; ask it rather than trust a flag.
    with_special = backend.encode("a", add_special_tokens=True).ids
    without = backend.encode("a", add_special_tokens=False).ids
    add_bos = (bos_id is not None and len(with_special) > len(without) and with_special[0] == bos_id
               and with_special[1:1 + len(without)] == without)
    return Tokenizer(backend=backend, bos_token=bos if bos_id is not None else None, bos_token_id=bos_id,
                     eos_token=eos if eos_id is not None else None, eos_token_id=eos_id, pad_token_id=pad_id,
                     unk_token_id=unk_id, add_bos_token=add_bos, end_token_ids=end_ids,
                     chat_template=chat_template, special_ids=special_ids,
                     vocab_size=backend.get_vocab_size(with_added_tokens=True))


def _set_bos_eos(backend: tokenizers.Tokenizer, bos: str | None, eos: str | None) -> None:
    """Post-processor that adds `bos` in front and/or `eos` at the end (None: don't)."""
    specials, single, pair = [], "$A:0", "$B:1"
    if bos is not None and (bos_id := backend.token_to_id(bos)) is not None:
        specials.append((bos, bos_id))
        single, pair = f"{bos}:0 {single}", f"{bos}:1 {pair}"
    if eos is not None and (eos_id := backend.token_to_id(eos)) is not None:
        specials.append((eos, eos_id))
        single, pair = f"{single} {eos}:0", f"{pair} {eos}:1"
    backend.post_processor = processors.TemplateProcessing(single=single, pair=f"{single} {pair}",
                                                           special_tokens=specials)


def _id_list(ids: Iterable[int]) -> list[int]:
    if isinstance(ids, (str, bytes)):
        raise LanternError(f"expected a list of token ids, got {type(ids).__name__}")
    try:
        items = list(ids)
    except TypeError:
        raise LanternError(f"expected a list of token ids, got {type(ids).__name__}") from None
    return [_as_token_id(i, None) for i in items]


def _as_token_id(value: Any, vocab_size: int | None) -> int:
    try:
        i = operator.index(value)  # accepts int, numpy and torch integer scalars; rejects floats and bools' cousins
    except TypeError:
        raise LanternError(f"token ids must be integers, got {value!r}") from None
    if i < 0 or i >= 2**32 or (vocab_size is not None and i >= vocab_size):
        limit = f"0..{vocab_size - 1}" if vocab_size is not None else "non-negative 32-bit"
        raise LanternError(f"token id {i} is out of range ({limit})")
    return i


# ---------------------------------------------------------------------- Hugging Face folders


def _read_text(path: Path, limit: int) -> str:
    try:
        size = path.stat().st_size
        if size > limit:
            raise ModelFileError(path, f"{size} bytes is too large for this file (limit {limit})")
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ModelFileError(path, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ModelFileError(path, f"cannot read: {e.strerror or e}") from None


def _parse_tokenizer_json(path: Path) -> tokenizers.Tokenizer:
    text = _read_text(path, MAX_TOKENIZER_JSON_BYTES)
    try:
        return tokenizers.Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception for every kind of bad file
        try:
            json.loads(text)
        except json.JSONDecodeError as je:
            raise ModelFileError(path, f"invalid JSON at line {je.lineno} column {je.colno}: {je.msg}") from None
        raise ModelFileError(path, f"not a tokenizer the tokenizers library can load: {e}") from None


def _read_json_object(path: Path) -> dict[str, Any]:
    """An optional JSON object file: {} if absent, an error naming the file if unreadable or not an object."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(_read_text(path, MAX_SIDE_FILE_BYTES))
    except json.JSONDecodeError as e:
        raise ModelFileError(path, f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise ModelFileError(path, f"expected a JSON object, found {type(data).__name__}")
    return data


def _token_content(value: Any, key: str, path: Path) -> str | None:
    """A special token as written in tokenizer_config.json: a string, {"content": ...}, or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ModelFileError(path, f"{key} must be a string or an object with a 'content' string, got {value!r}")


def _added_token(value: Any, special: bool, where: str, path: Path) -> AddedToken:
    """An AddedToken from a config entry: a string or a serialized AddedToken object."""
    if isinstance(value, str):
        return AddedToken(value, special=special, normalized=False)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        flags = {k: bool(value[k]) for k in ("single_word", "lstrip", "rstrip", "normalized") if k in value}
        return AddedToken(value["content"], special=bool(value.get("special", special)), **flags)
    raise ModelFileError(path, f"{where} must be a token string or an AddedToken object, got {value!r}")


def _register_added_tokens(backend: tokenizers.Tokenizer, config: dict[str, Any], named: dict[str, str | None],
                           path: Path) -> None:
    """Make the backend's added tokens match what transformers ends up with after loading the config."""
    present = {tok.content for tok in backend.get_added_tokens_decoder().values()}
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise ModelFileError(path, "added_tokens_decoder must be an object mapping ids to tokens")
    missing = []
    for key, value in sorted(decoder.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else -1):
        token = _added_token(value, special=False, where=f"added_tokens_decoder[{key!r}]", path=path)
        if token.content not in present:
            missing.append(token)
    if missing:
        backend.add_tokens(missing)

    # Named and extra special tokens are always special added tokens, matched whole on the raw text.
    extras: list[Any] = []
    for key in ("additional_special_tokens", "extra_special_tokens"):
        value = config.get(key)
        if isinstance(value, dict):
            extras.extend(value.values())
        elif isinstance(value, list):
            extras.extend(value)
        elif value is not None:
            raise ModelFileError(path, f"{key} must be a list of tokens, got {value!r}")
    contents = [c for c in named.values() if c is not None]
    contents += [_added_token(v, True, f"{key} entry", path).content for v in extras]
    if contents:
        backend.add_special_tokens([AddedToken(c, special=True, normalized=False) for c in dict.fromkeys(contents)])


def _hf_chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    """chat_template.jinja if present (transformers lets the file override the config), else the config's.

    The config's value is a string, or a list of {"name", "template"} of which the 'default' one is used.
    """
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return _read_text(jinja, MAX_SIDE_FILE_BYTES)
    value = config.get("chat_template")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        for item in value:
            if isinstance(item, dict) and item.get("name") == "default" and isinstance(item.get("template"), str):
                return item["template"]
        return None
    raise ModelFileError(folder / "tokenizer_config.json",
                         f"chat_template must be a string or a list of named templates, got {type(value).__name__}")


# ---------------------------------------------------------------------- GGUF metadata


class _GGUFVocab:
    """Checks the `tokenizer.ggml.*` metadata of one file and builds the matching backend."""

    def __init__(self, metadata: dict[str, Any], source: str, cache_dir: str | Path | None = None):
        self.meta = metadata
        self.source = source
        self.cache_dir = cache_dir

    def fail(self, problem: str) -> ModelFileError:
        return ModelFileError(self.source, problem)

    def build(self) -> Tokenizer:
        kind = self.meta.get("tokenizer.ggml.model")
        if kind is None:
            raise self.fail("no tokenizer in the metadata (tokenizer.ggml.model is missing)")
        if kind not in ("gpt2", "llama"):
            raise self.fail(f"tokenizer.ggml.model {kind!r} is not supported (Lantern reads 'gpt2', byte-level BPE, "
                            "and 'llama', SentencePiece-style BPE)")
        tokens = self.strings("tokenizer.ggml.tokens")
        n = len(tokens)
        if n == 0:
            raise self.fail("tokenizer.ggml.tokens is empty")
        if n > MAX_VOCAB:
            raise self.fail(f"tokenizer.ggml.tokens has {n} entries, more than any real vocabulary ({MAX_VOCAB})")
        types = self.numbers("tokenizer.ggml.token_type", n, int)
        if types is None:
            types = [NORMAL] * n
        bad = min(set(types) - _TOKEN_TYPES, default=None)
        if bad is not None:
            raise self.fail(f"tokenizer.ggml.token_type contains {bad!r}, not a known token type (1-6)")

        ids = {key: self.token_id(f"tokenizer.ggml.{key}", n) for key in
               ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id", "eot_token_id",
                "eom_token_id")}
        names = {key: (tokens[i] if i is not None else None) for key, i in ids.items()}

        if kind == "gpt2":
            backend, default_bos = self.byte_level(tokens)
        else:
            backend = self.sentencepiece(tokens, types, names["unknown_token_id"])
            default_bos = True  # llama.cpp's default for SentencePiece vocabularies

        # Control and unknown tokens are special: matched whole in text, dropped by skip_special_tokens.
        # User-defined tokens are matched whole too but are ordinary text (llama.cpp's partition step).
        added = []
        marked = np.flatnonzero(np.isin(np.asarray(types), (CONTROL, UNKNOWN, USER_DEFINED))).tolist()
        for token, token_type in ((tokens[i], types[i]) for i in marked):
            if token_type in (CONTROL, UNKNOWN):
                added.append(AddedToken(token, special=True, normalized=False))
            elif token_type == USER_DEFINED:
                added.append(self.user_defined(token, kind))
        if added:
            backend.add_tokens(added)

        add_bos = self.flag("tokenizer.ggml.add_bos_token", default_bos) and ids["bos_token_id"] is not None
        add_eos = self.flag("tokenizer.ggml.add_eos_token", False) and ids["eos_token_id"] is not None
        _set_bos_eos(backend, names["bos_token_id"] if add_bos else None, names["eos_token_id"] if add_eos else None)

        template = self.meta.get("tokenizer.chat_template")
        if template is not None and not isinstance(template, str):
            raise self.fail(f"tokenizer.chat_template must be a string, got {type(template).__name__}")
        end_ids = frozenset(ids[k] for k in ("eos_token_id", "eot_token_id", "eom_token_id") if ids[k] is not None)
        tok = _finish(backend, bos=names["bos_token_id"], eos=names["eos_token_id"],
                      pad=names["padding_token_id"], unk=names["unknown_token_id"], chat_template=template,
                      extra_end_ids=end_ids)
        # A vocabulary may repeat a token string; keep the ids the file names rather than the first match by text.
        return replace(tok, bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"],
                       pad_token_id=ids["padding_token_id"], unk_token_id=ids["unknown_token_id"],
                       end_token_ids=end_ids, vocab_size=max(tok.vocab_size, n))

    # ---- the two vocabulary kinds

    def byte_level(self, tokens: list[str]) -> tuple[tokenizers.Tokenizer, bool]:
        pre_name = self.meta.get("tokenizer.ggml.pre")
        if pre_name is None:
            warnings.warn(f"{self.source}: no tokenizer.ggml.pre in the metadata; using llama.cpp's 'default' "
                          "pre-tokenizer, which may not be the one the model was trained with", stacklevel=3)
            pre_name = "default"
        spec = BYTE_LEVEL_PRE_TOKENIZERS.get(pre_name)
        if spec is None:
            raise self.fail(f"tokenizer.ggml.pre {pre_name!r} is not a pre-tokenizer Lantern knows (known: "
                            f"{', '.join(sorted(BYTE_LEVEL_PRE_TOKENIZERS))}); tokenizing with another one would "
                            "give ids the model was not trained on")
        written = self.strings("tokenizer.ggml.merges")
        merges = [tuple(m.split(" ")) for m in written]
        if set(map(len, merges)) - {2} or "" in itertools.chain.from_iterable(merges):  # checked in C, then found
            j = next(j for j, m in enumerate(merges) if len(m) != 2 or not m[0] or not m[1])
            raise self.fail(f"tokenizer.ggml.merges[{j}] is {written[j]!r}, not two tokens separated by one space")
        vocab = _first_ids(tokens)
        try:
            model = models.BPE(vocab=vocab, merges=merges, ignore_merges=spec.ignore_merges, fuse_unk=False,
                               byte_fallback=False)
        except Exception as e:  # e.g. a merge naming a token that is not in the vocabulary
            raise self.fail(f"tokenizer.ggml.merges do not fit tokenizer.ggml.tokens: {e}") from None
        backend = tokenizers.Tokenizer(model)
        if spec.nfc:
            backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in spec.patterns]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        backend.decoder = decoders.ByteLevel()
        return backend, spec.add_bos

    def sentencepiece(self, tokens: list[str], types: list[int], unk: str | None) -> tokenizers.Tokenizer:
        add_space_prefix = self.flag("tokenizer.ggml.add_space_prefix", True)  # llama.cpp's default
        scores = self.numbers("tokenizer.ggml.scores", len(tokens), float)
        pieces = [self.user_defined(t, "llama").content if k == USER_DEFINED else t for t, k in zip(tokens, types)]
        vocab = _first_ids(pieces)
        merge_ids = self.merge_ids(pieces, types, scores)
        merges = [(pieces[a], pieces[b]) for a, b in zip(merge_ids[:, 0].tolist(), merge_ids[:, 1].tolist())]
        has_bytes = any(k == BYTE for k in types)
        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                                                  byte_fallback=has_bytes))
        # Spaces become '▁'; with add_space_prefix every stretch of text between matched-whole tokens also gets a
        # leading '▁' (llama.cpp adds it after each special token too), as the legacy Llama tokenizer.json does.
        replace_spaces = normalizers.Replace(" ", SPIECE_SPACE)
        backend.normalizer = (normalizers.Sequence([normalizers.Prepend(SPIECE_SPACE), replace_spaces])
                              if add_space_prefix else replace_spaces)
        steps = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_space_prefix:
            steps.append(decoders.Strip(" ", 1, 0))  # the prefix space added at encode time is not text
        backend.decoder = decoders.Sequence(steps)
        return backend

    def merge_ids(self, pieces: list[str], types: list[int], scores: list[float] | None) -> np.ndarray:
        """_merge_ids_from_scores, kept in `cache_dir` under a hash of its inputs: deriving Gemma 3's 515k merges
        from its 262k scored pieces takes ~0.6 s of Python, reading them back a few ms."""
        if self.cache_dir is None:
            return _merge_ids_from_scores(pieces, types, scores)
        h = hashlib.blake2b(b"lantern-spm-merges-1", digest_size=20)
        h.update(np.array([len(p) for p in pieces], dtype=np.int64).tobytes())
        h.update("".join(pieces).encode("utf-8", "surrogatepass"))
        h.update(np.asarray(types, dtype=np.int64).tobytes())
        h.update(b"" if scores is None else np.asarray(scores, dtype=np.float64).tobytes())
        path = Path(self.cache_dir) / f"spm-merges-{h.hexdigest()}.npy"
        try:
            ids = np.load(path, allow_pickle=False)
            if ids.dtype == np.int32 and ids.ndim == 2 and ids.shape[1] == 2 and (
                    ids.size == 0 or (ids.min() >= 0 and ids.max() < len(pieces))):
                return ids
        except (OSError, ValueError):
            pass  # not there yet, or unreadable: derive it again
        ids = _merge_ids_from_scores(pieces, types, scores)
        try:  # written whole, then renamed: a reader never sees half a file
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                np.save(f, ids, allow_pickle=False)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache costs only the time
        return ids

    def user_defined(self, token: str, kind: str) -> AddedToken:
        """A user-defined token, matched whole wherever it occurs.

        In SentencePiece vocabularies it is matched on the '▁' form of the text, as SentencePiece does;
        llama.cpp's converter stores such tokens with real spaces, so put the '▁' back (Gemma's runs of spaces).
        """
        if kind == "llama":
            return AddedToken(token.replace(" ", SPIECE_SPACE), special=False, normalized=True)
        return AddedToken(token, special=False, normalized=False)

    # ---- typed metadata access

    def strings(self, key: str) -> list[str]:
        value = self.meta.get(key)
        if value is None:
            raise self.fail(f"{key} is missing from the metadata")
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
            raise self.fail(f"{key} must be an array of strings, got {type(value).__name__}")
        if len(value) > 4 * MAX_VOCAB:  # merges may outnumber tokens, but not by this much
            raise self.fail(f"{key} has {len(value)} entries, more than any real tokenizer")
        out = list(value)
        if set(map(type, out)) <= {str}:  # the reader's own output: one pass in C
            return out
        bad = next((i for i, s in enumerate(out) if not isinstance(s, str)), None)
        if bad is not None:
            raise self.fail(f"{key}[{bad}] is {out[bad]!r}, not a string")
        return out

    def numbers(self, key: str, n: int, kind: Callable[[Any], Any]) -> list | None:
        """A numeric per-token array (numpy array or list) that must have exactly one entry per token."""
        value = self.meta.get(key)
        if value is None:
            return None
        if getattr(value, "ndim", 1) != 1 or isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
            raise self.fail(f"{key} must be a 1-D numeric array")
        if len(value) != n:
            raise self.fail(f"{key} has {len(value)} entries but tokenizer.ggml.tokens has {n}")
        items = value.tolist() if hasattr(value, "tolist") else list(value)
        if kind in (int, float) and set(map(type, items)) <= {kind}:  # numpy's tolist(): nothing to convert
            return items
        try:
            return [kind(x) for x in items]
        except (TypeError, ValueError):
            raise self.fail(f"{key} must hold numbers") from None

    def token_id(self, key: str, n: int) -> int | None:
        value = self.meta.get(key)
        if value is None:
            return None
        try:
            i = operator.index(value)
        except TypeError:
            raise self.fail(f"{key} must be an integer, got {value!r}") from None
        if not 0 <= i < n:
            raise self.fail(f"{key} is {i}, outside the vocabulary of {n} tokens")
        return i

    def flag(self, key: str, default: bool) -> bool:
        value = self.meta.get(key)
        if value is None:
            return default
        if isinstance(value, (str, bytes)) or not hasattr(value, "__bool__"):  # bool, int or numpy bool
            raise self.fail(f"{key} must be a boolean, got {value!r}")
        return bool(value)


def _first_ids(pieces: list[str]) -> dict[str, int]:
    """piece -> id, keeping the first id when a vocabulary repeats a string."""
    return dict(zip(reversed(pieces), range(len(pieces) - 1, -1, -1)))  # the last write, the first id, wins


def _merge_ids_from_scores(pieces: list[str], types: list[int], scores: list[float] | None) -> np.ndarray:
    """BPE merges equivalent to SentencePiece's rule "join the adjacent pair whose joined piece scores highest",
    as (M, 2) int32 ids of each merge's left and right piece, first merge first.

    Every way of writing a piece as two pieces becomes a merge, ranked by the joined piece's score (then by id, so
    files without scores fall back to vocabulary order; then by where it is cut). Only normal and user-defined
    pieces take part: control, byte and unused pieces are never produced by merging.
    """
    mergeable: dict[str, int] = {}
    for i, (piece, kind) in enumerate(zip(pieces, types)):
        if kind in (NORMAL, USER_DEFINED) and piece not in mergeable:
            mergeable[piece] = i
    # Hot loop (262k pieces, ~1.2M cuts for Gemma 3), written plainly: a comprehension per piece or a second
    # lookup per found cut measured slower. The ranking is numpy's.
    get = mergeable.get
    ids: list[int] = []
    cuts: list[int] = []
    lefts: list[int] = []
    rights: list[int] = []
    for piece, i in mergeable.items():
        for cut in range(1, len(piece)):
            a = get(piece[:cut])
            if a is not None:
                b = get(piece[cut:])
                if b is not None:
                    ids.append(i)
                    cuts.append(cut)
                    lefts.append(a)
                    rights.append(b)
    if not ids:
        return np.zeros((0, 2), dtype=np.int32)
    piece_ids = np.array(ids, dtype=np.int64)
    score = np.asarray(scores, dtype=np.float64)[piece_ids] if scores is not None else np.zeros(len(ids))
    order = np.lexsort((np.array(cuts), piece_ids, -score))  # the last key sorts first: score down, then id, cut
    return np.stack([np.array(lefts, dtype=np.int32)[order], np.array(rights, dtype=np.int32)[order]], axis=1)