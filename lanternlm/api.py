"""The Python API: `LLM(path_or_name)` with generate / chat (and their streaming forms) and the model exposed.

    from lanternlm import LLM, SamplingParams
    llm = LLM("smollm2-135m-instruct")
    print(llm.chat([{"role": "user", "content": "What is the capital of France?"}]).text)

    embedder = LLM("all-minilm-l6-v2")           # an encoder: llm.kind == "embed"
    vectors = embedder.embed(["first text", "second text"])   # list[list[float]], L2-normalised
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from . import embedding
from .chat import ChatTemplate, no_template_error
from .errors import LanternError
from .explain import attention, explain_generate, logit_lens
from .generate import Step, generate
from .loader.load import load
from .sampling import SamplingParams
from .store import catalogue_entry, recommended_generation_config, resolve


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]           # the new tokens only
    finish_reason: str | None
    prompt_token_ids: list[int]
    trace: list[dict] | None = None  # per token, when generate(..., trace=True): see LLM.explain


class LLM:
    """A loaded model with its tokenizer, chat template and generation defaults.

    `kind` is "generate" for decoders (generate, chat, and embed on request) and "embed" for encoders
    (embed only)."""

    def __init__(self, model: str, dtype: str | torch.dtype | None = None, device: str | None = None,
                 context: int | None = None, quantized: bool | None = None):
        """`quantized`: for GGUF files, compute from the quantized weights (default on CPU) or, with False,
        from weights dequantized to `dtype` (the exact reference path)."""
        self.name = str(model)
        self.path = resolve(model)
        loaded = load(self.path, dtype=dtype, device=device, quantized=quantized)
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.config = loaded.config
        # A catalogue name brings the model's recommended sampling settings (as an Ollama Modelfile does).
        self.generation_config = recommended_generation_config(catalogue_entry(model), loaded.generation_config)
        self.device = loaded.device
        self.kind = loaded.kind
        self.context = min(context or loaded.config.max_position_embeddings, loaded.config.max_position_embeddings)
        self.embedding_spec = embedding.spec_for(loaded, self.context)
        self.embedding_max_length = self.embedding_spec.max_length   # tokens per input, special tokens included
        self.embedding_dimensions = self.embedding_spec.dimensions
        self.embedding_prompts = dict(self.embedding_spec.prompts)   # e.g. {"query": "query: ", ...} (E5, BGE)
        self._template = None
        if loaded.chat_template:
            self._template = ChatTemplate(loaded.chat_template, bos_token=self.tokenizer.bos_token,
                                          eos_token=self.tokenizer.eos_token, origin=f"{self.path} chat template")

    # ------------------------------------------------------------------ prompts

    def _need_decoder(self, what: str) -> None:
        if self.kind != "generate":
            raise LanternError(f"{self.name} is an embedding model ({self.config.architecture}): it cannot "
                               f"{what}; use embed()")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        self._need_decoder("chat")
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
        self._need_decoder("generate text")
        return generate(self.model, self.tokenizer, ids, self._params(params), self.context, self.device)

    def generate_stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[Step]:
        return self._run(self.encode(prompt), params)

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                 trace: bool = False) -> Completion:
        """Generate from a text or token ids. trace=True records how each token was chosen (same tokens)."""
        self._need_decoder("generate text")
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

    # ------------------------------------------------------------------ embeddings

    def embed(self, inputs: str | list[str] | list[int] | list[list[int]], normalize: bool | None = None,
              truncate: bool = False, pooling: str | None = None, prompt_name: str | None = None) -> list[list[float]]:
        """One vector per input. Texts are tokenized (with the model's default prompt, if its
        sentence-transformers config names one, or `prompt_name` from `embedding_prompts`); token ids are
        used as given. An input longer than `embedding_max_length` is an error unless truncate=True.
        `normalize` and `pooling` ("mean", "cls", "last") default to the model's (decoders: last, normalised)."""
        batch = embedding.token_lists(inputs, self.tokenizer, self.embedding_spec, truncate, prompt_name)
        return embedding.embed_batch(self.model, self.embedding_spec, batch, pooling, normalize).tolist()

    def embed_ids(self, batch: list[list[int]], normalize: bool | None = None, truncate: bool = False,
                  pooling: str | None = None) -> torch.Tensor:
        """(N, D) float32 embeddings of token-id lists (special tokens as given), in padded sub-batches."""
        if not isinstance(batch, (list, tuple)) or not batch:
            raise embedding.EmbeddingInputError("embed_ids takes a non-empty list of token-id lists")
        if not all(isinstance(ids, (list, tuple)) for ids in batch):
            raise embedding.EmbeddingInputError("embed_ids takes a list of token-id lists")
        checked = [embedding.check_ids(list(ids), self.embedding_spec, truncate, i) for i, ids in enumerate(batch)]
        return embedding.embed_batch(self.model, self.embedding_spec, checked, pooling, normalize)

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
        self._need_decoder("generate text")
        ids = self._prompt(prompt)
        steps = list(explain_generate(self.model, self.tokenizer, ids, self._params(params), self.context, top_k))
        return {"prompt_ids": ids, "prompt_tokens": self.tokenizer.tokens(ids),
                "text": "".join(step.text for step, _ in steps),
                "token_ids": [step.token_id for step, _ in steps],
                "finish_reason": steps[-1][0].finish_reason if steps else None,
                "steps": [trace for _, trace in steps]}

    def logit_lens(self, prompt: str | list[int] | list[dict], position: int = -1, top_k: int = 5) -> dict:
        """What each layer would predict at `position` through the final norm and lm_head."""
        self._need_decoder("predict tokens")
        return logit_lens(self.model, self.tokenizer, self._prompt(prompt), position=position, top_k=top_k)

    def attention(self, prompt: str | list[int] | list[dict], layers: list[int] | None = None,
                  heads: list[int] | None = None) -> dict:
        """Attention weights per layer and head for the prompt."""
        self._need_decoder("show decoder attention")
        return attention(self.model, self.tokenizer, self._prompt(prompt), layers=layers, heads=heads)

    def describe(self) -> dict:
        """Module tree, parameter counts, config, tokenizer and files (what `lantern inspect` prints)."""
        from .inspect import describe
        return describe(self)

    @torch.inference_mode()
    def forward(self, prompt: str | list[int], output_hidden_states: bool = False):
        """Logits (1, T, V) and, on request, every layer's hidden states for a prompt: the seeds' walk."""
        self._need_decoder("compute logits")
        ids = torch.tensor([self.encode(prompt)], device=self.device)
        return self.model(ids, output_hidden_states=output_hidden_states)
