"""What a model is made of, as the seeds show it with print(model) and parameter arithmetic: the module tree
(repeated layers folded), parameter counts per component and in total, config highlights, tokenizer and
template facts, and the files. Plain data (`describe`) plus a text rendering (`render_text`).
"""

from __future__ import annotations

from torch import nn

from .kernels import isa_name, why_unavailable


def count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def logical_model(config):
    """The readable model for a config, on the meta device: no memory, plain nn.Linear layers. Parameter
    counts and the module tree come from it, whatever speed transforms the running model has."""
    from .loader.build import meta_model
    return meta_model(config)


def parameter_counts(model) -> dict:
    """Per component and in total. `total` counts each tensor once (transformers' num_parameters());
    `total_counting_lm_head` adds a tied lm_head again, as the seeds' arithmetic does."""
    cfg = model.config
    layer = model.model.layers[0]
    attn = {name: count(m) for name, m in layer.self_attn.named_children()}
    mlp = {name: count(m) for name, m in layer.mlp.named_children() if count(m)}
    norms = {name: count(m) for name, m in layer.named_children() if name.endswith("layernorm")}
    per_layer = count(layer)
    linear_per_layer = sum(count(m) for m in layer.modules() if isinstance(m, nn.Linear))
    lm_head = model.lm_head.weight.numel()
    total = count(model)
    return {
        "embed_tokens": count(model.model.embed_tokens),
        "per_layer": {"self_attn": attn, "mlp": mlp, "norms": norms, "total": per_layer,
                      "linear_only": linear_per_layer},
        "layers": per_layer * cfg.num_hidden_layers,
        "final_norm": count(model.model.norm),
        "lm_head": lm_head,
        "lm_head_tied": cfg.tie_word_embeddings,
        "total": total,
        "total_counting_lm_head": total + (lm_head if cfg.tie_word_embeddings else 0),
        # The seeds' estimate: each layer's linear weights (biases included) x layers + lm_head.
        "seeds_estimate": linear_per_layer * cfg.num_hidden_layers + lm_head,
    }


def encoder_parameter_counts(model) -> dict:
    """An encoder's parameters per component; `total` equals transformers' BertModel.num_parameters()."""
    layer = model.encoder.layer[0]
    emb = {name: count(m) for name, m in model.embeddings.named_children() if m is not None}
    per_layer = {"attention.self": count(getattr(layer.attention, "self")),
                 "attention.output": count(layer.attention.output),
                 "intermediate": count(layer.intermediate), "output": count(layer.output)}
    return {
        "embeddings": emb,
        "embeddings_total": count(model.embeddings),
        "per_layer": {**per_layer, "total": count(layer)},
        "layers": count(model.encoder),
        "pooler": count(model.pooler),
        "total": count(model),
    }


def describe_encoder(llm) -> dict:
    import torch

    from .loader.build import _skip_random_init
    from .models.encoder import EncoderModel

    cfg, tok, loaded, spec = llm.config, llm.tokenizer, llm.loaded, llm.embedding_spec
    files = [{"path": str(p), "bytes": p.stat().st_size} for p in loaded.files]
    for extra in ("config.json", "tokenizer.json", "tokenizer_config.json", *(
            str(p.relative_to(loaded.path)) for p in loaded.sentence.files)):
        if (loaded.path / extra).is_file():
            files.append({"path": str(loaded.path / extra), "bytes": (loaded.path / extra).stat().st_size})
    with torch.device("meta"), _skip_random_init():  # the readable tree, no memory: counts and the printed tree
        readable = EncoderModel(cfg)
    weights_bytes = sum(t.numel() * t.element_size() for t in llm.model.parameters())
    return {
        "model": str(loaded.path),
        "format": loaded.format,
        "kind": "embed",
        "architecture": cfg.architecture,
        "model_type": cfg.model_type,
        "config": {
            "layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size, "heads": cfg.num_attention_heads,
            "head_dim": cfg.head_dim, "max_positions": cfg.max_position_embeddings,
            "vocab_size": cfg.vocab_size, "token_types": cfg.type_vocab_size, "activation": cfg.hidden_act,
            "layer_norm_eps": cfg.layer_norm_eps, "pooler": cfg.pooler,
        },
        "embedding": {"pooling": spec.pooling, "normalize": spec.normalize, "max_length": spec.max_length,
                      "dimensions": spec.dimensions, "prompts": spec.prompts,
                      "default_prompt_name": spec.default_prompt_name, "similarity": spec.similarity,
                      "do_lower_case": spec.do_lower_case},
        "dtype": {"stored": cfg.torch_dtype, "compute": str(loaded.dtype).replace("torch.", ""),
                  "device": str(loaded.device), "weights_bytes_in_memory": weights_bytes},
        "parameters": encoder_parameter_counts(readable),
        "tokenizer": {"vocab_size": tok.vocab_size, "special_tokens": len(tok.special_ids),
                      "adds": tok.tokens([i for i in tok.encode("", add_special_tokens=True)])},
        "files": files,
        "module_tree": str(readable),
    }


def render_encoder_text(info: dict) -> str:
    c, p, e = info["config"], info["parameters"], info["embedding"]
    per = p["per_layer"]
    emb = ", ".join(f"{k} {v:,}" for k, v in p["embeddings"].items())
    lines = [
        f"{info['architecture']} encoder ({info['format']}) from {info['model']}",
        "",
        info["module_tree"],
        "",
        "parameters",
        f"  embeddings             {p['embeddings_total']:>15,}   ({emb})",
        f"  one encoder layer      {per['total']:>15,}   (attention.self {per['attention.self']:,}, "
        f"attention.output {per['attention.output']:,}, intermediate {per['intermediate']:,}, "
        f"output {per['output']:,})",
        f"  {'x ' + str(c['layers']) + ' layers':<22} {p['layers']:>15,}",
        f"  pooler                 {p['pooler']:>15,}",
        f"  total                  {p['total']:>15,}   (each tensor once, as num_parameters())",
        "",
        "config",
        f"  layers {c['layers']}, hidden {c['hidden_size']}, intermediate {c['intermediate_size']} "
        f"({c['activation']}), heads {c['heads']}, head_dim {c['head_dim']}",
        f"  max positions {c['max_positions']}, vocab {c['vocab_size']}, token types {c['token_types']}, "
        f"layer norm eps {c['layer_norm_eps']:g}",
        f"  stored {info['dtype']['stored']}, computed in {info['dtype']['compute']} on {info['dtype']['device']} "
        f"({info['dtype']['weights_bytes_in_memory'] / 1e6:.1f} MB of weights in memory)",
        "",
        "embedding",
        f"  {e['dimensions']} dimensions, {e['pooling']} pooling, "
        f"{'L2-normalised' if e['normalize'] else 'not normalised'}, at most {e['max_length']} tokens, "
        f"similarity {e['similarity']}",
        f"  prompts: {e['prompts'] or 'none'}"
        + (f" (default {e['default_prompt_name']!r})" if e["default_prompt_name"] else ""),
        "",
        "tokenizer",
        f"  vocab {info['tokenizer']['vocab_size']}, {info['tokenizer']['special_tokens']} special tokens, "
        f"adds {' ... '.join(info['tokenizer']['adds']) or 'nothing'}",
        "",
        "files",
    ]
    lines += [f"  {f['path']}  ({f['bytes'] / 1e6:.1f} MB)" for f in info["files"]]
    return "\n".join(lines)


def kv_cache_facts(llm) -> dict:
    """How keys and values are stored: the element type, bytes per token, and what `lantern serve`'s default
    budget (8 sequences of 4,096 tokens, or of the model's context if shorter) comes to."""
    from .models.kv_cache import BLOCK_SIZE, PagedKVCache
    per_token = PagedKVCache.block_bytes(llm.config, 1, llm.kv_dtype)
    context = min(4096, llm.config.max_position_embeddings)
    return {"dtype": str(llm.kv_dtype).replace("torch.", ""), "block_size": BLOCK_SIZE, "bytes_per_token": per_token,
            "serve_default_budget_bytes": 8 * context * per_token, "serve_default_context": context}


def describe(llm) -> dict:
    if llm.kind == "embed":
        return describe_encoder(llm)
    cfg, tok, loaded = llm.config, llm.tokenizer, llm.loaded
    files = [{"path": str(p), "bytes": p.stat().st_size} for p in loaded.files]
    for extra in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "chat_template.jinja"):
        if loaded.format == "hf" and (loaded.path / extra).is_file():
            files.append({"path": str(loaded.path / extra), "bytes": (loaded.path / extra).stat().st_size})
    running = llm.model
    weights_bytes = sum(t.numel() * t.element_size() for t in [*running.parameters(), *running.buffers()])
    readable = logical_model(cfg)
    kinds = sorted({type(m).__name__ for m in running.modules() if type(m).__name__.endswith("Linear")})
    rope = cfg.rope_for("full_attention")
    return {
        "model": str(loaded.path),
        "format": loaded.format,
        "kind": "generate",
        "architecture": cfg.architecture,
        "model_type": cfg.model_type,
        "config": {
            "layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size, "heads": cfg.num_attention_heads,
            "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
            "context_length": cfg.max_position_embeddings, "vocab_size": cfg.vocab_size,
            "rope": {"type": rope.rope_type, "theta": rope.rope_theta, "factor": rope.factor,
                     "partial_rotary_factor": rope.partial_rotary_factor},
            "sliding_window": cfg.sliding_window,
            "sliding_layers": sum(t == "sliding_attention" for t in cfg.layer_types),
            "activation": cfg.hidden_act, "rms_norm_eps": cfg.rms_norm_eps,
            "tie_word_embeddings": cfg.tie_word_embeddings, "qkv_bias": cfg.qkv_bias, "qk_norm": cfg.qk_norm,
        },
        "dtype": {"stored": (dict(loaded.gguf_types) if loaded.gguf_types
                             else cfg.torch_dtype),
                  "compute": str(loaded.dtype).replace("torch.", ""), "device": str(loaded.device),
                  "weights_bytes_in_memory": weights_bytes,
                  # Lantern's C++ kernels in use (avx512-vnni / avx2), or None on PyTorch's own kernels,
                  # and why not when the quantized path runs without them
                  "kernels": isa_name() if any(k.startswith("Quant") for k in kinds) else None,
                  "kernels_unavailable": why_unavailable() if "Int8Linear" in kinds else None},
        "kv_cache": kv_cache_facts(llm),
        "parameters": parameter_counts(readable),
        "linear_layers": kinds,                 # what computes them: Linear, QuantLinear or Int8Linear
        "tokenizer": {
            "vocab_size": tok.vocab_size, "bos": tok.bos_token, "eos": tok.eos_token,
            "end_of_turn": sorted(tok.tokens(sorted(tok.end_token_ids))),
            "adds_bos": tok.add_bos_token, "special_tokens": len(tok.special_ids),
        },
        "chat_template": {"present": loaded.chat_template is not None,
                          "chars": len(loaded.chat_template or "")},
        "files": files,
        "module_tree": str(readable),
    }


def render_text(llm, info: dict) -> str:
    if info.get("kind") == "embed":
        return render_encoder_text(info)
    c, p, t = info["config"], info["parameters"], info["tokenizer"]
    per = p["per_layer"]
    lines = [
        f"{info['architecture']} ({info['format']}) from {info['model']}",
        "",
        info["module_tree"],
        "",
        "parameters",
        f"  embed_tokens           {p['embed_tokens']:>15,}",
        f"  one decoder layer      {per['total']:>15,}   (self_attn {sum(per['self_attn'].values()):,}, "
        f"mlp {sum(per['mlp'].values()):,}, norms {sum(per['norms'].values()):,})",
        f"  {'x ' + str(c['layers']) + ' layers':<22} {p['layers']:>15,}",
        f"  final norm             {p['final_norm']:>15,}",
        f"  lm_head                {p['lm_head']:>15,}   {'(tied: shares embed_tokens)' if p['lm_head_tied'] else ''}",
        f"  total                  {p['total']:>15,}   (each tensor once, as num_parameters())",
    ]
    if p["lm_head_tied"]:
        lines.append(f"  total + tied lm_head   {p['total_counting_lm_head']:>15,}")
    lines += [
        f"  seeds' estimate        {p['seeds_estimate']:>15,}   "
        f"(linear weights per layer {per['linear_only']:,} x {c['layers']} + lm_head)",
        "",
        "config",
        f"  layers {c['layers']}, hidden {c['hidden_size']}, mlp {c['intermediate_size']} ({c['activation']}), "
        f"heads {c['heads']}, kv heads {c['kv_heads']}, head_dim {c['head_dim']}",
        f"  context {c['context_length']}, vocab {c['vocab_size']}, rope {c['rope']['type']} "
        f"theta {c['rope']['theta']:g}" + (f" factor {c['rope']['factor']:g}" if c['rope']['factor'] else "")
        + (f", sliding window {c['sliding_window']} on {c['sliding_layers']} layers" if c["sliding_window"] else ""),
        f"  stored {info['dtype']['stored']}, computed in {info['dtype']['compute']} on {info['dtype']['device']} "
        f"({info['dtype']['weights_bytes_in_memory'] / 1e6:.1f} MB of weights in memory; linear layers run as "
        f"{', '.join(info['linear_layers'])}"
        + (f", kernels {info['dtype']['kernels']}" if info['dtype'].get('kernels') else "")
        + (f"; Lantern's kernels unavailable: {info['dtype']['kernels_unavailable']}"
           if info['dtype'].get('kernels_unavailable') else "") + ")",
        "",
        "kv cache",
        f"  {info['kv_cache']['dtype']}, {info['kv_cache']['bytes_per_token']:,} bytes per token in blocks of "
        f"{info['kv_cache']['block_size']}; `lantern serve`'s default budget (8 x {info['kv_cache']['serve_default_context']}"
        f" tokens) is {info['kv_cache']['serve_default_budget_bytes'] / 2**30:.2f} GiB, touched only as it fills",
        "",
        "tokenizer",
        f"  vocab {t['vocab_size']}, bos {t['bos']!r}, eos {t['eos']!r}, end of turn {t['end_of_turn']}, "
        f"adds bos: {t['adds_bos']}, {t['special_tokens']} special tokens",
        f"  chat template: {'yes, ' + str(info['chat_template']['chars']) + ' chars' if info['chat_template']['present'] else 'none'}",
        "",
        "files",
    ]
    lines += [f"  {f['path']}  ({f['bytes'] / 1e6:.1f} MB)" for f in info["files"]]
    return "\n".join(lines)
