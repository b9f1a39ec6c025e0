"""The retrieval prompt and the sources list: numbered passages, then the question, in one user message.

One user message works with every chat template (some, such as Gemma's, have no system role). The
passages are numbered [1], [2], ... by rank ([1] scored best) and written best LAST, right before the
question: a small model leans on what it read most recently, and with the best passage first SmolLM2-135M
answered from the weaker passage below it. The sources list that Lantern prints after the answer uses the
same numbers, so a reader can check the answer against the passages without relying on the model to cite.
"""

from __future__ import annotations

from pathlib import Path

INSTRUCTION = ("Answer the question using only the numbered passages below. If they do not contain the answer, "
               "say that you do not know.")


def position(hit: dict) -> str:
    """'lines 3-9' (and the page, for a PDF), the way a person finds the place in the file."""
    a, b = hit["lines"]
    where = f"line {a}" if a == b else f"lines {a}-{b}"
    return f"page {hit['page']}, {where}" if hit.get("page") else where


def messages(question: str, hits: list[dict]) -> list[dict]:
    """The chat messages: instruction, numbered passages (best last) with their file names, then the question."""
    numbered = list(enumerate(hits, 1))[::-1]  # best last, nearest the question
    passages = "\n\n".join(f"[{n}] (from {Path(hit['source']).name}, {position(hit)})\n{hit['text'].strip()}"
                           for n, hit in numbered)
    body = f"{INSTRUCTION}\n\n{passages}\n\nQuestion: {question.strip()}" if hits else \
        f"No passages were found.\n\nQuestion: {question.strip()}"
    return [{"role": "user", "content": body}]


def sources(hits: list[dict]) -> list[dict]:
    """One entry per passage given to the model: its number, file, position and score."""
    return [{"n": n, "source": hit["source"], "position": position(hit), "lines": hit["lines"],
             "chars": hit["chars"], "page": hit.get("page"), "score": hit["score"]}
            for n, hit in enumerate(hits, 1)]


def sources_text(entries: list[dict]) -> str:
    """The list Lantern prints after the answer: `[1] /path/file.md, lines 3-9 (chars 120-640)`."""
    return "\n".join(f"[{s['n']}] {s['source']}, {s['position']} (chars {s['chars'][0]}-{s['chars'][1]}, "
                     f"score {s['score']:.3f})" for s in entries)
