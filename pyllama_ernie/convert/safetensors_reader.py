"""Streaming reader for safetensors checkpoints, without torch.

A checkpoint is either one or more ``*.safetensors`` files listed by
``model.safetensors.index.json`` (sharded), or, lacking an index, every
``*.safetensors`` file in the folder. Each file's JSON header is parsed and
checked here (dtypes, shapes, offsets inside the file), so a damaged file fails
with a message instead of garbage.

Tensor data is read through a read-only ``mmap`` in blocks of rows. Once the
consumer asks for the next block, the pages of the previous one are handed back
to the kernel (``madvise(MADV_DONTNEED)``), so reading a tensor of any size costs
about one block of memory, and the process's resident size does not grow with
the checkpoint.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConversionError

__all__ = ["TensorInfo", "SafetensorsFile", "Checkpoint", "bf16_to_f32", "DEFAULT_BLOCK_BYTES"]

# safetensors dtype -> (numpy dtype of the stored bytes, item size)
_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("<f8", 8),
    "F32": ("<f4", 4),
    "F16": ("<f2", 2),
    "BF16": ("<u2", 2),  # raw bits; widened to float32 by bf16_to_f32
    "I64": ("<i8", 8),
    "I32": ("<i4", 4),
    "I16": ("<i2", 2),
    "I8": ("i1", 1),
    "U8": ("u1", 1),
    "BOOL": ("?", 1),
}

_MAX_HEADER_BYTES = 100 * 1024 * 1024
_PAGE = mmap.PAGESIZE
DEFAULT_BLOCK_BYTES = 16 * 1024 * 1024  # peak RSS ~70 MiB for any model; larger blocks are no faster
INDEX_NAME = "model.safetensors.index.json"


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly (bf16 is the top half of an f32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _as_float(raw: np.ndarray, st_dtype: str) -> np.ndarray:
    """Stored values -> float16/float32, as llama.cpp's converter does: F16 and F32 stay, the rest become F32."""
    if st_dtype in ("F32", "F16"):
        return raw
    if st_dtype == "BF16":
        return bf16_to_f32(raw)
    return raw.astype(np.float32)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype (a safetensors name), shape and byte range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    offset: int  # absolute offset of the first byte in the file
    nbytes: int


def _read_header(path: Path) -> dict[str, TensorInfo]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConversionError(f"{path}: not a safetensors file (shorter than its 8-byte header length).")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > _MAX_HEADER_BYTES or 8 + n > size:
                raise ConversionError(
                    f"{path}: not a valid safetensors file (header length {n} does not fit the file of {size} bytes)."
                )
            blob = f.read(n)
    except OSError as e:
        raise ConversionError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        header = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: corrupt safetensors header ({e}).") from e
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: corrupt safetensors header (not a JSON object).")

    data_start = 8 + n
    data_len = size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        bad = f"{path}: corrupt safetensors header entry for {name!r}"
        if not isinstance(entry, dict):
            raise ConversionError(f"{bad}.")
        dtype = entry.get("dtype")
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        if dtype not in _DTYPES:
            raise ConversionError(f"{bad}: unsupported dtype {dtype!r}.")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ConversionError(f"{bad}: bad shape {shape!r}.")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise ConversionError(f"{bad}: bad data_offsets {offsets!r}.")
        begin, end = offsets
        if end > data_len:
            raise ConversionError(
                f"{path}: tensor {name!r} ends at byte {data_start + end} but the file has {size} bytes "
                "(the file is truncated or damaged; download it again)."
            )
        nbytes = math.prod(shape) * _DTYPES[dtype][1]
        if end - begin != nbytes:
            raise ConversionError(f"{bad}: {end - begin} bytes stored for shape {shape} of {dtype}.")
        tensors[name] = TensorInfo(name, dtype, tuple(shape), path, data_start + begin, nbytes)
    return tensors


class SafetensorsFile:
    """One ``.safetensors`` file: parsed header plus a lazily opened read-only mmap."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tensors = _read_header(self.path)
        self._file = None
        self._mm: mmap.mmap | None = None

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            try:
                self._file = open(self.path, "rb")
                if os.fstat(self._file.fileno()).st_size == 0:
                    raise ConversionError(f"{self.path} is empty.")
                self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            except OSError as e:
                raise ConversionError(f"cannot read {self.path}: {e.strerror or e}") from e
        return self._mm

    def raw(self, info: TensorInfo, row_start: int = 0, row_stop: int | None = None) -> np.ndarray:
        """The stored values of rows [row_start, row_stop) (along dim 0), without copying."""
        np_dtype, item = _DTYPES[info.dtype]
        shape = info.shape
        if len(shape) == 0:
            return np.frombuffer(self._map(), dtype=np_dtype, count=1, offset=info.offset).reshape(())
        n_rows = shape[0]
        row_stop = n_rows if row_stop is None else row_stop
        row_elems = math.prod(shape[1:])
        count = (row_stop - row_start) * row_elems
        if count == 0:
            return np.zeros((0, *shape[1:]), dtype=np_dtype)
        offset = info.offset + row_start * row_elems * item
        arr = np.frombuffer(self._map(), dtype=np_dtype, count=count, offset=offset)
        return arr.reshape((row_stop - row_start, *shape[1:]))

    def release(self, info: TensorInfo, row_start: int, row_stop: int) -> None:
        """Drop the pages of rows [row_start, row_stop) from this process (they stay in the page cache)."""
        if self._mm is None or not hasattr(self._mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        item = _DTYPES[info.dtype][1]
        row_bytes = math.prod(info.shape[1:]) * item if info.shape else item
        begin = info.offset + row_start * row_bytes
        end = info.offset + row_stop * row_bytes
        begin = begin // _PAGE * _PAGE
        if end > begin:
            try:
                self._mm.madvise(mmap.MADV_DONTNEED, begin, min(end, len(self._mm)) - begin)
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                # an array still points into the map; it is unmapped when that array goes
                pass
            self._mm = None
        if self._file is not None:
            self._file.close()
            self._file = None


class Checkpoint:
    """All tensors of a Hugging Face model folder, by name, read lazily."""

    def __init__(self, hf_dir: str | os.PathLike[str]):
        self.dir = Path(hf_dir)
        self._files: dict[Path, SafetensorsFile] = {}
        self._where: dict[str, TensorInfo] = {}
        index = self.dir / INDEX_NAME
        if index.is_file():
            paths = self._paths_from_index(index)
        else:
            paths = sorted(self.dir.glob("*.safetensors"))
            if not paths:
                others = sorted(p.name for p in self.dir.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
                hint = (
                    f" It has {', '.join(others)}: re-save the model with safetensors "
                    "(save_pretrained(..., safe_serialization=True))."
                    if others
                    else ""
                )
                raise ConversionError(f"no model weights (*.safetensors) in {self.dir}.{hint}")
        try:
            for p in paths:
                f = SafetensorsFile(p)
                self._files[p] = f
                for name, info in f.tensors.items():
                    if name in self._where:
                        raise ConversionError(
                            f"tensor {name!r} is stored twice ({self._where[name].path.name} and {p.name})."
                        )
                    self._where[name] = info
            if index.is_file():
                self._check_index(index)
        except BaseException:
            self.close()
            raise

    def _paths_from_index(self, index: Path) -> list[Path]:
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            weight_map = data["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError("weight_map is not a mapping of tensor names to file names")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise ConversionError(f"{index} is not a valid safetensors index ({e}).") from e
        self._weight_map = weight_map
        paths = []
        for fname in sorted(set(weight_map.values())):
            p = self.dir / fname
            if not p.is_file():
                raise ConversionError(
                    f"shard {fname} listed in {index.name} is missing from {self.dir} (incomplete download?)."
                )
            paths.append(p)
        return paths

    def _check_index(self, index: Path) -> None:
        for name, fname in self._weight_map.items():
            info = self._where.get(name)
            if info is None or info.path.name != fname:
                raise ConversionError(f"{index.name} says tensor {name!r} is in {fname}, but it is not there.")

    # -- access -------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._where)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._where[name]
        except KeyError:
            raise ConversionError(f"tensor {name!r} is not in the checkpoint {self.dir}.") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def iter_rows(
        self, name: str, row_start: int = 0, row_stop: int | None = None, block_bytes: int | None = None
    ) -> Iterator[np.ndarray]:
        """Rows [row_start, row_stop) of a tensor in blocks of about ``block_bytes`` (default
        ``DEFAULT_BLOCK_BYTES``) of float32.

        Each block is valid until the next one is requested: its pages are then released.
        0-D and 1-D tensors come as one block.
        """
        info = self.info(name)
        f = self._files[info.path]
        if len(info.shape) <= 1:
            yield _as_float(f.raw(info), info.dtype)
            return
        row_stop = info.shape[0] if row_stop is None else row_stop
        row_f32_bytes = max(1, math.prod(info.shape[1:]) * 4)
        step = max(1, (block_bytes or DEFAULT_BLOCK_BYTES) // row_f32_bytes)
        for r in range(row_start, row_stop, step):
            r1 = min(row_stop, r + step)
            yield _as_float(f.raw(info, r, r1), info.dtype)
            f.release(info, r, r1)

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
