"""The retrieval pipeline: files -> chunks -> embeddings -> the index -> top-k -> a chat prompt -> the answer.

    from lanternlm.retrieval import Rag
    rag = Rag()                                   # the index "default" under $LANTERN_HOME/rag/
    rag.add(["notes/"])                           # new and changed files only
    plan = rag.plan("When was the bridge built?", k=4)   # plain data: query tokens, hits, prompt, sources
    for step in rag.answer_stream(plan): print(step.text, end="")
    print(sources_text(plan["sources"]))

Every step returns plain data (dicts, lists, strings, numbers), so the CLI's `--show`, a server route and a
web page can show the same thing: the question's tokens, the chunks found with their scores and sources,
the prompt exactly as the chat model's template renders it, and its token count. The models load on first
use: listing or removing documents needs neither.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import LanternError
from ..store import DEFAULT_EMBEDDING_MODEL, DEFAULT_MODEL, cache_dir
from . import prompt as prompts
from .chunking import DEFAULT_OVERLAP, chunk_text
from .documents import file_sha256, find_files, read_document
from .embedder import Embedder
from .index import NAME, RetrievalError, VectorIndex

DEFAULT_INDEX = "default"
ANSWER_RESERVE = 512   # tokens kept free for the answer when max_tokens is not given


def index_path(name: str) -> Path:
    """Where the index called `name` lives: $LANTERN_HOME/rag/<name>/index.db."""
    if not NAME.fullmatch(name or ""):
        raise RetrievalError(f"index name {name!r}: use letters, digits, '.', '_' and '-' (at most 64)")
    return cache_dir() / "rag" / name / "index.db"


def _load_llm(name: str):
    from ..api import LLM
    return LLM(name)


class Rag:
    """One index with the embedding model that fills it and the chat model that answers from it.

    `embedding_model` defaults to the model the index was built with (else all-minilm-l6-v2); a different
    one is refused. `embedding_llm` / `chat_llm` pass already loaded models; `load(name)` loads one."""

    def __init__(self, index: str = DEFAULT_INDEX, embedding_model: str | None = None,
                 chat_model: str | None = None, *, embedding_llm=None, chat_llm=None,
                 load: Callable[[str], object] = _load_llm, overlap: int = DEFAULT_OVERLAP):
        self.index = VectorIndex(index_path(index), index)
        self.overlap = overlap
        self._embedding_name = embedding_model
        self._embedding_llm = embedding_llm
        self._chat_name = chat_model
        self._chat_llm = chat_llm
        self._load = load
        self._embedder: Embedder | None = None

    def close(self) -> None:
        self.index.close()

    # ------------------------------------------------------------------ models, loaded on first use

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            recorded = self.index.model()
            name = self._embedding_name or (recorded["name"] if recorded else DEFAULT_EMBEDDING_MODEL)
            llm = self._embedding_llm if self._embedding_llm is not None else self._load(name)
            self._embedder = Embedder(llm, name)
        return self._embedder

    @property
    def chat_name(self) -> str:
        return self._chat_name or DEFAULT_MODEL

    @property
    def chat(self):
        if self._chat_llm is None:
            self._chat_llm = self._load(self.chat_name)
        if getattr(self._chat_llm, "kind", "generate") != "generate":
            raise LanternError(f"{self.chat_name} is an embedding model; the answer needs a chat model "
                               f"such as {DEFAULT_MODEL}")
        return self._chat_llm

    # ------------------------------------------------------------------ managing documents

    def add(self, paths: list[str | os.PathLike], progress: Callable[[dict], None] | None = None) -> list[dict]:
        """Index the files the paths name (folders recurse). Unchanged files (same sha256) are left alone;
        a changed file's chunks are replaced. Each document is committed on its own, in one transaction.
        Returns one report per file: {"path", "status": added|updated|unchanged|failed, "chunks", "error"}."""
        files = find_files(paths)
        embedder = self.embedder
        self.index.check_model(embedder.identity, "adding to")
        self.index.record_model(embedder.identity, {"budget": embedder.passage_budget(), "overlap": self.overlap,
                                                    "max_length": embedder.max_length})
        reports = []
        for path in files:
            try:
                report = self._add_one(path, embedder)
            except LanternError as e:  # one unreadable file does not stop the others
                report = {"path": str(path), "status": "failed", "chunks": 0, "error": str(e)}
            reports.append(report)
            if progress:
                progress(report)
        return reports

    def _add_one(self, path: Path, embedder: Embedder) -> dict:
        sha, _ = file_sha256(path)
        old = self.index.document(path)
        if old is not None and old["sha256"] == sha:
            return {"path": str(path), "status": "unchanged", "chunks": old["chunks"], "error": None}
        doc = read_document(path)
        chunks = chunk_text(doc.text, embedder.tokenizer, embedder.passage_budget(), self.overlap,
                            fits=embedder.passage_fits)
        vectors = embedder.embed_passages([c.text for c in chunks])  # the slow part, outside the transaction
        self.index.replace_document(path, doc.kind, doc.sha256, doc.size, len(doc.text), chunks,
                                    [doc.page_of(c.char_start) for c in chunks], vectors)
        return {"path": str(path), "status": "updated" if old else "added", "chunks": len(chunks), "error": None}

    def remove(self, paths: list[str | os.PathLike]) -> list[str]:
        """Drop the documents at these paths, or under these folders (the files need not exist any more)."""
        targets = [str(Path(p).expanduser().resolve()) for p in paths]
        chosen = [d["path"] for d in self.index.documents()
                  if any(d["path"] == t or d["path"].startswith(t.rstrip(os.sep) + os.sep) for t in targets)]
        if not chosen:
            raise LanternError(f"{', '.join(map(str, paths))}: not in the index {self.index.name!r}")
        self.index.remove_documents(chosen)
        return chosen

    def list(self) -> dict:
        """The index: where it is, its embedding model, and each document with its chunk count."""
        return {"index": self.index.name, "path": str(self.index.path), "embedding_model": self.index.model(),
                **self.index.counts(), "documents": self.index.documents()}

    # ------------------------------------------------------------------ asking

    def search(self, question: str, k: int = 4) -> list[dict]:
        """The k best chunks: text, score (cosine similarity), source file and position, best first."""
        return self.retrieve(question, k)["hits"]

    def retrieve(self, question: str, k: int = 4) -> dict:
        """The question as the embedding model sees it (prefix, tokens) and the chunks found."""
        if not isinstance(question, str) or not question.strip():
            raise LanternError("the question is empty")
        if k < 1:
            raise LanternError(f"k must be at least 1, got {k}")
        if self.index.model() is None or self.index.counts()["documents"] == 0:
            raise LanternError(f"the index {self.index.name!r} has no documents; add some with "
                               "'lantern rag add PATH'")
        embedder = self.embedder
        self.index.check_model(embedder.identity, "searching")
        ids = embedder.query_ids(question)
        tokens = embedder.tokenizer.tokens(ids) if hasattr(embedder.tokenizer, "tokens") else []
        hits = self.index.search(embedder.embed_query(question), k)
        return {"question": question, "embedding_model": embedder.name,
                "query": {"text": embedder.query_prefix + question, "prefix": embedder.query_prefix,
                          "token_ids": ids, "tokens": tokens},
                "hits": hits}

    def build_prompt(self, question: str, hits: list[dict], max_tokens: int | None = None) -> dict:
        """The chat prompt rendered with the chat model's own template, and its token count. Passages that
        would leave no room for the answer in the model's context are dropped, last first."""
        chat = self.chat
        hits = list(hits)
        reserve = max_tokens or ANSWER_RESERVE
        context = getattr(chat, "context", None)
        dropped = 0
        while True:
            messages = prompts.messages(question, hits)
            ids = chat.encode_chat(messages)
            if context is None or len(ids) + reserve <= context or not hits:
                break
            hits.pop()
            dropped += 1
        return {"chat_model": self.chat_name, "messages": messages, "prompt": chat.apply_chat_template(messages),
                "prompt_token_ids": ids, "prompt_tokens": len(ids), "passages": len(hits),
                "dropped_passages": dropped, "sources": prompts.sources(hits)}

    def plan(self, question: str, k: int = 4, max_tokens: int | None = None) -> dict:
        """Everything before the answer, as plain data: retrieval, then the prompt built from its hits."""
        found = self.retrieve(question, k)
        return {"index": self.index.name, **found, **self.build_prompt(question, found["hits"], max_tokens)}

    def answer_stream(self, plan: dict, params=None) -> Iterator:
        """The chat model's answer to a plan's prompt, as Steps (`.text`, `.finish_reason`)."""
        return self.chat.generate_stream(plan["prompt_token_ids"], params)

    def ask(self, question: str, k: int = 4, params=None, show: bool = False) -> dict:
        """Answer in one call: {"answer", "finish_reason", "sources"}, and with show=True every step too."""
        plan = self.plan(question, k, getattr(params, "max_tokens", None))
        pieces, reason = [], None
        for step in self.answer_stream(plan, params):
            pieces.append(step.text)
            reason = step.finish_reason
        result = {"answer": "".join(pieces), "finish_reason": reason, "sources": plan["sources"]}
        return {**plan, **result} if show else result
