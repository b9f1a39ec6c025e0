"""The paged decode attention kernel (decode_attention_paged in lanternlm/kernels/decode_cpu.cpp).

A paged cache is, per layer, a pool of fixed-size blocks K and V (num_blocks, KV, block_size, D) and, per
sequence, a block table mapping logical block i (positions i*bs .. i*bs+bs-1) to a physical block. The kernel
rotates q and k, writes the new key and value through the table and attends over the window through it.

- float32 pools give the contiguous kernel's numbers exactly (decode_attention on the same history), on AVX-512's
  register loops and on the per-row loops (AVX2, or a head_dim that is no multiple of 16), for scrambled
  tables, rows of different lengths, block sizes 16 and 32, sliding windows with released (-1) blocks before
  them, int32 and int64 tables; the kernel writes exactly one row per sequence and nothing else;
- bfloat16 pools equal a float64 reference over the bf16-rounded keys and values, and the written rows are
  the round-to-nearest-even of the rotated key and of the value;
- a pure-PyTorch gather through the table is the oracle for both;
- malformed arguments raise RuntimeError with a message naming the problem, before anything is written;
- DecodeStack.forward_paged equals DecodeStack.forward over the same history.
Skipped as a whole where the kernels cannot be built (no compiler, not x86-64 with AVX2).
"""

from __future__ import annotations

import pytest
import torch

from lanternlm.kernels import kernels, why_unavailable

K = kernels(quiet=True)
pytestmark = pytest.mark.skipif(K is None, reason=f"kernels unavailable: {why_unavailable()}")


# ---- the oracle: rotate-half RoPE and attention gathered through the table, in PyTorch ----

def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x (B, n, D) on its first rot dims; cos/sin (B, rot)."""
    rot = cos.shape[-1]
    xr, rest = x[..., :rot], x[..., rot:]
    x1, x2 = xr[..., : rot // 2], xr[..., rot // 2:]
    return torch.cat([xr * cos[:, None] + torch.cat([-x2, x1], -1) * sin[:, None], rest], -1)


def reference_paged(q, k, v, cos, sin, k_pool, v_pool, tables, positions, scale, window):
    """The kernel in PyTorch: writes the pools in place, returns (B, H*D) computed in float64."""
    B, H, D = q.shape
    KV, bs = k.shape[1], k_pool.shape[2]
    qr, kr = rope(q, cos, sin), rope(k, cos, sin)
    for b, p in enumerate(positions.tolist()):
        block = int(tables[b, p // bs])
        k_pool[block, :, p % bs] = kr[b].to(k_pool.dtype)
        v_pool[block, :, p % bs] = v[b].to(v_pool.dtype)
    out = torch.empty(B, H * D, dtype=torch.float64)
    for b, p in enumerate(positions.tolist()):
        first = max(0, p - window + 1) if window > 0 else 0
        js = torch.arange(first, p + 1)
        blocks, offsets = tables[b].long()[js // bs], js % bs
        keys = k_pool[blocks, :, offsets].double().repeat_interleave(H // KV, dim=1)  # (n, H, D)
        values = v_pool[blocks, :, offsets].double().repeat_interleave(H // KV, dim=1)
        weights = (torch.einsum("hd,nhd->hn", qr[b].double(), keys) * scale).softmax(-1)
        out[b] = torch.einsum("hn,nhd->hd", weights, values).reshape(-1)
    return out


# ---- building a paged copy of a contiguous cache ----

def make_tables(positions: list[int], bs: int, window: int, gen: torch.Generator, index_dtype, spare: int = 3):
    """Block tables for rows whose new token sits at `positions`: the blocks holding positions the window
    reads (and the one written) get physical ids from one random permutation (non-monotonic, interleaved
    across rows); blocks wholly before the window and blocks after the last are -1. `spare` unused blocks
    exist too. Returns (tables (B, max_blocks), num_blocks)."""
    needed = []
    for p in positions:
        first = max(0, p - window + 1) if window > 0 else 0
        needed.append(range(first // bs, p // bs + 1))
    num_blocks = sum(len(r) for r in needed) + spare
    ids = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(p // bs for p in positions) + 2  # one unallocated (-1) block past the longest row
    tables = torch.full((len(positions), width), -1, dtype=torch.int64)
    for b, r in enumerate(needed):
        for i in r:
            tables[b, i] = ids.pop()
    return tables.to(index_dtype), num_blocks


def fill_pool(cache: torch.Tensor, tables: torch.Tensor, positions: list[int], num_blocks: int, bs: int, dtype):
    """A pool holding each row's history 0..p-1 of `cache` (B, KV, S, D) where its table maps it; every other
    row of the pool (released, spare, not yet written) is NaN, so reading one would poison the output."""
    _, KV, _, D = cache.shape
    pool = torch.full((num_blocks, KV, bs, D), float("nan"), dtype=dtype)
    for b, p in enumerate(positions):
        for j in range(p):
            block = int(tables[b, j // bs])
            if block >= 0:
                pool[block, :, j % bs] = cache[b, :, j].to(dtype)
    return pool


def random_step(B, H, KV, D, rot, S, gen):
    """q (B, H, D), k, v (B, KV, D), cos, sin (B, rot) and a random contiguous history (B, KV, S, D) each."""
    def r(*shape):
        return torch.randn(*shape, generator=gen)
    angles = r(B, rot // 2) * 3
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    return r(B, H, D), r(B, KV, D), r(B, KV, D), cos, sin, r(B, KV, S, D), r(B, KV, S, D)


def row_positions(B: int, bs: int, gen: torch.Generator) -> list[int]:
    """B positions of the new tokens: block edges (0, bs-1, bs, 2bs-1) first, then random ones up to ~4 blocks."""
    edges = [bs - 1, 0, bs, 2 * bs - 1]
    return [edges[b] if b < len(edges) else int(torch.randint(0, 4 * bs + 5, (1,), generator=gen)) for b in range(B)]


# (H, KV, D, rot): the default model's; partial RoPE; two heads per KV head; a head_dim that is no multiple of 16
# (the per-row loops even on AVX-512); 5 heads per KV head (a run of 4 and a run of 1)
SHAPES = [(9, 3, 64, 64), (4, 1, 32, 16), (2, 2, 16, 16), (4, 2, 24, 24), (10, 2, 48, 48)]
SHAPE_IDS = ["9x3x64", "4x1x32-rot16", "2x2x16", "4x2x24", "10x2x48"]


def attention_path(isa: int, D: int) -> int:
    """The loops last_attention_path() names for this instruction set and head_dim: 2 AVX-512 registers, 1 per-row."""
    return 2 if isa == 2 and D % 16 == 0 else 1


@pytest.fixture(params=["threads", "one-thread"])
def threads(request):
    """Run on the machine's threads and on one: the (row, head) tasks are split across threads differently, the
    numbers must not change."""
    before = torch.get_num_threads()
    if request.param == "one-thread":
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("window", [0, 7, 20, 45])  # full attention; windows shorter and longer than a block
@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_float32_pools_equal_the_contiguous_kernel(shape, bs, window, index_dtype, threads, isa):
    H, KV, D, rot = shape
    gen = torch.Generator().manual_seed(bs * 1000 + window * 10 + D)
    B = [1, 8, int(torch.randint(2, 8, (1,), generator=gen))][(window + bs // 16) % 3]
    positions = row_positions(B, bs, gen)
    S = max(positions) + 3
    q, k, v, cos, sin, k_cache, v_cache = random_step(B, H, KV, D, rot, S, gen)
    scale = D ** -0.5
    tables, n = make_tables(positions, bs, window, gen, index_dtype)
    k_pool, v_pool = (fill_pool(c, tables, positions, n, bs, torch.float32) for c in (k_cache, v_cache))
    k_before, v_before = k_pool.clone(), v_pool.clone()
    pos = torch.tensor(positions)

    got = K.decode_attention_paged(q, k, v, cos, sin, k_pool, v_pool, tables, pos, scale, window)
    assert K.last_attention_path() == attention_path(isa, D)
    want = K.decode_attention(q, k, v, cos, sin, k_cache, v_cache, torch.arange(B), pos, scale, window)
    assert K.last_attention_path() == attention_path(isa, D)
    assert got.shape == (B, H * D) and got.dtype == torch.float32
    assert torch.equal(got, want), (got - want).abs().max()  # the same loops over the same rows
    oracle = reference_paged(q, k, v, cos, sin, k_before.clone(), v_before.clone(), tables, pos, scale, window)
    assert torch.allclose(got.double(), oracle, atol=1e-5, rtol=1e-5)

    # the new rows are where the table says and hold what the contiguous kernel wrote; nothing else changed
    for b, p in enumerate(positions):
        block = int(tables[b, p // bs])
        assert torch.allclose(k_pool[block, :, p % bs], k_cache[b, :, p], atol=1e-6, rtol=0)
        assert torch.equal(v_pool[block, :, p % bs], v_cache[b, :, p])
        k_before[block, :, p % bs], v_before[block, :, p % bs] = k_pool[block, :, p % bs], v_pool[block, :, p % bs]
    torch.testing.assert_close(k_pool, k_before, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(v_pool, v_before, atol=0, rtol=0, equal_nan=True)


def test_released_blocks_really_exist_in_the_windowed_cases():
    # guard on the test above: with window 7 and block size 16, rows past position 22 release their first block
    tables, _ = make_tables([40, 3], 16, 7, torch.Generator().manual_seed(0), torch.int64)
    assert tables[0, 0] == -1 and tables[0, 1] == -1 and tables[0, 2] >= 0 and tables[1, 0] >= 0


@pytest.mark.parametrize("window", [0, 20])
@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("shape", SHAPES[:2] + SHAPES[3:], ids=SHAPE_IDS[:2] + SHAPE_IDS[3:])
def test_bfloat16_pools_equal_the_reference_on_rounded_values(shape, bs, window, threads, isa):
    H, KV, D, rot = shape
    gen = torch.Generator().manual_seed(bs + window + D)
    B = 8
    positions = row_positions(B, bs, gen)
    q, k, v, cos, sin, k_cache, v_cache = random_step(B, H, KV, D, rot, max(positions) + 1, gen)
    tables, n = make_tables(positions, bs, window, gen, torch.int32)
    k_pool, v_pool = (fill_pool(c, tables, positions, n, bs, torch.bfloat16) for c in (k_cache, v_cache))
    k_ref, v_ref = k_pool.clone(), v_pool.clone()
    pos = torch.tensor(positions)

    got = K.decode_attention_paged(q, k, v, cos, sin, k_pool, v_pool, tables, pos, 0.125, window)
    assert K.last_attention_path() == attention_path(isa, D)
    oracle = reference_paged(q, k, v, cos, sin, k_ref, v_ref, tables, pos, 0.125, window)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), oracle, atol=1e-5, rtol=1e-5), (got.double() - oracle).abs().max()
    # the written rows are the bf16 rounding of the rotated key and of the value, bit for bit
    torch.testing.assert_close(k_pool, k_ref, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(v_pool, v_ref, atol=0, rtol=0, equal_nan=True)
    kr = rope(k, cos, sin)
    for b, p in enumerate(positions):
        block = int(tables[b, p // bs])
        assert torch.equal(k_pool[block, :, p % bs], kr[b].to(torch.bfloat16))
        assert torch.equal(v_pool[block, :, p % bs], v[b].to(torch.bfloat16))
    # and bf16 keeps the answer near the float32 one (8 bits of mantissa)
    k32, v32 = (fill_pool(c, tables, positions, n, bs, torch.float32) for c in (k_cache, v_cache))
    exact = K.decode_attention_paged(q, k, v, cos, sin, k32, v32, tables, pos, 0.125, window)
    assert torch.allclose(got, exact, atol=0.05, rtol=0.05)


def test_bfloat16_writes_round_to_nearest_even():
    # values at and around the halfway point between two bf16 numbers, subnormals, overflow and specials;
    # v is written unrotated, so its bits can be chosen exactly
    bits = [0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0xBF808000, 0x00008000, 0x00018000, 0x7F7FFFFF,
            0x7F7F7FFF, 0x7F800000, 0xFF800000, 0x80000000, 0x00000000, 0x3F800000, 0x7FC00000, 0x7F800001]
    D = 16
    v32 = torch.tensor(bits + [0x3F800000] * (D * 2 - len(bits)), dtype=torch.int64).to(torch.int32).view(torch.float32)
    v = v32.view(1, 2, D)
    k = torch.zeros(1, 2, D)
    q = torch.zeros(1, 2, D)
    cos, sin = torch.ones(1, D), torch.zeros(1, D)
    k_pool = torch.zeros(2, 2, 16, D, dtype=torch.bfloat16)
    v_pool = torch.zeros(2, 2, 16, D, dtype=torch.bfloat16)
    K.decode_attention_paged(q, k, v, cos, sin, k_pool, v_pool, torch.tensor([[1]]), torch.tensor([3]), 1.0, 0)
    written = v_pool[1, :, 3].reshape(-1)
    want = v32.to(torch.bfloat16)
    nan = want.isnan()
    assert torch.equal(written.isnan(), nan)
    assert torch.equal(written[~nan].view(torch.int16), want[~nan].view(torch.int16))
    assert written.view(torch.int16)[0] == 0x3F80 and written.view(torch.int16)[1] == 0x3F82  # ties to even
    assert written[7] == float("inf")  # the largest float32 rounds up past bf16's largest finite value


def test_decode_attention_paged_single_row_at_position_zero_attends_to_itself():
    v = torch.randn(1, 1, 8)
    out = K.decode_attention_paged(torch.randn(1, 2, 8), torch.randn(1, 1, 8), v, torch.ones(1, 8), torch.zeros(1, 8),
                                   torch.zeros(1, 1, 16, 8), torch.zeros(1, 1, 16, 8), torch.tensor([[0]]),
                                   torch.tensor([0]), 0.3, 0)
    assert torch.equal(out, v[0].repeat(1, 2))


# ---- malformed arguments ----

def error_case(dtype=torch.float32):
    """A valid call (one row at position 40, window 8, block size 16: logical blocks 0 and 1 released)."""
    gen = torch.Generator().manual_seed(7)
    q, k, v, cos, sin, _, _ = random_step(1, 4, 2, 16, 16, 1, gen)
    pools = torch.zeros(4, 2, 16, 16, dtype=dtype), torch.zeros(4, 2, 16, 16, dtype=dtype)
    return {"q": q, "k": k, "v": v, "cos": cos, "sin": sin, "k_pool": pools[0], "v_pool": pools[1],
            "block_tables": torch.tensor([[-1, -1, 2, -1]], dtype=torch.int32), "positions": torch.tensor([40]),
            "scale": 0.25, "window": 8}


def call(a):
    return K.decode_attention_paged(a["q"], a["k"], a["v"], a["cos"], a["sin"], a["k_pool"], a["v_pool"],
                                    a["block_tables"], a["positions"], a["scale"], a["window"])


def test_the_error_case_is_valid():
    a = error_case()
    call(a)
    assert a["k_pool"][2, :, 8].abs().sum() > 0  # written at block 2, offset 40 % 16


@pytest.mark.parametrize("change,message", [
    ({"block_tables": torch.tensor([[-1, -1, 4, -1]], dtype=torch.int32)},
     r"block_tables\[0\]\[2\] = 4 is not a block of the pool \(0..3\)"),
    ({"block_tables": torch.tensor([[-1, -1, -7, -1]])}, r"block_tables\[0\]\[2\] = -7 is not a block"),
    ({"window": 0}, r"block_tables\[0\]\[0\] = -1 .*released block inside the attention window"),
    ({"window": 10}, r"block_tables\[0\]\[1\] = -1 .*positions 31..31"),
    ({"positions": torch.tensor([64])}, r"positions\[0\] = 64 is outside the block table's 0..63"),
    ({"positions": torch.tensor([-1])}, r"positions\[0\] = -1 is outside"),
    ({"v_pool": torch.zeros(4, 2, 16, 16, dtype=torch.bfloat16)}, "k_pool and v_pool must have the same dtype"),
    ({"k_pool": torch.zeros(4, 2, 16, 16, dtype=torch.float16),
      "v_pool": torch.zeros(4, 2, 16, 16, dtype=torch.float16)}, "must be float32 or bfloat16"),
    ({"v_pool": torch.zeros(4, 2, 8, 16)}, r"must both be \(num_blocks, KV=2, block_size, D=16\)"),
    ({"k_pool": torch.zeros(4, 1, 16, 16), "v_pool": torch.zeros(4, 1, 16, 16)}, "KV=2"),
    ({"k_pool": torch.zeros(4, 16, 2, 16).transpose(1, 2)}, "contiguous"),
    ({"block_tables": torch.tensor([[-1.0, -1.0, 2.0, -1.0]])}, "int32 or int64"),
    ({"block_tables": torch.tensor([-1, -1, 2, -1])}, r"block_tables must be \(B=1, max_blocks\)"),
    ({"positions": torch.tensor([40], dtype=torch.int32)}, "positions must be"),
    ({"q": torch.zeros(1, 3, 16)}, "H a multiple of KV"),
    ({"q": torch.zeros(1, 4, 16, dtype=torch.float64)}, "float32"),
])
def test_malformed_arguments_raise_before_writing(change, message):
    a = error_case()
    a.update(change)
    before = a["k_pool"].clone(), a["v_pool"].clone()
    with pytest.raises(RuntimeError, match=message):
        call(a)
    assert torch.equal(a["k_pool"], before[0]) and torch.equal(a["v_pool"], before[1])


def test_a_released_block_in_any_row_stops_the_whole_call_before_writing():
    a = error_case()
    a.update(q=a["q"].repeat(2, 1, 1), k=a["k"].repeat(2, 1, 1), v=a["v"].repeat(2, 1, 1), cos=a["cos"].repeat(2, 1),
             sin=a["sin"].repeat(2, 1), positions=torch.tensor([40, 20]),
             block_tables=torch.tensor([[-1, -1, 2, -1], [0, -1, -1, -1]], dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"block_tables\[1\]\[1\] = -1"):
        call(a)
    assert a["k_pool"].abs().sum() == 0  # row 0 (valid) was not written either


# ---- the whole stack ----

@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # gemma3: sliding layers (window 4), two RoPE kinds, q/k norms
def test_decode_stack_forward_paged_equals_forward(arch, tmp_path):
    from gguf import GGMLQuantizationType as T

    from lanternlm.fused import _decode_stack
    from lanternlm.load import load

    from gguf_writer import write_gguf
    from tiny_models import make_hf_model

    write_gguf(make_hf_model(arch), tmp_path / "m.gguf", T.Q8_0)
    model = load(tmp_path / "m.gguf", exact=False).model
    stack = _decode_stack(model.model)
    assert stack is not None
    cfg = model.config
    gen = torch.Generator().manual_seed(3)
    positions = [9, 3, 14, 16]
    B, KV, D, bs = len(positions), cfg.num_key_value_heads, cfg.head_dim, 4
    pos = torch.tensor(positions)
    cos, sin = [], []
    for kind in sorted(set(cfg.layer_types)):
        c, s = model.model.rotary[kind](pos[:, None], torch.float32)
        cos.append(c[:, 0])
        sin.append(s[:, 0])
    h = torch.randn(B, cfg.hidden_size, generator=gen)
    layers = cfg.num_hidden_layers
    k_caches = [torch.randn(B, KV, 20, D, generator=gen) for _ in range(layers)]
    v_caches = [torch.randn(B, KV, 20, D, generator=gen) for _ in range(layers)]
    tables, n = make_tables(positions, bs, 0, gen, torch.int64)  # one table for all layers
    for dtype in (torch.float32, torch.bfloat16):
        k_pools = [fill_pool(c, tables, positions, n, bs, dtype) for c in k_caches]
        v_pools = [fill_pool(c, tables, positions, n, bs, dtype) for c in v_caches]
        # the contiguous reference on the same (rounded) history
        kc = [c.to(dtype).float() for c in k_caches]
        vc = [c.to(dtype).float() for c in v_caches]
        want = stack.forward(h, cos, sin, kc, vc, torch.arange(B), pos)
        got = stack.forward_paged(h, cos, sin, k_pools, v_pools, tables, pos)
        if dtype == torch.float32:
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
            for layer in range(layers):
                for b, p in enumerate(positions):
                    block = int(tables[b, p // bs])
                    assert torch.allclose(k_pools[layer][block, :, p % bs], kc[layer][b, :, p], atol=1e-6)
        else:  # only the new token's key and value are rounded differently
            assert torch.allclose(got, want, atol=0.05, rtol=0.02), (got - want).abs().max()
