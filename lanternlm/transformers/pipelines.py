"""`pipeline("text-generation", ...)` and `pipeline("feature-extraction", ...)`, shaped as transformers'.

Text generation takes a string, chat messages, or a list of either, and returns per input
`[{"generated_text": ...}]`: the prompt plus the new text (return_full_text=True, the default), the new text
alone, or for messages the conversation with the assistant's reply appended. It tokenizes and decodes with the
tokenizer and generates with `model.generate`, so its defaults are transformers' pipeline defaults
(max_new_tokens 256, do_sample True) under the model's generation_config.json and the caller's arguments.
"""

from __future__ import annotations

from .auto import AutoModel, AutoModelForCausalLM, AutoTokenizer
from .errors import UnsupportedArgumentError, refuse_unknown
from .generation import SETTINGS
from .loading import MODEL_OPTIONS
from .modeling import LanternForCausalLM
from .tokenizer import PreTrainedTokenizerFast

TASKS = ("text-generation", "feature-extraction")
PIPELINE_DEFAULTS = {"max_new_tokens": 256, "do_sample": True}  # transformers' text-generation pipeline
CALL_OPTIONS = {"return_full_text", "return_tensors", "return_text", "skip_special_tokens",
                "clean_up_tokenization_spaces", "add_special_tokens", "prefix", "continue_final_message"}


def _is_chat(value) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and isinstance(value[0], dict)


class TextGenerationPipeline:
    task = "text-generation"

    def __init__(self, model: LanternForCausalLM, tokenizer: PreTrainedTokenizerFast, options: dict):
        self.model, self.tokenizer = model, tokenizer
        written = model.llm.loaded.generation_config if model.llm.loaded.format == "hf" else {}
        defaults = {k: v for k, v in PIPELINE_DEFAULTS.items() if k not in written}
        if tokenizer.pad_token_id is not None:
            defaults["pad_token_id"] = tokenizer.pad_token_id
        self._options = {**defaults, **options}

    def __call__(self, text_inputs, **options):
        refuse_unknown("pipeline call", options, set(SETTINGS) | CALL_OPTIONS)
        options = {**self._options, **options}
        if isinstance(text_inputs, str) or _is_chat(text_inputs):
            return self._one(text_inputs, options)
        return [self._one(item, options) for item in text_inputs]

    def _one(self, prompt, options: dict) -> list[dict]:
        # A chat ending in an assistant message is a prefill to continue, as transformers treats it.
        continuing = options.get("continue_final_message")
        if continuing is None:
            continuing = _is_chat(prompt) and prompt[-1].get("role") == "assistant"
        if _is_chat(prompt):
            inputs = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=not continuing,
                                                        continue_final_message=continuing, return_tensors="pt",
                                                        return_dict=True)
        else:
            text = options.get("prefix", "") + prompt
            inputs = self.tokenizer(text, return_tensors="pt", add_special_tokens=options.get("add_special_tokens",
                                                                                              True))
        generate = {k: v for k, v in options.items() if k in SETTINGS}
        sequence = self.model.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"], **generate)[0]
        if options.get("return_tensors"):
            return [{"generated_token_ids": sequence.tolist()}]
        new = self.tokenizer.decode(sequence[inputs["input_ids"].shape[1]:],
                                    skip_special_tokens=options.get("skip_special_tokens", True))
        if not options.get("return_full_text", True):
            return [{"generated_text": new}]
        if _is_chat(prompt) and continuing:
            return [{"generated_text": [*prompt[:-1], {**prompt[-1], "content": prompt[-1]["content"] + new}]}]
        if _is_chat(prompt):
            return [{"generated_text": [*prompt, {"role": "assistant", "content": new}]}]
        return [{"generated_text": prompt + new}]


class FeatureExtractionPipeline:
    """Per-token hidden states: for a text, a (1, T, C) nested list (a tensor with return_tensors=True)."""

    task = "feature-extraction"

    def __init__(self, model, tokenizer: PreTrainedTokenizerFast, options: dict):
        refuse_unknown("pipeline", options, {"return_tensors"})
        self.model, self.tokenizer, self._options = model, tokenizer, options

    def __call__(self, inputs, return_tensors: bool | None = None):
        if not isinstance(inputs, str):
            return [self(text, return_tensors) for text in inputs]
        encoded = self.tokenizer(inputs, return_tensors="pt")
        # An encoder or a decoder's base model is called as it is; a causal LM through its `model.model`.
        base = self.model.model if isinstance(self.model, LanternForCausalLM) else self.model
        hidden = base(encoded["input_ids"], attention_mask=encoded["attention_mask"])[0]
        tensors = self._options.get("return_tensors") if return_tensors is None else return_tensors
        return hidden if tensors else hidden.tolist()


def pipeline(task: str, model=None, tokenizer=None, **options):
    """A pipeline for `task` ("text-generation" or "feature-extraction"). `model` is a name or path (loaded
    with the loading options given here: device_map, torch_dtype, ...) or a model from from_pretrained;
    `tokenizer` likewise, by default the model's own. Other options are the call's defaults."""
    if task not in TASKS:
        raise UnsupportedArgumentError("pipeline", "task", f"{task!r}; lanternlm.transformers supports "
                                                           f"{', '.join(TASKS)}")
    if model is None:
        raise UnsupportedArgumentError("pipeline", "model", "give a model name, path or loaded model (Lantern picks "
                                                            "no default model for a task)")
    loading = {k: options.pop(k) for k in list(options) if k in MODEL_OPTIONS and k not in SETTINGS}
    if "device" in options:
        loading["device_map"] = options.pop("device")
    if isinstance(model, str):
        auto = AutoModelForCausalLM if task == "text-generation" else AutoModel
        name, model = model, auto.from_pretrained(model, **loading)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(name)
    elif loading:
        raise UnsupportedArgumentError("pipeline", sorted(loading)[0], "loading options need a model name, not a "
                                                                        "loaded model")
    if isinstance(tokenizer, str):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    if tokenizer is None:
        tokenizer = PreTrainedTokenizerFast(model.llm.tokenizer, {}, model.llm.name)
    if task == "text-generation":
        return TextGenerationPipeline(model, tokenizer, options)
    return FeatureExtractionPipeline(model, tokenizer, options)
