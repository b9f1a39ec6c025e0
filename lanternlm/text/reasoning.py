"""Keep a reasoning model's thinking apart from its answer: find the thinking format in the chat template, tell
whether the prompt leaves the model inside a thought, and split the generated text (streamed or whole) into
reasoning and content.

Reasoning models (Qwen3, QwQ, the DeepSeek-R1 distills, SmolLM3, ...) write ``<think>thoughts</think>`` and then
the answer. Some templates open the thought themselves (DeepSeek-R1's generation prompt ends with ``<think>\\n``),
so the model's output then starts inside it and only the closing tag appears.

The splitter holds back text that may still turn into a tag, as a stop-string matcher does, so neither part ever
shows a tag or a piece of one, and the split is the same however the text is cut into pieces.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ThinkFormat:
    """The tags around a model's thinking."""

    open: str = "<think>"
    close: str = "</think>"


THINK_TAGS = ThinkFormat()


def detect_thinking(template_source: str | None) -> ThinkFormat | None:
    """The thinking format of a chat template, or None for a model that does not think in tags.

    The sign is the closing tag: every thinking template mentions it, to strip past thoughts from the history
    (the first DeepSeek-R1 template has nothing else: the model writes the opening tag itself) or to render an
    empty thought when thinking is turned off. A template that mentions it without the model thinking costs
    nothing: output that does not start with the opening tag stays content.
    """
    if template_source and THINK_TAGS.close in template_source:
        return THINK_TAGS
    return None


def starts_inside(fmt: ThinkFormat, prompt_text: str) -> bool:
    """Whether the rendered prompt leaves the model inside an open thought.

    True when the prompt ends, but for whitespace, with the opening tag (DeepSeek-R1 and QwQ end their generation
    prompt with ``<think>\\n``). An opening tag earlier in the prompt does not count, even with no closing tag
    after it: it can only be text of a message (a user asking about ``<think>``), never the model's open thought.
    Qwen3 with thinking turned off ends with ``<think>\\n\\n</think>\\n\\n``: False.
    """
    return prompt_text.rstrip().endswith(fmt.open)


# The splitter's states, in the order text moves through them.
_START = "start"  # before the output's first non-whitespace text: an opening tag may still come
_THINK_LEAD = "think_lead"  # just inside the thought: whitespace here is not part of the reasoning
_THINK = "think"  # inside the thought
_AFTER = "after"  # just after the closing tag: whitespace here is not part of the content
_CONTENT = "content"  # the answer, to the end


class ReasoningSplitter:
    """Splits streamed model output into (reasoning, content) deltas.

    Not inside at the start: output that begins, after optional whitespace, with the opening tag is thinking up to
    the closing tag, and everything after it is content; output that begins otherwise is all content, verbatim.
    Inside at the start: everything up to the closing tag is thinking (an opening tag the model writes again at
    the start is dropped). A thought that never closes (cut by max_tokens) stays reasoning.

    Tags never appear in either part. Reasoning carries no leading or trailing whitespace (the newlines that
    models put inside the tags), and whitespace right after the closing tag is not put at content's start.
    The concatenated deltas of any split of a text into pieces, flush included, are the same.
    """

    def __init__(self, fmt: ThinkFormat, inside: bool):
        if not fmt.open or not fmt.close:
            raise ValueError("a thinking format needs non-empty opening and closing tags")
        self.fmt = fmt
        self.inside = inside
        self._state = _START
        self._held = ""  # text received but not yet given out: it may still become (part of) a tag

    def push(self, text: str) -> tuple[str, str]:
        """The (reasoning, content) deltas that `text`, the next piece of output, makes certain."""
        self._held += text
        reasoning, content = [], []
        while self._held:
            if self._state == _START:
                if not self._start():
                    break
            elif self._state == _THINK_LEAD:
                self._held = self._held.lstrip()
                if self._held:
                    self._state = _THINK
            elif self._state == _THINK:
                reasoning.append(self._think())
                if self._state == _THINK:
                    break  # the rest may be the closing tag or whitespace before it: wait for more text
            elif self._state == _AFTER:
                self._held = self._held.lstrip()
                if self._held:
                    self._state = _CONTENT
            else:
                content.append(self._held)
                self._held = ""
        return "".join(reasoning), "".join(content)

    def flush(self) -> tuple[str, str]:
        """The deltas for the text still held back, at the end of the output."""
        held, self._held = self._held, ""
        if self._state == _START and not self.inside:
            return "", held  # a few spaces or the start of an opening tag, then the end: that was the answer
        if self._state == _START:  # inside from the start, and cut short before any reasoning was certain
            return held.strip(), ""
        if self._state == _THINK:  # a thought cut short: what was written stays reasoning, even half a tag
            return held.rstrip(), ""
        return "", ""  # whitespace just inside or just after the thought

    def _start(self) -> bool:
        """Leave the start state if the held text decides how the output begins; False to wait for more."""
        text = self._held.lstrip()
        if text.startswith(self.fmt.open):
            self._held = text[len(self.fmt.open):]
            self._state = _THINK_LEAD
            return True
        if not text or self.fmt.open.startswith(text):
            return False  # only whitespace, or the start of an opening tag, so far
        if self.inside:
            self._held = text
            self._state = _THINK
        else:
            self._state = _CONTENT  # the answer keeps its leading whitespace
        return True

    def _think(self) -> str:
        """The reasoning the held text makes certain; moves past the closing tag if it is there."""
        held, close = self._held, self.fmt.close
        end = held.find(close)
        if end >= 0:
            self._held = held[end + len(close):]
            self._state = _AFTER
            return held[:end].rstrip()  # the newline before the closing tag is not reasoning
        # Hold the longest end that could start the closing tag, and the whitespace before it: that whitespace is
        # reasoning only if more reasoning follows it.
        keep = next((n for n in range(min(len(held), len(close) - 1), 0, -1) if held.endswith(close[:n])), 0)
        certain = held[:len(held) - keep].rstrip()
        self._held = held[len(certain):]
        return certain


def split_reasoning(fmt: ThinkFormat, text: str, inside: bool) -> tuple[str | None, str]:
    """The reasoning (None when the output has none) and the content of a whole output."""
    splitter = ReasoningSplitter(fmt, inside)
    reasoning, content = splitter.push(text)
    more_reasoning, more_content = splitter.flush()
    reasoning += more_reasoning
    return reasoning or None, content + more_content
