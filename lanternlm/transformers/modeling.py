"""`AutoModelForCausalLM.from_pretrained(...)` returns `LanternForCausalLM`: a loaded `lanternlm.LLM` behind
transformers' model interface.

`model(input_ids).logits`, `model.model(ids)[0]` (the last hidden state), `model.lm_head(...)`, `model.config`,
`model.generation_config`, `num_parameters()`, `generate(...)` (see generation.py) and `print(model)` (see
printing.py). The numbers come from Lantern's model as loaded: the fast path by default on CPU (computing from
a GGUF's blocks), the exact float32 path with `exact=True`. `model.llm` is the LLM itself, for
Lantern's own API and its look-inside views.

Shapes: B batch, T tokens, C hidden size, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..api import LLM
from ..errors import LanternError
from ..inspect import logical_model, parameter_counts
from . import generation
from .configs import generation_config, model_config
from .errors import refuse_set
from .outputs import base_model_output, causal_lm_output
from .printing import base_model_view, causal_lm_view


def _rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[torch.Tensor] | None:
    """Per row, the positions of its real tokens when `attention_mask` pads some rows; None without padding."""
    if attention_mask is None or bool(attention_mask.bool().all()):
        return None
    rows = []
    for mask in attention_mask.bool():
        real = mask.nonzero()[:, 0]
        if len(real) and int(real[-1] - real[0]) + 1 != len(real):
            raise LanternError("attention_mask must pad on one side (a run of 1s per row)")
        rows.append(real)
    return rows


def _check_inputs(where: str, input_ids, past_key_values, inputs_embeds, position_ids) -> torch.Tensor:
    refuse_set(where, "past_key_values", past_key_values,
               why="Lantern keeps its KV cache inside generate(); call generate() or pass the whole sequence")
    refuse_set(where, "inputs_embeds", inputs_embeds, why="pass input_ids")
    refuse_set(where, "position_ids", position_ids, why="positions follow from input_ids and attention_mask")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise LanternError(f"{where}: input_ids must be a (batch, tokens) tensor, e.g. tokenizer(text, "
                           f"return_tensors='pt').input_ids")
    return input_ids


class LanternModel:
    """transformers' `model.model`: the decoder stack without lm_head; calling it gives the last hidden state."""

    def __init__(self, llm: LLM, pad_token_id: int | None):
        self.llm = llm
        self._pad_token_id = pad_token_id

    embed_tokens = property(lambda self: self.llm.model.model.embed_tokens)
    layers = property(lambda self: self.llm.model.model.layers)
    norm = property(lambda self: self.llm.model.model.norm)

    @torch.inference_mode()
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_hidden_states: bool = False, return_dict: bool = True):
        """last_hidden_state (B, T, C) after the final norm; hidden_states as transformers gives them (the
        embeddings, then each layer's output, the last one normed)."""
        ids = _check_inputs("model.model", input_ids, past_key_values, inputs_embeds, position_ids)
        ids = ids.to(self.llm.device)
        rows = _rows(ids, attention_mask)
        if rows is not None:
            refuse_set("model.model", "output_hidden_states", output_hidden_states, (False,),
                       "hidden states of a padded batch; run the rows one by one")
            last = torch.zeros(*ids.shape, self.llm.config.hidden_size, dtype=self.llm.model.dtype)
            for i, real in enumerate(rows):
                last[i, real] = self.llm.model.model(ids[i:i + 1, real]).last_hidden_state[0]
            out = base_model_output(last)
        else:
            raw = self.llm.model.model(ids, output_hidden_states=output_hidden_states)
            hidden = (*raw.hidden_states[:-1], raw.last_hidden_state) if output_hidden_states else None
            out = base_model_output(raw.last_hidden_state, hidden)
        return out if return_dict else out.to_tuple()

    __call__ = forward

    def __repr__(self) -> str:
        return str(base_model_view(self.llm.config, self._pad_token_id))


class LanternForCausalLM:
    """A causal LM with transformers' interface over a loaded `LLM` (`self.llm`)."""

    def __init__(self, llm: LLM):
        if llm.kind != "generate":
            raise LanternError(f"{llm.name} is an embedding model ({llm.config.architecture}); load it with "
                               "AutoModel.from_pretrained")
        self.llm = llm
        self.config = model_config(llm)
        self.generation_config = generation_config(llm, self.config)
        self.name_or_path = llm.name
        self.model = LanternModel(llm, getattr(self.config, "pad_token_id", None))

    # ------------------------------------------------------------------ what transformers' models expose

    lm_head = property(lambda self: self.llm.model.lm_head)
    device = property(lambda self: self.llm.device)
    dtype = property(lambda self: self.llm.model.dtype)

    def __repr__(self) -> str:
        return str(causal_lm_view(self.llm.config, getattr(self.config, "pad_token_id", None)))

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Each tensor once, as transformers counts (a tied lm_head is the embedding matrix), counted on the
        readable model so quantized storage does not change the number."""
        counts = parameter_counts(logical_model(self.llm.config))
        return counts["total"] - (counts["embed_tokens"] if exclude_embeddings else 0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.llm.model.state_dict()

    def parameters(self):
        return self.llm.model.parameters()

    def named_parameters(self):
        return self.llm.model.named_parameters()

    def eval(self) -> LanternForCausalLM:
        return self  # always in inference mode: Lantern has no dropout and no training mode

    def to(self, device_or_dtype) -> LanternForCausalLM:
        """A no-op onto the model's own device or dtype; moving is done at load time (device_map=...)."""
        if isinstance(device_or_dtype, torch.dtype):
            refuse_set("model.to", "dtype", device_or_dtype, (self.dtype,),
                       "choose the dtype when loading: from_pretrained(..., torch_dtype=...)")
        else:
            refuse_set("model.to", "device", torch.device(device_or_dtype).type, (self.device.type,),
                       "choose the device when loading: from_pretrained(..., device_map=...)")
        return self

    def can_generate(self) -> bool:
        return True

    # ------------------------------------------------------------------ computing

    @torch.inference_mode()
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_hidden_states: bool = False,
                output_attentions: bool = False, return_dict: bool = True, logits_to_keep: int = 0):
        """logits (B, T, V) for every position (the last `logits_to_keep` with a count), and `loss` (mean
        next-token cross entropy, -100 ignored) when `labels` are given. A left- or right-padded batch runs row by
        row; its padded positions get zero logits."""
        ids = _check_inputs("model.forward", input_ids, past_key_values, inputs_embeds, position_ids)
        ids = ids.to(self.llm.device)
        rows = _rows(ids, attention_mask)
        if rows is not None:
            refuse_set("model.forward", "output_hidden_states", output_hidden_states or output_attentions,
                       (False,), "hidden states or attentions of a padded batch; run the rows one by one")
            logits = torch.zeros(*ids.shape, self.llm.config.vocab_size)
            for i, real in enumerate(rows):
                logits[i, real] = self.llm.model(ids[i:i + 1, real]).logits[0].float()
            hidden = attentions = None
            if logits_to_keep:
                logits = logits[:, -logits_to_keep:]
        else:
            raw = self.llm.model(ids, logits_to_keep=logits_to_keep, output_hidden_states=output_hidden_states,
                                 output_attentions=output_attentions)
            logits, attentions = raw.logits, raw.attentions
            hidden = None
            if output_hidden_states:  # transformers' last entry is after the final norm
                hidden = (*raw.hidden_states[:-1], self.llm.model.model.norm(raw.hidden_states[-1]))
        loss = None
        if labels is not None:
            # Position t predicts token t+1 (transformers shifts the same way).
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        out = causal_lm_output(loss, logits, hidden, attentions)
        return out if return_dict else out.to_tuple()

    __call__ = forward

    def generate(self, inputs: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Prompt + new ids as a (B, T + new) tensor; see `generation.generate` for the arguments."""
        return generation.generate(self, inputs, **kwargs)
