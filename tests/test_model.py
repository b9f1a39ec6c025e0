"""The model against transformers on tiny random models of every architecture: logits, cache, batching."""

from __future__ import annotations

import pytest
import torch

from lanternlm.config import ModelConfig
from lanternlm.loader.build import build_model
from lanternlm.model import KVCache

from tiny_models import ARCHS, make_hf_model


def lantern_from_hf(hf_model):
    config = ModelConfig.from_hf(hf_model.config.to_dict())
    tensors = {k: v.clone() for k, v in hf_model.state_dict().items()}
    return build_model(config, tensors, "test")


@pytest.fixture(scope="module", params=sorted(ARCHS))
def pair(request):
    hf = make_hf_model(request.param)
    return request.param, hf, lantern_from_hf(hf)


def test_logits_match_transformers(pair):
    name, hf, ours = pair
    ids = torch.randint(3, 320, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids).logits
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-4, name


def test_hidden_states_then_lm_head_is_the_logits(pair):
    # The seeds' walk: model.model(ids)[0] -> lm_head -> argmax.
    _, hf, ours = pair
    ids = torch.randint(3, 320, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hidden = ours.model(ids)[0]
        logits = ours.lm_head(hidden)
        ref_hidden = hf.model(ids)[0]
    assert (hidden - ref_hidden).abs().max().item() <= 1e-4
    assert torch.equal(logits.argmax(-1), ours(ids).logits.argmax(-1))


def test_cached_decoding_equals_full_forward(pair):
    name, _, ours = pair
    ids = torch.randint(3, 320, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = ours(ids).logits[0]
        cache = KVCache(ours.config, slots=1, max_len=32, dtype=torch.float32)
        pre = 6
        out = ours(ids[:, :pre], torch.arange(pre)[None], cache).logits[0]
        steps = [out]
        for p in range(pre, 16):
            steps.append(ours(ids[:, p:p + 1], torch.tensor([[p]]), cache).logits[0])
    got = torch.cat(steps)
    assert (got - full).abs().max().item() <= 1e-4, name


def test_batch_of_different_lengths_matches_solo_runs(pair):
    # Two sequences in cache slots 1 and 0, prefilled separately, then decoded together in one forward.
    name, _, ours = pair
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randint(3, 320, (1, 5), generator=gen), torch.randint(3, 320, (1, 9), generator=gen)
    nxt = torch.randint(3, 320, (2, 1), generator=gen)
    with torch.no_grad():
        solo_a = ours(torch.cat([a, nxt[:1]], 1)).logits[0, -1]
        solo_b = ours(torch.cat([b, nxt[1:]], 1)).logits[0, -1]
        cache = KVCache(ours.config, slots=2, max_len=16, dtype=torch.float32)
        ours(a, torch.arange(5)[None], cache, slots=torch.tensor([1]))
        ours(b, torch.arange(9)[None], cache, slots=torch.tensor([0]))
        both = ours(nxt.flip(0), torch.tensor([[9], [5]]), cache, slots=torch.tensor([0, 1])).logits[:, -1]
    assert (both[1] - solo_a).abs().max().item() <= 1e-4, name
    assert (both[0] - solo_b).abs().max().item() <= 1e-4, name


def test_attention_weights_path_matches_fast_path(pair):
    _, _, ours = pair
    ids = torch.randint(3, 320, (1, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        fast = ours(ids).logits
        slow = ours(ids, output_attentions=True)
    assert (slow.logits - fast).abs().max().item() <= 1e-4
    for weights in slow.attentions:
        assert torch.allclose(weights.sum(-1), torch.ones(()), atol=1e-5)
        assert torch.all(weights.triu(1) == 0)  # causal: nothing attends to the future


def test_tied_embeddings_share_one_matrix():
    hf = make_hf_model("qwen2")
    ours = lantern_from_hf(hf)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert sum(p.numel() for p in ours.parameters()) == hf.num_parameters()


def test_config_reads_v4_rope_fields_and_missing_kv_heads():
    hf = make_hf_model("llama3_rope")
    d = hf.config.to_dict()
    rope = d.pop("rope_parameters")
    d["rope_theta"] = rope.pop("rope_theta")
    d["rope_scaling"] = rope  # transformers v4 layout
    d.pop("num_key_value_heads")
    d.pop("head_dim", None)
    config = ModelConfig.from_hf(d)
    assert config.num_key_value_heads == config.num_attention_heads
    assert config.head_dim == 16
    full = config.rope["full_attention"]
    assert (full.rope_type, full.rope_theta, full.factor) == ("llama3", 500000.0, 8.0)


@pytest.mark.parametrize("bad,message", [
    ({"model_type": "gpt2"}, "unsupported architecture"),
    ({"model_type": "llama", "hidden_size": 64}, "missing required field"),
    ({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 3,
      "num_hidden_layers": 1, "vocab_size": 10, "intermediate_size": 8}, "not a multiple"),
    ({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1,
      "vocab_size": 10, "intermediate_size": 8, "rope_scaling": {"rope_type": "weird", "factor": 2}},
     "unsupported rope_type"),
])
def test_bad_configs_are_named(bad, message):
    from lanternlm.config import ConfigError
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf(bad)
