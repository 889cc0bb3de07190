"""Check a GGUF file in Python before llama.cpp reads it.

llama.cpp ends the whole process with ``abort()`` on some damaged files (a
``GGML_ASSERT`` or an uncaught C++ exception), which in a Python program kills
the user's application. :func:`validate_gguf` reads the header and the metadata
of a file (never the tensor data, so a 15 GB model takes milliseconds) with a
streaming parser that bounds every count and length by the bytes left in the
file, and refuses with :class:`~pyllama_ernie.errors.InvalidModelFileError`
(file name and what is wrong) anything that is not a well-formed GGUF file of the
kind asked for:

* the container: magic, version (2 or 3), tensor and key counts, every key
  (non-empty UTF-8 without NUL, unique) and value (known type, strings and
  arrays inside the file, booleans 0 or 1), ``general.alignment`` (u32, power of 2),
  every tensor (name, 1 to 4 dimensions all > 0, known ggml type, row length a
  multiple of the type's block, data offset where llama.cpp expects it and data
  inside the file);
* ``role="model"``: an ERNIE 4.5 architecture (``ernie4_5``, ``ernie4_5-moe``,
  ``ernie4_5-vl-moe``), the hyperparameters llama.cpp's loader reads for it with
  the values its asserts need, and a vocabulary llama.cpp can load and tokenize
  with (unique tokens, matching scores/types, special ids in range, byte tokens);
* ``role="mmproj"``: an ERNIE 4.5 VL vision projector (``clip``, ``ernie4_5vl``):
  the keys mtmd reads, with the types it assumes without checking, and exactly
  the tensors its graph uses, with consistent shapes (mtmd checks no shapes).

What is refused, and why, is listed in docs/reliability.md.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InvalidModelFileError, ModelLoadError

__all__ = ["ERNIE_ARCHS", "ROLES", "GGUFSummary", "TensorInfo", "validate_gguf", "check_gguf_file", "read_tensor"]

ERNIE_ARCHS = ("ernie4_5", "ernie4_5-moe", "ernie4_5-vl-moe")
ROLES = ("model", "mmproj", "auto")

_MAGIC = b"GGUF"

# GGUF value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_TYPE_NAMES = ("u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64", "f64")
_SCALAR_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<B",
               U64: "<Q", I64: "<q", F64: "<d"}
_SCALAR_SIZE = {t: struct.calcsize(f) for t, f in _SCALAR_FMT.items()}
_NP_DTYPE = {U8: "<u1", I8: "<i1", U16: "<u2", I16: "<i2", U32: "<u4", I32: "<i4", F32: "<f4", BOOL: "<u1",
             U64: "<u8", I64: "<i8", F64: "<f8"}
_INT_TYPES = (U8, I8, U16, I16, U32, I32, U64, I64)

_MAX_KEY_LEN = 65535
_MAX_STRING_LEN = 1 << 30  # llama.cpp's GGUF_MAX_STRING_LENGTH
_MAX_ARRAY_LEN = 1 << 24  # far above any real vocabulary or merge list
_MAX_NAME_LEN = 63  # GGML_MAX_NAME - 1
_MAX_DIMS = 4
_MAX_LAYERS = 512  # LLAMA_MAX_LAYERS
_MAX_EXPERTS = 1024  # LLAMA_MAX_EXPERTS
_HEADER = struct.Struct("<4sIQQ")
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


def _ggml_types() -> dict[int, tuple[str, int, int]]:
    """ggml type id -> (name, block size, bytes per block), from the gguf package."""
    import gguf

    return {int(t): (t.name, int(bs), int(ts)) for t, (bs, ts) in gguf.GGML_QUANT_SIZES.items()}


_GGML_TYPES = _ggml_types()
# types a weight can have: ggml computes with these (the integer, f64 and the
# activation-only Q8_1/Q8_K types are not weight types; llama.cpp may abort on them)
_NOT_WEIGHT_TYPES = {"I8", "I16", "I32", "I64", "F64", "Q8_1", "Q8_K"}
_FLOAT_TYPES = {"F32", "F16", "BF16"}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the file describes it; ``shape`` is in ggml order (``ne[0]`` first)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    type_name: str
    offset: int  # from the start of the data section
    nbytes: int


@dataclass
class GGUFSummary:
    """What :func:`validate_gguf` read: the metadata (arrays of strings as lists of bytes,
    numeric arrays as numpy arrays, strings decoded as UTF-8 with replacement) and the tensors."""

    path: Path
    role: str  # "model" or "mmproj" (what the file was checked as)
    version: int
    file_size: int
    alignment: int
    data_offset: int
    metadata: dict[str, Any] = field(repr=False)
    value_types: dict[str, tuple[int, int | None]] = field(repr=False)
    tensors: dict[str, TensorInfo] = field(repr=False)
    architecture: str | None = None
    n_vocab: int | None = None
    n_embd: int | None = None  # the text model's width, or the projector's output width

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    @property
    def parameters(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors.values())

    def read_tensor(self, name: str, rows: Any = None) -> np.ndarray:
        """See :func:`read_tensor`."""
        return read_tensor(self, name, rows)


class _Bad(Exception):
    """Internal: the file is damaged; the message says how."""


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def _pad(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def _describe_foreign(head: bytes) -> str:
    """What a file that does not start with GGUF's magic probably is."""
    if head.startswith(b"\x89PNG"):
        return "a PNG image"
    if head.startswith(b"\xff\xd8\xff"):
        return "a JPEG image"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "a GIF image"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (a PyTorch checkpoint?)"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer (the real file was not downloaded: run git lfs pull)"
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        return "an HTML page (a failed download?)"
    if len(head) >= 10 and head[8:10] == b'{"':
        return "a safetensors file (convert it with pyllama_ernie.convert first)"
    if head[:4] in (b"lmgg", b"fmgg", b"tjgg", b"algg"):
        return "a file in the old GGML/GGJT format, which llama.cpp no longer reads"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "not a GGUF file"
    if text and all(c.isprintable() or c.isspace() for c in text):
        return "a text file"
    return "not a GGUF file"


class _Reader:
    """Bounds-checked little-endian reads from a buffer."""

    __slots__ = ("buf", "pos", "size")

    def __init__(self, buf: Any, size: int, pos: int = 0) -> None:
        self.buf = buf
        self.size = size
        self.pos = pos

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.size - self.pos:
            raise _Bad(f"{what} at byte {self.pos} needs {n} bytes but only {self.size - self.pos} are left "
                       "(truncated or damaged file)")

    def u32(self, what: str) -> int:
        self.need(4, what)
        v = _U32.unpack_from(self.buf, self.pos)[0]
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        v = _U64.unpack_from(self.buf, self.pos)[0]
        self.pos += 8
        return v

    def scalar(self, vtype: int, what: str) -> Any:
        n = _SCALAR_SIZE[vtype]
        self.need(n, what)
        v = struct.unpack_from(_SCALAR_FMT[vtype], self.buf, self.pos)[0]
        self.pos += n
        return v

    def string(self, what: str, limit: int = _MAX_STRING_LEN) -> bytes:
        n = self.u64(f"the length of {what}")
        if n > limit:
            raise _Bad(f"{what} claims a length of {n} bytes (at most {limit} allowed)")
        self.need(n, what)
        s = self.buf[self.pos:self.pos + n]
        self.pos += n
        return bytes(s)


def _read_value(r: _Reader, vtype: int, key: str, keep_strings: bool) -> Any:
    if vtype == STR:
        return r.string(f"the value of {key!r}").decode("utf-8", "replace")
    if vtype == BOOL:
        v = r.scalar(BOOL, f"the value of {key!r}")
        if v > 1:
            raise _Bad(f"key {key!r} is a boolean with the byte value {v} (must be 0 or 1)")
        return bool(v)
    if vtype == ARR:
        etype = r.u32(f"the element type of {key!r}")
        if etype > F64:
            raise _Bad(f"array key {key!r} has an unknown element type {etype}")
        if etype == ARR:
            raise _Bad(f"array key {key!r} holds arrays (nested arrays are not valid GGUF)")
        n = r.u64(f"the length of array {key!r}")
        if n > _MAX_ARRAY_LEN:
            raise _Bad(f"array key {key!r} claims {n} elements (damaged length)")
        left = r.size - r.pos
        if etype == STR:
            if n * 8 > left:
                raise _Bad(f"array key {key!r} claims {n} strings, more than the {left} bytes left can hold")
            out = _read_strings(r, n, keep_strings)
            if out is None:
                _strings_error(r, n, key)  # raises, saying which string
            return out if keep_strings else _SkippedStrings(int(n))
        nbytes = n * _SCALAR_SIZE[etype]
        r.need(nbytes, f"the {n} elements of array {key!r}")
        arr = np.frombuffer(r.buf, dtype=_NP_DTYPE[etype], count=n, offset=r.pos).copy()
        r.pos += nbytes
        if etype == BOOL and n and int(arr.max()) > 1:
            raise _Bad(f"array key {key!r} has a boolean that is neither 0 nor 1")
        return arr
    if vtype in _SCALAR_FMT:
        return r.scalar(vtype, f"the value of {key!r}")
    raise _Bad(f"key {key!r} has an unknown value type {vtype}")


def _read_strings(r: _Reader, n: int, keep: bool) -> list[bytes] | None:
    """The ``n`` length-prefixed strings at ``r.pos`` (or an empty list when not ``keep``);
    None when they run past the end of the file. The fast path: one bounds check at the end
    (a length that overshoots makes the next read fail or leaves ``pos`` past the end)."""
    buf, pos, size, unpack = r.buf, r.pos, r.size, _U64.unpack_from
    out: list[bytes] = []
    try:
        if keep:
            append = out.append
            for _ in range(n):
                m = unpack(buf, pos)[0]
                pos += 8
                append(buf[pos:pos + m])
                pos += m
        else:
            for _ in range(n):
                pos += 8 + unpack(buf, pos)[0]
    except (struct.error, OverflowError, ValueError, IndexError):
        return None
    if pos > size:
        return None
    r.pos = pos
    return out


def _strings_error(r: _Reader, n: int, key: str) -> None:
    """Find the string of a damaged array that runs past the end, and say so."""
    buf, pos, size, unpack = r.buf, r.pos, r.size, _U64.unpack_from
    for i in range(n):
        if size - pos < 8:
            r.pos = pos
            r.need(8, f"the length of string {i} of {key!r}")
        m = unpack(buf, pos)[0]
        pos += 8
        if m > size - pos:
            raise _Bad(f"string {i} of array {key!r} (at byte {pos - 8}) claims {m} bytes, past the "
                       "end of the file (truncated or damaged)")
        pos += m
    raise _Bad(f"the strings of array {key!r} run past the end of the file")  # pragma: no cover


class _SkippedStrings:
    """A string array whose strings were checked but not kept (only its length is)."""

    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"<{self.n} strings>"


# string arrays whose strings are kept (the rest are only checked)
_KEEP_STRINGS = ("tokenizer.ggml.tokens",)


def _parse(buf: Any, size: int) -> tuple[int, dict[str, Any], dict[str, tuple[int, int | None]],
                                                     dict[str, TensorInfo], int, int]:
    r = _Reader(buf, size)
    if size < 4 or bytes(buf[:4]) != _MAGIC:
        raise _Bad(f"{_describe_foreign(bytes(buf[:64]))} (it does not start with the GGUF magic)"
                   if size >= 4 else f"not a GGUF file (only {size} bytes)")
    if size < _HEADER.size:
        raise _Bad(f"truncated GGUF header ({size} bytes)")
    _, version, n_tensors, n_kv = _HEADER.unpack_from(buf, 0)
    r.pos = _HEADER.size
    if version not in (2, 3):
        if version == 1:
            raise _Bad("GGUF version 1 is no longer supported by llama.cpp; convert the model again")
        if version in (0x02000000, 0x03000000):
            raise _Bad("a big-endian GGUF file; llama.cpp on this machine reads little-endian files only")
        raise _Bad(f"unsupported GGUF version {version} (2 and 3 are supported)")
    left = size - r.pos
    # a key/value pair takes at least 8 (key length) + 1 (key) + 4 (type) + 1 (value) bytes,
    # a tensor info 8 (name length) + 1 + 4 (n_dims) + 8 (one dim) + 4 (type) + 8 (offset)
    if n_kv > left // 14:
        raise _Bad(f"damaged header: it claims {n_kv} metadata keys, more than a {size}-byte file can hold")
    if n_tensors > left // 33:
        raise _Bad(f"damaged header: it claims {n_tensors} tensors, more than a {size}-byte file can hold")

    meta: dict[str, Any] = {}
    types: dict[str, tuple[int, int | None]] = {}
    for i in range(n_kv):
        raw = r.string(f"the name of metadata key {i}", limit=_MAX_KEY_LEN)
        if not raw:
            raise _Bad(f"metadata key {i} has an empty name")
        try:
            key = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad(f"metadata key {i} has a name that is not UTF-8 ({raw[:40]!r})") from None
        if "\x00" in key:
            raise _Bad(f"metadata key {i} has a name with a NUL byte ({key[:60]!r})")
        if key in meta:
            raise _Bad(f"metadata key {key!r} appears twice")
        vtype = r.u32(f"the type of {key!r}")
        if vtype > F64:
            raise _Bad(f"key {key!r} has an unknown value type {vtype}")
        etype: int | None = None
        if vtype == ARR:
            save = r.pos
            etype = r.u32(f"the element type of {key!r}")
            r.pos = save
        meta[key] = _read_value(r, vtype, key, key in _KEEP_STRINGS)
        types[key] = (vtype, etype)

    alignment = 32
    if "general.alignment" in meta:
        if types["general.alignment"][0] != U32:
            raise _Bad(f"general.alignment must be a u32, not {_type_name(types['general.alignment'])}")
        alignment = int(meta["general.alignment"])
        if not _is_pow2(alignment):
            raise _Bad(f"general.alignment is {alignment}, not a power of 2")

    infos: list[tuple[str, tuple[int, ...], int, int]] = []
    seen: set = set()
    for i in range(n_tensors):
        raw = r.string(f"the name of tensor {i}", limit=1 << 16)
        if not raw or len(raw) > _MAX_NAME_LEN:
            raise _Bad(f"tensor {i} has a name of {len(raw)} bytes (1 to {_MAX_NAME_LEN} allowed)")
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad(f"tensor {i} has a name that is not UTF-8 ({raw!r})") from None
        if "\x00" in name or not name.isprintable():
            raise _Bad(f"tensor {i} has a name with control characters ({name!r})")
        if name in seen:
            raise _Bad(f"tensor {name!r} appears twice")
        seen.add(name)
        n_dims = r.u32(f"the number of dimensions of {name!r}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise _Bad(f"tensor {name!r} has {n_dims} dimensions (1 to {_MAX_DIMS} allowed)")
        r.need(8 * n_dims, f"the shape of {name!r}")
        shape = struct.unpack_from(f"<{n_dims}q", buf, r.pos)
        r.pos += 8 * n_dims
        if any(d <= 0 for d in shape):
            raise _Bad(f"tensor {name!r} has shape {list(shape)}: every dimension must be positive")
        n_el = math.prod(shape)
        if n_el >= 1 << 62:
            raise _Bad(f"tensor {name!r} has shape {list(shape)}: too many elements")
        gtype = r.u32(f"the type of {name!r}")
        if gtype not in _GGML_TYPES:
            raise _Bad(f"tensor {name!r} has an unknown ggml type {gtype}")
        tname, blck, tsize = _GGML_TYPES[gtype]
        if shape[0] % blck:
            raise _Bad(f"tensor {name!r} of type {tname} has rows of {shape[0]} elements, "
                       f"not a multiple of the type's block size {blck}")
        offset = r.u64(f"the data offset of {name!r}")
        infos.append((name, shape, gtype, offset))

    data_offset = _pad(r.pos, alignment) if n_tensors else r.pos
    if data_offset > size:
        raise _Bad(f"the tensor data section would start at byte {data_offset}, past the end of the "
                   f"{size}-byte file (truncated)")
    tensors: dict[str, TensorInfo] = {}
    expected = 0
    for name, shape, gtype, offset in infos:
        tname, blck, tsize = _GGML_TYPES[gtype]
        nbytes = math.prod(shape) // blck * tsize
        if offset != expected:
            raise _Bad(f"tensor {name!r} has data offset {offset}, but llama.cpp expects {expected} "
                       "(tensors must follow one another, aligned; damaged tensor table)")
        end = data_offset + offset + nbytes
        if end > size:
            raise _Bad(f"the data of tensor {name!r} ends at byte {end}, past the end of the {size}-byte file "
                       "(truncated: was the download or copy interrupted?)")
        tensors[name] = TensorInfo(name, tuple(int(d) for d in shape), gtype, tname, offset, nbytes)
        expected = offset + _pad(nbytes, alignment)
    return version, meta, types, tensors, alignment, data_offset


def _type_name(t: tuple[int, int | None]) -> str:
    vtype, etype = t
    if vtype == ARR:
        return f"array of {_TYPE_NAMES[etype] if etype is not None and etype <= F64 else '?'}"
    return _TYPE_NAMES[vtype] if vtype <= F64 else str(vtype)


# --- typed access to the metadata ------------------------------------------------------------

class _Meta:
    def __init__(self, meta: dict[str, Any], types: dict[str, tuple[int, int | None]]) -> None:
        self.meta = meta
        self.types = types

    def has(self, key: str) -> bool:
        return key in self.meta

    def _check_type(self, key: str, want: tuple[int, int | None]) -> Any:
        got = self.types[key]
        if got != want:
            raise _Bad(f"key {key!r} is a {_type_name(got)}, but llama.cpp reads it as a {_type_name(want)}")
        return self.meta[key]

    def u32(self, key: str, required: bool = True, default: int | None = None) -> int | None:
        if key not in self.meta:
            if required:
                raise _Bad(f"key {key!r} is missing")
            return default
        return int(self._check_type(key, (U32, None)))

    def f32(self, key: str, required: bool = True, default: float | None = None) -> float | None:
        if key not in self.meta:
            if required:
                raise _Bad(f"key {key!r} is missing")
            return default
        return float(self._check_type(key, (F32, None)))

    def string(self, key: str, required: bool = True) -> str | None:
        if key not in self.meta:
            if required:
                raise _Bad(f"key {key!r} is missing")
            return None
        return str(self._check_type(key, (STR, None)))

    def boolean(self, key: str) -> bool | None:
        if key not in self.meta:
            return None
        return bool(self._check_type(key, (BOOL, None)))

    def u32_or_layers(self, key: str, n_layer: int, required: bool = True) -> list[int] | None:
        """A u32, or (as llama.cpp's get_key_or_arr allows) an array of one int per layer."""
        if key not in self.meta:
            if required:
                raise _Bad(f"key {key!r} is missing")
            return None
        vtype, etype = self.types[key]
        if vtype == ARR:
            if etype not in (U32, I32):
                raise _Bad(f"key {key!r} is an {_type_name((vtype, etype))}, expected a u32 or an array of ints")
            arr = self.meta[key]
            if len(arr) != n_layer:
                raise _Bad(f"key {key!r} has {len(arr)} values for {n_layer} layers")
            if etype == I32 and n_layer and int(arr.min()) < 0:
                raise _Bad(f"key {key!r} has a negative value")
            return [int(x) for x in arr]
        return [int(self._check_type(key, (U32, None)))] * n_layer


def _uniform(key: str, values: list[int]) -> int:
    if len(set(values)) > 1:
        raise _Bad(f"key {key!r} differs between layers ({values}); ERNIE 4.5 uses one value for all layers")
    return values[0]


# --- the language model ----------------------------------------------------------------------

_SPECIAL_IDS = ("bos", "eos", "eot", "eom", "unknown", "seperator", "padding", "mask", "cls",
                "fim_pre", "fim_suf", "fim_mid", "fim_pad", "fim_rep", "fim_sep", "prefix", "suffix", "middle")
_TOKEN_TYPES = range(7)  # LLAMA_TOKEN_TYPE_UNDEFINED .. BYTE
_TOKEN_TYPE_BYTE = 6
_BYTE_TOKEN = re.compile(rb"<0x[0-9A-Fa-f]{2}>")


def _check_model(m: _Meta, tensors: dict[str, TensorInfo]) -> tuple[str, int, int]:
    arch = m.string("general.architecture", required=False)
    if arch is None:
        raise _Bad("general.architecture is missing: not a model file")
    if arch == "clip":
        raise _Bad("this is an mmproj (vision projector) file, not a language model: pass it as mmproj_path "
                   "and give the ERNIE 4.5 VL language model as the model")
    if arch not in ERNIE_ARCHS:
        raise _Bad(f"not an ERNIE 4.5 model: its architecture is {arch!r} "
                   f"(this package runs {', '.join(ERNIE_ARCHS)})")
    p = arch + "."
    n_layer = m.u32(p + "block_count")
    assert n_layer is not None
    if not 1 <= n_layer <= _MAX_LAYERS:
        raise _Bad(f"{p}block_count is {n_layer} (1 to {_MAX_LAYERS} allowed)")
    n_embd = m.u32(p + "embedding_length")
    assert n_embd is not None
    if n_embd < 1 or n_embd > 1 << 20:
        raise _Bad(f"{p}embedding_length is {n_embd}")
    n_ctx = m.u32(p + "context_length")
    if not n_ctx:
        raise _Bad(f"{p}context_length is 0")
    ff = m.u32_or_layers(p + "feed_forward_length", n_layer)
    assert ff is not None
    if _uniform(p + "feed_forward_length", ff) < 1:
        raise _Bad(f"{p}feed_forward_length is 0")
    heads = m.u32_or_layers(p + "attention.head_count", n_layer)
    assert heads is not None
    n_head = _uniform(p + "attention.head_count", heads)
    kv_heads = m.u32_or_layers(p + "attention.head_count_kv", n_layer, required=False) or heads
    n_head_kv = _uniform(p + "attention.head_count_kv", kv_heads)
    if n_head < 1 or n_head_kv < 1 or n_head % n_head_kv:
        raise _Bad(f"attention.head_count {n_head} and head_count_kv {n_head_kv}: both must be positive and "
                   "the first a multiple of the second")
    eps = m.f32(p + "attention.layer_norm_rms_epsilon")
    assert eps is not None
    if not (math.isfinite(eps) and eps >= 0):
        raise _Bad(f"{p}attention.layer_norm_rms_epsilon is {eps}")
    m.f32(p + "rope.freq_base", required=False)
    head_k = m.u32(p + "attention.key_length", required=False, default=n_embd // n_head)
    head_v = m.u32(p + "attention.value_length", required=False, default=n_embd // n_head)
    n_rot = m.u32(p + "rope.dimension_count", required=False, default=head_k)
    if not head_k or head_k != head_v or n_rot != head_k:
        raise _Bad(f"head size {head_k} (keys), {head_v} (values) and rope.dimension_count {n_rot} must be equal "
                   "and positive for ERNIE 4.5 (llama.cpp asserts it)")
    scaling = m.string(p + "rope.scaling.type", required=False)
    if scaling is not None and scaling not in ("none", "linear", "yarn", "longrope"):
        raise _Bad(f"{p}rope.scaling.type is {scaling!r}")
    factor = m.f32(p + "rope.scaling.factor", required=False)
    for key in ("nextn_predict_layers", "leading_dense_block_count"):
        v = m.u32(p + key, required=False)
        if v is not None and v > n_layer:
            raise _Bad(f"{p}{key} is {v}, more than the {n_layer} layers")

    # experts (llama.cpp asserts these relations for every architecture)
    n_expert = m.u32(p + "expert_count", required=arch != "ernie4_5", default=0) or 0
    used = m.u32_or_layers(p + "expert_used_count", n_layer, required=arch != "ernie4_5") or [0]
    n_used = max(used)
    groups = m.u32(p + "expert_group_count", required=False, default=0) or 0
    group_used = m.u32(p + "expert_group_used_count", required=False, default=0) or 0
    if n_expert > _MAX_EXPERTS or n_used > n_expert:
        raise _Bad(f"expert_count {n_expert} and expert_used_count {n_used}: at most {_MAX_EXPERTS} experts, "
                   "and no more used than there are")
    if n_expert:
        if n_used < 1 or groups >= n_expert or (groups > 1 and (n_expert % groups or not 0 < group_used < groups)):
            raise _Bad(f"expert_used_count {n_used}, expert_group_count {groups}, expert_group_used_count "
                       f"{group_used} are not valid for {n_expert} experts")
    elif n_used or groups:
        raise _Bad(f"expert_used_count is {n_used} but expert_count is 0")
    if arch in ("ernie4_5-moe", "ernie4_5-vl-moe"):
        if n_expert < 1:
            raise _Bad(f"{p}expert_count is 0")
        step = m.u32(p + "interleave_moe_layer_step")
        if not step:
            raise _Bad(f"{p}interleave_moe_layer_step is 0 (must be > 0)")
        exp_ff = m.u32_or_layers(p + "expert_feed_forward_length", n_layer)
        assert exp_ff is not None
        m.u32(p + "expert_shared_feed_forward_length", required=False)
    if arch == "ernie4_5-vl-moe":
        key = p + "rope.dimension_sections"
        if key not in m.meta:
            raise _Bad(f"{key} is missing: an ERNIE 4.5 VL model needs its 3-D rope dimension_sections")
        vtype, etype = m.types[key]
        if vtype != ARR or etype not in (I32, U32) or len(m.meta[key]) != 4:
            raise _Bad(f"{key} must be an array of 4 ints, not a {_type_name((vtype, etype))}"
                       + (f" of {len(m.meta[key])}" if vtype == ARR else ""))
        sections = [int(x) for x in m.meta[key]]
        if min(sections) < 0 or sum(sections) != n_rot // 2:
            raise _Bad(f"{key} is {sections}: it must sum to n_rot/2 = {n_rot // 2}")
        n_expert_vl = m.u32(p + "expert_count_vl")
        assert n_expert_vl is not None
        if not 1 <= n_expert_vl <= _MAX_EXPERTS or n_used > n_expert_vl:
            raise _Bad(f"{p}expert_count_vl is {n_expert_vl} (1 to {_MAX_EXPERTS}, and at least "
                       f"expert_used_count = {n_used})")
        m.u32(p + "expert_feed_forward_length_vl")
        if scaling not in (None, "none") and not (scaling == "linear" and factor in (None, 0.0, 1.0)):
            raise _Bad(f"rope scaling ({scaling}) is not supported for ernie4_5-vl-moe")

    n_vocab = _check_vocab(m)

    # tensors: every weight of a type ggml computes with, and the embedding of the vocabulary's size
    for t in tensors.values():
        if t.type_name in _NOT_WEIGHT_TYPES:
            raise _Bad(f"tensor {t.name!r} has type {t.type_name}, which is not a weight type")
    emb = tensors.get("token_embd.weight")
    if emb is None:
        raise _Bad("tensor 'token_embd.weight' is missing")
    for t in (emb, tensors.get("output.weight")):
        if t is not None and t.shape != (n_embd, n_vocab):
            raise _Bad(f"tensor {t.name!r} has shape {list(t.shape)}, expected [{n_embd}, {n_vocab}] "
                       f"(embedding_length x the {n_vocab} tokens of the vocabulary)")
    return arch, n_vocab, n_embd


def _check_vocab(m: _Meta) -> int:
    model = m.string("tokenizer.ggml.model", required=False)
    if model is None:
        raise _Bad("tokenizer.ggml.model is missing: the file has no vocabulary")
    if model not in ("llama", "gpt2"):
        raise _Bad(f"tokenizer.ggml.model is {model!r}; ERNIE 4.5 uses a SentencePiece ('llama') or BPE ('gpt2') "
                   "vocabulary")
    key = "tokenizer.ggml.tokens"
    if key not in m.meta:
        raise _Bad(f"{key} is missing: the file has no vocabulary")
    if m.types[key] != (ARR, STR):
        raise _Bad(f"{key} must be an array of strings, not a {_type_name(m.types[key])}")
    tokens: list[bytes] = m.meta[key]
    n = len(tokens)
    if n == 0:
        raise _Bad(f"{key} is empty")
    if n >= 1 << 31:
        raise _Bad(f"{key} has {n} tokens")
    # llama.cpp maps each token's text, as a C string (up to the first NUL; an empty one
    # becomes "[EMPTY_<id>]"), to its id; two tokens with one text abort it (hazard 8)
    nul = b"\x00"
    seen = set(tokens)
    if len(seen) != n or b"" in seen or nul in b"".join(tokens):
        texts: dict[bytes, int] = {}
        for i, tok in enumerate(tokens):
            k = tok.find(nul)
            text = tok if k < 0 else tok[:k]
            if not text:
                text = b"[EMPTY_%d]" % i
            j = texts.setdefault(text, i)
            if j != i:
                raise _Bad(f"the vocabulary has the token {text[:40].decode('utf-8', 'replace')!r} twice "
                           f"(ids {j} and {i}); llama.cpp would abort on it")
        seen = set(texts)
    types = None
    for sub, allowed in (("scores", (F32, I32)), ("token_type", (I32,))):
        k = "tokenizer.ggml." + sub
        if k in m.meta:
            vtype, etype = m.types[k]
            if vtype != ARR or etype not in allowed:
                raise _Bad(f"{k} must be an array of {' or '.join(_TYPE_NAMES[a] for a in allowed)}, "
                           f"not a {_type_name((vtype, etype))}")
            if len(m.meta[k]) != n:
                raise _Bad(f"{k} has {len(m.meta[k])} entries for {n} tokens")
            if sub == "token_type":
                types = m.meta[k]
                bad = np.flatnonzero((types < _TOKEN_TYPES.start) | (types >= _TOKEN_TYPES.stop))
                if bad.size:
                    raise _Bad(f"token {int(bad[0])} has an unknown token type {int(types[bad[0]])}")
    if model == "llama":
        # SentencePiece byte fallback: llama.cpp looks up "<0xXX>" (or the single byte) for any byte
        # no token covers and throws, through its C API, if there is none: the process aborts
        for b in range(256):
            if b"<0x%02X>" % b not in seen and bytes([b]) not in seen:
                raise _Bad(f"the SentencePiece vocabulary has no byte token <0x{b:02X}>; llama.cpp would abort "
                           "on text containing that byte")
        if types is not None:
            for i in np.flatnonzero(types == _TOKEN_TYPE_BYTE):
                if not _BYTE_TOKEN.fullmatch(tokens[int(i)]):
                    raise _Bad(f"token {int(i)} ({tokens[int(i)][:20]!r}) is typed as a byte token but is not "
                               "of the form <0xXX>")
    else:
        k = "tokenizer.ggml.merges"
        if k not in m.meta or m.types[k] != (ARR, STR):
            raise _Bad(f"{k} (an array of strings) is missing: a BPE vocabulary needs its merges")
    for name in _SPECIAL_IDS:
        k = f"tokenizer.ggml.{name}_token_id"
        v = m.u32(k, required=False)
        if v is not None and v >= n:
            raise _Bad(f"{k} is {v}, outside the vocabulary of {n} tokens")
    for name in ("add_bos_token", "add_eos_token", "add_sep_token", "add_space_prefix",
                 "remove_extra_whitespaces"):
        m.boolean("tokenizer.ggml." + name)
    for name in ("pre", "chat_template"):
        m.string("tokenizer." + ("ggml." if name == "pre" else "") + name, required=False)
    return n


# --- the vision projector (mmproj) -----------------------------------------------------------

# every key mtmd reads with a getter that does not check the type (gguf_get_val_* asserts it)
_CLIP_KEY_TYPES: dict[str, tuple[int, int | None]] = {
    "general.name": (STR, None), "general.description": (STR, None),
    "clip.projector_type": (STR, None), "clip.vision.projector_type": (STR, None),
    "clip.audio.projector_type": (STR, None),
    "clip.has_vision_encoder": (BOOL, None), "clip.has_audio_encoder": (BOOL, None),
    "clip.has_gen_audio_encoder": (BOOL, None), "clip.use_gelu": (BOOL, None), "clip.use_silu": (BOOL, None),
    "clip.minicpmv_version": (I32, None), "clip.minicpmv_query_num": (U32, None),
    "clip.vision.mm_patch_merge_type": (STR, None), "clip.vision.swiglu_clamp": (F32, None),
    "clip.vision.attention.layer_norm_epsilon": (F32, None),
    "clip.vision.image_mean": (ARR, F32), "clip.vision.image_std": (ARR, F32),
    "clip.vision.image_grid_pinpoints": (ARR, I32), "clip.vision.feature_layer": (ARR, I32),
    "clip.vision.wa_layer_indexes": (ARR, I32), "clip.vision.wa_pattern_mode": (ARR, I32),
    "clip.vision.projector.spatial_offsets": (ARR, I32),
}
for _k in ("embedding_length", "feed_forward_length", "block_count", "projection_dim", "attention.head_count",
           "attention.head_count_kv", "attention.head_dim", "image_size", "image_min_pixels", "image_max_pixels",
           "video_min_pixels", "video_max_pixels",
           "preproc_min_tiles", "preproc_max_tiles", "preproc_image_size", "patch_size", "spatial_merge_size",
           "projector.scale_factor", "projector.query_side", "projector.window_side", "n_wa_pattern",
           "window_size", "sam.head_count", "sam.block_count", "sam.embedding_length", "expert_used_count"):
    _CLIP_KEY_TYPES["clip.vision." + _k] = (U32, None)
del _k


def _check_mmproj(m: _Meta, tensors: dict[str, TensorInfo]) -> int:
    arch = m.string("general.architecture", required=False)
    if arch in ERNIE_ARCHS:
        raise _Bad(f"this is a language model ({arch}), not an mmproj (vision projector) file: was the model "
                   "given as mmproj_path?")
    if arch != "clip":
        raise _Bad(f"not an mmproj (projector) file: its architecture is {arch!r}, not 'clip'")
    for key, want in _CLIP_KEY_TYPES.items():
        if key in m.meta and m.types[key] != want:
            raise _Bad(f"key {key!r} is a {_type_name(m.types[key])}, but mtmd reads it as a {_type_name(want)} "
                       "(it would abort)")
    if m.boolean("clip.has_vision_encoder") is not True:
        raise _Bad("clip.has_vision_encoder is not true: the file has no vision encoder")
    for k in ("clip.has_audio_encoder", "clip.has_gen_audio_encoder"):
        if m.boolean(k):
            raise _Bad(f"{k} is true; an ERNIE 4.5 VL projector has no audio encoder")
    ptype = m.string("clip.projector_type", required=False) or m.string("clip.vision.projector_type",
                                                                        required=False)
    if ptype != "ernie4_5vl":
        raise _Bad(f"projector type {ptype!r}; this package runs ERNIE-4.5-VL projectors ('ernie4_5vl')")
    v = "clip.vision."

    def pos(key: str, lo: int = 1, hi: int = (1 << 31) - 1) -> int:
        val = m.u32(v + key)
        assert val is not None
        if not lo <= val <= hi:
            raise _Bad(f"{v}{key} is {val} ({lo} to {hi} allowed)")
        return val

    h = pos("embedding_length", hi=1 << 16)
    n_head = pos("attention.head_count", hi=h)
    if h % n_head or (h // n_head) % 4:
        raise _Bad(f"vision width {h} over {n_head} heads does not give a head size that is a multiple of 4")
    if m.u32(v + "attention.head_count_kv", required=False, default=n_head) != n_head:
        raise _Bad(f"{v}attention.head_count_kv differs from head_count (the ERNIE vision tower has no GQA)")
    if m.u32(v + "attention.head_dim", required=False, default=h // n_head) != h // n_head:
        raise _Bad(f"{v}attention.head_dim is not embedding_length / head_count")
    ff = pos("feed_forward_length", hi=1 << 20)
    n_layer = pos("block_count", hi=_MAX_LAYERS)
    proj = pos("projection_dim", hi=1 << 20)
    eps = m.f32(v + "attention.layer_norm_epsilon")
    assert eps is not None
    if not (math.isfinite(eps) and eps >= 0):
        raise _Bad(f"{v}attention.layer_norm_epsilon is {eps}")
    pos("image_size", lo=0, hi=8192)
    patch = pos("patch_size", hi=1024)
    merge = pos("spatial_merge_size", hi=64)
    lo_px = pos("image_min_pixels")
    hi_px = pos("image_max_pixels")
    if lo_px > hi_px:
        raise _Bad(f"{v}image_min_pixels ({lo_px}) exceeds image_max_pixels ({hi_px})")
    if m.has(v + "video_min_pixels") or m.has(v + "video_max_pixels"):  # optional (older files: the defaults)
        lo_vid, hi_vid = pos("video_min_pixels"), pos("video_max_pixels")
        if lo_vid > hi_vid:
            raise _Bad(f"{v}video_min_pixels ({lo_vid}) exceeds video_max_pixels ({hi_vid})")
    for k in ("image_mean", "image_std"):
        if v + k not in m.meta:
            raise _Bad(f"{v}{k} is missing")
        arr = m.meta[v + k]
        if len(arr) < 3 or not np.all(np.isfinite(arr)) or (k == "image_std" and np.any(arr[:3] <= 0)):
            raise _Bad(f"{v}{k} is {list(arr[:8])}: 3 finite values needed (std > 0)")
    if m.boolean("clip.use_gelu") and m.boolean("clip.use_silu"):
        raise _Bad("clip.use_gelu and clip.use_silu are both true")
    for k in ("image_grid_pinpoints", "feature_layer"):
        if v + k in m.meta:
            raise _Bad(f"{v}{k} is set; an ERNIE 4.5 VL projector has none")

    # exactly the tensors the ernie4_5vl graph uses, with the shapes it assumes
    s = h * merge * merge
    want: dict[str, tuple[int, ...]] = {"v.patch_embd.weight": (patch, patch, 3, h),
                                        "v.post_ln.weight": (h,), "v.post_ln.bias": (h,)}
    for i in range(n_layer):
        b = f"v.blk.{i}."
        want.update({
            b + "ln1.weight": (h,), b + "ln1.bias": (h,), b + "ln2.weight": (h,), b + "ln2.bias": (h,),
            b + "attn_qkv.weight": (h, 3 * h), b + "attn_qkv.bias": (3 * h,),
            b + "attn_out.weight": (h, h), b + "attn_out.bias": (h,),
            b + "ffn_up.weight": (h, ff), b + "ffn_up.bias": (ff,),
            b + "ffn_down.weight": (ff, h), b + "ffn_down.bias": (h,),
        })
    for i in (0, 1, 4):
        want[f"mm.{i}.weight"] = (s, s)
        want[f"mm.{i}.bias"] = (s,)
    for i in (2, 5):
        want[f"mm.{i}.weight"] = (s,)
        want[f"mm.{i}.bias"] = (s,)
    want.update({"mm.3.weight": (s, s, 2), "mm.3.bias": (s,), "mm.6.weight": (s, proj), "mm.6.bias": (proj,),
                 "mm.7.weight": (proj,)})
    for name, shape in want.items():
        t = tensors.get(name)
        if t is None:
            raise _Bad(f"tensor {name!r} is missing")
        if t.shape != shape:
            raise _Bad(f"tensor {name!r} has shape {list(t.shape)}, expected {list(shape)} (from the clip.vision.* "
                       "sizes)")
        if len(shape) == 1 and t.type_name != "F32":
            raise _Bad(f"tensor {name!r} has type {t.type_name}; norms and biases must be F32")
        if name == "v.patch_embd.weight" and t.type_name not in _FLOAT_TYPES:
            raise _Bad(f"tensor {name!r} has type {t.type_name}; the patch embedding must be F32, F16 or BF16")
        if t.type_name in _NOT_WEIGHT_TYPES:
            raise _Bad(f"tensor {name!r} has type {t.type_name}, which is not a weight type")
    extra = sorted(set(tensors) - set(want))
    if extra:
        raise _Bad(f"unexpected tensor {extra[0]!r} (an ERNIE 4.5 VL projector with {n_layer} blocks has "
                   f"{len(want)} tensors, this file {len(tensors)})")
    return proj


# --- entry point -----------------------------------------------------------------------------

def validate_gguf(path: str | os.PathLike[str], *, role: str = "model") -> GGUFSummary:
    """Check ``path`` as a GGUF file llama.cpp can load without aborting; return what it holds.

    ``role`` is ``"model"`` (an ERNIE 4.5 language model), ``"mmproj"`` (an ERNIE 4.5 VL
    vision projector) or ``"auto"`` (``"mmproj"`` for a ``clip`` file, else ``"model"``).
    Raises FileNotFoundError for a missing file, :class:`~pyllama_ernie.errors.ModelLoadError`
    for one that cannot be read (no permission, an I/O error), and
    :class:`~pyllama_ernie.errors.InvalidModelFileError` (a ``ModelLoadError`` and a
    ``ValueError``) for a directory or anything damaged or of the wrong kind.
    Only the header and the metadata are read; the tensor data is not.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    p = Path(os.fspath(path)).expanduser()
    try:
        f = open(p, "rb")  # noqa: SIM115 - closed by the with below; open errors are told apart here
    except FileNotFoundError:
        raise FileNotFoundError(f"no such model file: {p}") from None
    except IsADirectoryError:
        raise InvalidModelFileError(f"{p} is a directory, not a GGUF file", llama_log="") from None
    except PermissionError as e:
        raise ModelLoadError(f"cannot read {p}: permission denied ({e.strerror})", llama_log="") from e
    except OSError as e:
        raise ModelLoadError(f"cannot open {p}: {e.strerror or e}", llama_log="") from e
    with f:
        try:
            st = os.fstat(f.fileno())
        except OSError as e:  # pragma: no cover - fstat on an open file
            raise ModelLoadError(f"cannot read {p}: {e}", llama_log="") from e
        if stat.S_ISDIR(st.st_mode):
            raise InvalidModelFileError(f"{p} is a directory, not a GGUF file", llama_log="")
        if not stat.S_ISREG(st.st_mode):
            raise InvalidModelFileError(f"{p} is not a regular file", llama_log="")
        size = st.st_size
        if size == 0:
            raise InvalidModelFileError(f"{p.name}: the file is empty (0 bytes), not a GGUF file", llama_log="")
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot read {p}: {e}", llama_log="") from e
        try:
            try:
                version, meta, types, tensors, alignment, data_offset = _parse(mm, size)
                m = _Meta(meta, types)
                arch = meta.get("general.architecture") if types.get("general.architecture") == (STR, None) else None
                kind = role if role != "auto" else ("mmproj" if arch == "clip" else "model")
                n_vocab: int | None = None
                if kind == "model":
                    arch, n_vocab, n_embd = _check_model(m, tensors)
                else:
                    n_embd = _check_mmproj(m, tensors)
            except _Bad as e:
                raise InvalidModelFileError(f"{p.name}: {e}", llama_log="") from None
            except OSError as e:  # an I/O error while reading the mapping (SIGBUS is not raised as this)
                raise ModelLoadError(f"cannot read {p}: {e}", llama_log="") from e
        finally:
            mm.close()
    return GGUFSummary(path=p, role=kind, version=version, file_size=size, alignment=alignment,
                       data_offset=data_offset, metadata=meta, value_types=types, tensors=tensors,
                       architecture=arch, n_vocab=n_vocab, n_embd=n_embd)


def check_gguf_file(path: str | os.PathLike[str], role: str | None = None) -> Path:
    """Refuse, with a clear error, a file llama.cpp cannot load (or would abort on); return its path.

    ``role``: ``"model"`` (an ERNIE 4.5 language model), ``"mmproj"`` (an ERNIE 4.5 VL
    vision projector) or None (either: a ``clip`` file is checked as an mmproj, anything
    else as a model). Only the header and metadata are read (see :func:`validate_gguf`).
    Raises FileNotFoundError, :class:`~pyllama_ernie.errors.InvalidModelFileError`
    (damaged, wrong kind, a directory) or :class:`~pyllama_ernie.errors.ModelLoadError` (unreadable).
    """
    return validate_gguf(path, role=role or "auto").path


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)


def read_tensor(summary: GGUFSummary, name: str, rows: Any = None) -> np.ndarray:
    """A tensor of a checked file as float32, in NumPy order (``shape[::-1]`` of ggml's).

    ``rows`` (an index or index array into the first NumPy axis) reads only those rows,
    e.g. a few token embeddings of a large vocabulary. Quantized types are dequantized
    with the ``gguf`` package. The file is mapped, not read whole.
    """
    t = summary.tensors.get(name)
    if t is None:
        raise KeyError(f"{summary.path.name} has no tensor {name!r}")
    shape = tuple(reversed(t.shape))
    n_rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    data = np.memmap(summary.path, dtype=np.uint8, mode="r", offset=summary.data_offset + t.offset,
                     shape=(t.nbytes,))
    raw = data.reshape(n_rows, t.nbytes // n_rows)
    if rows is not None:
        raw = raw[np.atleast_1d(np.asarray(rows, dtype=np.int64))]
    if t.type_name == "F32":
        out = np.array(raw).view("<f4")
    elif t.type_name == "F16":
        out = np.array(raw).view("<f2").astype(np.float32)
    elif t.type_name == "BF16":
        out = _bf16_to_f32(np.array(raw))
    else:
        import gguf

        out = gguf.quants.dequantize(np.array(raw), gguf.GGMLQuantizationType(t.ggml_type)).astype(np.float32)
    out = out.reshape(raw.shape[0], shape[-1]) if len(shape) > 1 else out.reshape(shape)
    return out if rows is not None else out.reshape(shape)
