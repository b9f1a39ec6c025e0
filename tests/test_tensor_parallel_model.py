"""Tensor parallelism, the model part (issue 17): a model split over 2 ranks on gloo computes what one process
computes.

One spawn of 2 ranks (torch.multiprocessing, a gloo group over a FileStore in tmp_path) runs every 2-rank check
and saves what it saw; the tests below assert on that. The ranks compare, on tiny random models of every
architecture, the sharded exact model with the unsplit one (logits of a prefill and of cached decode steps within
1e-4, greedy tokens identical), load a tiny HF folder and a tiny mixed-kind GGUF file with only their part, and
run the default model (SmolLM2-135M Q4_1) with its C++ decode stack and the all-reduce between layers. The
split rules (plan_shards), cutting blocks by columns and the decode stack's callback are checked in this process.
"""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lanternlm.config import ModelConfig
from lanternlm.distributed import shard as shard_module
from lanternlm.distributed.plan import ShardError, plan_shards, split_evenly
from lanternlm.model import KVCache
from lanternlm.models.kv_cache import PagedKVCache

WORLD = 2
PROMPT = 12  # prompt tokens of the tiny models' checks
STEPS = 16   # greedy decode steps
# arch -> overrides of tiny_models.COMMON: uneven heads, a replicated KV head, uneven MLP columns and vocabulary
EXACT = {
    # 6+3 q, 2+1 kv heads, vocab 161 + 160; o_proj and down_proj biases (kept on rank 0 only)
    "llama": {"num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 144, "vocab_size": 321,
              "attention_bias": True, "mlp_bias": True},
    "mistral": {},  # sliding window 5
    # one KV head, on both ranks, 3 + 2 query heads; MLP columns 64 + 36
    "qwen2": {"num_attention_heads": 5, "num_key_value_heads": 1, "hidden_size": 80, "intermediate_size": 100},
    "qwen3": {},
    "phi3": {"intermediate_size": 160},  # fused qkv_proj and gate_up_proj; MLP columns 96 + 64
    "gemma3": {"final_logit_softcapping": 3.0},  # applied to the gathered logits
}
PAGED = {"mistral", "qwen3", "gemma3"}  # decoded through a PagedKVCache; the others through the contiguous KVCache
# A llama GGUF whose matrices are of several kinds (q/k/v kept apart; K-quant super-blocks of 256 cut at 32 by
# the column split of down_proj; Q6_K requantized to 8-bit on the fly).
MIXED = {"hidden_size": 256, "intermediate_size": 768, "num_attention_heads": 8, "num_key_value_heads": 2,
         "num_hidden_layers": 2}


# ------------------------------------------------------------------ the split rules (no ranks needed)

def config(heads: int, kv: int, intermediate: int = 1536, vocab: int = 49152) -> ModelConfig:
    return ModelConfig(model_type="llama", vocab_size=vocab, hidden_size=64 * heads, intermediate_size=intermediate,
                       num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=kv, head_dim=64,
                       max_position_embeddings=64)


def plans(cfg: ModelConfig, world: int):
    return [plan_shards(cfg, r, world) for r in range(world)]


def test_one_rank_holds_the_whole_model():
    p = plan_shards(config(9, 3), 0, 1)
    assert (p.q_heads, p.kv_heads, p.intermediate, p.vocab) == ((0, 9), (0, 3), (0, 1536), (0, 49152))


def test_query_heads_follow_their_kv_heads_when_kv_heads_are_split():
    a, b = plans(config(9, 3), 2)  # the default model: 3 KV heads -> 2 + 1, so 6 + 3 query heads
    assert (a.kv_heads, b.kv_heads, a.q_heads, b.q_heads) == ((0, 2), (2, 3), (0, 6), (6, 9))
    assert [p.q_heads for p in plans(config(8, 8), 3)] == [(0, 3), (3, 6), (6, 8)]


def test_more_ranks_than_kv_heads_replicate_them_and_split_their_query_heads():
    a, b = plans(config(9, 1), 2)  # one KV head on both ranks, 5 + 4 query heads
    assert (a.kv_heads, b.kv_heads, a.q_heads, b.q_heads) == ((0, 1), (0, 1), (0, 5), (5, 9))
    # 4 ranks over 3 KV heads: KV head 0 on ranks 0 and 1 (its 3 query heads 2 + 1), heads 1 and 2 one rank each
    assert [(p.kv_heads, p.q_heads) for p in plans(config(9, 3), 4)] == [
        ((0, 1), (0, 2)), ((0, 1), (2, 3)), ((1, 2), (3, 6)), ((2, 3), (6, 9))]


@pytest.mark.parametrize("heads,kv", [(9, 3), (9, 1), (8, 2), (12, 4), (6, 6), (14, 2), (32, 8)])
def test_every_split_is_a_uniform_gqa_cover_of_the_heads(heads, kv):
    group = heads // kv
    for world in range(1, heads + 1):
        ps = plans(config(heads, kv), world)
        q_sizes = [p.q_heads[1] - p.q_heads[0] for p in ps]
        assert [p.q_heads for p in ps] == list(zip([0, *[p.q_heads[1] for p in ps[:-1]]], [p.q_heads[1] for p in ps]))
        assert ps[-1].q_heads[1] == heads and min(q_sizes) >= 1
        for p in ps:
            n_q, n_kv = p.q_heads[1] - p.q_heads[0], p.kv_heads[1] - p.kv_heads[0]
            assert n_kv >= 1 and n_q % n_kv == 0  # the same number of query heads on each local KV head
            per = n_q // n_kv
            # local query head j uses local KV head j // per, and that is its own KV head in the whole model
            assert all((p.q_heads[0] + j) // group == p.kv_heads[0] + j // per for j in range(n_q))
        if world <= kv:
            kv_sizes = [p.kv_heads[1] - p.kv_heads[0] for p in ps]
            assert sum(kv_sizes) == kv and max(kv_sizes) - min(kv_sizes) <= 1
        else:
            assert all(p.kv_heads[1] - p.kv_heads[0] == 1 for p in ps)
            sharing = [sum(p.kv_heads[0] == g for p in ps) for g in range(kv)]
            assert max(sharing) - min(sharing) <= 1


def test_more_ranks_than_query_heads_or_a_rank_outside_the_world_is_refused():
    with pytest.raises(ShardError, match="9 query heads over 10 ranks"):
        plan_shards(config(9, 3), 0, 10)
    with pytest.raises(ShardError, match="rank 2"):
        plan_shards(config(9, 3), 2, 2)


def test_mlp_columns_split_at_whole_blocks_and_the_vocabulary_anywhere():
    assert [p.intermediate for p in plans(config(9, 3, intermediate=1536), 2)] == [(0, 768), (768, 1536)]
    assert [p.intermediate for p in plans(config(9, 3, intermediate=96), 2)] == [(0, 64), (64, 96)]
    assert [p.intermediate for p in plans(config(9, 3, intermediate=100), 2)] == [(0, 64), (64, 100)]
    assert [p.intermediate for p in plans(config(9, 3, intermediate=1536), 5)] == [
        (0, 320), (320, 640), (640, 960), (960, 1248), (1248, 1536)]
    assert [p.vocab for p in plans(config(9, 3, vocab=321), 2)] == [(0, 161), (161, 321)]
    assert split_evenly(7, 3) == [(0, 3), (3, 5), (5, 7)]


# ------------------------------------------------------------------ blocks cut by columns, the stack's callback

def test_blocks_cut_by_columns_hold_those_columns_of_every_kind():
    import numpy as np
    from gguf import GGMLQuantizationType as T

    from lanternlm.kernels.blocks import (
        KIND_IQ4_NL,
        KIND_IQ4_XS,
        KIND_Q2_K,
        KIND_Q4_K,
        KIND_Q4_MIN,
        KIND_Q5_K,
        KIND_Q5_MIN,
        KIND_Q8,
        dequantize_blocks,
        float_blocks,
        from_ggml,
        quantize_q4_0,
        quantize_q4_1,
        quantize_q8_torch,
    )
    from lanternlm.quantize import MatrixPart

    from gguf_writer import random_blocks

    w = torch.randn(6, 512, generator=torch.Generator().manual_seed(0))
    matrices = [quantize_q4_0(w), quantize_q4_1(w), quantize_q8_torch(w), float_blocks(w.bfloat16())]
    for i, qtype in enumerate((T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)):  # multipliers per 16 (Q3_K, Q6_K), offsets
        raw = random_blocks(qtype, 6, 512, np.random.default_rng(i))
        matrices.append(from_ggml(raw.reshape(-1), int(qtype), (6, 512)))
    for qtype in (T.IQ4_NL, T.IQ4_XS):  # non-linear values; IQ4_XS's scale per block, d per super-block
        matrices.append(from_ggml(random_blocks(qtype, 6, 512, np.random.default_rng(7)).reshape(-1), int(qtype),
                                  (6, 512)))
    for blocks in matrices:
        whole = dequantize_blocks(blocks)
        part = MatrixPart(rows=((4, 6), (0, 1)), cols=(96, 352))  # 352 - 96: 8 blocks, inside K-quant super-blocks
        cut = part.of_blocks(blocks)
        want = whole[[4, 5, 0], 96:352]
        assert cut.shape == (3, 256)
        if blocks.kind in (KIND_Q4_K, KIND_Q5_K):  # a cut inside super-blocks: per-block scales rounded to float16
            assert cut.kind == {KIND_Q4_K: KIND_Q4_MIN, KIND_Q5_K: KIND_Q5_MIN}[blocks.kind]  # (test_kquant_kernels)
            assert torch.allclose(dequantize_blocks(cut), want, rtol=0, atol=2.0 ** -10 * float(want.abs().max()))
        elif blocks.kind == KIND_IQ4_XS:  # each block's scale D*(ls - 32) rounded to float16
            assert cut.kind == KIND_IQ4_NL
            assert torch.all((dequantize_blocks(cut) - want).abs() <= want.abs() * 2.0 ** -11 + 1e-7)
        elif blocks.kind == KIND_Q2_K:  # its halves' scales and mins fit no per-block kind: 8-bit blocks
            assert cut.kind == KIND_Q8
            step = want.view(3, 8, 32).abs().amax(-1, keepdim=True) / 127  # half an 8-bit step, and float16 d
            assert torch.all((dequantize_blocks(cut).view(3, 8, 32) - want.view(3, 8, 32)).abs() <= step * 0.5 * 1.002)
        else:
            assert torch.equal(dequantize_blocks(cut), want)
    with pytest.raises(ValueError, match="32-element blocks"):
        quantize_q4_1(w).columns(16, 64)


def test_the_decode_stack_calls_back_after_o_proj_and_down_proj_in_place(tmp_path):
    """The stack's allreduce callback (used by a tensor-parallel rank) gets o_proj's and down_proj's (B, C)
    outputs, twice per layer, and what it writes into them is what the layer adds: a callback that zeroes them
    leaves the hidden states at the embedding."""
    from gguf import GGMLQuantizationType as T

    from lanternlm.load import load

    from gguf_writer import write_gguf
    from tiny_models import make_hf_model

    write_gguf(make_hf_model("llama", hidden_size=128, num_attention_heads=4, num_key_value_heads=2), tmp_path / "m.gguf",
               T.Q8_0)
    model = load(tmp_path / "m.gguf").model
    assert type(model.model).__name__ == "FusedTransformer"
    ids = torch.tensor([[5, 17, 33, 2]])

    def last_logits(callback):
        for layer in model.model.layers:  # what shard.py's row-parallel modules provide
            layer.self_attn.o_proj.reduce = layer.mlp.down_proj.reduce = callback
        model.model.rebuild_stack()
        cache = KVCache(model.config, 1, 16, torch.float32)
        model(ids[:, :3], torch.arange(3)[None], cache)
        logits = model(ids[:, 3:], torch.tensor([[3]]), cache).logits
        assert model.model._stack is not None  # the decode step ran in the stack
        return logits

    seen = []
    plain = last_logits(None)
    assert torch.equal(last_logits(lambda t: seen.append(tuple(t.shape))), plain)
    assert seen == [(1, 128)] * (2 * model.config.num_hidden_layers)
    zeroed = last_logits(lambda t: t.zero_())
    h = model.model.embed_tokens(ids[:, 3:])
    assert torch.allclose(zeroed, model.lm_head(model.model.norm(h)), atol=1e-5)
    for layer in model.model.layers:
        del layer.self_attn.o_proj.reduce, layer.mlp.down_proj.reduce


# ------------------------------------------------------------------ what the 2 ranks do

def _build(folder: Path, arch: str):
    from lanternlm.loader.build import build_model

    cfg = ModelConfig.from_hf(json.loads((folder / f"{arch}.json").read_text()))
    state = torch.load(folder / f"{arch}.pt")
    return build_model(cfg, dict(state), arch)


def _cache(model, paged: bool, dtype=torch.float32):
    if paged:
        return PagedKVCache(model.config, 8, 16, dtype, torch.float32), torch.arange(8)[None]
    return KVCache(model.config, 1, 128, torch.float32), None


def _decode(model, ids: list[int], steps: int, paged: bool, kv_dtype=torch.float32):
    """(the prompt's last logits and each greedy step's, the greedy tokens), through a cache."""
    cache, slots = _cache(model, paged, kv_dtype)
    logits = model(torch.tensor([ids]), torch.arange(len(ids))[None], cache, slots, logits_to_keep=1).logits
    seen, tokens = [logits[0, -1]], []
    for p in range(len(ids), len(ids) + steps):
        tokens.append(int(seen[-1].argmax()))
        seen.append(model(torch.tensor([[tokens[-1]]]), torch.tensor([[p]]), cache, slots).logits[0, -1])
    return torch.stack(seen), tokens


def _against(reference, sharded, ids: list[int], paged: bool, steps: int = STEPS) -> dict:
    """Both models on the same prompt: the worst logit difference of a no-cache prefill and of each cached step
    (the sharded model fed the reference's tokens), and each one's own greedy tokens."""
    x = torch.tensor([ids])
    prefill = (reference(x).logits - sharded(x).logits).abs().max().item()
    ref_logits, ref_tokens = _decode(reference, ids, steps, paged)
    cache, slots = _cache(sharded, paged)
    logits = sharded(x, torch.arange(len(ids))[None], cache, slots, logits_to_keep=1).logits[0, -1]
    worst, tokens = (logits - ref_logits[0]).abs().max().item(), [int(logits.argmax())]
    for step, token in enumerate(ref_tokens[:-1]):
        logits = sharded(torch.tensor([[token]]), torch.tensor([[len(ids) + step]]), cache, slots).logits[0, -1]
        worst = max(worst, (logits - ref_logits[step + 1]).abs().max().item())
        tokens.append(int(logits.argmax()))
    return {"prefill": prefill, "decode": worst, "scale": ref_logits.abs().max().item(),
            "ref_tokens": ref_tokens, "tokens": tokens,
            "kv_heads": sharded.config.num_key_value_heads,
            "cache_heads": cache.k[0].shape[1], "q_heads": sharded.model.layers[0].self_attn.n_heads}


def _batched(reference, sharded) -> float:
    """Two sequences of different lengths prefilled apart, then decoded together (the engine's batches) for three
    steps through a paged cache: the worst logit difference."""
    worst, caches = 0.0, []
    tables = torch.tensor([[0, 1], [2, 3]])
    lengths = [7, 12]
    ids = torch.randint(3, reference.config.vocab_size, (2, 15), generator=torch.Generator().manual_seed(2))
    for model in (reference, sharded):
        cache = PagedKVCache(model.config, 4, 16, torch.float32, torch.float32)
        for b, n in enumerate(lengths):
            model(ids[b:b + 1, :n], torch.arange(n)[None], cache, tables[b:b + 1], logits_to_keep=1)
        caches.append(cache)
    for step in range(3):
        x = torch.stack([ids[b, n + step] for b, n in enumerate(lengths)])[:, None]
        pos = torch.tensor([[n + step] for n in lengths])
        a, b = (m(x, pos, c, tables).logits for m, c in zip((reference, sharded), caches))
        worst = max(worst, (a - b).abs().max().item())
    return worst


def _storage_bytes(model) -> int:
    """Bytes of every distinct storage the model's tensors live in: quantize.py's arena counts whole (it is
    sized up front from the parts to be read, plus 2 MiB for huge-page alignment)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()]}
    return sum(storages.values())


def _tensor_bytes(model) -> int:
    """Bytes of the model's distinct tensors (a tied matrix once)."""
    return sum({t.data_ptr(): t.nbytes for t in [*model.parameters(), *model.buffers()]}.values())


def _rank_checks(rank: int, folder: Path, default_gguf: Path, prompt: list[int]) -> dict:
    from lanternlm.distributed.plan import Shard
    from lanternlm.distributed.shard import shard_model
    from lanternlm.load import load, read_config

    group = dist.group.WORLD
    out: dict = {"exact": {}, "inspection": "no error"}
    for arch in EXACT:
        reference, sharded = _build(folder, arch), _build(folder, arch)
        plan = plan_shards(reference.config, rank, WORLD)
        shard_model(sharded, plan, group)
        ids = torch.randint(3, reference.config.vocab_size, (PROMPT,), generator=torch.Generator().manual_seed(1))
        out["exact"][arch] = {"plan": plan, **_against(reference, sharded, ids.tolist(), arch in PAGED),
                              "batched": _batched(reference, sharded)}
        if arch == "llama":
            try:
                sharded(ids[None], output_hidden_states=True)
            except ShardError as e:
                out["inspection"] = str(e)

    # an HF folder: the exact path (loaded whole, then sliced) and the fast path (each matrix cut as it is read),
    # with its float32 matrices as they are and quantized to q8_0
    hf = folder / "hf"
    shard = Shard(plan_shards(read_config(hf), rank, WORLD), group)
    ids = list(range(5, 5 + PROMPT))
    for name, kwargs in (("hf_exact", {"exact": True}), ("hf_f32", {"exact": False}), ("hf_q8", {"quantize": "q8_0"})):
        whole, part = load(hf, **kwargs).model, load(hf, shard=shard, **kwargs).model
        out[name] = {**_against(whole, part, ids, name != "hf_exact"), "batched": _batched(whole, part)}
    # shard_model on a model loaded whole on the fast path (tied q8_0 blocks, fused q/k/v, a built decode stack)
    whole, part = load(hf, quantize="q8_0").model, load(hf, quantize="q8_0").model
    _decode(part, ids, 1, paged=True)
    out["hf_q8_sharded_after"] = _against(whole, shard_model(part, shard.plan, group), ids, True)

    # a mixed-kind GGUF on the kernels: only the rank's rows and block columns are read
    mixed = folder / "mixed.gguf"
    shard = Shard(plan_shards(read_config(mixed), rank, WORLD), group)
    whole, part = load(mixed).model, load(mixed, shard=shard).model
    out["mixed"] = {**_against(whole, part, ids, True), "bytes": _tensor_bytes(part),
                    "classes": sorted({type(m).__name__ for m in part.modules()})}
    out["mixed_sharded_after"] = _against(whole, shard_model(load(mixed).model, shard.plan, group), ids, True)
    # a GGUF on the exact path: dequantized whole (llama.cpp's Q/K permutation undone), then sliced
    f32 = folder / "llama_f32.gguf"
    shard_f32 = Shard(plan_shards(read_config(f32), rank, WORLD), group)
    out["gguf_exact"] = _against(load(f32, exact=True).model, load(f32, exact=True, shard=shard_f32).model, ids,
                                 False)
    # where Lantern's kernels cannot run: PyTorch's int8 rows (Int8Linear) and the float embedding, split alike
    from lanternlm import quantize
    uses_kernels, quantize.uses_kernels = quantize.uses_kernels, lambda gguf: False
    try:
        int8 = [load(mixed, shard=shard).model, load(mixed).model]
    finally:
        quantize.uses_kernels = uses_kernels
    exact = load(mixed, exact=True).model
    x = torch.tensor([ids])
    out["int8"] = {"classes": sorted({type(m).__name__ for m in int8[0].modules()}),
                   "errors": [((m(x).logits - exact(x).logits).norm() / exact(x).logits.norm()).item() for m in int8]}

    # the default model: greedy answer through a bf16 paged cache (the engine's), then one counted decode step
    shard = Shard(plan_shards(read_config(default_gguf), rank, WORLD), group)
    model = load(default_gguf, shard=shard).model
    _, tokens = _decode(model, prompt, 24, paged=True, kv_dtype=torch.bfloat16)
    calls = {"sums": 0, "modules": 0}
    real = shard_module.sum_over_ranks

    def counted(*args, **kwargs):
        calls["sums"] += 1
        return real(*args, **kwargs)

    cache, slots = _cache(model, True, torch.bfloat16)
    model(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache, slots, logits_to_keep=1)
    hooks = [m.register_forward_hook(lambda *a: calls.__setitem__("modules", calls["modules"] + 1))
             for layer in model.model.layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj)]
    shard_module.sum_over_ranks = counted
    try:
        model(torch.tensor([[tokens[0]]]), torch.tensor([[len(prompt)]]), cache, slots)
    finally:
        shard_module.sum_over_ranks = real
    for hook in hooks:
        hook.remove()
    out["default"] = {"tokens": tokens, "stack": model.model._stack is not None, "calls": calls,
                      "layers": model.config.num_hidden_layers, "bytes": _storage_bytes(model),
                      "kv_heads": model.config.num_key_value_heads}
    return out


def _rank(rank: int, folder: Path, default_gguf: Path, prompt: list[int]) -> None:
    torch.set_num_threads(1)  # two ranks on two cores
    torch.set_grad_enabled(False)
    dist.init_process_group("gloo", store=dist.FileStore(str(folder / "store"), WORLD), rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(_rank_checks(rank, folder, default_gguf, prompt), folder / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, default_gguf):
    """What each of the 2 ranks saw (after the files they load are written here), and the single-process
    greedy answer of the default model."""
    from gguf import GGMLQuantizationType as T

    from lanternlm.api import LLM
    from lanternlm.load import load

    from gguf_writer import write_gguf
    from serving import tiny_chat_folder
    from tiny_models import make_hf_model

    folder = tmp_path_factory.mktemp("tp")
    for arch, overrides in EXACT.items():
        hf = make_hf_model(arch, **overrides)
        (folder / f"{arch}.json").write_text(json.dumps(hf.config.to_dict()))
        torch.save({k: v.clone() for k, v in hf.state_dict().items()}, folder / f"{arch}.pt")
    tiny_chat_folder(folder / "hf")
    kinds = {"q_proj": T.Q4_K, "k_proj": T.Q5_K, "v_proj": T.Q8_0, "o_proj": T.Q6_K, "gate_proj": T.Q4_1,
             "up_proj": T.Q4_1, "down_proj": T.Q4_K, "embed_tokens": T.Q8_0, "lm_head": T.Q6_K}
    write_gguf(make_hf_model("llama", seed=1), folder / "llama_f32.gguf", T.F32)
    write_gguf(make_hf_model("llama", **MIXED), folder / "mixed.gguf",
               qtype_for=lambda name, shape: next((t for k, t in kinds.items() if k in name), T.F32))

    llm = LLM(default_gguf)
    prompt = llm.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    _, tokens = _decode(llm.model, prompt, 24, paged=True, kv_dtype=torch.bfloat16)
    single = {"tokens": tokens, "bytes": _storage_bytes(llm.model),
              "mixed_bytes": _tensor_bytes(load(folder / "mixed.gguf").model)}
    del llm

    ctx = mp.start_processes(_rank, args=(folder, default_gguf, prompt), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 300  # a bound, not a measurement: a hung rank fails the test
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail("the 2 ranks did not finish within 300 s")
    finally:
        for process in ctx.processes:
            if process.is_alive():
                process.terminate()
            process.join(10)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)], single


@pytest.mark.parametrize("arch", sorted(EXACT))
def test_exact_path_two_ranks_give_the_single_process_logits_and_tokens(ranks, arch):
    for seen in ranks[0]:
        r = seen["exact"][arch]
        assert r["prefill"] <= 1e-4 and r["decode"] <= 1e-4 and r["batched"] <= 1e-4, r
        assert r["tokens"] == r["ref_tokens"] and len(r["tokens"]) == STEPS


def test_uneven_splits_and_a_replicated_kv_head_are_what_the_ranks_ran(ranks):
    (a, b), _ = ranks
    # llama 9 / 3 heads: 6 + 3 query heads on 2 + 1 KV heads (the KV cache holds only those), vocab 161 + 160
    assert (a["exact"]["llama"]["q_heads"], b["exact"]["llama"]["q_heads"]) == (6, 3)
    assert (a["exact"]["llama"]["cache_heads"], b["exact"]["llama"]["cache_heads"]) == (2, 1)
    assert (a["exact"]["llama"]["plan"].vocab, b["exact"]["llama"]["plan"].vocab) == ((0, 161), (161, 321))
    # qwen2 5 / 1 heads: the one KV head on both ranks, 3 + 2 query heads; MLP columns 64 + 36
    assert (a["exact"]["qwen2"]["plan"].kv_heads, b["exact"]["qwen2"]["plan"].kv_heads) == ((0, 1), (0, 1))
    assert (a["exact"]["qwen2"]["q_heads"], b["exact"]["qwen2"]["q_heads"]) == (3, 2)
    assert (a["exact"]["qwen2"]["plan"].intermediate, b["exact"]["qwen2"]["plan"].intermediate) == ((0, 64), (64, 100))


def close_for_blocks(r: dict, rounded: bool = False) -> bool:
    """Logits of a sharded model on blocks against the unsplit one on the same blocks. The kernels round every
    activation to int16 per block of 32, so the 1e-7 differences of the ranks' sums (the all-reduce adds two
    partial products) can flip a rounding: observed up to 7e-5 of the largest logit here, where the
    quantization itself moves the logits by ~1000x more (against the exact model). `rounded`: a Q4_K matrix
    cut inside its super-blocks takes each block's scale and offset rounded to float16 (2^-11 of each), so the
    two models' weights differ there, and flips some weights' bf16 rounding in the dense prefill: observed
    2.2e-3 of the largest logit there; in decode 1.3e-4 at most steps and 2.3e-3 at one of 16 (2.7e-4 before
    the 5-bit kinds' products moved to byte dot products, a different float summation order: a near-tie of
    int16 rounding on these random weights). Same bound for both then."""
    bound = (5e-3 if rounded else 1e-3) * r["scale"]
    return r["decode"] <= bound and r["prefill"] <= bound


def test_hf_folder_loads_each_rank_its_part(ranks):
    for seen in ranks[0]:
        for path in ("hf_exact", "hf_f32"):  # float weights, float activations: only the sums' order differs
            r = seen[path]
            assert r["prefill"] <= 1e-4 and r["decode"] <= 1e-4 and r["batched"] <= 1e-4, (path, r)
            assert r["tokens"] == r["ref_tokens"]
        q8 = seen["hf_q8"]  # rows decoded together: the C++ stack with a batch of 2
        assert close_for_blocks(q8) and q8["batched"] <= 1e-3 * q8["scale"], q8
        assert seen["hf_q8"]["tokens"] == seen["hf_q8"]["ref_tokens"]
        assert seen["hf_q8"]["cache_heads"] == 1  # qwen2's 2 KV heads, one per rank


def test_a_mixed_kind_gguf_loads_only_its_rows_and_block_columns(ranks):
    (a, b), single = ranks
    for seen in (a, b):
        r = seen["mixed"]
        assert close_for_blocks(r, rounded=True), r  # down_proj: Q4_K, 768 columns cut at 384
        assert r["tokens"] == r["ref_tokens"]
        assert {"RowParallelQuantLinear", "VocabParallelQuantLinear", "VocabParallelQuantEmbedding"} <= set(r["classes"])
        # every matrix is split, only the norms are whole on both ranks: each rank holds about half
        assert r["bytes"] < 0.6 * single["mixed_bytes"]


def test_a_gguf_on_the_exact_path_is_loaded_whole_then_sliced(ranks):
    for seen in ranks[0]:
        r = seen["gguf_exact"]
        assert r["prefill"] <= 1e-4 and r["decode"] <= 1e-4, r
        assert r["tokens"] == r["ref_tokens"]


def test_shard_model_cuts_a_model_loaded_whole_on_the_fast_path(ranks):
    for seen in ranks[0]:
        for name in ("hf_q8_sharded_after", "mixed_sharded_after"):
            assert close_for_blocks(seen[name], rounded=name.startswith("mixed")), (name, seen[name])
            assert seen[name]["tokens"] == seen[name]["ref_tokens"]


def test_the_pytorch_int8_fallback_is_split_too(ranks):
    for seen in ranks[0]:
        r = seen["int8"]
        assert {"RowParallelInt8Linear", "VocabParallelInt8Linear", "VocabParallelEmbedding"} <= set(r["classes"])
        # int8 rows quantize a rank's columns with their own row scale, so the numbers are not the unsplit
        # fallback's; their error against the exact model is (bf16 activations and random K-quant weights make
        # it ~17% of the logits' norm here, both ways)
        sharded, whole = r["errors"]
        assert abs(sharded - whole) < 0.1 * whole, r


def test_default_model_two_ranks_give_the_same_greedy_answer_through_the_decode_stack(ranks):
    (a, b), single = ranks
    assert a["default"]["tokens"] == b["default"]["tokens"] == single["tokens"]
    for seen in (a, b):
        r = seen["default"]
        assert r["stack"]  # the decode step ran in the C++ stack ...
        # ... which summed o_proj's and down_proj's outputs between layers through the callback (plus the
        # embedding's one sum), while no row-parallel module ran in Python
        assert r["calls"] == {"sums": 2 * r["layers"] + 1, "modules": 0}
        assert r["bytes"] < 0.6 * single["bytes"]  # the rank's arena was sized for its part
    assert (a["default"]["kv_heads"], b["default"]["kv_heads"]) == (2, 1)


def test_hidden_states_of_a_sharded_model_are_refused(ranks):
    for seen in ranks[0]:
        assert "not available from a tensor-parallel model" in seen["inspection"]

