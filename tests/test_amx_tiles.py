"""bf16 matrices in AMX tiles (kernels/amx_cpu.cpp, blocks.py KIND_BF16_TILES), where the CPU has AMX-BF16.

- the tile order: the kernels' in-place reorder equals blocks.from_tiles' torch reference, element (r, i) where the
  docstring says; rows gathered back, dequantization, and the column / row cuts a tensor-parallel rank takes give
  the plain matrix's values (these run on every CPU: no tile instruction is involved);
- the product (AMX only): within the hi + lo split's error of x @ W.T in float64, for any row count (1-40, partial
  16-row chunks, 1-5 column blocks in a group), each row's bits independent of the rows beside it and of the
  thread count; the prefill product of bf16 activations within float32 summation of x.bfloat16() @ W.T;
- a bf16 folder loads into tiles (the tied head and the embedding included), decodes the exact path's greedy
  tokens, and a batch of six streams on the Engine's own thread gives each stream's tokens decoded alone.
"""

from __future__ import annotations

import pytest
import torch
from test_bf16_path import batch_on_engine_thread

from lanternlm import LLM, SamplingParams
from lanternlm.kernels import kernels
from lanternlm.kernels.blocks import (
    KIND_BF16,
    KIND_BF16_TILES,
    dequantize_blocks,
    float_blocks,
    from_tiles,
    tileable,
    to_tiles,
)
from lanternlm.quantize import QuantEmbedding, QuantLinear

from test_hf_folder import save_folder

pytestmark = pytest.mark.skipif(kernels(quiet=True) is None, reason="Lantern's kernels are unavailable here")
needs_amx = pytest.mark.skipif(kernels(quiet=True) is None or not kernels().amx_bf16(),
                               reason="this CPU has no AMX-BF16 (the tiled product is not made here)")
PATH_AMX = 5  # kernels().last_float_path()


def tiled(w: torch.Tensor):
    return to_tiles(float_blocks(w.clone()))


def test_amx_detection_agrees_with_pytorch():
    """The kernels' own check (CPUID, XCR0, the OS's permission for tile data) against PyTorch's report."""
    capability = getattr(torch._C._cpu, "_get_cpu_capability", None)
    if capability is None:
        pytest.skip("this PyTorch does not report CPU capabilities")
    assert kernels().amx_bf16() == bool(capability().get("amx_bf16"))


@pytest.mark.parametrize("n,k", [(16, 32), (48, 64), (80, 96), (96, 576)])
def test_tile_order_is_the_reference_order(n, k):
    torch.manual_seed(n + k)
    w = torch.randn(n, k).bfloat16()
    blocks = tiled(w)
    assert blocks.kind == KIND_BF16_TILES and blocks.shape == (n, k) and blocks.qs.shape == (n, k)
    assert torch.equal(from_tiles(blocks).qs, w)
    flat = blocks.qs.reshape(-1)
    for r, i in [(0, 0), (0, 1), (1, 0), (15, 31), (n - 1, k - 1), (n // 2 + 3, k // 2 + 5)]:
        at = ((r // 16 * (k // 32) + i // 32) * 16 + i % 32 // 2) * 32 + r % 16 * 2 + i % 2  # blocks.py's formula
        assert flat[at] == w[r, i], (r, i)


def test_tiled_rows_dequantization_and_cuts_are_the_plain_values():
    torch.manual_seed(1)
    w = torch.randn(64, 96).bfloat16()
    blocks = tiled(w)
    index = torch.tensor([5, 0, 63, 5, 17])
    assert torch.equal(kernels().bf16_tile_rows(blocks.qs, index), w[index])
    assert torch.equal(kernels().dequantize(blocks.qs, None, None, KIND_BF16_TILES, 96, torch.float32), w.float())
    assert torch.equal(kernels().dequantize(blocks.qs, None, None, KIND_BF16_TILES, 96, torch.bfloat16), w)
    assert torch.equal(dequantize_blocks(blocks), w.float())
    rows = blocks.rows(index)
    assert rows.kind == KIND_BF16 and torch.equal(rows.qs, w[index])
    cut = blocks.columns(32, 80)
    assert cut.kind == KIND_BF16 and torch.equal(cut.qs, w[:, 32:80])
    with pytest.raises(RuntimeError, match="out of range"):
        kernels().bf16_tile_rows(blocks.qs, torch.tensor([64]))


def test_untileable_matrices_are_refused():
    for shape in [(17, 32), (16, 48)]:
        blocks = float_blocks(torch.zeros(shape, dtype=torch.bfloat16))
        assert not tileable(blocks)
        with pytest.raises(ValueError, match="AMX tiles"):
            to_tiles(blocks)
        with pytest.raises(RuntimeError, match="multiple of 16"):
            kernels().bf16_tiles(blocks.qs)
    assert not tileable(float_blocks(torch.zeros(16, 32, dtype=torch.float16)))
    with pytest.raises(RuntimeError, match="tiled bf16 weights"):
        kernels().qmatmul(torch.randn(2, 32), torch.zeros(16, 32), None, None, KIND_BF16_TILES)  # float32 W


@needs_amx
@pytest.mark.parametrize("n,k", [(16, 32), (48, 96), (80, 64), (208, 576)])
def test_amx_product_matches_float64_for_any_row_count(n, k):
    torch.manual_seed(n * k)
    w = (torch.randn(n, k) * 0.2).bfloat16()
    blocks = tiled(w)
    x = torch.randn(40, k)
    whole = kernels().qmatmul(x, blocks.qs, None, None, KIND_BF16_TILES)
    assert kernels().last_float_path() == PATH_AMX
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(kernels().qmatmul(x, blocks.qs, None, None, KIND_BF16_TILES), whole)
    finally:
        torch.set_num_threads(threads)
    for rows in (1, 2, 5, 15, 16, 17, 31, 40):
        y = kernels().qmatmul(x[:rows], blocks.qs, None, None, KIND_BF16_TILES)
        ref = x[:rows].double() @ w.double().t()
        scale = x[:rows].double().abs() @ w.double().abs().t()
        # x = hi + lo to 2^-16 relative, as the dpbf16 kernel's split; float32 sums
        assert torch.all((y.double() - ref).abs() <= 2.0 ** -14 * scale + 1e-7), (rows, (y.double() - ref).abs().max())
        assert torch.equal(y, whole[:rows])  # a row's bits do not depend on its batch
    assert torch.equal(kernels().qmatmul(x[3:9][None], blocks.qs, None, None, KIND_BF16_TILES)[0], whole[3:9])


@needs_amx
def test_amx_prefill_product_of_bf16_activations():
    torch.manual_seed(2)
    w = (torch.randn(96, 128) * 0.2).bfloat16()
    blocks = tiled(w)
    for rows in (1, 16, 37, 64):
        x = torch.randn(2, rows, 128).bfloat16()
        y = kernels().tiles_matmul(x, blocks.qs)
        ref = x.double() @ w.double().t()
        scale = x.double().abs() @ w.double().abs().t()
        assert y.shape == (2, rows, 96) and y.dtype == torch.float32
        assert torch.all((y.double() - ref).abs() <= 2.0 ** -18 * scale + 1e-7), rows
    assert kernels().tiles_matmul(torch.zeros(0, 128, dtype=torch.bfloat16), blocks.qs).shape == (0, 96)
    with pytest.raises(RuntimeError, match="bfloat16"):
        kernels().tiles_matmul(torch.zeros(3, 128), blocks.qs)


def greedy(llm: LLM, prompt, n: int = 12) -> list[int]:
    return llm.generate(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)).token_ids


@needs_amx
@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])  # a tied head, and one with head_dim 24
def test_bf16_folder_on_tiles_decodes_the_exact_tokens(arch, tmp_path):
    save_folder(tmp_path, arch, torch.bfloat16)
    fast = LLM(str(tmp_path), kv_dtype=torch.float32)
    exact = LLM(str(tmp_path), exact=True, kv_dtype=torch.float32)
    linears = [m for m in fast.model.modules() if isinstance(m, QuantLinear)]
    assert linears and {m.kind for m in linears} == {KIND_BF16_TILES}
    embedding = fast.model.model.embed_tokens
    tied = fast.config.tie_word_embeddings
    assert isinstance(embedding, QuantEmbedding) and embedding.kind == (KIND_BF16_TILES if tied else KIND_BF16)
    assert torch.equal(embedding(torch.tensor([[3, 7]]))[0], exact.model.model.embed_tokens.weight[[3, 7]].float())
    prompt = "Hello world! The quick brown fox jumps over the lazy dog, and then some more words follow it."
    assert greedy(fast, prompt) == greedy(exact, prompt)  # a prefill of 32+ rows (bf16 activations), then decode
    assert kernels().last_float_path() == PATH_AMX


@needs_amx
def test_engine_batch_on_tiles_gives_each_stream_its_tokens_alone(tmp_path):
    """Six greedy streams decoded as one batch on the Engine's own thread (as in `lantern serve`), against each
    decoded alone: the same tokens, all of them, since a tiled product's row does not depend on its batch (the
    prompts keep the batched prefill under 32 rows, where activations keep their hi + lo parts on both sides)."""
    save_folder(tmp_path, "llama", torch.bfloat16)
    llm = LLM(str(tmp_path))
    prompts = [llm.encode(f"fox {i}")[:4] for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = [greedy(llm, p) for p in prompts]
    got = batch_on_engine_thread(llm, prompts, params, kv_dtype=llm.kv_dtype)
    assert kernels().last_float_path() == PATH_AMX
    assert got == alone
