"""Tests for lanternlm.loader.quants: every supported type must equal gguf-py's dequantizer bit for bit."""

from __future__ import annotations

import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as reference_dequantize

from lanternlm.errors import LanternError
from lanternlm.loader.gguf import read_gguf
from lanternlm.loader.quants import GGUF_PY_TYPES, SUPPORTED_TYPES, dequantize, tensor_nbytes, type_layout, type_name

from gguf_writer import SCALE_AT
from gguf_writer import random_blocks as small_scale_blocks
from model_files import default_gguf_path

BLOCK_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]

# Byte offsets of the fp16 scale fields inside one block (from ggml's block structs). Random bytes elsewhere are
# always valid quants; the scales get random *finite* fp16 values (normal, subnormal, zero, either sign) so the
# comparison is not spoiled by NaN != NaN.
FP16_FIELDS = {
    T.Q4_0: [0],
    T.Q4_1: [0, 2],
    T.Q5_0: [0],
    T.Q5_1: [0, 2],
    T.Q8_0: [0],
    T.Q2_K: [80, 82],
    T.Q3_K: [108],
    T.Q4_K: [0, 2],
    T.Q5_K: [0, 2],
    T.Q6_K: [208],
}


def model_path() -> Path:
    return default_gguf_path()


def random_finite_f16(rng: np.random.Generator, n: int) -> np.ndarray:
    """n random fp16 bit patterns with the all-ones exponent (inf/NaN) excluded, as (n, 2) uint8."""
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
    bits = np.where((bits & 0x7C00) == 0x7C00, bits & 0xBFFF, bits).astype(np.uint16)
    return bits.view(np.uint8).reshape(n, 2)


def random_blocks(rng: np.random.Generator, qtype: T, n_blocks: int) -> np.ndarray:
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for start in FP16_FIELDS[qtype]:
        blocks[:, start : start + 2] = random_finite_f16(rng, n_blocks)
    return blocks


def reference(raw: np.ndarray, qtype: T, shape: tuple[int, ...]) -> torch.Tensor:
    """gguf-py's answer for raw bytes of a tensor with PyTorch shape `shape`, as float32."""
    rows = raw.reshape(-1, tensor_nbytes(int(qtype), (shape[-1],)))
    values = np.asarray(reference_dequantize(rows, qtype)).astype(np.float32)
    return torch.from_numpy(values.copy()).reshape(shape)


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_random_blocks_match_gguf_py_exactly(qtype, rows):
    rng = np.random.default_rng(1000 * int(qtype) + rows)
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    blocks_per_row = 3 if block_size == 256 else 5
    shape = (rows, blocks_per_row * block_size)
    raw = random_blocks(rng, qtype, rows * blocks_per_row).reshape(-1)

    got = dequantize(raw, int(qtype), shape)

    assert got.dtype == torch.float32 and tuple(got.shape) == shape
    assert torch.equal(got, reference(raw, qtype, shape))


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_three_dimensional_shape(qtype):
    rng = np.random.default_rng(int(qtype))
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    shape = (2, 3, 2 * block_size)
    raw = random_blocks(rng, qtype, 12).reshape(-1)
    assert torch.equal(dequantize(raw, int(qtype), shape), reference(raw, qtype, shape))


def test_quantized_values_from_gguf_py_quantizer_round_trip():
    # Realistic (not random-byte) blocks: quantize smooth data with gguf-py, then decode both ways.
    rng = np.random.default_rng(7)
    data = rng.standard_normal((16, 256)).astype(np.float32)
    for qtype in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0):
        packed = gguf.quants.quantize(data, qtype)
        got = dequantize(packed.reshape(-1), int(qtype), data.shape)
        assert torch.equal(got, reference(packed.reshape(-1), qtype, data.shape)), qtype.name
        # And it is a sane approximation of the input (catches decoders that agree on garbage).
        assert (got - torch.from_numpy(data)).abs().max().item() < 0.5, qtype.name


@pytest.mark.parametrize("qtype", [T.F16, T.BF16], ids=lambda t: t.name)
def test_every_16_bit_pattern(qtype):
    # All 65536 bit patterns: zeros, subnormals, infinities and NaNs included.
    raw = np.arange(1 << 16, dtype=np.uint16).view(np.uint8)
    got = dequantize(raw, int(qtype), (256, 256))
    expected = torch.from_numpy(np.asarray(reference_dequantize(raw, qtype)).astype(np.float32).reshape(256, 256))
    assert torch.equal(got.isnan(), expected.isnan())
    finite = ~expected.isnan()
    assert torch.equal(got[finite], expected[finite])
    # Sign of zero survives too.
    assert torch.equal(torch.signbit(got[finite]), torch.signbit(expected[finite]))


def test_f32_is_bit_exact_including_nan_payloads():
    bits = np.random.default_rng(3).integers(0, 1 << 32, size=4096, dtype=np.uint64).astype(np.uint32)
    raw = bits.view(np.uint8)
    got = dequantize(raw, int(T.F32), (64, 64))
    assert np.array_equal(got.numpy().view(np.uint32).reshape(-1), bits)


def test_torch_and_numpy_inputs_agree_and_result_is_independent():
    rng = np.random.default_rng(11)
    raw = random_blocks(rng, T.Q6_K, 4).reshape(-1)
    from_numpy = dequantize(raw, int(T.Q6_K), (4, 256))
    from_torch = dequantize(torch.from_numpy(raw.copy()), int(T.Q6_K), (4, 256))
    assert torch.equal(from_numpy, from_torch)

    f32 = np.arange(8, dtype=np.float32).view(np.uint8)
    source = torch.from_numpy(f32.copy())
    out = dequantize(source, int(T.F32), (8,))
    out[0] = 100.0
    assert source[:4].view(torch.float32).item() == 0.0  # the result does not alias its input


def test_read_only_input_gives_no_warning():
    raw = np.arange(16, dtype=np.float32).view(np.uint8)
    raw.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = dequantize(raw, int(T.F32), (4, 4))
    out += 1  # and the result is writable
    assert out[0, 0].item() == 1.0


def test_layout_table_agrees_with_gguf_py():
    for qtype in T:
        assert type_layout(int(qtype)) == tuple(gguf.GGML_QUANT_SIZES[qtype]), qtype.name
        assert type_name(int(qtype)) == qtype.name
    assert {T(t).name for t in SUPPORTED_TYPES} >= {
        "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
        "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0",
        "MXFP4",
    }
    # what no model file holds (ggml's run-time activation types, integers)
    assert not {T(t).name for t in SUPPORTED_TYPES} & {"Q8_1", "Q8_K", "I8", "I16", "I32", "I64", "F64"}


def test_unknown_type_is_a_clear_error():
    with pytest.raises(LanternError, match="unknown ggml tensor type 99"):
        type_layout(99)
    assert type_name(99) == "unknown type 99"
    with pytest.raises(LanternError, match="unknown type 99"):
        dequantize(np.zeros(4, np.uint8), 99, (1,))


def test_known_but_unsupported_type_names_the_type():
    _, type_size = gguf.GGML_QUANT_SIZES[T.Q8_K]
    with pytest.raises(LanternError, match="Q8_K is not supported"):
        dequantize(np.zeros(type_size, np.uint8), int(T.Q8_K), (256,))


@pytest.mark.parametrize("qtype", sorted((t for t in SCALE_AT if int(t) in GGUF_PY_TYPES), key=int), ids=lambda t: t.name)
def test_iq_and_ternary_types_decode_as_gguf_py_does(qtype):
    # gguf-py decodes these for Lantern (loader/quants.GGUF_PY_TYPES): the tensor's shape, dtype and every value.
    raw = small_scale_blocks(qtype, 3, 512, np.random.default_rng(int(qtype)))
    got = dequantize(raw.reshape(-1), int(qtype), (3, 512))
    want = torch.from_numpy(reference_dequantize(raw, qtype))
    assert got.dtype == torch.float32 and got.shape == (3, 512)
    assert torch.equal(got, want) and torch.isfinite(got).all() and got.abs().max() > 0


def test_wrong_byte_count_and_partial_blocks_are_rejected():
    with pytest.raises(LanternError, match="needs 68 bytes, got 67"):
        dequantize(np.zeros(67, np.uint8), int(T.Q8_0), (64,))
    with pytest.raises(LanternError, match="not a multiple of its block size 32"):
        dequantize(np.zeros(34, np.uint8), int(T.Q8_0), (2, 16))
    with pytest.raises(LanternError, match="1-D uint8"):
        dequantize(np.zeros((2, 34), np.uint8), int(T.Q8_0), (64,))
    with pytest.raises(LanternError, match="1-D uint8"):
        dequantize(torch.zeros(34, dtype=torch.int8), int(T.Q8_0), (32,))


def test_every_tensor_of_the_default_model_matches_gguf_py():
    with read_gguf(model_path()) as model:
        seen = set()
        for name, info in model.tensors.items():
            raw = model.raw(name)
            got = dequantize(raw, info.ggml_type, info.shape)
            assert torch.equal(got, reference(raw, T(info.ggml_type), info.shape)), name
            seen.add(type_name(info.ggml_type))
    assert {"Q4_1", "Q8_0", "F32"} <= seen
