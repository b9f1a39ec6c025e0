"""Log-probabilities in the shapes clients parse: OpenAI's chat shape, its legacy completions shape (parallel
lists, as lm-eval reads them), and vLLM's `prompt_logprobs`. `text` turns a token id into its text."""

from __future__ import annotations

from collections.abc import Callable

Text = Callable[[int], str]


def chat_logprobs(entries, text: Text) -> dict:
    """entries: (token id, logprob, [(id, logprob), ...])."""
    def one(tid, lp):
        t = text(tid)
        return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}
    return {"content": [{**one(tid, lp), "top_logprobs": [one(t, l) for t, l in top]} for tid, lp, top in entries],
            "refusal": None}


def completion_logprobs(entries, offset: int, text: Text) -> dict:
    """OpenAI's legacy shape. entries: (token id, logprob or None, alternatives or None); None marks the
    prompt's first token, which nothing predicts (OpenAI and vLLM report null there). `offset`: where the
    first token's text starts in the choice's text."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, lp, top in entries:
        t = text(tid)
        offsets.append(offset)
        offset += len(t)
        tokens.append(t)
        token_lps.append(lp)
        tops.append(None if top is None else {text(a): l for a, l in top})
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def prompt_entries(ids: list[int], scored: list) -> list[tuple[int, float | None, list | None]]:
    """The engine's prompt logprobs (None, then (logprob, rank, top) per token) as completion entries."""
    return [(tid, None, None) if s is None else (tid, s[0], s[2]) for tid, s in zip(ids, scored)]


def vllm_prompt_logprobs(ids: list[int], scored: list, text: Text) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: per prompt token, null for the first, else {token id: {logprob, rank,
    decoded_token}} for the token itself and its top alternatives."""
    out = []
    for tid, s in zip(ids, scored):
        if s is None:
            out.append(None)
            continue
        lp, rank, top = s
        entry = {str(t): {"logprob": l, "rank": r + 1, "decoded_token": text(t)} for r, (t, l) in enumerate(top)}
        entry[str(tid)] = {"logprob": lp, "rank": rank, "decoded_token": text(tid)}
        out.append(entry)
    return out
