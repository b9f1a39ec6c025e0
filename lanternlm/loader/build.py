"""Instantiate CausalLM from a config and named tensors without allocating the weights twice.

The module tree is created on the meta device (no memory), the loaded tensors are assigned into it as they
are, and only the RoPE buffers, which no checkpoint stores, are computed for real.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..config import ModelConfig
from ..errors import ModelFileError
from ..model import CausalLM, RotaryEmbedding

# Names some checkpoints carry that hold nothing the model needs (old transformers saved RoPE buffers).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@contextmanager
def _skip_random_init():
    """nn.Linear and nn.Embedding draw random initial weights as they are built, which on the meta device runs
    through PyTorch's Python reference ops and imports torch._dynamo: ~1.3 s of the first load, measured.
    Every weight is assigned from the checkpoint next, so the draws are skipped (the same thing transformers'
    `no_init_weights` does)."""
    init = torch.nn.init
    names = ("kaiming_uniform_", "uniform_", "normal_")
    saved = {name: getattr(init, name) for name in names}
    for name in names:
        setattr(init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(init, name, fn)


def meta_model(config: ModelConfig) -> CausalLM:
    """The module tree for `config` on the meta device: no memory and no initialisation."""
    with torch.device("meta"), _skip_random_init():
        return CausalLM(config)


def build_model(config: ModelConfig, tensors: dict[str, torch.Tensor], source,
                device: torch.device | str = "cpu", deferred: frozenset[str] = frozenset()) -> CausalLM:
    """`deferred` names are left on the meta device: a transform (quantize.py) replaces their modules next."""
    model = meta_model(config)
    expected = dict(model.state_dict(keep_vars=True))
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")  # shares model.embed_tokens.weight
        tensors.pop("lm_head.weight", None)  # some tied checkpoints store the copy anyway
    unexpected = [n for n in tensors if n not in expected and not n.endswith(IGNORED_SUFFIXES)]
    if unexpected:
        raise ModelFileError(source, f"unexpected tensor {unexpected[0]!r} for {config.architecture}"
                                     f"{f' (and {len(unexpected) - 1} more)' if len(unexpected) > 1 else ''}")
    missing = [n for n in expected if n not in tensors and n not in deferred]
    if missing:
        hint = " (the checkpoint has no lm_head: is tie_word_embeddings missing?)" if missing == ["lm_head.weight"] else ""
        raise ModelFileError(source, f"missing tensor {missing[0]!r}"
                                     f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}{hint}")
    for name, param in expected.items():
        if name in deferred:
            continue
        if tuple(tensors[name].shape) != tuple(param.shape):
            raise ModelFileError(source, f"tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                                         f"config says {tuple(param.shape)}")
    model.load_state_dict({n: tensors[n] for n in expected if n not in deferred}, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for layer_type in list(model.model.rotary.keys()):
        model.model.rotary[layer_type] = RotaryEmbedding(config.rope_for(layer_type), config.head_dim).to(device)
    model.requires_grad_(False)
    return model.eval()
