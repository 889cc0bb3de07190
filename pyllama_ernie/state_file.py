"""Save one conversation's KV-cache state to a file, and read it back safely.

A desktop app that keeps conversations on disk saves, per conversation, the
opaque bytes llama.cpp's ``llama_state_seq_get_data`` produced for its sequence
(the *payload*) together with what the package needs to resume it: the identity
of the model and the context settings it belongs to, and what the cache holds
position by position (``Context._keys`` / ``Context._next``). :func:`read_state`
checks everything in Python before the payload goes near C: llama.cpp trusts
the bytes it is given to ``llama_state_seq_set_data``, and a file from another
model, another cache type, an older build or a damaged disk must be refused
with a message that says which, never load garbage into the cache.

Layout (little-endian)::

    offset  size  field
    0       16    magic  b"PYLLAMA-ERNIE-KV"
    16      4     u32 format version (1)
    20      8     u64 header_len (at most 64 MiB)
    28      8     u64 payload_len
    36      32    SHA-256 of header + payload
    68      ...   header: header_len bytes of UTF-8 JSON (an object, below)
    ...     ...   payload: payload_len bytes, the llama.cpp sequence state

    68 + header_len + payload_len is exactly the file's size.

The header is ``{"model": {...}, "context": {...}, "keys": [...], "nexts": [...],
"created": <seconds since the epoch>}``, strict JSON (no NaN, no duplicate names).
``keys[i]`` is a token id, or ``["<hex digest>", row]`` for row ``row`` of an
image or video embedding chunk (``Embeddings.key``); ``nexts[i]`` is the rope
position that follows position ``i``. What Context guarantees about them, and
:func:`read_state` checks (a file that passes the checksum can still be crafted):

* every token id is in ``0 .. n_vocab - 1`` (when the model identity has ``n_vocab``);
* a token sits right after what precedes it: ``nexts[i] == nexts[i-1] + 1``
  (``1`` for the first position), as ``Context`` lays tokens out;
* the rows of an embedding chunk are whole and in order: row ``r > 0`` follows row
  ``r - 1`` of the same chunk (``Context`` never keeps part of a chunk);
* every position is in ``1 .. 2**31 - 1`` (``llama_pos`` is a 32-bit int). Positions
  of embedding rows need not increase (M-RoPE rows of an image share ``t``).

A newer format version is refused by name (the reader says which versions it
knows); an older one, should there ever be one, is read by this module.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import operator
import os
import re
import stat
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from .errors import StateFileError

__all__ = ["SeqState", "StateFileError", "write_state", "read_state", "MAGIC", "VERSION", "MAX_HEADER",
           "PREFIX_SIZE"]

MAGIC = b"PYLLAMA-ERNIE-KV"
VERSION = 1
MAX_HEADER = 64 << 20  # 64 MiB: millions of positions; anything larger is damage, not a conversation
_PREFIX = struct.Struct("<16sIQQ32s")  # magic, version, header_len, payload_len, sha256
PREFIX_SIZE = _PREFIX.size  # 68
_FIELDS = ("model", "context", "keys", "nexts", "created")
_MAX_POS = 2**31 - 1  # llama_pos is int32
_MAX_DIGEST_HEX = 128  # 64-byte digests; Embeddings.key is 16 bytes today
_HEX = re.compile(r"[0-9a-fA-F]+")
_READ_CHUNK = 1 << 24


@dataclass(frozen=True)
class SeqState:
    """One sequence's saved KV-cache state and what it takes to resume it.

    ``model``: the identity of the model it belongs to (JSON values, e.g. ``desc``,
    ``n_embd``, ``n_layer``, ``n_vocab``, ``n_params``, ``size``, ``arch``).
    ``context``: the context settings the payload depends on (e.g. ``kv_cache_type``,
    ``n_pos_per_embd``). ``keys``/``nexts``: what the cache holds, as ``Context._keys``
    and ``Context._next`` (token ids and ``(digest, row)`` pairs; the position after
    each). ``payload``: the bytes of ``llama_state_seq_get_data``. ``created``:
    ``time.time()`` when it was saved.
    """

    model: dict[str, Any]
    context: dict[str, Any]
    keys: list[Any]
    nexts: list[int]
    payload: bytes = field(repr=False)
    created: float = field(default_factory=time.time)


class _Bad(Exception):
    """Internal: what is wrong, said without the file's name; ``reason`` as StateFileError's."""

    def __init__(self, message: str, reason: str = "damaged") -> None:
        super().__init__(message)
        self.reason = reason


# --- writing ---


def write_state(path: str | os.PathLike[str], state: SeqState) -> None:
    """Write ``state`` to ``path`` atomically: a crash leaves the old file or the new one.

    The file is written next to ``path`` under a temporary name, flushed to disk and
    renamed over ``path``. It is created readable by its owner only (it holds the
    conversation). Raises ValueError (a :class:`StateFileError`) or TypeError for a
    state that :func:`read_state` would refuse, and OSError when the folder is not writable.
    """
    header = _encode_header(state)
    payload = memoryview(state.payload).cast("B")
    digest = hashlib.sha256(header)
    digest.update(payload)
    prefix = _PREFIX.pack(MAGIC, VERSION, len(header), len(payload), digest.digest())
    p = Path(os.fspath(path)).expanduser()
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with open(fd, "wb") as f:
            f.write(prefix)
            f.write(header)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(p.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable where the system allows (POSIX); best effort."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _encode_header(state: SeqState) -> bytes:
    """The header JSON of ``state``, after checking it as a reader would."""
    model = _plain_json(state.model, "model")
    context = _plain_json(state.context, "context")
    try:
        keys = [_encode_key(k) for k in state.keys]
        nexts = [operator.index(n) for n in state.nexts]
    except TypeError as e:
        raise TypeError(f"keys must be token ids and (bytes, row) pairs, nexts ints: {e}") from None
    created = float(state.created)
    doc = {"model": model, "context": context, "keys": keys, "nexts": nexts, "created": created}
    try:
        _check_header(doc, model)
    except _Bad as e:
        raise StateFileError(f"cannot save this state: {e}", reason=e.reason) from None
    header = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(header) > MAX_HEADER:
        raise StateFileError(f"cannot save this state: its header would take {len(header)} bytes "
                             f"(at most {MAX_HEADER})", reason="too_large")
    return header


def _plain_json(value: Any, what: str) -> dict[str, Any]:
    """``value`` as it reads back from JSON (tuples become lists), or TypeError/ValueError."""
    if not isinstance(value, dict):
        raise TypeError(f"{what} must be a dict, not {type(value).__name__}")
    try:
        out = json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must hold only JSON values (str, int, float, bool, None, list, dict): {e}") from None
    return out


def _encode_key(k: Any) -> Any:
    if isinstance(k, tuple):
        if len(k) != 2 or not isinstance(k[0], (bytes, bytearray)):
            raise TypeError(f"an embedding key must be (bytes, row), not {k!r}")
        return [bytes(k[0]).hex(), _int(k[1])]
    return _int(k)


def _int(v: Any) -> int:
    if isinstance(v, bool):  # True is an int to Python, not a token id to anyone
        raise TypeError(f"{v!r} is not an integer")
    return operator.index(v)


# --- reading ---


def read_state(path: str | os.PathLike[str], *, model: dict[str, Any], context: dict[str, Any],
               max_payload: int | None = None) -> SeqState:
    """Read a state saved by :func:`write_state`, refusing anything unfit for this model.

    ``model`` and ``context`` are the identity and settings of what it is to be loaded
    into; they must equal those the file records. ``max_payload`` bounds the payload's
    size in bytes. Everything is checked before it is returned: the format and its
    version, every length against the file's size (nothing is allocated from a declared
    length), the SHA-256 checksum, the header's JSON and types, and the model and context.

    Raises FileNotFoundError (or another OSError) when the file cannot be opened, and
    :class:`StateFileError` (a ValueError) saying what is wrong otherwise.
    """
    p = Path(os.fspath(path)).expanduser()
    expect_model = _plain_json(model, "model")
    expect_context = _plain_json(context, "context")
    if max_payload is not None and (isinstance(max_payload, bool) or operator.index(max_payload) < 0):
        raise ValueError(f"max_payload must be a non-negative int or None, not {max_payload!r}")
    try:
        header, payload = _read_parts(p, max_payload)
        doc = _parse_header(header)
        _check_header(doc, expect_model)
        _same(doc["model"], expect_model, "model")
        _same(doc["context"], expect_context, "context")
    except _Bad as e:
        raise StateFileError(f"{p.name}: {e}", reason=e.reason) from None
    keys = [k if isinstance(k, int) else (bytes.fromhex(k[0]), k[1]) for k in doc["keys"]]
    return SeqState(model=doc["model"], context=doc["context"], keys=keys, nexts=doc["nexts"],
                    payload=payload, created=float(doc["created"]))


def _open(p: Path) -> Any:
    """``p`` open for reading; a folder is a StateFileError, a missing file FileNotFoundError."""
    try:
        return open(p, "rb")  # noqa: SIM115 - the caller closes it
    except IsADirectoryError:
        raise StateFileError(f"{p} is a folder, not a saved state", reason="foreign") from None
    except PermissionError:
        if p.is_dir():  # Windows says "permission denied" for a folder
            raise StateFileError(f"{p} is a folder, not a saved state", reason="foreign") from None
        raise


def _read_parts(p: Path, max_payload: int | None) -> tuple[bytes, bytes]:
    """The checked header and payload bytes of the file at ``p``."""
    _check_kind(os.stat(p), p)  # before opening: opening a named pipe waits for a writer
    with _open(p) as f:
        st = os.fstat(f.fileno())
        _check_kind(st, p)  # it may have been replaced in between
        size = st.st_size
        if size == 0:
            raise _Bad("the file is empty (0 bytes), not a saved state", "foreign")
        header_len, payload_len, digest = _read_prefix(f.read(PREFIX_SIZE), size)
        _check_lengths(header_len, payload_len, size, max_payload)
        header = _read_exactly(f, header_len, "the header")
        payload = _read_exactly(f, payload_len, "the payload")
    h = hashlib.sha256(header)
    h.update(payload)
    if h.digest() != digest:
        raise _Bad("the checksum does not match: the file is damaged (or was changed after it was saved)")
    return header, payload


def _check_kind(st: os.stat_result, p: Path) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise StateFileError(f"{p} is a folder, not a saved state", reason="foreign")
    if not stat.S_ISREG(st.st_mode):  # a pipe or a device could block or never end
        raise _Bad("not a regular file (a pipe, socket or device)", "foreign")


def _read_prefix(head: bytes, size: int) -> tuple[int, int, bytes]:
    """header_len, payload_len and the digest, after the magic and the version."""
    if not head.startswith(MAGIC):
        if len(head) < len(MAGIC) and MAGIC.startswith(head):
            raise _Bad(f"the file is truncated ({size} bytes; a saved state starts with {PREFIX_SIZE})")
        raise _Bad(f"{_describe_foreign(head)}, not a saved pyllama_ernie conversation state", "foreign")
    if len(head) < len(MAGIC) + 4:
        raise _Bad(f"the file is truncated ({size} bytes; a saved state starts with {PREFIX_SIZE})")
    version = struct.unpack_from("<I", head, len(MAGIC))[0]
    if version > VERSION:
        raise _Bad(f"the state was saved in format version {version}, newer than version {VERSION} that "
                   "this pyllama_ernie reads (upgrade pyllama_ernie to load it)", "version")
    if version < 1:
        raise _Bad(f"unknown format version {version} (this pyllama_ernie reads version {VERSION})", "version")
    if len(head) < PREFIX_SIZE:
        raise _Bad(f"the file is truncated ({size} bytes; a saved state starts with {PREFIX_SIZE})")
    _, _, header_len, payload_len, digest = _PREFIX.unpack(head)
    return header_len, payload_len, digest


def _check_lengths(header_len: int, payload_len: int, size: int, max_payload: int | None) -> None:
    """The declared lengths, against the bounds and the file's size, before any is allocated."""
    if header_len == 0:
        raise _Bad("the header is empty")
    if header_len > MAX_HEADER:
        raise _Bad(f"the header claims {header_len} bytes (at most {MAX_HEADER} allowed; damaged length)")
    declared = PREFIX_SIZE + header_len + payload_len
    if declared > size:
        raise _Bad(f"the file is truncated: it has {size} bytes, its header declares {declared} "
                   f"({header_len} of header, {payload_len} of payload)")
    if declared < size:
        raise _Bad(f"the file has {size - declared} bytes after the end of the saved state "
                   f"(its header declares {declared} of {size}; damaged)")
    if max_payload is not None and payload_len > max_payload:
        raise _Bad(f"the payload has {payload_len} bytes, more than max_payload ({max_payload})", "too_large")


def _read_exactly(f: Any, n: int, what: str) -> bytes:
    """``n`` bytes (already checked against the file's size), or _Bad if the file shrank."""
    if n <= _READ_CHUNK:
        data = f.read(n)
    else:  # a bytearray grown chunk by chunk: a file that shrinks meanwhile costs no more than it holds
        buf = bytearray()
        while len(buf) < n:
            chunk = f.read(min(_READ_CHUNK, n - len(buf)))
            if not chunk:
                break
            buf += chunk
        data = bytes(buf)
    if len(data) != n:
        raise _Bad(f"the file ended inside {what} (it was truncated while being read)")
    return data


def _describe_foreign(head: bytes) -> str:
    """What a file that does not start with the magic probably is."""
    if head.startswith(b"GGUF"):
        return "this is a GGUF model file"
    if head.startswith(b"PYLLAMA-"):
        return "this is another pyllama file"
    return "this is not a pyllama_ernie state file (wrong magic bytes)"


# --- the header ---


def _parse_header(header: bytes) -> dict[str, Any]:
    """The header as a JSON object with exactly the expected fields (types checked later)."""
    try:
        text = header.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Bad(f"the header is not UTF-8 (byte {e.start})") from None
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except _Bad:
        raise
    except (ValueError, RecursionError) as e:  # JSONDecodeError, huge ints, deep nesting
        raise _Bad(f"the header is not valid JSON ({_short(str(e))})") from None
    if not isinstance(doc, dict):
        raise _Bad(f"the header is JSON but not an object (a {type(doc).__name__})")
    missing = [k for k in _FIELDS if k not in doc]
    if missing:
        raise _Bad(f"the header lacks {', '.join(missing)}")
    extra = sorted(k for k in doc if k not in _FIELDS)
    if extra:
        raise _Bad(f"the header has unknown fields: {_short(', '.join(extra))}")
    return doc


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Bad(f"the header names {_short(repr(k))} twice")
        out[k] = v
    return out


def _no_constant(name: str) -> NoReturn:
    raise _Bad(f"the header holds {name}, which is not a JSON number")


def _check_header(doc: dict[str, Any], model: dict[str, Any]) -> None:
    """The types and invariants of the header's fields (see the module docstring)."""
    for name in ("model", "context"):
        if not isinstance(doc[name], dict):
            raise _Bad(f"the header's {name} is not an object")
    created = doc["created"]
    if isinstance(created, bool) or not isinstance(created, (int, float)) or not math.isfinite(created) \
            or created < 0:
        raise _Bad(f"the header's created time {_short(repr(created))} is not a time")
    keys, nexts = doc["keys"], doc["nexts"]
    if not isinstance(keys, list) or not isinstance(nexts, list):
        raise _Bad("the header's keys and nexts must be lists")
    if len(keys) != len(nexts):
        raise _Bad(f"the header has {len(keys)} keys but {len(nexts)} nexts")
    n_vocab = model.get("n_vocab")
    n_vocab = n_vocab if type(n_vocab) is int and n_vocab > 0 else _MAX_POS
    prev_key: Any = None
    prev_next = 0
    for i, (k, nx) in enumerate(zip(keys, nexts)):
        if type(nx) is not int or not 1 <= nx <= _MAX_POS:
            raise _Bad(f"nexts[{i}] is {_short(repr(nx))}, not a position in 1..{_MAX_POS}")
        if type(k) is int:
            _check_token(i, k, nx, prev_next, n_vocab)
        else:
            _check_row(i, k, prev_key)
        prev_key, prev_next = k, nx


def _check_token(i: int, k: int, nx: int, prev_next: int, n_vocab: int) -> None:
    if not 0 <= k < n_vocab:
        raise _Bad(f"keys[{i}] is the token id {k}, outside the vocabulary (0..{n_vocab - 1})")
    if nx != prev_next + 1:
        raise _Bad(f"the token at keys[{i}] sits at position {prev_next} but nexts[{i}] is {nx}, "
                   f"not {prev_next + 1}")


def _check_row(i: int, k: Any, prev_key: Any) -> None:
    if not (isinstance(k, list) and len(k) == 2 and isinstance(k[0], str) and type(k[1]) is int):
        raise _Bad(f"keys[{i}] is {_short(repr(k))}: neither a token id nor a [hex digest, row] pair")
    digest, row = k
    if not (0 < len(digest) <= _MAX_DIGEST_HEX and len(digest) % 2 == 0 and _HEX.fullmatch(digest)):
        raise _Bad(f"keys[{i}] has the digest {_short(repr(digest))}, not an even-length hex string "
                   f"of at most {_MAX_DIGEST_HEX} digits")
    if not 0 <= row < _MAX_POS:
        raise _Bad(f"keys[{i}] has the row {row}, not in 0..{_MAX_POS - 1}")
    if row > 0 and (not isinstance(prev_key, list) or prev_key != [digest, row - 1]):
        raise _Bad(f"keys[{i}] is row {row} of an embedding chunk whose row {row - 1} does not precede it")


def _same(stored: dict[str, Any], expected: dict[str, Any], what: str) -> None:
    """Refuse, naming the first field that differs, a state saved for another model/context."""
    for name in list(expected) + [k for k in stored if k not in expected]:
        a, b = stored.get(name, _MISSING), expected.get(name, _MISSING)
        if _canon(a) != _canon(b):
            this = "this model has" if what == "model" else "this context has"
            saved = "saved from a different model" if what == "model" else "saved with different context settings"
            raise _Bad(f"this state was {saved} ({name} {_show(a)}, {this} {_show(b)})", what)


_MISSING = object()


def _canon(v: Any) -> Any:
    # type-exact comparison: 1 and True and 1.0 are equal to Python, not to a model's identity
    if v is _MISSING:
        return v
    try:
        return json.dumps(v, sort_keys=True)
    except RecursionError:  # absurdly nested: equal to no real identity
        return object()


def _show(v: Any) -> str:
    return "(none)" if v is _MISSING else _short(repr(v))


def _short(s: str, n: int = 80) -> str:
    return s if len(s) <= n else s[:n - 3] + "..."
