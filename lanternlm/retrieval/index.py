"""The vector database: one SQLite file per index, with sqlite-vec's `vec0` table for the vectors.

Why SQLite: its transactions are what makes `lantern rag add` crash-safe. A document's row, its chunks and
their vectors are written in ONE transaction (`replace_document`), after the slow embedding is done. In WAL
mode a transaction becomes visible only when its commit record reaches the log, so a process killed at any
instant (SIGKILL included) leaves each document either fully present or absent, and the next open rolls
the log back to the last commit. The document row carries its chunk count, so "complete" can be checked.

Python's own `sqlite3` may be built without extension loading; apsw ships its own current SQLite and loads
sqlite-vec's compiled extension (`sqlite_vec.loadable_path()`). `vec0` does exact k-nearest-neighbour
search by cosine distance; its data lives in ordinary shadow tables, inside the same transactions.

Layout: `meta` (the embedding model's name, dimensions and fingerprint; the chunking settings),
`documents` (path, sha256, chunk count), `chunks` (text and position) and `vectors` (rowid = chunk id).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np

from ..errors import LanternError
from .chunking import Chunk

SCHEMA_VERSION = 1
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class RetrievalError(LanternError):
    """An index cannot be opened, or is used with a model it was not built with."""


def _connect(path: Path):
    try:
        import apsw
        import sqlite_vec
    except ImportError as e:
        raise RetrievalError(f"retrieval needs the apsw and sqlite-vec packages ({e.name} is missing): "
                          "pip install apsw sqlite-vec") from None
    try:
        conn = apsw.Connection(str(path))
        conn.enable_load_extension(True)
        conn.load_extension(sqlite_vec.loadable_path())
        conn.enable_load_extension(False)
        conn.set_busy_timeout(10_000)  # another `lantern rag` writing: wait for it rather than fail
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL: a commit survives the process being killed; only a power cut can lose the last
        # commits, and even then the file is consistent.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
    except apsw.Error as e:
        raise RetrievalError(f"{path}: cannot open the index ({type(e).__name__}: {e})") from None
    return conn


class VectorIndex:
    """One named index on disk. Cheap to open; the vectors table is made when the first model is recorded."""

    def __init__(self, path: Path, name: str = "default"):
        self.path = Path(path)
        self.name = name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = _connect(self.path)
        with self.conn:  # one transaction: a half-created index never exists
            self.conn.execute("""
                CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                CREATE TABLE IF NOT EXISTS documents (
                    id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, kind TEXT NOT NULL,
                    sha256 TEXT NOT NULL, size INTEGER NOT NULL, characters INTEGER NOT NULL,
                    chunks INTEGER NOT NULL, added_at REAL NOT NULL);
                CREATE TABLE IF NOT EXISTS chunks (
                    id INTEGER PRIMARY KEY,
                    document_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
                    seq INTEGER NOT NULL, text TEXT NOT NULL, char_start INTEGER NOT NULL,
                    char_end INTEGER NOT NULL, line_start INTEGER NOT NULL, line_end INTEGER NOT NULL,
                    page INTEGER, tokens INTEGER NOT NULL);
                CREATE INDEX IF NOT EXISTS chunks_by_document ON chunks(document_id, seq);
            """)
            version = self.meta().get("schema_version")
            if version is None:
                self._set_meta("schema_version", SCHEMA_VERSION)
            elif version != SCHEMA_VERSION:
                raise RetrievalError(f"{self.path}: index schema version {version}; this Lantern reads version "
                                  f"{SCHEMA_VERSION}")

    def close(self) -> None:
        self.conn.close()

    # ------------------------------------------------------------------ the model the index was built with

    def meta(self) -> dict:
        return {k: json.loads(v) for k, v in self.conn.execute("SELECT key, value FROM meta")}

    def _set_meta(self, key: str, value) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def model(self) -> dict | None:
        """{"name", "dimensions", "fingerprint"} of the embedding model that filled the index, if any."""
        return self.meta().get("embedding_model")

    def check_model(self, identity: dict, doing: str) -> None:
        """Raise unless `identity` is the model the index was built with (same dimensions and fingerprint)."""
        recorded = self.model()
        if recorded is None:
            return
        if recorded["dimensions"] != identity["dimensions"] or recorded["fingerprint"] != identity["fingerprint"]:
            raise RetrievalError(
                f"index {self.name!r} was built with the embedding model {recorded['name']} "
                f"({recorded['dimensions']} dimensions, fingerprint {recorded['fingerprint'][:12]}); "
                f"{doing} it with {identity['name']} ({identity['dimensions']} dimensions, fingerprint "
                f"{identity['fingerprint'][:12]}) would compare unrelated vectors. Use --embedding-model "
                f"{recorded['name']}, or another --index")

    def record_model(self, identity: dict, chunking: dict) -> None:
        """Remember the model (first use only) and create the vectors table of its dimensions."""
        self.check_model(identity, "filling")
        if self.model() is not None:
            return
        with self.conn:
            self._set_meta("embedding_model", identity)
            self._set_meta("chunking", chunking)
            self._set_meta("created_at", time.time())
            self.conn.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS vectors USING "
                              f"vec0(embedding float[{int(identity['dimensions'])}] distance_metric=cosine)")

    # ------------------------------------------------------------------ documents

    def document(self, path: Path) -> dict | None:
        rows = self._documents("WHERE path = ?", (str(path),))
        return rows[0] if rows else None

    def documents(self) -> list[dict]:
        return self._documents("ORDER BY path", ())

    def _documents(self, where: str, args: tuple) -> list[dict]:
        cols = ("id", "path", "kind", "sha256", "size", "characters", "chunks", "added_at")
        return [dict(zip(cols, row)) for row in
                self.conn.execute(f"SELECT {', '.join(cols)} FROM documents {where}", args)]

    def replace_document(self, path: Path, kind: str, sha256: str, size: int, characters: int,
                         chunks: list[Chunk], pages: list[int | None], vectors: np.ndarray) -> None:
        """Write a document, its chunks and their vectors, replacing any earlier version: one transaction."""
        if len(chunks) != len(vectors):
            raise ValueError("one vector per chunk")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        with self.conn:
            self._delete(str(path))
            self.conn.execute("INSERT INTO documents(path, kind, sha256, size, characters, chunks, added_at) "
                              "VALUES (?, ?, ?, ?, ?, ?, ?)",
                              (str(path), kind, sha256, size, characters, len(chunks), time.time()))
            doc_id = self.conn.last_insert_rowid()
            for chunk, page, vector in zip(chunks, pages, vectors):
                self.conn.execute(
                    "INSERT INTO chunks(document_id, seq, text, char_start, char_end, line_start, line_end, page, "
                    "tokens) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (doc_id, chunk.seq, chunk.text, chunk.char_start, chunk.char_end, chunk.line_start,
                     chunk.line_end, page, chunk.tokens))
                self.conn.execute("INSERT INTO vectors(rowid, embedding) VALUES (?, ?)",
                                  (self.conn.last_insert_rowid(), vector.tobytes()))

    def remove_documents(self, paths: list[str]) -> None:
        with self.conn:
            for path in paths:
                self._delete(path)

    def _delete(self, path: str) -> None:
        if self.model() is not None:
            self.conn.execute("DELETE FROM vectors WHERE rowid IN (SELECT c.id FROM chunks c JOIN documents d "
                              "ON c.document_id = d.id WHERE d.path = ?)", (path,))
        self.conn.execute("DELETE FROM documents WHERE path = ?", (path,))  # chunks go by ON DELETE CASCADE

    # ------------------------------------------------------------------ search

    def counts(self) -> dict:
        docs, chunks = self.conn.execute("SELECT count(*), coalesce(sum(chunks), 0) FROM documents").fetchone()
        stored = self.conn.execute("SELECT count(*) FROM chunks").fetchone()[0]
        vectors = self.conn.execute("SELECT count(*) FROM vectors").fetchone()[0] if self.model() else 0
        return {"documents": docs, "chunks": chunks, "chunk_rows": stored, "vectors": vectors}

    def search(self, vector: np.ndarray, k: int) -> list[dict]:
        """The k chunks nearest to `vector` by cosine, best first, with score = cosine similarity."""
        if self.model() is None:
            return []
        k = max(1, min(int(k), 4096))  # vec0's limit on k
        query = np.ascontiguousarray(vector, dtype=np.float32).tobytes()
        rows = self.conn.execute(
            "WITH hits AS (SELECT rowid, distance FROM vectors WHERE embedding MATCH ? AND k = ?) "
            "SELECT c.id, hits.distance, c.text, d.path, c.seq, c.char_start, c.char_end, c.line_start, "
            "c.line_end, c.page, c.tokens FROM hits JOIN chunks c ON c.id = hits.rowid "
            "JOIN documents d ON d.id = c.document_id ORDER BY hits.distance", (query, k)).fetchall()
        return [{"rank": n + 1, "score": round(1.0 - float(dist), 6), "text": text, "source": path, "chunk": seq,
                 "chars": [cs, ce], "lines": [ls, le], "page": page, "tokens": tokens, "id": cid}
                for n, (cid, dist, text, path, seq, cs, ce, ls, le, page, tokens) in enumerate(rows)]
