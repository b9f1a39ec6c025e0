"""The Python API: `LLM(path_or_name)` with generate / chat (and their streaming forms) and the model exposed.

    from lanternlm import LLM, SamplingParams
    llm = LLM("smollm2-135m-instruct")
    print(llm.chat([{"role": "user", "content": "What is the capital of France?"}]).text)

    reply = llm.chat(messages, response_format={"type": "json_schema", "json_schema": {"schema": schema}})
    reply.message            # {"role": "assistant", "content": '{"city": "Paris"}'}: always valid when it stops
    reply = llm.chat(messages, tools=[...], tool_choice="required")
    reply.message["tool_calls"]                  # OpenAI-shaped calls, parsed from the model's own format

    embedder = LLM("all-minilm-l6-v2")           # an encoder: llm.kind == "embed"
    vectors = embedder.embed(["first text", "second text"])   # list[list[float]], L2-normalised

    llm = LLM("smollm2-135m-instruct", tensor_parallel=2)    # split over 2 processes this one starts
    ...
    llm.close()                                  # stops them (also done when the LLM is collected, or at exit)
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from . import embedding
from .distributed import launch
from .distributed.driver import Driver, serve_forwards
from .distributed.plan import Shard, plan_shards
from .errors import LanternError
from .explain import attention, explain_generate, logit_lens
from .generation.chat_plan import ChatOptions, ChatPlan, plan_chat
from .generation.generate import Step, generate
from .generation.grammar import GrammarCompiler
from .generation.guide import GuideSpec
from .generation.sampling import SamplingParams
from .load import LoadedModel, load, pick_device, read_config
from .store import catalogue_entry, recommended_generation_config, resolve
from .text.chat import ChatTemplate, no_template_error
from .text.constraint import GrammarSpec
from .text.reasoning import ThinkFormat, detect_thinking, starts_inside


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]           # the new tokens only
    finish_reason: str | None
    prompt_token_ids: list[int]
    trace: list[dict] | None = None  # per token, when generate(..., trace=True): see LLM.explain
    # chat(): the assistant message as OpenAI shapes it (content, reasoning_content, tool_calls); finish_reason
    # is then "tool_calls" when the model called a tool.
    message: dict | None = None


class LLM:
    """A loaded model with its tokenizer, chat template and generation defaults.

    `kind` is "generate" for decoders (generate, chat, and embed on request) and "embed" for encoders
    (embed only)."""

    def __init__(self, model: str, dtype: str | torch.dtype | None = None, device: str | None = None,
                 context: int | None = None, exact: bool | None = None, quantize: str | None = None,
                 kv_dtype: torch.dtype | None = None, tensor_parallel: int = 1, threads: int | None = None):
        """`exact`: True computes from weights dequantized (GGUF) or widened (HF folder) to `dtype`, the
        reference path; by default on CPU, the fast path computes from the weights as stored (a GGUF's blocks,
        an HF folder's bf16/fp16 matrices). `quantize` ("q8_0", "q4_0", "q4_1"): quantize an HF folder's (or an
        F16/BF16 GGUF's) weights to those blocks at load. `kv_dtype`: how keys and values are stored (default:
        bfloat16 on the fast path, the model's dtype on the exact one).
        `tensor_parallel` N > 1: split the model over N ranks (distributed/): this process is rank 0 and starts
        the other N - 1 itself (spawned: a script needs the `if __name__ == "__main__":` guard), or, under
        torchrun, joins the group torchrun formed (other ranks call `serve_rank`). `threads`: CPU threads for the compute (with tensor_parallel: per rank; default: PyTorch's
        count, or the host's cores split between its ranks)."""
        self.name = str(model)
        self.path = resolve(model)
        self.ranks: launch.Ranks | None = None
        if tensor_parallel == 1:
            if threads is not None:  # before the load: the kernels' split and threads started later follow it
                torch.set_num_threads(threads)
            loaded = load(self.path, dtype=dtype, device=device, exact=exact, quantize=quantize)
            self.model = loaded.model
        else:
            self.ranks, loaded, self.model = RankSource(self.path, dtype, device, exact, quantize).open(
                tensor_parallel, threads)
        # Stops the other ranks once: close(), this object collected, or the interpreter's exit.
        self._close = weakref.finalize(self, _stop_ranks, self.model if self.ranks else None, self.ranks)
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.config = loaded.config
        # A catalogue name brings the model's recommended sampling settings (as an Ollama Modelfile does).
        self.generation_config = recommended_generation_config(catalogue_entry(model), loaded.generation_config)
        self.device = loaded.device
        self.kind = loaded.kind
        if kv_dtype is not None and kv_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise LanternError(f"kv_dtype must be float32, bfloat16 or float16, got {kv_dtype}")
        self.kv_dtype = kv_dtype or (loaded.model.dtype if loaded.exact else torch.bfloat16)
        self.context = min(context or loaded.config.max_position_embeddings, loaded.config.max_position_embeddings)
        self.embedding_spec = embedding.spec_for(loaded, self.context)
        self.embedding_max_length = self.embedding_spec.max_length   # tokens per input, special tokens included
        self.embedding_dimensions = self.embedding_spec.dimensions
        self.embedding_prompts = dict(self.embedding_spec.prompts)   # e.g. {"query": "query: ", ...} (E5, BGE)
        self._template = None
        if loaded.chat_template:
            self._template = ChatTemplate(loaded.chat_template, bos_token=self.tokenizer.bos_token,
                                          eos_token=self.tokenizer.eos_token, origin=f"{self.path} chat template")
        # How the model thinks, if its template has it think in tags (Qwen3, DeepSeek-R1 distills, ...).
        self.thinking: ThinkFormat | None = detect_thinking(loaded.chat_template) if self.kind == "generate" else None
        self._grammars: GrammarCompiler | None = None
        self._grammars_lock = threading.Lock()

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (nothing to do without them). The LLM cannot generate after it."""
        self._close()

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

    @property
    def grammars(self) -> GrammarCompiler:
        """Compiles (and caches) grammars for this model's vocabulary; made on first use."""
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = GrammarCompiler(self.tokenizer, self.config.vocab_size)
            return self._grammars

    def plan_chat(self, messages: list[dict], options: ChatOptions | None = None) -> ChatPlan:
        """The prompt and output constraint for a chat request (tools, response_format, thinking)."""
        self._need_decoder("chat")
        if self._template is None:
            raise no_template_error(str(self.path))
        return plan_chat(self._template, self.tokenizer, self.grammars, messages, options or ChatOptions())

    def thinking_starts_inside(self, prompt_ids: list[int]) -> bool:
        """Whether this prompt leaves the model inside an open thought (its template opened one)."""
        return self.thinking is not None and starts_inside(
            self.thinking, self.tokenizer.decode(prompt_ids, skip_special_tokens=False))

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

    def _run(self, ids: list[int], params: SamplingParams | None, guide: GuideSpec | None = None,
             trace_top_k: int | None = None) -> Iterator[Step]:
        self._need_decoder("generate text")
        return generate(self.model, self.tokenizer, ids, self._params(params), self.context, self.device, guide,
                        trace_top_k, self.kv_dtype)

    def guide_for(self, grammar: GrammarSpec | None) -> GuideSpec | None:
        """The guide that holds a plain generation to `grammar` (compiled once, cached)."""
        return None if grammar is None else GuideSpec(self.grammars.compile(grammar))

    def stream_ids(self, ids: list[int], params: SamplingParams | None = None,
                   guide: GuideSpec | None = None) -> Iterator[Step]:
        """Steps generated after the token ids `ids`, under `guide` (see plan_chat / guide_for)."""
        return self._run(self.encode(ids), params, guide)

    def generate_stream(self, prompt: str | list[int], params: SamplingParams | None = None,
                        grammar: GrammarSpec | None = None) -> Iterator[Step]:
        return self._run(self.encode(prompt), params, self.guide_for(grammar))

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None, trace: bool = False,
                 grammar: GrammarSpec | None = None) -> Completion:
        """Generate from a text or token ids. trace=True records how each token was chosen (same tokens);
        `grammar` (GrammarSpec.json_schema / regex / lark) constrains the output."""
        self._need_decoder("generate text")
        ids = self.encode(prompt)
        return self._collect(ids, self._run(ids, params, self.guide_for(grammar), 5 if trace else None), trace)

    def chat_stream(self, messages: list[dict], params: SamplingParams | None = None,
                    options: ChatOptions | None = None) -> Iterator[Step]:
        """Raw steps of a chat reply (thinking and tool-call text included; `plan_chat(...).reader()` splits
        them)."""
        plan = self.plan_chat(messages, options)
        return self._run(plan.prompt_ids, plan.sampling(params or SamplingParams()), plan.guide)

    def chat(self, messages: list[dict], params: SamplingParams | None = None, *, tools: list[dict] | None = None,
             tool_choice=None, parallel_tool_calls: bool = True, response_format: dict | None = None,
             grammar: GrammarSpec | None = None, chat_template_kwargs: dict | None = None,
             thinking_token_budget: int | None = None, trace: bool = False) -> Completion:
        """One chat reply. The arguments after `params` are OpenAI's (and Lantern's `grammar` and
        `thinking_token_budget`); `Completion.message` holds the reply as OpenAI shapes it."""
        plan = self.plan_chat(messages, ChatOptions(
            tools=tools, tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls,
            response_format=response_format, grammar=grammar, chat_template_kwargs=chat_template_kwargs,
            thinking_token_budget=thinking_token_budget))
        done = self._collect(plan.prompt_ids, self._run(plan.prompt_ids, plan.sampling(params or SamplingParams()),
                                                        plan.guide, 5 if trace else None), trace)
        message, reason = plan.message(done.text, done.finish_reason)
        return Completion(done.text, done.token_ids, reason, done.prompt_token_ids, done.trace, message)

    @staticmethod
    def _collect(prompt_ids: list[int], steps: Iterator[Step], trace: bool = False) -> Completion:
        text, ids, reason, traces = [], [], None, []
        for i, step in enumerate(steps):
            text.append(step.text)
            ids.append(step.token_id)
            reason = step.finish_reason
            if trace:
                traces.append({"index": i, "position": len(prompt_ids) + i, "text": step.text,
                               "finish_reason": step.finish_reason, **step.trace})
        return Completion("".join(text), ids, reason, prompt_ids, traces if trace else None)

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
        steps = list(explain_generate(self.model, self.tokenizer, ids, self._params(params), self.context, top_k,
                                      kv_dtype=self.kv_dtype))
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


# ---------------------------------------------------------------------- tensor parallelism


@dataclass(frozen=True)
class RankSource:
    """What every rank loads its shard from (picklable: spawned ranks get it), and a worker rank's whole life."""

    path: Path
    dtype: str | torch.dtype | None
    device: str | None
    exact: bool | None
    quantize: str | None

    def open(self, world: int, threads: int | None) -> tuple[launch.Ranks, LoadedModel, Driver]:
        """As rank 0: check the split, start (or join) the ranks, load this rank's shard and drive it."""
        if world < 1:
            raise LanternError(f"tensor parallelism needs at least 1 rank, got {world}")
        plan_shards(read_config(self.path), 0, world)  # too many ranks for the model: refused before any starts
        ranks = launch.start(world, pick_device(self.device), threads, self)
        if ranks.rank != 0:
            raise LanternError(f"this process is rank {ranks.rank} of a torchrun launch: serve_rank() runs it")
        try:
            loaded = self.load(ranks)
            return ranks, loaded, Driver(loaded.model, ranks)
        except BaseException:
            ranks.close()  # the workers see rank 0 go and exit
            raise

    def load(self, ranks: launch.Ranks) -> LoadedModel:
        config = read_config(self.path)
        shard = Shard(plan_shards(config, ranks.rank, ranks.world), ranks.group)
        return load(self.path, dtype=self.dtype, device=ranks.device, exact=self.exact, quantize=self.quantize,
                    shard=shard)

    def __call__(self, ranks: launch.Ranks) -> None:
        """A worker rank: load its shard, then run rank 0's forwards until rank 0 stops."""
        serve_forwards(self.load(ranks).model, ranks)


def serve_rank(model: str, tensor_parallel: int, dtype: str | torch.dtype | None = None, device: str | None = None,
               exact: bool | None = None, quantize: str | None = None, threads: int | None = None) -> None:
    """Under torchrun, on a rank other than 0: join the group, load this rank's shard and run rank 0's forwards
    until rank 0 stops (returns) or goes away (TensorParallelError). Rank 0 runs `LLM(..., tensor_parallel=N)`
    with the same model and options."""
    source = RankSource(resolve(model), dtype, device, exact, quantize)
    ranks = launch.start(tensor_parallel, pick_device(device), threads, source)
    try:
        source(ranks)
    finally:
        ranks.close()


def _stop_ranks(driver: Driver | None, ranks: launch.Ranks | None) -> None:
    if ranks is not None:
        ranks.close(grace=launch.STOP_TIMEOUT if driver.stop() else 0)
