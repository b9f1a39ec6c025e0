"""The bridge from objects built the transformers way to Lantern's look-inside views: hand the model (or a
pipeline) and a prompt, text or chat messages, to `explain`, `logit_lens`, `attention` or `describe`.

    model = AutoModelForCausalLM.from_pretrained("smollm2-135m-instruct")
    lanternlm.transformers.explain(model, messages)["steps"][0]["chosen"]

Each is the `LLM` method of the same name (api.py) on the model's own LLM; nothing is recomputed here.
Generation settings for `explain` come from the model's generation_config, as `generate` uses them.
"""

from __future__ import annotations

import torch

from .generation import new_token_budget, sampling_params


def _facade(model):
    return model.model if hasattr(model, "task") else model  # a pipeline holds the model


def _llm(model):
    return _facade(model).llm


def _ids(prompt):
    """A tensor of ids (as the tokenizer returns them) becomes a list; text and messages pass as they are."""
    if isinstance(prompt, torch.Tensor):
        return prompt.reshape(-1).tolist()
    return prompt


def explain(model, prompt, max_new_tokens: int | None = None, top_k: int = 5) -> dict:
    """Generate with a trace of how each token was chosen: candidates, each sampling stage, the draw."""
    config = _facade(model).generation_config
    if max_new_tokens:
        config = config.update(max_new_tokens=max_new_tokens)
    llm = _llm(model)
    return llm.explain(_ids(prompt), sampling_params(config, new_token_budget(config, 0, llm.context)), top_k)


def logit_lens(model, prompt, position: int = -1, top_k: int = 5) -> dict:
    """What each layer would predict at `position` through the final norm and lm_head."""
    return _llm(model).logit_lens(_ids(prompt), position, top_k)


def attention(model, prompt, layers: list[int] | None = None, heads: list[int] | None = None) -> dict:
    """Attention weights per layer and head for the prompt."""
    return _llm(model).attention(_ids(prompt), layers, heads)


def describe(model) -> dict:
    """Module tree, parameter counts, config, tokenizer and files (what `lantern inspect` shows)."""
    return _llm(model).describe()
