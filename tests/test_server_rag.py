"""Retrieval over HTTP (/v1/lantern/rag/...): documents uploaded into a fresh index, a question answered with
every step shown (the chunks found with their scores, the prompt and its token count, the answer streamed by
the engine, the sources), equal to what the Python pipeline finds; and the refusals."""

from __future__ import annotations

import json
import os

import httpx
import pytest
from test_server_embeddings import minilm_folder

from serving import KEY, Server, tiny_chat_folder

H = {"Authorization": f"Bearer {KEY}"}
pytestmark = pytest.mark.slow  # the real chat and embedding models behind a server
DOCS = {
    "bridges.md": "# Bridges\n\nThe Golden Gate Bridge opened in 1937 and spans the strait at San Francisco.",
    "bread.txt": "Sourdough bread rises with a starter of wild yeast and lactic acid bacteria.",
    "chess.html": "<html><body><h1>Chess</h1><p>In chess, the knight moves in an L shape.</p></body></html>",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_gguf):
    home = tmp_path_factory.mktemp("lantern-home")
    old = os.environ.get("LANTERN_HOME")
    os.environ["LANTERN_HOME"] = str(home)  # the server subprocess inherits it: a fresh store and index
    try:
        s = Server(str(default_gguf), "--api-key", KEY, "--embedding-model", str(minilm_folder()),
                   name="smollm2-135m-instruct")
    finally:
        if old is None:
            os.environ.pop("LANTERN_HOME")
        else:
            os.environ["LANTERN_HOME"] = old
    yield s
    assert s.stop() == 0


def test_upload_list_and_ask_with_every_step(server):
    for name, text in DOCS.items():
        r = httpx.post(f"{server.url}/v1/lantern/rag/documents", headers=H, timeout=120,
                       json={"name": name, "text": text})
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "added" and r.json()["chunks"] >= 1
    again = httpx.post(f"{server.url}/v1/lantern/rag/documents", headers=H, timeout=120,
                       json={"name": "bread.txt", "text": DOCS["bread.txt"]}).json()
    assert again["status"] == "unchanged"
    listed = httpx.get(f"{server.url}/v1/lantern/rag/documents", headers=H).json()
    assert sorted(os.path.basename(d["path"]) for d in listed["documents"]) == sorted(DOCS)

    body = {"question": "When did the Golden Gate Bridge open?", "k": 2, "max_tokens": 24, "temperature": 0}
    r = httpx.post(f"{server.url}/v1/lantern/rag/ask", headers=H, json=body, timeout=120).json()
    plan = r["plan"]
    assert os.path.basename(plan["hits"][0]["source"]) == "bridges.md"
    assert plan["hits"][0]["score"] >= plan["hits"][1]["score"]
    assert "Golden Gate" in plan["prompt"] and plan["prompt_tokens"] == len(plan["prompt_token_ids"])
    assert plan["query"]["tokens"] and r["sources"] == plan["sources"] and r["finish_reason"] in ("stop", "length")
    assert r["answer"]

    chunks = []
    with httpx.stream("POST", f"{server.url}/v1/lantern/rag/ask", headers=H, json={**body, "stream": True},
                      timeout=120) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
    first, last = chunks[0]["choices"][0], chunks[-1]["choices"][0]
    assert first["plan"]["hits"] == plan["hits"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == r["answer"]  # greedy: the same answer
    assert last["finish_reason"] and last["sources"] == r["sources"]


def test_rag_refusals(server, chat_only):
    bad_name = httpx.post(f"{server.url}/v1/lantern/rag/documents", headers=H,
                          json={"name": "../escape.md", "text": "x"})
    assert bad_name.status_code == 400 and bad_name.json()["error"]["param"] == "name"
    empty = httpx.post(f"{server.url}/v1/lantern/rag/ask", headers=H, json={"question": "hi", "index": "nothing"})
    assert empty.status_code == 400 and "no documents" in empty.json()["error"]["message"]
    bad_index = httpx.post(f"{server.url}/v1/lantern/rag/ask", headers=H, json={"question": "hi", "index": "../x"})
    assert bad_index.status_code == 400 and bad_index.json()["error"]["param"] == "index"
    no_model = httpx.get(f"{chat_only.url}/v1/lantern/rag/documents")
    assert no_model.status_code == 400 and no_model.json()["error"]["code"] == "no_embedding_model"


@pytest.fixture(scope="module")
def chat_only(tmp_path_factory):
    s = Server(str(tiny_chat_folder(tmp_path_factory.mktemp("tiny-rag-chat"))))
    yield s
    assert s.stop() == 0
