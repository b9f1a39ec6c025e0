"""`AutoModel.from_pretrained(...)` on an encoder (BERT family, e.g. "all-minilm-l6-v2"): Lantern's encoder
behind transformers' BertModel call, `model(**tokenizer(texts, padding=True, return_tensors="pt"))`, giving
last_hidden_state (B, T, C) and pooler_output (B, C). Pooling into sentence embeddings is `model.llm.embed`.
`print(model)` shows Lantern's readable encoder (its parameter names are transformers').
"""

from __future__ import annotations

import torch

from ..api import LLM
from ..inspect import count
from .configs import PretrainedConfig
from .errors import refuse_set
from .outputs import ModelOutput


class LanternEncoderModel:
    """An encoder with transformers' interface over a loaded `LLM` (`self.llm`)."""

    def __init__(self, llm: LLM):
        self.llm = llm
        self.config = PretrainedConfig(dict(vars(llm.config)))
        self.name_or_path = llm.name

    device = property(lambda self: self.llm.device)

    def __repr__(self) -> str:
        return repr(self.llm.model)

    def num_parameters(self) -> int:
        return count(self.llm.model)

    def eval(self) -> LanternEncoderModel:
        return self

    @torch.inference_mode()
    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                output_hidden_states: bool = False, return_dict: bool = True):
        refuse_set("model.forward", "position_ids", position_ids)
        device = self.llm.device
        out = self.llm.model(input_ids.to(device), None if attention_mask is None else attention_mask.to(device),
                             None if token_type_ids is None else token_type_ids.to(device), output_hidden_states)
        result = ModelOutput(last_hidden_state=out.last_hidden_state, pooler_output=out.pooler_output,
                             hidden_states=out.hidden_states)
        return result if return_dict else result.to_tuple()

    __call__ = forward
