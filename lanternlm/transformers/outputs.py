"""transformers' output objects: fields by name (`out.logits`), by position (`out[0]`, the first field that is
set) and as a dict (`out["logits"]`), as transformers' ModelOutput allows."""

from __future__ import annotations


class ModelOutput(dict):
    """A dict of the fields that are set, in declaration order, with attribute and integer access."""

    def __init__(self, **fields):
        super().__init__((k, v) for k, v in fields.items() if v is not None)
        self._names = tuple(fields)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self:
            return self[name]
        if name in self._names:  # a field of this output that is not set
            return None
        raise AttributeError(name)

    def __getitem__(self, key):
        if isinstance(key, (int, slice)):
            return self.to_tuple()[key]
        return super().__getitem__(key)

    def to_tuple(self) -> tuple:
        return tuple(self.values())


def causal_lm_output(loss=None, logits=None, hidden_states=None, attentions=None) -> ModelOutput:
    return ModelOutput(loss=loss, logits=logits, past_key_values=None, hidden_states=hidden_states,
                       attentions=attentions)


def base_model_output(last_hidden_state, hidden_states=None, attentions=None) -> ModelOutput:
    return ModelOutput(last_hidden_state=last_hidden_state, past_key_values=None, hidden_states=hidden_states,
                       attentions=attentions)


def generate_output(sequences, scores=None, logits=None) -> ModelOutput:
    return ModelOutput(sequences=sequences, scores=scores, logits=logits, attentions=None, hidden_states=None,
                       past_key_values=None)
