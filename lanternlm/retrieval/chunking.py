"""Cutting a document's text into overlapping chunks that each fit the embedding model, counted in its tokens.

The text is tokenized once (without special tokens) with character offsets. A chunk is a run of at most
`budget` tokens, where the caller's budget already leaves room for the model's special tokens ([CLS],
[SEP]) and any passage prefix. Within the last half of that run the cut moves back to the best boundary
it can find: a paragraph break, then a line break or a sentence end, then a space, so chunks rarely end
mid-word. The next chunk starts `overlap` tokens before the cut (moved forward to a word start), so a
sentence cut in two is whole in one of them. Each chunk keeps its character span in the text and its
first and last line (1-based).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_OVERLAP = 32


@dataclass(frozen=True)
class Chunk:
    seq: int          # position of the chunk in its document, from 0
    text: str
    char_start: int   # text[char_start:char_end] == self.text
    char_end: int
    line_start: int   # 1-based, inclusive
    line_end: int
    tokens: int       # tokens of the chunk text alone (no special tokens, no prefix)


def token_spans(tokenizer, text: str) -> list[tuple[int, int]]:
    """(start, end) character offsets of each token of `text`, no special tokens added.

    Lantern's Tokenizer wraps a Hugging Face `tokenizers.Tokenizer` (`.backend`), whose offsets point into
    the original text even when the model normalizes (lowercases, strips accents)."""
    backend = getattr(tokenizer, "backend", tokenizer)
    encoding = backend.encode(text, add_special_tokens=False)
    return [(int(s), int(e)) for s, e in encoding.offsets]


def _boundary_strength(text: str, spans: list[tuple[int, int]], j: int) -> int:
    """How good a place it is to end a chunk just before token j: 4 paragraph, 3 line, 2 sentence, 1 word,
    0 inside a word (the gap is the text between token j-1 and token j)."""
    prev_end, start = spans[j - 1][1], spans[j][0]
    gap = text[prev_end:start]
    if "\n\n" in gap:
        return 4
    if "\n" in gap:
        return 3
    if gap and gap.isspace():
        return 2 if text[prev_end - 1:prev_end] in ".!?;:" else 1
    return 0


def chunk_text(text: str, tokenizer, budget: int, overlap: int = DEFAULT_OVERLAP,
               fits: Callable[[str], bool] | None = None) -> list[Chunk]:
    """Chunks of at most `budget` tokens overlapping by about `overlap` tokens.

    `fits(chunk_text)`, when given, is the final word: it re-tokenizes the chunk the way it will be embedded
    (prefix and special tokens included), and a chunk that does not fit (a rare effect of tokenizing a
    slice on its own) is cut a few tokens shorter."""
    if budget < 8:
        raise ValueError(f"chunk budget of {budget} tokens is too small")
    overlap = max(0, min(overlap, budget // 2))
    spans = [s for s in token_spans(tokenizer, text) if s[1] > s[0]]
    newlines = [i for i, c in enumerate(text) if c == "\n"]

    def line_of(char: int) -> int:
        return bisect_right(newlines, char - 1) + 1 if char > 0 else 1

    chunks: list[Chunk] = []
    n, i = len(spans), 0
    while i < n:
        hard_end = min(i + budget, n)
        end = hard_end
        if hard_end < n:  # look back over the second half of the window for the strongest boundary
            best, best_strength = hard_end, -1
            for j in range(hard_end, i + budget // 2, -1):
                strength = _boundary_strength(text, spans, j)
                if strength > best_strength:
                    best, best_strength = j, strength
                    if strength == 4:
                        break
            end = best
        while True:
            start_char, end_char = spans[i][0], spans[end - 1][1]
            piece = text[start_char:end_char]
            if fits is None or fits(piece) or end - i <= 1:
                break
            end = max(i + 1, end - max(2, (end - i) // 16))
        chunks.append(Chunk(len(chunks), piece, start_char, end_char, line_of(start_char), line_of(end_char - 1),
                            end - i))
        if end >= n:
            break
        nxt = max(end - overlap, i + 1)
        while nxt < end and _boundary_strength(text, spans, nxt) == 0:  # start the overlap at a word
            nxt += 1
        i = nxt if nxt < end else max(end - overlap, i + 1)
    return chunks
