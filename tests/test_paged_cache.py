"""The engine's paged KV cache (lanternlm/engine/kv_cache.py) against the contiguous one the model has always
used: through the readable model path, on tiny random models of every architecture (Gemma 3's sliding layers
and Mistral's window included), the logits must be identical, for a prefill in chunks, rows of different
lengths decoded together, and block tables that scatter a sequence over non-consecutive blocks."""

from __future__ import annotations

import pytest
import torch
from test_model import lantern_from_hf

from lanternlm.model import KVCache
from lanternlm.models.kv_cache import PagedKVCache

from tiny_models import ARCHS, make_hf_model

BLOCK = 4


@pytest.fixture(scope="module", params=sorted(ARCHS))
def model(request):
    return lantern_from_hf(make_hf_model(request.param))


def tables_for(lengths: list[int], seed: int) -> torch.Tensor:
    """Scrambled, disjoint block tables covering each length (plus room for one more token), -1 padded."""
    need = [(n + BLOCK) // BLOCK for n in lengths]
    order = torch.randperm(sum(need), generator=torch.Generator().manual_seed(seed)).tolist()
    rows, at = [], 0
    for n in need:
        rows.append(order[at:at + n] + [-1] * (max(need) - n))
        at += n
    return torch.tensor(rows)


@torch.inference_mode()
def test_paged_equals_contiguous_exactly(model):
    """Chunked prefill of two sequences of different lengths, then three decode steps of both together: the
    paged cache gives bit-identical logits (float32 pools, the exact path)."""
    torch.manual_seed(0)
    lengths = [13, 22]
    ids = torch.randint(0, model.config.vocab_size, (2, max(lengths) + 3))
    contiguous = KVCache(model.config, slots=2, max_len=64, dtype=torch.float32)
    tables = tables_for([n + 3 for n in lengths], seed=1)
    paged = PagedKVCache(model.config, num_blocks=int(tables.max()) + 1, block_size=BLOCK, dtype=torch.float32,
                         compute_dtype=torch.float32)
    for b, n in enumerate(lengths):
        for start in range(0, n, 5):  # prefill chunks of 5 (block boundaries fall inside chunks)
            chunk = ids[b:b + 1, start:min(n, start + 5)]
            pos = torch.arange(start, start + chunk.shape[1])[None]
            a = model(chunk, pos, contiguous, slots=b, logits_to_keep=1).logits
            p = model(chunk, pos, paged, slots=tables[b:b + 1], logits_to_keep=1).logits
            assert torch.equal(a, p)
    for step in range(3):
        nxt = torch.stack([ids[b, n + step] for b, n in enumerate(lengths)])[:, None]
        pos = torch.tensor([[n + step] for n in lengths])
        a = model(nxt, pos, contiguous, slots=None, logits_to_keep=1).logits
        p = model(nxt, pos, paged, slots=tables, logits_to_keep=1).logits
        assert torch.equal(a, p)


@torch.inference_mode()
def test_bf16_pools_stay_close_and_store_rounded_values(model):
    """bfloat16 pools (the fast path's storage): the logits stay close to float32's, and what is stored is the
    bfloat16 rounding of the keys and values written."""
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, 11))
    tables = tables_for([11], seed=2)
    exact = PagedKVCache(model.config, 8, BLOCK, torch.float32, torch.float32)
    half = PagedKVCache(model.config, 8, BLOCK, torch.bfloat16, torch.float32)
    pos = torch.arange(11)[None]
    a = model(ids, pos, exact, slots=tables, logits_to_keep=1).logits
    b = model(ids, pos, half, slots=tables, logits_to_keep=1).logits
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    assert torch.equal(half.k[0].float(), exact.k[0].to(torch.bfloat16).float())


def test_sizes_and_block_copies():
    """Bytes per block and per token follow the shapes (the default model's bf16 figure: 30 layers x 3 KV
    heads x 64 x 2 (K and V) x 2 bytes = 23,040 per token); copy_block copies every layer."""
    from lanternlm.config import ModelConfig
    config = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
                                  "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                                  "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192})
    cache = PagedKVCache(config, num_blocks=4, block_size=16, dtype=torch.bfloat16, compute_dtype=torch.float32)
    assert cache.bytes_per_token == 23_040 and cache.bytes_per_block == 16 * 23_040
    cache.k[3][1].fill_(1.5)
    cache.copy_block(1, 2)
    assert torch.equal(cache.k[3][2], cache.k[3][1]) and cache.k[3][2].float().sum() > 0
