"""Tests for lanternlm.loader.gguf: files written by gguf-py read back right, and malformed files fail clearly."""

from __future__ import annotations

import struct
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

from lanternlm.errors import ModelFileError
from lanternlm.loader.gguf import GGUFFile, GGUFTensorInfo, read_gguf

from model_files import default_gguf_path

RNG = np.random.default_rng(42)
# Tensors of the sample file, PyTorch shapes. Names of equal length let tests swap one name for another.
ALPHA = RNG.standard_normal((3, 64)).astype(np.float32)  # F32, 2-D
BETA = RNG.standard_normal((2, 3, 32)).astype(np.float16)  # F16, 3-D
GAMMA = RNG.standard_normal((4, 64)).astype(np.float32)  # stored as Q8_0
DELTA = RNG.integers(0, 256, size=(2, 144), dtype=np.uint8)  # raw Q4_K bytes: 2 rows of one 256-block
DELTA[:, 0:4] = np.array([0x00, 0x3C, 0x00, 0x38], np.uint8)  # finite fp16 d = 1.0, dmin = 0.5
EPSIL = RNG.standard_normal(5).astype(np.float32)  # F32, 1-D

METADATA = {
    "test.u8": (200, V.UINT8),
    "test.i8": (-100, V.INT8),
    "test.u16": (60000, V.UINT16),
    "test.i16": (-30000, V.INT16),
    "test.u32": (4_000_000_000, V.UINT32),
    "test.i32": (-2_000_000_000, V.INT32),
    "test.f32": (0.1, V.FLOAT32),
    "test.u64": (2**63 + 5, V.UINT64),
    "test.i64": (-(2**62), V.INT64),
    "test.f64": (0.1, V.FLOAT64),
    "test.yes": (True, V.BOOL),
    "test.nop": (False, V.BOOL),
    "test.name": ("héllo ✓ wörld", V.STRING),
    "test.words": (["a", "bb", "", "ünï"], V.ARRAY, V.STRING),
    "test.ints": ([3, -1, 7], V.ARRAY, V.INT32),
    "test.big": ([1, 2**40], V.ARRAY, V.UINT64),
    "test.floats": ([0.5, -2.25, 1e-3], V.ARRAY, V.FLOAT32),
    "test.flags": ([True, False, True], V.ARRAY, V.BOOL),
    "test.last": ("z" * 300, V.STRING),
}


def model_path() -> Path:
    return default_gguf_path()


def write_sample(path: Path, alignment: int | None = None, endian=gguf.GGUFEndian.LITTLE) -> Path:
    writer = gguf.GGUFWriter(path, arch="testarch", endianess=endian)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for key, spec in METADATA.items():
        writer.add_key_value(key, spec[0], spec[1], sub_type=spec[2] if len(spec) > 2 else None)
    writer.add_tensor("alpha.weight", ALPHA)
    writer.add_tensor("beta.weight", BETA)
    writer.add_tensor("gamma.weight", gguf.quants.quantize(GAMMA, T.Q8_0), raw_dtype=T.Q8_0)
    writer.add_tensor("delta.weight", DELTA, raw_dtype=T.Q4_K)
    writer.add_tensor("epsil.bias", EPSIL)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def sample(tmp_path) -> Path:
    return write_sample(tmp_path / "sample.gguf")


# ---- locating fields inside a written file, to corrupt them ----


def _string_at(data: bytes, text: str) -> int:
    """Byte position of the length prefix of the GGUF string `text` (which must occur once)."""
    needle = struct.pack("<Q", len(text.encode())) + text.encode()
    assert data.count(needle) == 1, text
    return data.index(needle)


def kv_fields(data: bytes, key: str) -> dict[str, int]:
    start = _string_at(data, key)
    type_pos = start + 8 + len(key.encode())
    return {"key_len": start, "key": start + 8, "type": type_pos, "value": type_pos + 4}


def tensor_fields(data: bytes, name: str) -> dict[str, int]:
    start = _string_at(data, name)
    n_dims_pos = start + 8 + len(name)
    (n_dims,) = struct.unpack_from("<I", data, n_dims_pos)
    dims_pos = n_dims_pos + 4
    type_pos = dims_pos + 8 * n_dims
    return {"name": start + 8, "n_dims": n_dims_pos, "dims": dims_pos, "type": type_pos, "offset": type_pos + 4}


def patch(data: bytes, pos: int, fmt: str, value) -> bytes:
    packed = struct.pack(fmt, value)
    return data[:pos] + packed + data[pos + len(packed) :]


# ---- reading valid files ----


def test_metadata_round_trips_with_python_types(sample):
    with read_gguf(sample) as f:
        assert f.version == 3 and f.alignment == 32
        assert f.metadata["general.architecture"] == "testarch"
        for key in ("test.u8", "test.i8", "test.u16", "test.i16", "test.u32", "test.i32", "test.u64", "test.i64"):
            assert type(f.metadata[key]) is int and f.metadata[key] == METADATA[key][0], key
        assert f.metadata["test.f32"] == float(np.float32(0.1))  # the stored float32, widened
        assert f.metadata["test.f64"] == 0.1
        assert f.metadata["test.yes"] is True and f.metadata["test.nop"] is False
        assert f.metadata["test.name"] == "héllo ✓ wörld"
        assert f.metadata["test.words"] == ["a", "bb", "", "ünï"]
        ints = f.metadata["test.ints"]
        assert isinstance(ints, np.ndarray) and ints.dtype == np.int32 and ints.tolist() == [3, -1, 7]
        assert f.metadata["test.big"].dtype == np.uint64 and f.metadata["test.big"].tolist() == [1, 2**40]
        floats = f.metadata["test.floats"]
        assert floats.dtype == np.float32 and np.array_equal(floats, np.array([0.5, -2.25, 1e-3], np.float32))
        flags = f.metadata["test.flags"]
        assert flags.dtype == np.bool_ and flags.tolist() == [True, False, True]
        assert list(f.metadata) == ["general.architecture", *METADATA]


def test_metadata_and_tensor_table_agree_with_gguf_py_reader(sample):
    reader = gguf.GGUFReader(sample)
    with read_gguf(sample) as f:
        assert list(f.tensors) == [t.name for t in reader.tensors]
        for t in reader.tensors:
            info = f.tensors[t.name]
            assert info == GGUFTensorInfo(
                t.name, tuple(int(d) for d in reversed(t.shape.tolist())), int(t.tensor_type), t.data_offset, t.n_bytes
            )
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            ours, theirs = f.metadata[key], field.contents()
            if isinstance(ours, np.ndarray):
                assert np.array_equal(ours, np.asarray(theirs)), key
            else:
                assert ours == theirs, key


def test_tensors_have_pytorch_shapes_types_and_values(sample):
    with read_gguf(sample) as f:
        assert {n: (i.shape, i.ggml_type) for n, i in f.tensors.items()} == {
            "alpha.weight": ((3, 64), T.F32),
            "beta.weight": ((2, 3, 32), T.F16),
            "gamma.weight": ((4, 64), T.Q8_0),
            "delta.weight": ((2, 256), T.Q4_K),
            "epsil.bias": ((5,), T.F32),
        }
        assert torch.equal(f.tensor("alpha.weight"), torch.from_numpy(ALPHA))
        assert torch.equal(f.tensor("beta.weight"), torch.from_numpy(BETA.astype(np.float32)))
        assert torch.equal(f.tensor("epsil.bias"), torch.from_numpy(EPSIL))
        q8 = gguf.quants.dequantize(gguf.quants.quantize(GAMMA, T.Q8_0), T.Q8_0)
        assert torch.equal(f.tensor("gamma.weight"), torch.from_numpy(q8))
        q4k = gguf.quants.dequantize(DELTA, T.Q4_K)
        assert torch.equal(f.tensor("delta.weight"), torch.from_numpy(q4k))
        half = f.tensor("alpha.weight", dtype=torch.float16)
        assert half.dtype == torch.float16 and torch.equal(half, torch.from_numpy(ALPHA).half())


def test_raw_is_a_read_only_view_of_the_file_bytes(sample):
    data = sample.read_bytes()
    with read_gguf(sample) as f:
        info = f.tensors["gamma.weight"]
        raw = f.raw("gamma.weight")
        assert raw.dtype == np.uint8 and raw.shape == (info.nbytes,)
        assert not raw.flags.writeable and not raw.flags.owndata
        assert raw.tobytes() == data[info.offset : info.offset + info.nbytes]
        assert info.offset % 32 == 0
        del raw


def test_custom_alignment_is_honoured(tmp_path):
    path = write_sample(tmp_path / "aligned.gguf", alignment=256)
    with read_gguf(path) as f:
        assert f.alignment == 256
        assert all(info.offset % 256 == 0 for info in f.tensors.values())
        assert torch.equal(f.tensor("epsil.bias"), torch.from_numpy(EPSIL))
        assert torch.equal(f.tensor("alpha.weight"), torch.from_numpy(ALPHA))


def test_version_2_reads_like_version_3(sample, tmp_path):
    v2 = tmp_path / "v2.gguf"
    v2.write_bytes(patch(sample.read_bytes(), 4, "<I", 2))
    with read_gguf(sample) as f3, read_gguf(v2) as f2:
        assert f2.version == 2
        assert f2.tensors == f3.tensors
        assert f2.metadata["test.words"] == f3.metadata["test.words"]
        assert torch.equal(f2.tensor("beta.weight"), f3.tensor("beta.weight"))


def test_close_and_lookup_errors(sample):
    f = read_gguf(sample)
    assert isinstance(f, GGUFFile)
    with pytest.raises(ModelFileError, match=r"no tensor named 'missing\.weight'") as exc:
        f.raw("missing.weight")
    assert str(sample) in str(exc.value)
    view = f.raw("alpha.weight")
    f.close()  # a live view must not make close() fail or dangle
    assert view.tobytes() == ALPHA.tobytes()
    with pytest.raises(ModelFileError, match="file is closed"):
        f.tensor("alpha.weight")
    with read_gguf(sample) as g:
        pass
    with pytest.raises(ModelFileError, match="file is closed"):
        g.raw("alpha.weight")


def test_tensor_of_an_unsupported_type_fails_only_when_read(tmp_path):
    path = tmp_path / "iq.gguf"
    writer = gguf.GGUFWriter(path, arch="testarch")
    writer.add_tensor("iq.weight", np.zeros((1, 292), np.uint8), raw_dtype=T.Q8_K)  # a type no model file holds
    writer.add_tensor("ok.weight", EPSIL)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with read_gguf(path) as f:
        assert f.tensors["iq.weight"].shape == (1, 256)
        assert torch.equal(f.tensor("ok.weight"), torch.from_numpy(EPSIL))
        with pytest.raises(ModelFileError, match=r"tensor 'iq\.weight': dequantizing Q8_K is not supported") as exc:
            f.tensor("iq.weight")
        assert str(exc.value).startswith(str(path))


# ---- malformed files ----


def _truncate_in_last_string(data: bytes) -> bytes:
    return data[: kv_fields(data, "test.last")["value"] + 8 + 100]


def _truncate_in_tensor_data(data: bytes) -> bytes:
    # epsil.bias is the last tensor: 20 bytes of data padded to 32 at the end of the file, so cutting
    # 16 bytes leaves only 16 of its 20 bytes.
    return data[: len(data) - 16]


CASES = {
    "bad_magic": (lambda d: b"GGML" + d[4:], "not a GGUF file"),
    "empty_file": (lambda d: b"", "file is empty"),
    "three_bytes": (lambda d: d[:3], "too short to be a GGUF file"),
    "truncated_header": (lambda d: d[:12], "file is truncated: header tensor count"),
    "truncated_metadata": (_truncate_in_last_string, "value of metadata key 'test.last' at byte"),
    "version_1": (lambda d: patch(d, 4, "<I", 1), "unsupported GGUF version 1"),
    "version_99": (lambda d: patch(d, 4, "<I", 99), "unsupported GGUF version 99"),
    "absurd_tensor_count": (lambda d: patch(d, 8, "<Q", 2**60), f"header claims {2**60} tensors"),
    "absurd_kv_count": (lambda d: patch(d, 16, "<Q", 2**60), f"header claims {2**60} metadata entries"),
    "huge_key_length": (
        lambda d: patch(d, kv_fields(d, "test.u8")["key_len"], "<Q", 2**62),
        f"claims {2**62} bytes",
    ),
    "huge_string_value": (
        lambda d: patch(d, kv_fields(d, "test.name")["value"], "<Q", 2**62),
        f"value of metadata key 'test.name' at byte .* claims {2**62} bytes",
    ),
    "huge_string_array": (
        lambda d: patch(d, kv_fields(d, "test.words")["value"] + 4, "<Q", 2**62),
        f"metadata key 'test.words': array of {2**62} strings .* runs past the end",
    ),
    "huge_string_in_array": (
        lambda d: patch(d, kv_fields(d, "test.words")["value"] + 4 + 8 + 8 + 1, "<Q", 2**62),
        f"metadata key 'test.words': string #1 .* claims {2**62} bytes",
    ),
    "huge_numeric_array": (
        lambda d: patch(d, kv_fields(d, "test.ints")["value"] + 4, "<Q", 2**62),
        f"metadata key 'test.ints': array of {2**62} int32 values .* runs past the end",
    ),
    "unknown_value_type": (
        lambda d: patch(d, kv_fields(d, "test.u32")["type"], "<I", 99),
        "metadata key 'test.u32' has unknown value type 99",
    ),
    "unknown_array_type": (
        lambda d: patch(d, kv_fields(d, "test.ints")["value"], "<I", 77),
        "metadata key 'test.ints' is an array of unknown value type 77",
    ),
    "array_of_arrays": (
        lambda d: patch(d, kv_fields(d, "test.ints")["value"], "<I", 9),
        "metadata key 'test.ints' is an array of arrays",
    ),
    "duplicate_key": (
        lambda d: patch(d, kv_fields(d, "test.i8")["key"], "7s", b"test.u8"),
        "duplicate metadata key 'test.u8'",
    ),
    "key_not_utf8": (lambda d: patch(d, kv_fields(d, "test.u16")["key"], "B", 0xFF), "is not valid UTF-8"),
    "array_string_not_utf8": (
        lambda d: patch(d, kv_fields(d, "test.words")["value"] + 4 + 8 + 8, "B", 0xC3),
        "metadata key 'test.words': string #0 is not valid UTF-8",
    ),
    "unknown_ggml_type": (
        lambda d: patch(d, tensor_fields(d, "alpha.weight")["type"], "<I", 99),
        "tensor 'alpha.weight': unknown ggml tensor type 99",
    ),
    "removed_ggml_type": (
        lambda d: patch(d, tensor_fields(d, "alpha.weight")["type"], "<I", 4),
        "tensor 'alpha.weight': unknown ggml tensor type 4",
    ),
    "five_dims": (
        lambda d: patch(d, tensor_fields(d, "alpha.weight")["n_dims"], "<I", 5),
        "tensor 'alpha.weight' has 5 dimensions",
    ),
    "huge_dim_count": (
        lambda d: patch(d, tensor_fields(d, "alpha.weight")["n_dims"], "<I", 2**32 - 1),
        f"tensor 'alpha.weight' has {2**32 - 1} dimensions",
    ),
    "zero_dim": (
        lambda d: patch(d, tensor_fields(d, "beta.weight")["dims"] + 8, "<Q", 0),
        "tensor 'beta.weight' has a dimension of size 0",
    ),
    "negative_dim": (
        lambda d: patch(d, tensor_fields(d, "beta.weight")["dims"], "<Q", 2**64 - 1),
        "tensor 'beta.weight' has a dimension of size -1",
    ),
    "huge_dims": (
        lambda d: patch(d, tensor_fields(d, "alpha.weight")["dims"] + 8, "<Q", 2**62),
        r"tensor 'alpha.weight' \(F32, shape \(4611686018427387904, 64\)\) data ends at byte .* past the end",
    ),
    "duplicate_tensor_name": (
        lambda d: patch(d, tensor_fields(d, "gamma.weight")["name"], "12s", b"alpha.weight"),
        "duplicate tensor name 'alpha.weight'",
    ),
    "offset_past_end": (
        lambda d: patch(d, tensor_fields(d, "beta.weight")["offset"], "<Q", 2**40),
        r"tensor 'beta.weight' \(F16, shape \(2, 3, 32\)\) data ends at byte .* past the end of the file",
    ),
    "misaligned_offset": (
        lambda d: patch(
            d, tensor_fields(d, "beta.weight")["offset"], "<Q",
            struct.unpack_from("<Q", d, tensor_fields(d, "beta.weight")["offset"])[0] + 2,
        ),
        "tensor 'beta.weight' data offset .* is not a multiple of the alignment 32",
    ),
    "partial_block": (
        lambda d: patch(d, tensor_fields(d, "gamma.weight")["dims"], "<Q", 48),
        "tensor 'gamma.weight': Q8_0 tensor of shape .* not a multiple of its block size 32",
    ),
    "truncated_tensor_data": (
        _truncate_in_tensor_data,
        r"tensor 'epsil.bias' \(F32, shape \(5,\)\) data ends at byte .* past the end of the file",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_file_gives_one_clear_error(sample, tmp_path, case):
    corrupt, expected = CASES[case]
    bad = tmp_path / f"{case}.gguf"
    bad.write_bytes(corrupt(sample.read_bytes()))

    tracemalloc.start()
    try:
        with pytest.raises(ModelFileError, match=expected) as exc:
            read_gguf(bad)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert str(exc.value).startswith(f"{bad}: ")  # names the file first, then the problem
    assert exc.value.path == str(bad)
    # A corrupt count is refused before anything is sized or looped by it (no wall clock here: a loop over a
    # huge count would show as this test never ending; fuzz/ runs the reader with a per-input time bound).
    assert peak < 16 * 2**20, f"{case} allocated {peak} bytes"  # no allocation sized by a corrupt length


def test_big_endian_file_is_rejected(tmp_path):
    path = write_sample(tmp_path / "big.gguf", endian=gguf.GGUFEndian.BIG)
    with pytest.raises(ModelFileError, match="big-endian GGUF files are not supported") as exc:
        read_gguf(path)
    assert str(path) in str(exc.value)


@pytest.mark.parametrize("alignment", [48, 0])
def test_alignment_must_be_a_power_of_two(tmp_path, alignment):
    path = write_sample(tmp_path / "aligned.gguf", alignment=64)
    data = path.read_bytes()
    path.write_bytes(patch(data, kv_fields(data, "general.alignment")["value"], "<I", alignment))
    with pytest.raises(ModelFileError, match=f"general.alignment {alignment} is not a power of two"):
        read_gguf(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ModelFileError, match="file not found") as exc:
        read_gguf(tmp_path / "nope.gguf")
    assert str(tmp_path / "nope.gguf") in str(exc.value)
    with pytest.raises(ModelFileError, match="is a directory"):
        read_gguf(tmp_path)


def test_every_truncation_point_of_the_header_fails_cleanly(sample, tmp_path):
    # Cut the file after every byte of the header, metadata and tensor table: each must raise ModelFileError.
    data = sample.read_bytes()
    with read_gguf(sample) as f:
        data_start = min(info.offset for info in f.tensors.values())
    bad = tmp_path / "cut.gguf"
    for cut in range(data_start):
        bad.write_bytes(data[:cut])
        with pytest.raises(ModelFileError):
            read_gguf(bad)


def test_random_corruption_never_escapes_as_another_exception(sample, tmp_path):
    # Seeded fuzz over the header, metadata and tensor table: random bytes and boundary values (0, 2**31,
    # 2**62, 2**64-1, ...) written over fields, sometimes with a truncation. Every outcome must be either a
    # file that opens and dequantizes, or a ModelFileError; never IndexError/ValueError/MemoryError or a hang.
    data = sample.read_bytes()
    with read_gguf(sample) as f:
        data_start = min(info.offset for info in f.tensors.values())
    rng = np.random.default_rng(2024)
    boundary = [0, 1, 7, 9, 33, 2**31, 2**32 - 1, 2**62, 2**63, 2**64 - 1]
    bad = tmp_path / "fuzz.gguf"
    outcomes = {"opened": 0, "rejected": 0}
    for _ in range(400):
        corrupt = bytearray(data)
        for _ in range(int(rng.integers(1, 4))):
            pos = int(rng.integers(0, data_start))
            if rng.random() < 0.5:
                corrupt[pos] = int(rng.integers(0, 256))
            else:
                width = int(rng.choice([4, 8]))
                value = int(rng.choice(boundary)) % (1 << (8 * width))
                corrupt[pos : pos + width] = value.to_bytes(width, "little")
        if rng.random() < 0.1:
            corrupt = corrupt[: int(rng.integers(0, len(corrupt)))]
        bad.write_bytes(bytes(corrupt))
        try:
            with read_gguf(bad) as f:
                for name in f.tensors:
                    f.tensor(name)
            outcomes["opened"] += 1
        except ModelFileError as exc:
            assert str(exc).startswith(f"{bad}: ")
            outcomes["rejected"] += 1
    assert outcomes["rejected"] > 200  # the fuzz really does hit the checks


# ---- the real default model ----


def test_default_model_opens_with_expected_metadata():
    path = model_path()
    with read_gguf(path) as f:
        assert f.version == 3 and f.alignment == 32
        assert len(f.tensors) == 272
        md = f.metadata
        assert md["general.architecture"] == "llama"
        assert md["llama.block_count"] == 30
        assert md["llama.embedding_length"] == 576
        assert md["llama.attention.head_count"] == 9 and md["llama.attention.head_count_kv"] == 3
        assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "smollm"
        assert len(md["tokenizer.ggml.tokens"]) == 49152 and len(md["tokenizer.ggml.merges"]) == 48900
        assert md["tokenizer.ggml.token_type"].dtype == np.int32
        assert f.tensors["token_embd.weight"].shape == (49152, 576)
        assert f.tensors["token_embd.weight"].ggml_type == T.Q8_0
        assert sum(name.startswith("blk.") for name in f.tensors) == 30 * 9

        # Everything agrees with gguf-py's own reader.
        reader = gguf.GGUFReader(path)
        assert [t.name for t in reader.tensors] == list(f.tensors)
        for t in reader.tensors:
            info = f.tensors[t.name]
            assert (info.offset, info.nbytes, info.ggml_type) == (t.data_offset, t.n_bytes, int(t.tensor_type))
            assert info.shape == tuple(int(d) for d in reversed(t.shape.tolist()))
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            ours, theirs = md[key], field.contents()
            assert (np.array_equal(ours, theirs) if isinstance(ours, np.ndarray) else ours == theirs), key
