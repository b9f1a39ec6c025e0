"""Tests for lanternlm.text.tokenizer: Hugging Face folders against transformers, GGUF metadata against transformers,
SentencePiece and the real SmolLM2 file, the incremental decoder against full decoding, and error reporting."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as RawTokenizer
from transformers import AutoTokenizer

from lanternlm.errors import LanternError, ModelFileError
from lanternlm.text.tokenizer import IncrementalDecoder, Tokenizer

import tokenizer_fixtures as F

FFFD = "\ufffd"


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def byte_folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("byte_level")
    return {name: F.write_byte_level_folder(root / name, style) for name, style in F.BYTE_STYLES.items()}


@pytest.fixture(scope="module")
def spm_models() -> dict[str, bytes]:
    return {name: F.train_sentencepiece(style) for name, style in F.SPM_STYLES.items()}


@pytest.fixture(scope="module")
def spm_folders(tmp_path_factory, spm_models) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("spm")
    return {name: F.write_spm_folder(root / name, F.SPM_STYLES[name], spm_models[name]) for name in F.SPM_STYLES}


@pytest.fixture(scope="module")
def folders(byte_folders, spm_folders) -> dict[str, Path]:
    return {**byte_folders, **spm_folders}


@pytest.fixture(scope="module")
def references(folders) -> dict[str, object]:
    return {name: AutoTokenizer.from_pretrained(str(folder)) for name, folder in folders.items()}


@pytest.fixture(scope="module")
def gguf_metas(byte_folders, spm_folders, spm_models) -> dict[str, dict]:
    metas = {name: F.gguf_from_byte_level_folder(folder, F.BYTE_STYLES[name]) for name, folder in byte_folders.items()}
    metas.update({name: F.gguf_from_spm(folder, spm_models[name]) for name, folder in spm_folders.items()})
    return metas


@pytest.fixture(scope="module")
def real_gguf(default_gguf) -> Path:
    return default_gguf


@pytest.fixture(scope="module")
def real_meta(real_gguf) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(real_gguf))
    return {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.")}


ALL_STYLES = [*F.BYTE_STYLES, *F.SPM_STYLES]
# Longer than Gemma's longest whole-space token (31): HF's merge order and SentencePiece split these differently.
LONG_SPACE_TEXTS = [" " * 40 + "x", "a" + " " * 33 + "b", "tab\t" + " " * 64]


def assert_same_as_reference(ours: Tokenizer, ref, texts: list[str]) -> None:
    for text in texts:
        for add in (True, False):
            assert ours.encode(text, add_special_tokens=add) == ref(text, add_special_tokens=add)["input_ids"], \
                (text, add)
        ids = ref(text)["input_ids"]
        # Whole sequences, and slices that cut characters and drop the BOS / keep trailing specials.
        for part in (ids, ids[1:], ids[:-1], ids[len(ids) // 2:]):
            for skip in (False, True):
                assert ours.decode(part, skip_special_tokens=skip) == ref.decode(part, skip_special_tokens=skip), \
                    (text, part, skip)


# ---------------------------------------------------------------------- Hugging Face folders


@pytest.mark.parametrize("style", ALL_STYLES)
def test_hf_folder_matches_transformers(style, folders, references):
    ours = Tokenizer.from_hf_folder(folders[style])
    ref = references[style]
    assert_same_as_reference(ours, ref, F.TEXTS + LONG_SPACE_TEXTS)
    assert ours.bos_token_id == ref.bos_token_id and ours.eos_token_id == ref.eos_token_id
    assert ours.pad_token_id == ref.pad_token_id and ours.unk_token_id == ref.unk_token_id
    prepends = ref("hi")["input_ids"][:1] == [ref.bos_token_id] != ref("hi", add_special_tokens=False)["input_ids"][:1]
    assert ours.add_bos_token == prepends
    assert ours.special_ids == {i for i, t in ref.added_tokens_decoder.items() if t.special}
    assert ours.vocab_size == len(ref)
    assert ours.end_token_ids == {ref.eos_token_id}
    assert ours.chat_template == ref.chat_template
    assert ours.tokens(ours.encode("Hello")) == ref.convert_ids_to_tokens(ref("Hello")["input_ids"])
    assert ours.token_to_id("<|im_start|>") == ref.convert_tokens_to_ids("<|im_start|>")


def test_hf_special_tokens_map_and_missing_special_token(tmp_path, byte_folders):
    """Without added_tokens_decoder, special_tokens_map.json decides the named tokens; a named token missing from
    the vocabulary is added as a new special token (both as transformers does)."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((byte_folders["gpt2"] / "tokenizer.json").read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": {"content": "<|im_end|>", "lstrip": False, "rstrip": False, "normalized": False},
         "pad_token": "<pad>"}))
    ours, ref = Tokenizer.from_hf_folder(folder), AutoTokenizer.from_pretrained(str(folder))
    assert ours.eos_token == "<|im_end|>" and ours.eos_token_id == ref.eos_token_id
    assert ours.pad_token_id == ref.pad_token_id == len(ref) - 1  # a new id past the trained vocabulary
    assert ours.vocab_size == len(ref)
    assert_same_as_reference(ours, ref, ["a <pad> b<|im_end|>", "<pad><pad>"])


def test_hf_add_bos_flags_follow_tokenizer_json(tmp_path, spm_folders):
    """With a tokenizer.json, transformers 5 ignores add_bos_token/add_eos_token: the post-processor decides."""
    folder = tmp_path / "nobos"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((spm_folders["llama"] / "tokenizer.json").read_bytes())
    config = json.loads((spm_folders["llama"] / "tokenizer_config.json").read_text())
    config.update(add_bos_token=False, add_eos_token=True)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ours, ref = Tokenizer.from_hf_folder(folder), AutoTokenizer.from_pretrained(str(folder))
    assert ours.add_bos_token
    assert ours.encode("Hello world") == ref("Hello world")["input_ids"]
    assert ours.encode("Hello world")[0] == ours.bos_token_id != ours.encode("Hello world")[-1]


def test_hf_chat_template_sources(tmp_path, byte_folders):
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((byte_folders["smollm"] / "tokenizer.json").read_bytes())
    named = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": named, "eos_token": "<|im_end|>"}))
    assert Tokenizer.from_hf_folder(folder).chat_template == "DEFAULT"
    # transformers lets chat_template.jinja override the config's template, so do we.
    (folder / "chat_template.jinja").write_text("JINJA {{ messages }}")
    assert Tokenizer.from_hf_folder(folder).chat_template == "JINJA {{ messages }}"
    assert AutoTokenizer.from_pretrained(str(folder)).chat_template == "JINJA {{ messages }}"
    (folder / "chat_template.jinja").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    assert Tokenizer.from_hf_folder(folder).chat_template is None


# ---------------------------------------------------------------------- GGUF metadata


@pytest.mark.parametrize("style", ALL_STYLES)
def test_gguf_metadata_matches_hf_tokenizer(style, gguf_metas, references):
    """Metadata as llama.cpp's converter writes it, rebuilt, tokenizes like the original HF folder."""
    ours = Tokenizer.from_gguf_metadata(gguf_metas[style], source=f"{style}.gguf")
    ref = references[style]
    assert_same_as_reference(ours, ref, F.TEXTS)
    assert ours.bos_token_id == ref.bos_token_id and ours.eos_token_id == ref.eos_token_id
    assert ours.eos_token_id in ours.end_token_ids
    assert ours.chat_template == F.CHAT_TEMPLATE
    assert ours.vocab_size == len(gguf_metas[style]["tokenizer.ggml.tokens"])
    specials = {i for i, t in ref.added_tokens_decoder.items() if t.special}
    assert ours.special_ids == specials


@pytest.mark.parametrize("style", list(F.SPM_STYLES))
def test_gguf_sentencepiece_matches_sentencepiece(style, gguf_metas, spm_models):
    """SentencePiece itself is the reference for 'llama' vocabularies: byte fallback for characters the
    vocabulary lacks, the dummy prefix, and Gemma's user-defined space runs matched whole (31 + 9 spaces,
    where HF's merge order gives 16 + 24)."""
    ours = Tokenizer.from_gguf_metadata(gguf_metas[style])
    sp = spm.SentencePieceProcessor(model_proto=spm_models[style])
    texts = [t for t in F.TEXTS + LONG_SPACE_TEXTS if "<|" not in t]  # SentencePiece never parses control tokens
    for text in texts:
        assert ours.encode(text, add_special_tokens=False) == sp.encode(text), text
        assert ours.encode(text) == [sp.bos_id(), *sp.encode(text)], text
    used = {p for t in texts for p in ours.tokens(ours.encode(t))}
    assert any(p.startswith("<0x") for p in used), "the texts must exercise byte fallback"
    if style == "gemma":
        forty = ours.tokens(ours.encode(" " * 40, add_special_tokens=False))
        assert forty == [F.SPACE * 31, F.SPACE * 9]
        assert ours.decode(ours.encode(" " * 40), skip_special_tokens=True) == " " * 40


def test_gguf_sentencepiece_merges_are_cached_by_their_inputs(gguf_metas, tmp_path):
    """Merges derived from the scores are kept under a hash of the pieces, types and scores: the cached build
    tokenizes as the uncached one, a changed score is a new entry, and a damaged entry is derived again."""
    meta = gguf_metas["gemma"]
    texts = [t for t in F.TEXTS + LONG_SPACE_TEXTS if "<|" not in t]
    plain = Tokenizer.from_gguf_metadata(meta)
    first = Tokenizer.from_gguf_metadata(meta, cache_dir=tmp_path)
    [entry] = tmp_path.glob("spm-merges-*.npy")
    again = Tokenizer.from_gguf_metadata(meta, cache_dir=tmp_path)
    for tok in (first, again):
        assert [tok.encode(t) for t in texts] == [plain.encode(t) for t in texts]
    np.save(entry, np.zeros((0, 2), dtype=np.int32))  # a valid entry with no merges: it is what gets used
    unmerged = Tokenizer.from_gguf_metadata(meta, cache_dir=tmp_path)
    assert sum(len(unmerged.encode(t)) for t in texts) > sum(len(plain.encode(t)) for t in texts)
    scores = np.array(meta["tokenizer.ggml.scores"], dtype=np.float32)
    scores[-1] += 1.0
    Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.scores": scores}, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("spm-merges-*.npy"))) == 2
    for damage in (b"not numpy", np.array([[0, 10**9]], dtype=np.int32), np.array([[-1, 0]], dtype=np.int32)):
        if isinstance(damage, bytes):
            entry.write_bytes(damage)
        else:
            np.save(entry, damage)
        rebuilt = Tokenizer.from_gguf_metadata(meta, cache_dir=tmp_path)
        assert [rebuilt.encode(t) for t in texts] == [plain.encode(t) for t in texts]
        assert np.load(entry).shape[0] > 1  # written again


@pytest.mark.parametrize("style,wrong", [("smollm", "gpt-2"), ("gpt2", "smollm"), ("qwen2", "llama-bpe"),
                                         ("llama3", "qwen2"), ("gpt2", "default")])
def test_gguf_pre_tokenizer_name_is_honoured(style, wrong, gguf_metas, references):
    """The test texts tell the variants apart, so a wrong regex choice could not pass the comparison above."""
    meta = gguf_metas[style]
    right = Tokenizer.from_gguf_metadata(meta)
    other = Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.pre": wrong})
    assert any(other.encode(t) != right.encode(t) for t in F.TEXTS)
    assert all(right.encode(t) == references[style](t)["input_ids"] for t in F.TEXTS)


def test_gguf_accepts_numpy_arrays_and_eot_ids(gguf_metas):
    """The team's GGUF reader yields numpy arrays for numeric arrays; eot/eom ids also end a turn."""
    meta = dict(gguf_metas["gemma"])
    as_lists = Tokenizer.from_gguf_metadata(meta)
    im_end = meta["tokenizer.ggml.tokens"].index("<|im_end|>")
    meta.update({"tokenizer.ggml.token_type": np.asarray(meta["tokenizer.ggml.token_type"], dtype=np.int32),
                 "tokenizer.ggml.scores": np.asarray(meta["tokenizer.ggml.scores"], dtype=np.float32),
                 "tokenizer.ggml.eot_token_id": np.uint32(im_end), "tokenizer.ggml.add_bos_token": np.bool_(True)})
    as_numpy = Tokenizer.from_gguf_metadata(meta)
    for text in F.TEXTS:
        assert as_numpy.encode(text) == as_lists.encode(text)
    assert as_numpy.end_token_ids == {as_lists.eos_token_id, im_end}


def test_gguf_missing_pre_tokenizer_warns_and_uses_default(gguf_metas):
    meta = {k: v for k, v in gguf_metas["gpt2"].items() if k != "tokenizer.ggml.pre"}
    with pytest.warns(UserWarning, match="tokenizer.ggml.pre"):
        tok = Tokenizer.from_gguf_metadata(meta, source="old.gguf")
    default = Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.pre": "default"})
    assert all(tok.encode(t) == default.encode(t) for t in F.TEXTS)


# ---------------------------------------------------------------------- the real SmolLM2 file


def test_real_smollm2_gguf(real_gguf, real_meta, tmp_path):
    ours = Tokenizer.from_gguf_metadata(real_meta, source=str(real_gguf))
    assert (ours.bos_token, ours.bos_token_id, ours.eos_token, ours.eos_token_id) == \
        ("<|im_start|>", 1, "<|im_end|>", 2)
    assert ours.token_to_id("<|endoftext|>") == 0 and not ours.add_bos_token
    assert ours.end_token_ids == {2} and ours.vocab_size == 49152
    assert ours.chat_template == real_meta["tokenizer.chat_template"]

    # transformers' GGUF conversion builds a plain ByteLevel pre-tokenizer: it loses SmolLM2's one-digit-at-a-time
    # split (and Gemma's whole-token space runs). We follow the model's real tokenizer, as llama.cpp does, so we
    # compare with it only on texts without numeric characters.
    converted = AutoTokenizer.from_pretrained(str(real_gguf.parent), gguf_file=real_gguf.name)
    no_digits = [t for t in F.TEXTS + LONG_SPACE_TEXTS if not any(c.isnumeric() for c in t)]
    assert_same_as_reference(ours, converted, no_digits)

    digits = ours.encode("12345")
    assert ours.tokens(digits) == ["1", "2", "3", "4", "5"]

    # SmolLM2's own tokenizer.json is this vocabulary with Digits(individual_digits=True) then ByteLevel; rebuilt
    # here from the file's vocabulary, it agrees with us on every text, numbers included.
    tokens, types = real_meta["tokenizer.ggml.tokens"], real_meta["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ")) for m in real_meta["tokenizer.ggml.merges"]]
    hf = RawTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3])
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
         "unk_token": "<|endoftext|>", "add_bos_token": False}))
    original = AutoTokenizer.from_pretrained(str(tmp_path))
    numeric = ["In 2024, 3.14 a1b2 and 1,000,000", "a ½ cup, ¾ of it", " ٢٠٢٤ and ２０２４年", "x² + y³ = 10⁴"]
    assert_same_as_reference(ours, original, F.TEXTS + numeric)
    assert ours.encode(" ½") != converted(" ½")["input_ids"]  # where the plain-ByteLevel conversion goes wrong


# ---------------------------------------------------------------------- incremental decoding


@pytest.fixture(scope="module")
def all_tokenizers(folders, gguf_metas, real_meta) -> dict[str, Tokenizer]:
    toks = {f"{name}/hf": Tokenizer.from_hf_folder(folder) for name, folder in folders.items()}
    toks.update({f"{name}/gguf": Tokenizer.from_gguf_metadata(meta) for name, meta in gguf_metas.items()})
    toks["smollm2-real"] = Tokenizer.from_gguf_metadata(real_meta)
    return toks


def stream(tok: Tokenizer, ids: list[int], skip: bool, prompt: list[int] | None = None) -> list[str]:
    decoder = IncrementalDecoder(tok, skip_special_tokens=skip, prompt_ids=prompt)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_decoder_equals_full_decode(all_tokenizers, skip):
    split_characters = 0
    for name, tok in all_tokenizers.items():
        for text in F.TEXTS + LONG_SPACE_TEXTS:
            ids = tok.encode(text)
            pieces = stream(tok, ids, skip)
            assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip), (name, text)
            assert not any(FFFD in p for p in pieces), (name, text, pieces)
            split_characters += sum(FFFD in tok.decode([i]) for i in ids)
    assert split_characters > 100, "the texts must split characters across tokens"


def test_incremental_decoder_continues_after_prompt(all_tokenizers):
    """With the prompt as context the first generated token keeps its leading space (SentencePiece '▁')."""
    for name, tok in all_tokenizers.items():
        for text in F.TEXTS:
            ids = tok.encode(text)
            for cut in range(len(ids) + 1):
                prompt = tok.decode(ids[:cut])
                if FFFD in prompt:
                    continue  # prompts that end inside a character: see the next test
                full = tok.decode(ids)
                assert "".join(stream(tok, ids[cut:], False, ids[:cut])) == full[len(prompt):], (name, text, cut)
    llama = all_tokenizers["llama/gguf"]
    prompt, reply = llama.encode("Question:"), llama.encode("Hello there", add_special_tokens=False)
    assert llama.tokens(reply)[0].startswith(F.SPACE)
    assert "".join(stream(llama, reply, True, prompt)) == " Hello there"
    assert "".join(stream(llama, reply, True)) == "Hello there"  # same as decode(reply): the prefix space goes


def test_incremental_decoder_prompt_ending_inside_a_character(all_tokenizers):
    """The generated token that completes a character split between prompt and output releases all of it once:
    nothing the prompt already showed is repeated, nothing is lost, no U+FFFD."""
    cases = 0
    for name, tok in all_tokenizers.items():
        for text in F.TEXTS:
            ids = tok.encode(text)
            full = tok.decode(ids, skip_special_tokens=True)
            for cut in range(1, len(ids)):
                prompt_text = tok.decode(ids[:cut], skip_special_tokens=True)
                if not prompt_text.endswith(FFFD):
                    continue
                cases += 1
                out = "".join(stream(tok, ids[cut:], True, ids[:cut]))
                assert full.endswith(out) and FFFD not in out, (name, text, cut, out)
                completed = next(tok.decode(ids[:c], skip_special_tokens=True) for c in range(cut + 1, len(ids) + 1)
                                 if not tok.decode(ids[:c], skip_special_tokens=True).endswith(FFFD))
                # Before the output: at least the prompt's readable text, but not the completed character.
                assert len(prompt_text.rstrip(FFFD)) <= len(full) - len(out) < len(completed), (name, text, cut)
    assert cases > 50
    # A byte-level token can hold a space and the first bytes of an emoji: the space is not repeated.
    tok = all_tokenizers["smollm2-real"]
    ids = tok.encode("Family: 👨 and 東京")
    cut = next(c for c in range(len(ids)) if tok.decode(ids[:c]).endswith(FFFD))
    assert tok.decode(ids[:cut]) == "Family: " + FFFD
    assert "".join(stream(tok, ids[cut:], True, ids[:cut])) == "👨 and 東京"


def test_incremental_decoder_flushes_truly_invalid_bytes(all_tokenizers):
    tok = all_tokenizers["llama/gguf"]
    lone = tok.token_to_id("<0xE4>")  # the first byte of a 3-byte character, never completed
    decoder = IncrementalDecoder(tok)
    assert "".join(decoder.push(i) for i in tok.encode("ok", add_special_tokens=False)) == "ok"
    assert decoder.push(lone) == ""
    assert decoder.flush() == FFFD == tok.decode([lone])
    assert decoder.flush() == ""


class CountingBackend:
    """Wraps a tokenizers.Tokenizer and records the length of every decoded window."""

    def __init__(self, backend):
        self.backend = backend
        self.windows: list[int] = []

    def decode(self, ids, skip_special_tokens=False):
        self.windows.append(len(ids))
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)


def test_incremental_decoder_decodes_a_small_window(all_tokenizers):
    tok = all_tokenizers["smollm2-real"]
    counting = CountingBackend(tok.backend)
    counted = replace(tok, backend=counting)
    ids = tok.encode("".join(F.TEXTS) * 6)
    assert len(ids) > 2000
    prompt = ids[:500]
    pieces = stream(counted, ids[500:], True, prompt)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)[len(tok.decode(prompt, True)):]
    assert max(counting.windows) <= 12  # a few tokens of context plus the pending ones, whatever the length


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_decoder_stays_small_on_garbage(all_tokenizers, skip):
    """Hundreds of invalid bytes or of special tokens in a row: same text as decode(), bounded windows."""
    tok = all_tokenizers["llama/gguf"]
    counting = CountingBackend(tok.backend)
    counted = replace(tok, backend=counting)
    hello = tok.encode("Hello", add_special_tokens=False)
    ids = (hello + [tok.token_to_id("<0x80>")] * 300 + hello + [tok.token_to_id("<0xE4>")] * 100
           + [tok.token_to_id("<|im_start|>")] * 300 + tok.encode(" world 東京", add_special_tokens=False))
    pieces = stream(counted, ids, skip)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
    assert max(counting.windows) <= 40  # bounded: at most ~2 x 16 held-back tokens, not the 700 pushed


# ---------------------------------------------------------------------- API details and errors


def test_with_end_ids_and_id_validation(all_tokenizers):
    tok = all_tokenizers["qwen2/hf"]
    more = tok.with_end_ids([tok.token_to_id("<|endoftext|>"), np.int64(5)])
    assert more.end_token_ids == tok.end_token_ids | {tok.token_to_id("<|endoftext|>"), 5}
    assert tok.end_token_ids == {tok.eos_token_id}  # the original is unchanged
    with pytest.raises(LanternError, match="out of range"):
        tok.with_end_ids([tok.vocab_size])
    with pytest.raises(LanternError, match="str"):
        tok.encode(b"bytes")
    with pytest.raises(LanternError, match="-1"):
        tok.decode([1, -1])
    with pytest.raises(LanternError, match="integers"):
        tok.decode([1.5])
    with pytest.raises(LanternError, match="not in the vocabulary"):
        tok.tokens([tok.vocab_size + 10])
    assert tok.decode([tok.vocab_size + 10]) == ""  # like transformers: an id without a token decodes to nothing
    assert tok.token_to_id("no such token") is None


def test_hf_folder_errors(tmp_path, byte_folders):
    with pytest.raises(ModelFileError, match="tokenizer.json: missing"):
        Tokenizer.from_hf_folder(tmp_path)
    with pytest.raises(ModelFileError, match="not a directory"):
        Tokenizer.from_hf_folder(tmp_path / "nope")
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {')
    with pytest.raises(ModelFileError, match=r"tokenizer\.json: invalid JSON at line 1 column"):
        Tokenizer.from_hf_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "Nonsense"}}')
    with pytest.raises(ModelFileError, match="tokenizer.json: not a tokenizer"):
        Tokenizer.from_hf_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ModelFileError, match="not UTF-8"):
        Tokenizer.from_hf_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((byte_folders["gpt2"] / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("{'single': 'quotes'}")
    with pytest.raises(ModelFileError, match="tokenizer_config.json: invalid JSON"):
        Tokenizer.from_hf_folder(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('["a list"]')
    with pytest.raises(ModelFileError, match="expected a JSON object"):
        Tokenizer.from_hf_folder(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": 7}')
    with pytest.raises(ModelFileError, match="eos_token must be a string"):
        Tokenizer.from_hf_folder(tmp_path)


@pytest.mark.parametrize("change,message", [
    ({"tokenizer.ggml.model": "bert"}, "tokenizer.ggml.model 'bert' is not supported"),
    ({"tokenizer.ggml.model": None}, "tokenizer.ggml.model is missing"),
    ({"tokenizer.ggml.tokens": None}, "tokenizer.ggml.tokens is missing"),
    ({"tokenizer.ggml.tokens": []}, "tokenizer.ggml.tokens is empty"),
    ({"tokenizer.ggml.token_type": [1, 1, 3]}, "token_type has 3 entries but tokenizer.ggml.tokens has"),
    ({"tokenizer.ggml.token_type": "drop-last"}, "token_type has .* entries but tokenizer.ggml.tokens has"),
    ({"tokenizer.ggml.token_type": "bad-type"}, "not a known token type"),
    ({"tokenizer.ggml.pre": "mystery-bpe"}, "tokenizer.ggml.pre 'mystery-bpe' is not a pre-tokenizer"),
    ({"tokenizer.ggml.merges": ["a b c"]}, r"merges\[0\] is 'a b c'"),
    ({"tokenizer.ggml.merges": ["zzzq qqqz"]}, "merges do not fit tokenizer.ggml.tokens"),
    ({"tokenizer.ggml.merges": None}, "tokenizer.ggml.merges is missing"),
    ({"tokenizer.ggml.eos_token_id": 10**6}, "eos_token_id is 1000000, outside the vocabulary"),
    ({"tokenizer.ggml.bos_token_id": "1"}, "bos_token_id must be an integer"),
    ({"tokenizer.chat_template": 5}, "chat_template must be a string"),
])
def test_gguf_metadata_errors(change, message, gguf_metas):
    meta = dict(gguf_metas["smollm"])
    for key, value in change.items():
        if value == "drop-last":
            value = meta[key][:-1]
        elif value == "bad-type":
            value = [*meta[key][:-1], 9]
        meta[key] = value
    meta = {k: v for k, v in meta.items() if v is not None}
    with pytest.raises(ModelFileError, match=message) as info:
        Tokenizer.from_gguf_metadata(meta, source="broken.gguf")
    assert str(info.value).startswith("broken.gguf: ")


def test_gguf_sentencepiece_scores_length_checked(gguf_metas):
    meta = dict(gguf_metas["llama"])
    meta["tokenizer.ggml.scores"] = meta["tokenizer.ggml.scores"][:10]
    with pytest.raises(ModelFileError, match="scores has 10 entries but tokenizer.ggml.tokens has 700"):
        Tokenizer.from_gguf_metadata(meta, source="x.gguf")
