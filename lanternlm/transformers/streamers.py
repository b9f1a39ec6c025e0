"""Streamers for `generate(..., streamer=...)`, with transformers' protocol: generate calls `put(prompt_ids)`
once, then `put(token_ids)` per new token, then `end()`.

Text is released by Lantern's IncrementalDecoder, so a character split across tokens is never shown in halves;
`TextStreamer` prints it as it comes, `TextIteratorStreamer` hands it to another thread through a queue.
"""

from __future__ import annotations

from queue import Queue

import torch

from ..text.tokenizer import IncrementalDecoder
from .errors import refuse_unknown


class BaseStreamer:
    """What generate() calls; subclass and override put / end to receive raw token ids."""

    def put(self, value: torch.Tensor) -> None:
        raise NotImplementedError

    def end(self) -> None:
        raise NotImplementedError


class TextStreamer(BaseStreamer):
    """Prints the text as it is generated (the prompt too, unless skip_prompt=True)."""

    def __init__(self, tokenizer, skip_prompt: bool = False, **decode_kwargs):
        refuse_unknown("TextStreamer", decode_kwargs, {"skip_special_tokens", "clean_up_tokenization_spaces"})
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.skip_special_tokens = bool(decode_kwargs.get("skip_special_tokens", False))
        self._decoder: IncrementalDecoder | None = None

    def put(self, value: torch.Tensor) -> None:
        ids = value.reshape(-1).tolist()
        if self._decoder is None:  # the first put() is the prompt
            prompt = ids if self.skip_prompt else []
            self._decoder = IncrementalDecoder(self.tokenizer.lantern, self.skip_special_tokens, prompt)
            if self.skip_prompt:
                return
        text = "".join(self._decoder.push(i) for i in ids)
        if text:
            self.on_finalized_text(text)

    def end(self) -> None:
        text = self._decoder.flush() if self._decoder is not None else ""
        self._decoder = None
        self.on_finalized_text(text, stream_end=True)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        print(text, flush=True, end="" if not stream_end else None)


class TextIteratorStreamer(TextStreamer):
    """Iterate over the text pieces while generate() runs in another thread:

        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
        Thread(target=model.generate, kwargs=dict(**inputs, streamer=streamer, max_new_tokens=64)).start()
        for piece in streamer: ...
    """

    def __init__(self, tokenizer, skip_prompt: bool = False, timeout: float | None = None, **decode_kwargs):
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.text_queue: Queue = Queue()
        self.timeout = timeout
        self._stop = object()

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.text_queue.put(text, timeout=self.timeout)
        if stream_end:
            self.text_queue.put(self._stop, timeout=self.timeout)

    def __iter__(self):
        return self

    def __next__(self) -> str:
        value = self.text_queue.get(timeout=self.timeout)  # queue.Empty after `timeout` seconds, as transformers
        if value is self._stop:
            raise StopIteration
        return value
