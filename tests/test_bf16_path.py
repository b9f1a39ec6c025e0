"""HF folders (and F16/BF16 GGUFs) on the fast path: their bf16/fp16/fp32 matrices multiplied as stored by
Lantern's kernels (the float kinds), and quantized at load with --quantize.

- the float kinds' product equals x @ W.T in float64 within float32 summation error (FMA paths) or the hi + lo
  bf16 split of the activations (dpbf16), on every instruction set this CPU has; each test asserts the path;
- Q4_0/Q4_1 blocks made from float weights are ggml's reference recipes, value for value;
- an HF folder of each tiny architecture loads onto the fast path and decodes the exact path's greedy tokens;
- `lantern run --quantize q8_0` works on a folder, and an unknown type is a one-line error.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from test_cli import lantern

from lanternlm import LLM, LanternError, SamplingParams
from lanternlm.fused import FusedTransformer
from lanternlm.kernels import kernels
from lanternlm.kernels.blocks import (
    KIND_BF16,
    KIND_BF16_TILES,
    KIND_F16,
    KIND_F32,
    KIND_Q4,
    KIND_Q4_MIN,
    KIND_Q8,
    KIND_Q8_LANES,
    dequantize_blocks,
    float_blocks,
    quantize_q4_0,
    quantize_q4_1,
)
from lanternlm.quantize import QuantEmbedding, QuantLinear

from gguf_writer import write_gguf
from test_hf_folder import save_folder
from tiny_models import ARCHS

pytestmark = pytest.mark.skipif(kernels(quiet=True) is None, reason="Lantern's kernels are unavailable here")

PATH_AVX2, PATH_AVX512, PATH_DPBF16, PATH_DENSE = 1, 2, 3, 4  # kernels().last_float_path()
# What a bf16 folder's matrices load as: AMX tiles where the CPU has AMX-BF16 (test_amx_tiles.py; every tiny model's
# matrix has N % 16 == 0 and K % 32 == 0), else the plain matrix.
BF16_KIND = KIND_BF16_TILES if kernels(quiet=True) is not None and kernels().amx_bf16() else KIND_BF16
PROMPT = "Hello world! The quick brown fox"


def float_paths() -> list[tuple[int, int, int]]:
    """(isa, dpbf16 on, expected path) for every float-kind kernel this CPU can run."""
    k = kernels()
    paths = [(1, 0, PATH_AVX2)]
    if k.set_isa(2) == 2:
        paths.append((2, 0, PATH_AVX512))
        if k.set_bf16_dot(1):
            paths.append((2, 1, PATH_DPBF16))
    return paths


@pytest.fixture
def restore_isa():
    k = kernels()
    isa, dot, dense = k.isa(), k.bf16_dot(), k.dense_bf16_rows()
    k.set_dense_bf16_rows(0)  # Lantern's own kernels, whatever this CPU's default
    yield
    k.set_isa(2)
    k.set_bf16_dot(dot)
    k.set_isa(isa)
    k.set_dense_bf16_rows(dense)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,k,rows", [(37, 75, 1), (5, 16, 3), (130, 576, 2), (9, 33, 5), (64, 1, 4), (3, 100, 2),
                                      (23, 161, 11), (10, 64, 8)])
def test_float_kind_product_on_every_path(dtype, n, k, rows, restore_isa):
    torch.manual_seed(n * k + rows)
    w = (torch.randn(n, k) * 0.2).to(dtype)
    x = torch.randn(rows, k)
    ref = (x.double() @ w.double().t())
    scale = x.double().abs() @ w.double().abs().t()  # what rounding errors are relative to
    blocks = float_blocks(w)
    assert blocks.kind == {torch.bfloat16: KIND_BF16, torch.float16: KIND_F16, torch.float32: KIND_F32}[dtype]
    for isa, dot, path in float_paths():
        kernels().set_isa(isa)
        kernels().set_bf16_dot(dot)
        y = kernels().qmatmul(x, blocks.qs, None, None, blocks.kind)
        ran = kernels().last_float_path()
        # dpbf16 runs for bf16 weights and 1-2 activation rows; otherwise the FMA kernel of the same width
        dpbf16 = dtype == torch.bfloat16 and rows <= 2
        assert ran == (path if path != PATH_DPBF16 or dpbf16 else PATH_AVX512)
        # FMA: exact products, float32 sums (~K * 2^-24 of the scale). dpbf16: x = hi + lo to 2^-16 relative.
        tol = 2.0 ** -14 if ran == PATH_DPBF16 else 2.0 ** -19
        assert y.shape == (rows, n) and y.dtype == torch.float32
        assert torch.all((y.double() - ref).abs() <= tol * scale + 1e-7), (isa, dot, (y.double() - ref).abs().max())
        # a leading batch shape, as the model calls it
        y3 = kernels().qmatmul(x[None], blocks.qs, None, None, blocks.kind)
        assert torch.equal(y3[0], y)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_float_kind_rows_from_three_on_get_the_same_bits_in_any_batch(dtype, restore_isa):
    """From 3 activation rows on, the FMA kernels give every output one chain of FMAs in every tile shape (4 x 4
    and smaller on AVX-512, 2 x 4 on AVX2): a row's result has the same bits in any batch of 3 or more, on one
    thread or two. (1-2 rows take two chains, or dpbf16: the float kinds are not batch-invariant below 3 rows,
    bench/README.md says so.)"""
    torch.manual_seed(5)
    w = (torch.randn(203, 1000) * 0.2).to(dtype)  # 50 tiles of 4 weight rows, then 2 and 1; K ends in 8 of 16
    x = torch.randn(13, 1000)
    threads = torch.get_num_threads()
    for isa, _, path in float_paths():
        if path == PATH_DPBF16:
            continue
        kernels().set_isa(isa)
        whole = kernels().qmatmul(x, w, None, None, float_blocks(w).kind)
        assert kernels().last_float_path() == path
        try:
            torch.set_num_threads(1)
            assert torch.equal(kernels().qmatmul(x, w, None, None, float_blocks(w).kind), whole)
        finally:
            torch.set_num_threads(threads)
        for start, end in [(0, 3), (2, 7), (5, 13), (9, 12), (1, 12)]:
            got = kernels().qmatmul(x[start:end], w, None, None, float_blocks(w).kind)
            assert torch.equal(got, whole[start:end]), (isa, start, end)


def test_dense_bf16_rows_default_follows_amx():
    """bf16 matrices go to a dense matmul from 16 rows where the CPU has AMX-BF16 (oneDNN's tiles win there), and
    never elsewhere (its AVX-512 kernels lose to Lantern's up to 64 rows and beyond): the kernels' own CPUID check
    agrees with PyTorch's."""
    capability = getattr(torch._C._cpu, "_get_cpu_capability", None)
    if capability is None:
        pytest.skip("this PyTorch does not report CPU capabilities")
    assert kernels().dense_bf16_rows() == (16 if capability().get("amx_bf16") else 0)


def test_bf16_matrices_take_a_dense_matmul_from_dense_rows_on(restore_isa):
    """From dense_bf16_rows() rows on (forced here, whatever the CPU), a bf16 matrix is multiplied by PyTorch's
    bf16 matmul, a slice of W's rows per pool thread: x.bfloat16() @ W.T to within bf16 rounding of the output
    (each slice's matmul may sum in another order than the whole one's); fewer rows, and fp16/fp32 matrices,
    keep the kernels."""
    torch.manual_seed(11)
    k = kernels()
    assert k.set_dense_bf16_rows(4) == 4
    w = (torch.randn(70, 96) * 0.2).bfloat16()
    for rows in (1, 3, 4, 9):
        x = torch.randn(rows, 96)
        y = k.qmatmul(x, w, None, None, KIND_BF16)
        if rows < 4:
            assert k.last_float_path() != PATH_DENSE
            assert torch.allclose(y, x @ w.float().t(), atol=1e-4, rtol=1e-4)
        else:
            assert k.last_float_path() == PATH_DENSE
            assert torch.allclose(y, (x.bfloat16() @ w.t()).float(), rtol=2 ** -7, atol=1e-6)
            assert torch.equal(y, y.bfloat16().float())  # the matmul's bf16 outputs, widened
            assert torch.equal(k.qmatmul(x[None], w, None, None, KIND_BF16)[0], y)  # a leading batch shape
    for dtype in (torch.float16, torch.float32):
        k.qmatmul(torch.randn(9, 96), w.to(dtype), None, None, float_blocks(w.to(dtype)).kind)
        assert k.last_float_path() != PATH_DENSE
    assert k.set_dense_bf16_rows(-3) == 0  # never


def test_bf16_folder_decodes_a_batch_through_dense_products(tmp_path, restore_isa):
    """The decode stack's products go dense in a batch that reaches dense_bf16_rows(), on the pool's threads
    beside its own products, called from the Engine's own thread (as in `lantern serve`): 6 greedy streams, all
    queued before the thread starts, finish, every stream as long as asked, and each stream decoded alone
    (kernels, float32 activations) and in the batch (dense, bf16 activations) picks the same first three tokens.
    bf16 rounding may part them later on a near tie, as it does in vLLM (seed 1 here; with seeds 0 and 3 one stream
    of six parts at its 2nd / 3rd token)."""
    # in_features 80 and 120, no multiples of 32: plain bf16 matrices on every CPU (AMX tiles take the others;
    # test_amx_tiles.py)
    save_folder(tmp_path, "llama", torch.bfloat16, hidden_size=80, intermediate_size=120, seed=1)
    llm = LLM(str(tmp_path))
    assert {m.kind for m in llm.model.modules() if isinstance(m, QuantLinear)} == {KIND_BF16}
    prompts = [llm.encode(f"{PROMPT} {i}") for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = [llm.generate(p, params).token_ids for p in prompts]
    kernels().set_dense_bf16_rows(4)
    got = batch_on_engine_thread(llm, prompts, params)
    assert kernels().last_float_path() == PATH_DENSE
    assert all(len(got[i]) == 12 and got[i][:3] == alone[i][:3] for i in range(6))


def batch_on_engine_thread(llm: LLM, prompts: list[list[int]], params: SamplingParams, **engine_args) -> list[list[int]]:
    """Each prompt's tokens, decoded as one batch by an Engine on its own thread (as in `lantern serve`), every
    request queued before the thread starts; every stream must finish and the engine stay alive."""
    from lanternlm.engine import Engine

    engine = Engine(llm.model, llm.tokenizer, context=128, max_batch=len(prompts), **engine_args)
    got: list[list[int]] = [[] for _ in prompts]
    finished = threading.Semaphore(0)

    def on_event(event, i):
        got[i].append(event.step.token_id)
        if event.step.finish_reason:
            finished.release()

    for i, p in enumerate(prompts):
        engine.submit(p, params, lambda e, i=i: on_event(e, i))
    engine.start()
    try:
        assert all(finished.acquire(timeout=120) for _ in prompts), "a stream never finished"
    finally:
        engine.shutdown()
    assert not engine.dead
    return got


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_float_kinds_to_bf16_round_as_pytorch_does(dtype, restore_isa):
    """The dense path's fp16/fp32 -> bf16 (kernels' own loop on AVX-512, PyTorch's copy elsewhere): the same bits as
    PyTorch's conversion, rounding to nearest even, infinities, subnormals and a row length that is no multiple
    of 16; a NaN stays a NaN."""
    torch.manual_seed(3)
    w = (torch.randn(37, 77) * 3).to(dtype)
    w[0, :4] = torch.tensor([float("inf"), -float("inf"), 6e-8, -0.0])  # 6e-8: an fp16 subnormal
    w[1, 5] = float("nan")
    w.view(-1)[100:140] = (1 + (2 * torch.arange(40) + 1) * 2.0 ** -8).to(dtype)  # halfway between two bf16 values
    ref = w.to(torch.bfloat16)
    kind = float_blocks(w).kind
    for isa in sorted({1, kernels().set_isa(2)}):
        kernels().set_isa(isa)
        out = torch.empty(37, 77, dtype=torch.bfloat16)
        kernels().dequantize_into(w, None, None, kind, 77, out)
        for got in (out, kernels().dequantize(w, None, None, kind, 77, torch.bfloat16)):
            assert torch.isnan(got[1, 5])
            got[1, 5] = ref[1, 5] = 0
            assert torch.equal(got.view(torch.int16), ref.view(torch.int16)), isa
            ref[1, 5] = float("nan")


def test_float_kind_dequantize_and_bad_input():
    w = torch.randn(7, 45).bfloat16()
    assert torch.equal(kernels().dequantize(w, None, None, KIND_BF16, 45, torch.float32), w.float())
    assert kernels().dequantize(w, None, None, KIND_BF16, 45, torch.bfloat16).data_ptr() == w.data_ptr()
    assert torch.equal(dequantize_blocks(float_blocks(w)), w.float())
    with pytest.raises(RuntimeError, match="float weights"):
        kernels().qmatmul(torch.randn(2, 45), w.half(), None, None, KIND_BF16)  # the dtype is the kind's
    with pytest.raises(RuntimeError, match="float weights"):
        kernels().qmatmul(torch.randn(2, 44), w, None, None, KIND_BF16)


def ggml_q4_0(x: np.ndarray) -> np.ndarray:
    """ggml's quantize_row_q4_0_ref for one block, dequantized: the loop as ggml writes it."""
    amax, vmax = 0.0, 0.0
    for v in x:
        if amax < abs(v):
            amax, vmax = abs(v), v
    d = np.float32(vmax) / np.float32(-8)
    inv = np.float32(1) / d if d else np.float32(0)
    q = [min(15, int(np.float32(v) * inv + np.float32(8.5))) for v in x]
    return np.float32(np.float16(d)) * (np.array(q, dtype=np.float32) - 8)


def ggml_q4_1(x: np.ndarray) -> np.ndarray:
    lo, hi = np.float32(x.min()), np.float32(x.max())
    d = (hi - lo) / np.float32(15)
    inv = np.float32(1) / d if d else np.float32(0)
    q = [min(15, int((np.float32(v) - lo) * inv + np.float32(0.5))) for v in x]
    return np.float32(np.float16(d)) * np.array(q, dtype=np.float32) + np.float32(np.float16(lo))


@pytest.mark.parametrize("quantize,ref,kind", [(quantize_q4_0, ggml_q4_0, KIND_Q4), (quantize_q4_1, ggml_q4_1, KIND_Q4_MIN)])
def test_4bit_quantization_is_ggml_reference(quantize, ref, kind):
    torch.manual_seed(0)
    w = torch.randn(3, 96)
    w[1, 32:64] = 0.0  # an all-zero block quantizes to zeros
    w[2, :32] = 0.5  # a constant block
    blocks = quantize(w)
    assert blocks.kind == kind
    got = dequantize_blocks(blocks).numpy()
    want = np.stack([np.concatenate([ref(w[r, i:i + 32].numpy()) for i in range(0, 96, 32)]) for r in range(3)])
    np.testing.assert_array_equal(got, want)
    assert torch.equal(kernels().dequantize(blocks.qs, blocks.d, blocks.m, kind, 96, torch.float32), torch.from_numpy(got))


def greedy(llm: LLM, n: int = 24) -> list[int]:
    return llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)).token_ids


@pytest.mark.parametrize("arch", list(ARCHS))
def test_bf16_folder_on_the_fast_path_decodes_the_exact_tokens(arch, tmp_path):
    save_folder(tmp_path, arch, torch.bfloat16)
    # float32 keys and values on both sides: the fast path's default bf16 cache is a rounding of its own that
    # flips near-tied picks of these random models; here the weights' path alone is compared.
    fast = LLM(str(tmp_path), kv_dtype=torch.float32)
    exact = LLM(str(tmp_path), exact=True, kv_dtype=torch.float32)
    assert not fast.loaded.exact and exact.loaded.exact
    linears = [m for m in fast.model.modules() if isinstance(m, QuantLinear)]
    assert linears and {m.kind for m in linears} == {BF16_KIND}
    assert isinstance(fast.model.model.embed_tokens, QuantEmbedding)
    assert not any(type(m) is torch.nn.Linear for m in fast.model.modules())
    assert greedy(fast) == greedy(exact)
    assert isinstance(fast.model.model, FusedTransformer) and fast.model.model._stack is not None  # one C++ call


@pytest.mark.parametrize("dtype,kind", [(torch.float16, KIND_F16), (torch.float32, KIND_F32)])
def test_fp16_and_fp32_folders_keep_their_type(dtype, kind, tmp_path):
    save_folder(tmp_path, "qwen2", dtype)
    # a float32 folder stays on the exact path unless asked: its users expect float32 numbers
    assert LLM(str(tmp_path)).loaded.exact == (dtype == torch.float32)
    fast = LLM(str(tmp_path), exact=False, kv_dtype=torch.float32)
    assert {m.kind for m in fast.model.modules() if isinstance(m, QuantLinear)} == {kind}
    assert greedy(fast) == greedy(LLM(str(tmp_path), exact=True))


@pytest.mark.parametrize("qtype,kind", [("q8_0", KIND_Q8), ("q4_1", KIND_Q4_MIN)])
def test_quantize_at_load(qtype, kind, tmp_path):
    save_folder(tmp_path, "llama", torch.bfloat16, hidden_size=64, intermediate_size=128)
    llm = LLM(str(tmp_path), quantize=qtype)
    kinds = {name: m.kind for name, m in llm.model.named_modules() if isinstance(m, QuantLinear)}
    eight_bit = KIND_Q8_LANES if kernels().isa() == 2 else KIND_Q8  # 8-bit blocks across lanes with AVX-512
    assert kinds.pop("lm_head") == eight_bit  # the head stays at 8 bits, as llama.cpp keeps its output matrix
    assert set(kinds.values()) == {eight_bit if kind == KIND_Q8 else kind}
    assert len(greedy(llm, 8)) == 8
    with pytest.raises(LanternError, match="unknown quantization type 'q3_x'"):
        LLM(str(tmp_path), quantize="q3_x")
    with pytest.raises(LanternError, match="exclude"):
        LLM(str(tmp_path), quantize="q8_0", exact=True)
    assert LLM(str(tmp_path), exact=True).loaded.exact


def test_bf16_gguf_takes_the_folder_path(tmp_path):
    from tiny_models import make_hf_model

    hf = make_hf_model("qwen2").to(torch.bfloat16)
    write_gguf(hf, tmp_path / "m.gguf", T.BF16)
    fast = LLM(str(tmp_path / "m.gguf"), kv_dtype=torch.float32)
    assert {m.kind for m in fast.model.modules() if isinstance(m, QuantLinear)} == {BF16_KIND}
    exact = LLM(str(tmp_path / "m.gguf"), exact=True)
    ids = [5, 9, 13, 40]
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    assert fast.generate(ids, sp).token_ids == exact.generate(ids, sp).token_ids
    q8 = LLM(str(tmp_path / "m.gguf"), quantize="q8_0")
    assert {m.kind for m in q8.model.modules() if isinstance(m, QuantLinear)} == {
        KIND_Q8_LANES if kernels().isa() == 2 else KIND_Q8}
    # a file whose matrices are quantized already: --quantize is refused, not silently ignored
    write_gguf(hf, tmp_path / "q4.gguf", T.Q4_1)
    with pytest.raises(LanternError, match=r"q4.gguf: --quantize q8_0 quantizes float weights.*Q4_1 already"):
        LLM(str(tmp_path / "q4.gguf"), quantize="q8_0")


def test_cli_quantize(tmp_path):
    save_folder(tmp_path, "qwen2", torch.bfloat16)
    r = lantern("run", "-m", str(tmp_path), "--quantize", "q8_0", "--temperature", "0", "--max-tokens", "5", PROMPT)
    assert r.returncode == 0, r.stderr
    r = lantern("run", "-m", str(tmp_path), "--quantize", "q3", "--max-tokens", "5", PROMPT)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown quantization type 'q3'" in lines[0] and "q8_0" in lines[0], r.stderr
