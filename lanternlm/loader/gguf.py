"""Reading GGUF files: a strict, bounds-checked parser of the header, metadata and tensor table over a read-only memory map.

It knows the container format only, not any model: tensor names and metadata keys are passed through as stored.
Tensor data is not touched at open time; `GGUFFile.raw` hands out zero-copy views and `GGUFFile.tensor`
dequantizes through `lanternlm.loader.quants`.

We do not use gguf-py's `GGUFReader` here: it builds numpy objects per field and per string, which takes
seconds on a 49k-token vocabulary, and it does not check lengths and offsets against the file size.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lanternlm.errors import LanternError, ModelFileError
from lanternlm.loader.quants import dequantize, tensor_nbytes, type_name

_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4  # ggml's GGML_MAX_DIMS

# GGUF metadata value types.
_STRING = 8
_ARRAY = 9
_BOOL = 7
# Fixed-size scalar types: id -> (name, struct format, little-endian numpy dtype).
_SCALARS: dict[int, tuple[str, struct.Struct, str]] = {
    0: ("uint8", struct.Struct("<B"), "<u1"),
    1: ("int8", struct.Struct("<b"), "<i1"),
    2: ("uint16", struct.Struct("<H"), "<u2"),
    3: ("int16", struct.Struct("<h"), "<i2"),
    4: ("uint32", struct.Struct("<I"), "<u4"),
    5: ("int32", struct.Struct("<i"), "<i4"),
    6: ("float32", struct.Struct("<f"), "<f4"),
    _BOOL: ("bool", struct.Struct("<B"), "<u1"),
    10: ("uint64", struct.Struct("<Q"), "<u8"),
    11: ("int64", struct.Struct("<q"), "<i8"),
    12: ("float64", struct.Struct("<d"), "<f8"),
}
_INTEGER_TYPES = frozenset({0, 1, 2, 3, 4, 5, 10, 11})

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# Smallest possible encodings, used to reject absurd counts before looping over them:
# a key-value pair is a key length (8) + value type (4) + at least a 1-byte value;
# a tensor entry is a name length (8) + dim count (4) + type (4) + offset (8).
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor lives in the file and how it is encoded."""

    name: str
    shape: tuple[int, ...]  # PyTorch order (GGUF stores dims reversed: ne[0] is the fastest/column dim)
    ggml_type: int  # gguf.GGMLQuantizationType value
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


class GGUFFile:
    """An open GGUF file: its metadata, its tensor table, and access to tensor data through a read-only memory map.

    Attributes: path, version, metadata (key -> int/float/bool/str, list[str] for string arrays, 1-D numpy
    array for numeric arrays), tensors (name -> GGUFTensorInfo, in file order), alignment.
    Create it with `read_gguf`.
    """

    def __init__(
        self,
        path: Path,
        version: int,
        metadata: dict[str, Any],
        tensors: dict[str, GGUFTensorInfo],
        alignment: int,
        mapping: mmap.mmap,
    ):
        self.path = path
        self.version = version
        self.metadata = metadata
        self.tensors = tensors
        self.alignment = alignment
        self._mapping: mmap.mmap | None = mapping
        # One read-only uint8 view of the whole file; raw() slices it without copying.
        self._bytes: np.ndarray | None = np.frombuffer(mapping, dtype=np.uint8)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's encoded bytes: a read-only 1-D uint8 view into the memory map (no copy)."""
        info = self._info(name)
        assert self._bytes is not None  # _info checked the file is open
        return self._bytes[info.offset : info.offset + info.nbytes]

    def release(self, name: str, start: int = 0, end: int | None = None) -> None:
        """Tell the OS the tensor's bytes (those from `start` to `end` within it: all by default) are no longer
        needed in memory (after they were copied out): the mapped file's pages would otherwise stay resident, on
        top of the copies, until the file is closed."""
        info = self._info(name)
        assert self._mapping is not None
        end = info.nbytes if end is None else min(end, info.nbytes)
        page = mmap.PAGESIZE
        start = (info.offset + max(start, 0) + page - 1) // page * page  # whole pages inside the range only
        end = (info.offset + end) // page * page
        if end > start and hasattr(mmap, "MADV_DONTNEED"):
            self._mapping.madvise(mmap.MADV_DONTNEED, start, end - start)

    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor dequantized to a new float32 tensor of its PyTorch shape, then cast to `dtype`."""
        info = self._info(name)
        try:
            values = dequantize(self.raw(name), info.ggml_type, info.shape)
        except LanternError as exc:
            raise ModelFileError(self.path, f"tensor {name!r}: {exc}") from None
        return values if dtype == torch.float32 else values.to(dtype)

    def close(self) -> None:
        """Release the memory map. Views returned by raw() keep their pages mapped until they are dropped."""
        self._bytes = None
        mapping, self._mapping = self._mapping, None
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:
                # Someone still holds a raw() view; unmapping now would leave it dangling. The mapping is
                # freed when the last view is garbage-collected.
                pass

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, version={self.version}, {len(self.metadata)} keys, {len(self.tensors)} tensors)"

    def _info(self, name: str) -> GGUFTensorInfo:
        if self._bytes is None:
            raise ModelFileError(self.path, "file is closed")
        info = self.tensors.get(name)
        if info is None:
            raise ModelFileError(self.path, f"no tensor named {name!r}")
        return info


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Open and validate a GGUF v2/v3 file; tensor data is memory-mapped, not read. Raises ModelFileError."""
    path = Path(path)
    mapping = _map_file(path)
    try:
        version, metadata, tensors, alignment = _Parser(path, mapping).parse()
    except BaseException:
        try:
            mapping.close()
        except BufferError:
            pass  # a view is still referenced from the traceback; the map goes away with it
        raise
    return GGUFFile(path, version, metadata, tensors, alignment, mapping)


def _map_file(path: Path) -> mmap.mmap:
    """Memory-map the file read-only, turning OS errors into ModelFileError."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size == 0:
                raise ModelFileError(path, "file is empty, not a GGUF file")
            # mmap keeps its own handle, so the file object can be closed right away.
            return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise ModelFileError(path, "file not found") from None
    except IsADirectoryError:
        raise ModelFileError(path, "is a directory, not a GGUF file") from None
    except PermissionError:
        raise ModelFileError(path, "permission denied") from None
    except OSError as exc:
        raise ModelFileError(path, f"cannot read file: {exc.strerror or exc}") from None


class _Parser:
    """One pass over the header, metadata and tensor table; every read is checked against the file size."""

    def __init__(self, path: Path, buf: mmap.mmap):
        self.path = path
        self.buf = buf
        self.size = len(buf)
        self.pos = 0

    def fail(self, problem: str) -> ModelFileError:
        return ModelFileError(self.path, problem)

    def need(self, count: int, what: str) -> None:
        if count > self.size - self.pos:
            raise self.fail(
                f"file is truncated: {what} at byte {self.pos} needs {count} bytes "
                f"but only {self.size - self.pos} remain (file size {self.size})"
            )

    def u32(self, what: str) -> int:
        self.need(4, what)
        (value,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return value

    def u64(self, what: str) -> int:
        self.need(8, what)
        (value,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return value

    def string(self, what: str) -> str:
        length = self.u64(f"length of {what}")
        if length > self.size - self.pos:  # rejects absurd lengths such as 2**62 before any allocation
            raise self.fail(
                f"{what} at byte {self.pos} claims {length} bytes but only {self.size - self.pos} remain "
                f"(file size {self.size}); the file is truncated or corrupt"
            )
        start = self.pos
        self.pos += length
        try:
            return str(self.buf[start : self.pos], "utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at byte {start} is not valid UTF-8") from None

    def parse(self) -> tuple[int, dict[str, Any], dict[str, GGUFTensorInfo], int]:
        version, tensor_count, kv_count = self.header()
        metadata = self.metadata(kv_count)
        alignment = self.alignment(metadata)
        tensors = self.tensor_table(tensor_count, alignment)
        return version, metadata, tensors, alignment

    def header(self) -> tuple[int, int, int]:
        magic = bytes(self.buf[0:4])
        if magic != _MAGIC:
            if len(magic) < 4:
                raise self.fail(f"file is {self.size} bytes, too short to be a GGUF file")
            raise self.fail(f"not a GGUF file (starts with {magic!r}, expected {_MAGIC!r})")
        self.pos = 4
        version = self.u32("header version")
        if version not in _SUPPORTED_VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            if swapped in (1, 2, 3):
                raise self.fail("big-endian GGUF files are not supported (this file's byte order is big-endian)")
            if version == 1:
                raise self.fail("unsupported GGUF version 1 (only versions 2 and 3 are supported)")
            raise self.fail(f"unsupported GGUF version {version} (only versions 2 and 3 are supported)")
        tensor_count = self.u64("header tensor count")
        kv_count = self.u64("header metadata count")
        remaining = self.size - self.pos
        if kv_count * _MIN_KV_BYTES > remaining:
            raise self.fail(
                f"header claims {kv_count} metadata entries, impossible in the {remaining} bytes that remain"
            )
        if tensor_count * _MIN_TENSOR_INFO_BYTES > remaining:
            raise self.fail(f"header claims {tensor_count} tensors, impossible in the {remaining} bytes that remain")
        return version, tensor_count, kv_count

    def metadata(self, kv_count: int) -> dict[str, Any]:
        metadata: dict[str, Any] = {}
        for index in range(kv_count):
            key = self.string(f"metadata key #{index}")
            if key in metadata:
                raise self.fail(f"duplicate metadata key {key!r}")
            value_type = self.u32(f"value type of metadata key {key!r}")
            metadata[key] = self.value(value_type, key)
        return metadata

    def value(self, value_type: int, key: str) -> Any:
        scalar = _SCALARS.get(value_type)
        if scalar is not None:
            _, fmt, _ = scalar
            self.need(fmt.size, f"value of metadata key {key!r}")
            (value,) = fmt.unpack_from(self.buf, self.pos)
            self.pos += fmt.size
            return bool(value) if value_type == _BOOL else value
        if value_type == _STRING:
            return self.string(f"value of metadata key {key!r}")
        if value_type == _ARRAY:
            return self.array(key)
        raise self.fail(f"metadata key {key!r} has unknown value type {value_type}")

    def array(self, key: str) -> list[str] | np.ndarray:
        elem_type = self.u32(f"array element type of metadata key {key!r}")
        count = self.u64(f"array length of metadata key {key!r}")
        if elem_type == _STRING:
            return self.string_array(key, count)
        scalar = _SCALARS.get(elem_type)
        if scalar is None:
            if elem_type == _ARRAY:
                raise self.fail(f"metadata key {key!r} is an array of arrays, which is not supported")
            raise self.fail(f"metadata key {key!r} is an array of unknown value type {elem_type}")
        name, fmt, dtype = scalar
        if count > (self.size - self.pos) // fmt.size:
            raise self.fail(
                f"metadata key {key!r}: array of {count} {name} values at byte {self.pos} "
                f"runs past the end of the file ({self.size} bytes)"
            )
        values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
        self.pos += count * fmt.size
        # A copy in native byte order: a few hundred KB at most in real files, and holding no view into the
        # map lets close() actually unmap the file.
        return values != 0 if elem_type == _BOOL else values.astype(values.dtype.newbyteorder("="))

    def string_array(self, key: str, count: int) -> list[str]:
        # Each string needs at least its 8-byte length, which bounds a sane count.
        if count > (self.size - self.pos) // 8:
            raise self.fail(
                f"metadata key {key!r}: array of {count} strings at byte {self.pos} "
                f"runs past the end of the file ({self.size} bytes)"
            )
        # Hot loop (vocabularies and merge lists hold ~10^5 strings): locals only, one bounds check per string.
        buf, size, pos = self.buf, self.size, self.pos
        unpack = _U64.unpack_from
        out: list[str] = []
        append = out.append
        index = 0
        try:
            for index in range(count):
                if size - pos < 8:
                    raise self.fail(f"file is truncated inside the string array of metadata key {key!r}")
                (length,) = unpack(buf, pos)
                pos += 8
                if length > size - pos:
                    raise self.fail(
                        f"metadata key {key!r}: string #{index} at byte {pos} claims {length} bytes "
                        f"but only {size - pos} remain"
                    )
                append(str(buf[pos : pos + length], "utf-8"))
                pos += length
        except UnicodeDecodeError:
            raise self.fail(f"metadata key {key!r}: string #{index} is not valid UTF-8") from None
        self.pos = pos
        return out

    def alignment(self, metadata: dict[str, Any]) -> int:
        if "general.alignment" not in metadata:
            return _DEFAULT_ALIGNMENT
        value = metadata["general.alignment"]
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"general.alignment must be an integer, got {value!r}")
        if value <= 0 or value & (value - 1):
            raise self.fail(f"general.alignment {value} is not a power of two")
        return value

    def tensor_table(self, tensor_count: int, alignment: int) -> dict[str, GGUFTensorInfo]:
        # Tensor offsets are relative to the data section, which starts at the next aligned byte after the table.
        entries = []
        for index in range(tensor_count):
            name = self.string(f"name of tensor #{index}")
            n_dims = self.u32(f"dimension count of tensor {name!r}")
            if n_dims > _MAX_DIMS:
                raise self.fail(f"tensor {name!r} has {n_dims} dimensions (at most {_MAX_DIMS} are allowed)")
            dims = [self.u64(f"dimension of tensor {name!r}") for _ in range(n_dims)]
            for dim in dims:
                # Stored as uint64, but ggml reads int64: values >= 2**63 are negative sizes.
                if dim == 0 or dim >= 2**63:
                    signed = dim - 2**64 if dim >= 2**63 else dim
                    raise self.fail(f"tensor {name!r} has a dimension of size {signed} (must be positive)")
            ggml_type = self.u32(f"type of tensor {name!r}")
            relative = self.u64(f"data offset of tensor {name!r}")
            entries.append((name, tuple(reversed(dims)), ggml_type, relative))

        data_start = -(-self.pos // alignment) * alignment
        tensors: dict[str, GGUFTensorInfo] = {}
        for name, shape, ggml_type, relative in entries:
            if name in tensors:
                raise self.fail(f"duplicate tensor name {name!r}")
            try:
                nbytes = tensor_nbytes(ggml_type, shape)  # also rejects unknown type ids
            except LanternError as exc:
                raise self.fail(f"tensor {name!r}: {exc}") from None
            if relative % alignment:
                raise self.fail(
                    f"tensor {name!r} data offset {relative} is not a multiple of the alignment {alignment}"
                )
            offset = data_start + relative
            if offset + nbytes > self.size:
                raise self.fail(
                    f"tensor {name!r} ({type_name(ggml_type)}, shape {shape}) data ends at byte {offset + nbytes}, "
                    f"past the end of the file ({self.size} bytes); the file is truncated or corrupt"
                )
            tensors[name] = GGUFTensorInfo(name, shape, ggml_type, offset, nbytes)
        return tensors
