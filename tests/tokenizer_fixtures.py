"""Builds small but real tokenizers for the tokenizer tests: Hugging Face folders shaped like SmolLM2, Qwen2,
Llama 3, GPT-2 (byte-level BPE) and Llama 2 / Gemma (SentencePiece BPE), trained here on a small corpus, and the
GGUF metadata dicts llama.cpp's convert script would write for each of them.

The byte-level vocabularies are trained with `tokenizers`; the SentencePiece ones with `sentencepiece` itself, so
that its own encoder can serve as the reference for the GGUF side. Regexes and pipeline layouts are those of the
real models' tokenizer.json files.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers.tokenization_utils_base import generate_merges

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# Training text: several scripts, code, digits and whitespace, so that merges exist for all of them. Some
# characters of the test texts (rare CJK, most emoji, Arabic ligatures) are deliberately absent, so SentencePiece
# vocabularies must fall back to bytes for them.
CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.",
    "Hello, world! Hello there, how are you doing today? I'm fine, thanks, and you're kind.",
    "It's a test of the tokenizer: we've got words, numbers like 12345 and 2024, and 3.14159.",
    "In 1999 there were 365 days, 52 weeks and 12 months; 1,000,000 is a million.",
    "東京は日本の首都です。日本語の文章をここに書きます。東京タワーは高いです。",
    "我爱北京天安门。中文的句子也在这里。北京是中国的首都。",
    "한국어 텍스트도 있어요. 안녕하세요, 세계!",
    "مرحبا بالعالم! هذه جملة عربية قصيرة. العالم كبير.",
    "Emoji: 😀 😃 🎉 👍 — smile and party.",
    "def main(argv):\n\tif len(argv) > 1:\n\t\treturn 0\n    else:\n        return -1  # comment\n",
    "for i in range(10):\n    print(i, i * 2)\n\n\nclass Foo:\n    pass\n",
    "    indented text    with    runs of spaces   and\n\nnew lines\n\n\n\nhere",
    "Café naïve résumé façade — “quotes” and ‘single’ … done.",
    "It costs £5 at 20 °C, © 2024 by ® makers; ¼ of £12 is £3.",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi there!<|im_end|>\n",
] * 3

# The texts every tokenizer must agree on.
TEXTS = [
    "",
    "Hello, world! This is a test.",
    "The quick brown fox jumps over the lazy dog. It's 2024; we've got 3.14159 and 1,000,000 reasons.",
    "東京は日本の首都です。我爱北京天安门。한국어 텍스트도 있어요. 龘靐齉",
    "مرحبا بالعالم! هذه جملة عربية. ﷺ",
    "Family: 👨‍👩‍👧‍👦, flags 🇯🇵🇫🇷, thumbs 👍🏽, coder 🧑‍💻 and 🎉🎉",
    "def f(x):\n\tif x > 0:\n\t\treturn x * 2\n    else:\n        return -x  # comment\n",
    "a  b   c    d\n\n\nend   \n  \t  mixed\r\nwindows line",
    "   leading and trailing   ",
    " ",
    "\n",
    "12345 0.5 007 x²",
    "a ½ cup at 90 °C, ¾ of £3 ٢٠٢٤",
    "cafe\u0301 and A\u030a (decomposed accents)",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>more text <|endoftext|> end",
    "Café naïve résumé — “quotes” ‘single’ …",
    "zero\u200bwidth and\u00a0nbsp",
    "x" + " " * 20 + "y",
]


# ---------------------------------------------------------------------- byte-level BPE folders

GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class ByteStyle:
    """One byte-level model family: its GGUF pre-tokenizer name and tokenizer.json layout."""

    name: str
    gguf_pre: str
    tokenizer_class: str
    specials: tuple[str, ...]
    bos: str | None
    eos: str
    add_bos: bool | None  # tokenizer_config's add_bos_token (None: key absent)


BYTE_STYLES = {
    # SmolLM2: its tokenizer_config says GPT2Tokenizer, but transformers 5 rebuilds that class with a plain
    # ByteLevel pre-tokenizer and drops tokenizer.json's Digits step; the generic class keeps the file as written.
    "smollm": ByteStyle("smollm", "smollm", "PreTrainedTokenizerFast",
                        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), "<|im_start|>", "<|im_end|>", None),
    "qwen2": ByteStyle("qwen2", "qwen2", "Qwen2Tokenizer",
                       ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None, "<|im_end|>", False),
    "llama3": ByteStyle("llama3", "llama-bpe", "PreTrainedTokenizerFast",
                        ("<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"),
                        "<|begin_of_text|>", "<|end_of_text|>", None),
    "gpt2": ByteStyle("gpt2", "gpt-2", "PreTrainedTokenizerFast",
                      ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), "<|endoftext|>", "<|endoftext|>", None),
}

USER_TOKEN = "<tool_call>"  # an added token that is not special (Qwen2.5 has this one)


def build_byte_level(style: ByteStyle, vocab_size: int = 1200) -> Tokenizer:
    tok = Tokenizer(models.BPE(ignore_merges=style.name == "llama3"))
    if style.name == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    elif style.name == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        regex = QWEN2_REGEX if style.name == "qwen2" else LLAMA3_REGEX
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if style.name == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  special_tokens=list(style.specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.add_tokens([AddedToken(USER_TOKEN, special=False, normalized=False)])
    if style.name == "llama3":
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{style.bos}:0 $A:0", pair=f"{style.bos}:0 $A:0 {style.bos}:1 $B:1",
                                          special_tokens=[(style.bos, tok.token_to_id(style.bos))])])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def write_byte_level_folder(folder: Path, style: ByteStyle) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_byte_level(style)
    tok.save(str(folder / "tokenizer.json"))
    config: dict[str, Any] = {
        "tokenizer_class": style.tokenizer_class,
        "bos_token": style.bos, "eos_token": style.eos, "pad_token": style.eos,
        "unk_token": None if style.name != "smollm" else "<|endoftext|>",
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": _added_tokens_decoder(tok),
        "chat_template": CHAT_TEMPLATE,
    }
    if style.add_bos is not None:
        config["add_bos_token"] = style.add_bos
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=1), encoding="utf-8")
    return folder


def _added_tokens_decoder(tok: Tokenizer) -> dict[str, dict]:
    return {str(i): {"content": t.content, "lstrip": t.lstrip, "rstrip": t.rstrip, "normalized": t.normalized,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(tok.get_added_tokens_decoder().items())}


def gguf_from_byte_level_folder(folder: Path, style: ByteStyle) -> dict[str, Any]:
    """What convert_hf_to_gguf.py's GPT-2-style vocabulary export writes for this folder."""
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    vocab: dict[str, int] = dict(data["model"]["vocab"])
    added = {t["id"]: t for t in data["added_tokens"]}
    for i, t in added.items():
        vocab[t["content"]] = i
    by_id = {i: s for s, i in vocab.items()}
    size = max(by_id) + 1
    tokens, types = [], []
    for i in range(size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(5)
        elif i in added:
            tokens.append(added[i]["content"])
            types.append(3 if added[i]["special"] else 4)
        else:
            tokens.append(by_id[i])
            types.append(1)
    merges = data["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": style.gguf_pre,
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.eos_token_id": vocab[config["eos_token"]],
        "tokenizer.ggml.padding_token_id": vocab[config["pad_token"]],
        "tokenizer.chat_template": config["chat_template"],
    }
    if config.get("bos_token"):
        meta["tokenizer.ggml.bos_token_id"] = vocab[config["bos_token"]]
    if "add_bos_token" in config:
        meta["tokenizer.ggml.add_bos_token"] = config["add_bos_token"]
    return meta


# ---------------------------------------------------------------------- SentencePiece BPE folders

SPACE = "\u2581"
GEMMA_SPACE_RUNS = [SPACE * k for k in range(2, 32)]  # Gemma has whole tokens for 2..31 spaces


@dataclass(frozen=True)
class SpmStyle:
    name: str
    dummy_prefix: bool
    bos: str
    eos: str
    unk: str
    pad: str | None


SPM_STYLES = {
    "llama": SpmStyle("llama", True, "<s>", "</s>", "<unk>", None),
    "gemma": SpmStyle("gemma", False, "<bos>", "<eos>", "<unk>", "<pad>"),
}


def train_sentencepiece(style: SpmStyle, vocab_size: int = 700) -> bytes:
    """A SentencePiece BPE model trained the way Llama 2 / Gemma models were (byte fallback, digits split)."""
    ids = ({"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1} if style.name == "llama"
           else {"pad_id": 0, "eos_id": 1, "bos_id": 2, "unk_id": 3, "pad_piece": style.pad})
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=out, model_type="bpe", vocab_size=vocab_size,
        hard_vocab_limit=False, byte_fallback=True, split_digits=True, character_coverage=1.0,
        add_dummy_prefix=style.dummy_prefix, remove_extra_whitespaces=False, normalization_rule_name="identity",
        allow_whitespace_only_pieces=True, max_sentencepiece_length=16,
        bos_piece=style.bos, eos_piece=style.eos, unk_piece=style.unk,
        control_symbols=(["<mask>"] if style.name == "gemma" else []) + ["<|im_start|>", "<|im_end|>"],
        user_defined_symbols=GEMMA_SPACE_RUNS if style.name == "gemma" else [],
        minloglevel=2, num_threads=1, **ids)
    return out.getvalue()


def spm_pieces(model: bytes) -> list[tuple[str, float, int]]:
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    return [(p.piece, p.score, p.type) for p in proto.pieces]


def build_spm_tokenizer_json(style: SpmStyle, model: bytes) -> Tokenizer:
    """tokenizer.json laid out like the real Llama 2 (legacy) / Gemma files, merges as HF's converter makes them."""
    pieces = spm_pieces(model)
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=generate_merges(vocab), unk_token=style.unk, fuse_unk=True,
                               byte_fallback=True))
    if style.name == "llama":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
        tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    else:
        tok.normalizer = normalizers.Replace(" ", SPACE)
        tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p, _, t in pieces if t in (2, 3)])
    tok.add_tokens([AddedToken(p, special=False, normalized=False) for p, _, t in pieces if t == 4])
    bos_id = vocab[style.bos]
    tok.post_processor = processors.TemplateProcessing(single=f"{style.bos}:0 $A:0",
                                                       pair=f"{style.bos}:0 $A:0 {style.bos}:1 $B:1",
                                                       special_tokens=[(style.bos, bos_id)])
    return tok


def write_spm_folder(folder: Path, style: SpmStyle, model: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_spm_tokenizer_json(style, model)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        # transformers 5's LlamaTokenizer class swaps the legacy normalizer for a Metaspace pre-tokenizer, so the
        # Llama-2-style folder names the generic class; GemmaTokenizer rebuilds exactly the Gemma layout.
        "tokenizer_class": "PreTrainedTokenizerFast" if style.name == "llama" else "GemmaTokenizer",
        "bos_token": style.bos, "eos_token": style.eos, "unk_token": style.unk, "pad_token": style.pad,
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": _added_tokens_decoder(tok),
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=1), encoding="utf-8")
    return folder


def gguf_from_spm(folder: Path, model: bytes) -> dict[str, Any]:
    """What convert_hf_to_gguf.py's SentencePiece vocabulary export writes: the .model pieces, scores and types,
    then tokenizer_config.json's added tokens re-typed (user-defined ones stored with real spaces)."""
    pieces = spm_pieces(model)
    tokens = [p for p, _, _ in pieces]
    scores = [s for _, s, _ in pieces]
    types = [t for _, _, t in pieces]
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    for key, entry in config["added_tokens_decoder"].items():
        i = int(key)
        if entry["special"]:
            types[i] = 3
        else:
            types[i] = 4
            tokens[i] = entry["content"].replace(SPACE, " ")
        scores[i] = -1000.0
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    index = {p: i for i, p in enumerate(p for p, _, _ in pieces)}
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.add_space_prefix": bool(proto.normalizer_spec.add_dummy_prefix),
        "tokenizer.ggml.bos_token_id": index[config["bos_token"]],
        "tokenizer.ggml.eos_token_id": index[config["eos_token"]],
        "tokenizer.ggml.unknown_token_id": index[config["unk_token"]],
        "tokenizer.ggml.add_bos_token": config["add_bos_token"],
        "tokenizer.ggml.add_eos_token": config["add_eos_token"],
        "tokenizer.chat_template": config["chat_template"],
    }
    if config.get("pad_token"):
        meta["tokenizer.ggml.padding_token_id"] = index[config["pad_token"]]
    return meta
