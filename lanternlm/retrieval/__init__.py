"""Retrieval: files cut into chunks, embedded, kept in an embedded vector database, and found for a question.

`Rag` is the pipeline (add / remove / list / search / build_prompt / plan / ask); `chunking`, `documents`,
`embedder`, `index` and `prompt` are its parts, one responsibility each.
"""

from .index import RetrievalError
from .prompt import sources_text
from .rag import DEFAULT_EMBEDDING_MODEL, DEFAULT_INDEX, Rag, index_path

__all__ = ["DEFAULT_EMBEDDING_MODEL", "DEFAULT_INDEX", "Rag", "RetrievalError", "index_path", "sources_text"]
