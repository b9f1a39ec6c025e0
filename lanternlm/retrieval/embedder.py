"""The embedding model as retrieval sees it: its identity, its prefixes, its token budget, and batches of vectors.

An index remembers which model filled it by name, dimensions and a fingerprint. The fingerprint is a
sha256 over the model's files: the content of its small files (configs, pooling, tokenizer, prompts) and
the names and sizes of its weights, so a different model, or the same name pointing at different
weights or pooling, is recognised without hashing hundreds of megabytes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ..errors import LanternError

SMALL_FILE = 1 << 20     # files up to this size are hashed by content, larger ones by name and size
BATCH = 32               # passages embedded per forward


def model_fingerprint(path: Path) -> str:
    """sha256 over a model folder's (or file's) small files' contents and big files' names and sizes."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                                                                            p.relative_to(path).parts)) \
        if path.is_dir() else [path]
    for file in files:
        name = file.relative_to(path).as_posix() if path.is_dir() else file.name
        size = file.stat().st_size
        if name.endswith(".md"):
            continue  # a model card does not change the vectors
        digest.update(f"{name}\0{size}\0".encode())
        if size <= SMALL_FILE and file.suffix in (".json", ".txt", ".jinja", ".model"):
            digest.update(file.read_bytes())
    return digest.hexdigest()


class Embedder:
    """Wraps an embedding `LLM` (kind "embed"): passages and queries to float32 vectors, with the model's
    query/passage prefixes, and the token budget a chunk may use."""

    def __init__(self, llm, name: str):
        kind = getattr(llm, "kind", "embed")
        if kind != "embed":
            raise LanternError(f"{name} is a {kind} model, not an embedding model; give an embedding model "
                               "such as all-minilm-l6-v2")
        self.llm = llm
        self.name = name
        self.tokenizer = llm.tokenizer
        self.max_length = int(llm.embedding_max_length)
        self.dimensions = int(llm.embedding_dimensions)
        prompts = dict(getattr(llm, "embedding_prompts", None) or {})
        # sentence-transformers names them freely; E5 uses query/passage, others query/document
        self.query_prefix = prompts.get("query", "")
        self.passage_prefix = prompts.get("passage", prompts.get("document", ""))
        fingerprint = getattr(llm, "fingerprint", None)
        self.fingerprint = fingerprint if isinstance(fingerprint, str) else model_fingerprint(llm.path)
        self.special_tokens = len(self.tokenizer.encode("", add_special_tokens=True))

    @property
    def identity(self) -> dict:
        return {"name": self.name, "dimensions": self.dimensions, "fingerprint": self.fingerprint}

    def passage_budget(self) -> int:
        """Tokens a chunk's own text may use: the maximum less the special tokens and the passage prefix."""
        prefix = len(self.tokenizer.encode(self.passage_prefix, add_special_tokens=False)) if self.passage_prefix \
            else 0
        return self.max_length - self.special_tokens - prefix

    def passage_fits(self, text: str) -> bool:
        return len(self.ids(text, self.passage_prefix)) <= self.max_length

    def ids(self, text: str, prefix: str) -> list[int]:
        """The exact tokens embedded: prefix + text with the model's special tokens. Lantern tokenizes here
        and hands ids to the model, so a model's default prompt is never added on top of this prefix."""
        return self.tokenizer.encode(prefix + text, add_special_tokens=True)

    def embed_passages(self, texts: list[str]) -> np.ndarray:
        """(N, D) float32, prefixed as the model wants passages."""
        out = np.zeros((len(texts), self.dimensions), dtype=np.float32)
        for at in range(0, len(texts), BATCH):
            batch = [self.ids(t, self.passage_prefix) for t in texts[at:at + BATCH]]
            out[at:at + len(batch)] = self.llm.embed_ids(batch).float().cpu().numpy()
        return out

    def query_ids(self, question: str) -> list[int]:
        ids = self.ids(question, self.query_prefix)
        if len(ids) > self.max_length:
            raise LanternError(f"the question is {len(ids)} tokens long; the embedding model {self.name} takes at "
                               f"most {self.max_length} (special tokens and prefix included): shorten it")
        return ids

    def embed_query(self, question: str) -> np.ndarray:
        """(D,) float32, prefixed as the model wants queries."""
        return self.llm.embed_ids([self.query_ids(question)]).float().cpu().numpy()[0]
