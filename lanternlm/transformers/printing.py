"""`print(model)` as transformers prints it: the readable model's tree under transformers' class and module names.

The tree is drawn from the readable model of the config (built on the meta device, plain nn.Linear layers), so
it is the same whatever quantized or fused modules compute underneath. Lantern's module names are already
transformers' (q_proj, mlp, input_layernorm, ...); what differs is written down here, in one table per kind
of difference: class names, the activation's name, where the rotary embedding sits, and Phi-3's extra
(inactive) dropout modules. torch's own printer then folds repeated layers ("(0-29): 30 x ...").
"""

from __future__ import annotations

from torch import nn

from ..inspect import logical_model

# transformers' activation classes for config.hidden_act (its ACT2FN names, as they print).
ACTIVATIONS = {"silu": "SiLUActivation", "gelu_pytorch_tanh": "GELUTanh", "gelu_tanh": "GELUTanh",
               "gelu": "GELUActivation"}


class ModuleView(nn.Module):
    """A node of the printed tree: a class name, the text inside its parentheses and its children."""

    def __init__(self, name: str, extra: str = ""):
        super().__init__()
        self.name, self.extra = name, extra

    def _get_name(self) -> str:  # what nn.Module.__repr__ prints as the class name
        return self.name

    def extra_repr(self) -> str:
        return self.extra


def _prefix(config) -> str:
    return config.architecture.removesuffix("ForCausalLM")  # "Llama", "Qwen2", "Gemma3", ...


def base_model_name(config) -> str:
    # Gemma 3's text-only model is Gemma3TextModel (Gemma3Model is the multimodal one).
    return "Gemma3TextModel" if config.model_type == "gemma3_text" else f"{_prefix(config)}Model"


def _linear(module: nn.Linear) -> ModuleView:
    return ModuleView("Linear", module.extra_repr())


def _norm(prefix: str, module) -> ModuleView:
    return ModuleView(f"{prefix}RMSNorm", module.extra_repr())


def _attention(prefix: str, config, attn) -> ModuleView:
    view = ModuleView(f"{prefix}Attention")
    # Phi-3 declares o_proj before its fused qkv_proj, and transformers prints children in declaration order.
    names = ["o_proj", "qkv_proj"] if config.fused_qkv else ["q_proj", "k_proj", "v_proj", "o_proj"]
    for name in names:
        view.add_module(name, _linear(getattr(attn, name)))
    if attn.q_norm is not None:
        view.add_module("q_norm", _norm(prefix, attn.q_norm))
        view.add_module("k_norm", _norm(prefix, attn.k_norm))
    return view


def _mlp(prefix: str, config, mlp) -> ModuleView:
    view = ModuleView(f"{prefix}MLP")
    for name in (["gate_up_proj"] if config.fused_qkv else ["gate_proj", "up_proj"]) + ["down_proj"]:
        view.add_module(name, _linear(getattr(mlp, name)))
    act = ACTIVATIONS.get(config.hidden_act, type(mlp.act).__name__)
    view.add_module("activation_fn" if config.model_type == "phi3" else "act_fn", ModuleView(act))
    return view


def _layer(prefix: str, config, layer) -> ModuleView:
    view = ModuleView(f"{prefix}DecoderLayer")
    view.add_module("self_attn", _attention(prefix, config, layer.self_attn))
    view.add_module("mlp", _mlp(prefix, config, layer.mlp))
    for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"):
        if hasattr(layer, name):
            view.add_module(name, _norm(prefix, getattr(layer, name)))
    if config.model_type == "phi3":  # Phi-3's residual dropouts: p=0 at inference, printed all the same
        for name in ("resid_attn_dropout", "resid_mlp_dropout"):
            view.add_module(name, ModuleView("Dropout", "p=0.0, inplace=False"))
    return view


def base_model_view(config, pad_token_id: int | None) -> ModuleView:
    """transformers' `model.model`: embeddings, layers, final norm, rotary embedding."""
    readable = logical_model(config).model
    prefix = _prefix(config)
    view = ModuleView(base_model_name(config))
    embed = readable.embed_tokens.extra_repr() + (f", padding_idx={pad_token_id}" if pad_token_id is not None else "")
    # Gemma multiplies embeddings by sqrt(hidden) inside a module of its own in transformers.
    embed_class = "Gemma3TextScaledWordEmbedding" if config.model_type == "gemma3_text" else "Embedding"
    view.add_module("embed_tokens", ModuleView(embed_class, embed))
    view.add_module("layers", nn.ModuleList(_layer(prefix, config, layer) for layer in readable.layers))
    view.add_module("norm", _norm(prefix, readable.norm))
    view.add_module("rotary_emb", ModuleView(f"{prefix}RotaryEmbedding"))
    return view


def causal_lm_view(config, pad_token_id: int | None) -> ModuleView:
    """transformers' `XxxForCausalLM`: the base model and lm_head."""
    view = ModuleView(config.architecture)
    view.add_module("model", base_model_view(config, pad_token_id))
    view.add_module("lm_head", _linear(logical_model(config).lm_head))
    return view
