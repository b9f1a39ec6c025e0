"""The Python API: `LLM(path_or_name)` with generate / chat (and their streaming forms) and the model exposed.

    from lanternlm import LLM, SamplingParams
    llm = LLM("smollm2-135m-instruct")
    print(llm.chat([{"role": "user", "content": "What is the capital of France?"}]).text)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .chat import ChatTemplate, no_template_error
from .errors import LanternError
from .explain import attention, explain_generate, logit_lens
from .generate import Step, generate
from .loader.load import load
from .sampling import SamplingParams
from .store import resolve


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]           # the new tokens only
    finish_reason: str | None
    prompt_token_ids: list[int]
    trace: list[dict] | None = None  # per token, when generate(..., trace=True): see LLM.explain


class LLM:
    """A loaded model with its tokenizer, chat template and generation defaults."""

    def __init__(self, model: str, dtype: str | torch.dtype | None = None, device: str | None = None,
                 context: int | None = None, quantized: bool | None = None):
        """`quantized`: for GGUF files, compute from the quantized weights (default on CPU) or, with False,
        from weights dequantized to `dtype` (the exact reference path)."""
        self.path = resolve(model)
        loaded = load(self.path, dtype=dtype, device=device, quantized=quantized)
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.config = loaded.config
        self.generation_config = loaded.generation_config
        self.device = loaded.device
        self.context = min(context or loaded.config.max_position_embeddings, loaded.config.max_position_embeddings)
        self._template = None
        if loaded.chat_template:
            self._template = ChatTemplate(loaded.chat_template, bos_token=self.tokenizer.bos_token,
                                          eos_token=self.tokenizer.eos_token, origin=f"{self.path} chat template")

    # ------------------------------------------------------------------ prompts

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        if self._template is None:
            raise no_template_error(str(self.path))
        return self._template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        # The template writes the BOS itself when the model wants one, so no special tokens are added here,
        # as transformers' apply_chat_template(tokenize=True) does.
        return self.tokenizer.encode(self.apply_chat_template(messages, add_generation_prompt),
                                     add_special_tokens=False)

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        ids = list(prompt)
        vocab = self.config.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise LanternError(f"token id {bad[0]!r} is outside the vocabulary (0..{vocab - 1})")
        return ids

    # ------------------------------------------------------------------ generation

    def _params(self, params: SamplingParams | None) -> SamplingParams:
        return (params or SamplingParams()).with_defaults(self.generation_config)

    def _run(self, ids: list[int], params: SamplingParams | None) -> Iterator[Step]:
        return generate(self.model, self.tokenizer, ids, self._params(params), self.context, self.device)

    def generate_stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[Step]:
        return self._run(self.encode(prompt), params)

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                 trace: bool = False) -> Completion:
        """Generate from a text or token ids. trace=True records how each token was chosen (same tokens)."""
        ids = self.encode(prompt)
        if trace:
            found = self.explain(ids, params)
            return Completion(found["text"], found["token_ids"], found["finish_reason"], ids, found["steps"])
        return self._collect(ids, self._run(ids, params))

    def chat_stream(self, messages: list[dict], params: SamplingParams | None = None) -> Iterator[Step]:
        return self._run(self.encode_chat(messages), params)

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> Completion:
        ids = self.encode_chat(messages)
        return self._collect(ids, self._run(ids, params))

    @staticmethod
    def _collect(prompt_ids: list[int], steps: Iterator[Step]) -> Completion:
        text, ids, reason = [], [], None
        for step in steps:
            text.append(step.text)
            ids.append(step.token_id)
            reason = step.finish_reason
        return Completion("".join(text), ids, reason, prompt_ids)

    # ------------------------------------------------------------------ looking inside

    def _prompt(self, prompt: str | list[int] | list[dict]) -> list[int]:
        """A text, token ids, or chat messages (a list of dicts, rendered with the model's template)."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            return self.encode_chat(prompt)
        return self.encode(prompt)

    def explain(self, prompt: str | list[int] | list[dict], params: SamplingParams | None = None,
                top_k: int = 5) -> dict:
        """Generate with a trace of every token: candidates, each sampling stage, the choice and the draw.
        Plain data (json-serialisable). Messages (a list of dicts) go through the chat template."""
        ids = self._prompt(prompt)
        steps = list(explain_generate(self.model, self.tokenizer, ids, self._params(params), self.context, top_k))
        return {"prompt_ids": ids, "prompt_tokens": self.tokenizer.tokens(ids),
                "text": "".join(step.text for step, _ in steps),
                "token_ids": [step.token_id for step, _ in steps],
                "finish_reason": steps[-1][0].finish_reason if steps else None,
                "steps": [trace for _, trace in steps]}

    def logit_lens(self, prompt: str | list[int] | list[dict], position: int = -1, top_k: int = 5) -> dict:
        """What each layer would predict at `position` through the final norm and lm_head."""
        return logit_lens(self.model, self.tokenizer, self._prompt(prompt), position=position, top_k=top_k)

    def attention(self, prompt: str | list[int] | list[dict], layers: list[int] | None = None,
                  heads: list[int] | None = None) -> dict:
        """Attention weights per layer and head for the prompt."""
        return attention(self.model, self.tokenizer, self._prompt(prompt), layers=layers, heads=heads)

    def describe(self) -> dict:
        """Module tree, parameter counts, config, tokenizer and files (what `lantern inspect` prints)."""
        from .inspect import describe
        return describe(self)

    @torch.inference_mode()
    def forward(self, prompt: str | list[int], output_hidden_states: bool = False):
        """Logits (1, T, V) and, on request, every layer's hidden states for a prompt: the seeds' walk."""
        ids = torch.tensor([self.encode(prompt)], device=self.device)
        return self.model(ids, output_hidden_states=output_hidden_states)
