"""The saved-conversation state file (pyllama_ernie/state_file.py): round trip, atomic
writes, and every kind of bad file refused with StateFileError before it could reach C.

Pure Python: needs no build. Hostile headers that must get past the checksum are
written with :func:`_pack`, which computes a valid SHA-256 over whatever it is given.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
from pathlib import Path
from typing import Any

import pytest

from pyllama_ernie import state_file as sf
from pyllama_ernie.errors import ErnieError
from pyllama_ernie.state_file import SeqState, StateFileError, read_state, write_state

hypothesis = pytest.importorskip("hypothesis")
st = pytest.importorskip("hypothesis.strategies")

MODEL = {"desc": "ernie4_5 0.3B F16", "n_embd": 64, "n_layer": 2, "n_vocab": 1000, "n_params": 123456,
         "size": 246912, "arch": "ernie4_5"}
CONTEXT = {"kv_cache_type": "f16", "n_pos_per_embd": 4}
IMG = hashlib.blake2b(b"image", digest_size=16).digest()
VID = hashlib.blake2b(b"video", digest_size=16).digest()


def sample_state(payload_len: int = 4096, seed: int = 0) -> SeqState:
    """Tokens, a 4-row image whose rows share positions (M-RoPE), tokens, a 2-row video."""
    keys: list[Any] = [1, 2, 3]
    nexts = [1, 2, 3]
    keys += [(IMG, 0), (IMG, 1), (IMG, 2), (IMG, 3)]
    nexts += [4, 4, 5, 6]  # not increasing by one, and repeating: allowed for embedding rows
    keys += [7, 999]
    nexts += [7, 8]
    keys += [(VID, 0), (VID, 1)]
    nexts += [9, 9]
    payload = random.Random(seed).randbytes(payload_len)
    return SeqState(model=dict(MODEL), context=dict(CONTEXT), keys=keys, nexts=nexts, payload=payload,
                    created=1_700_000_000.5)


def read(path: Path, **kw: Any) -> SeqState:
    return read_state(path, model=kw.pop("model", MODEL), context=kw.pop("context", CONTEXT), **kw)


def refused(path: Path, match: str, reason: str | None = None, **kw: Any) -> StateFileError:
    with pytest.raises(StateFileError, match=match) as info:
        read(path, **kw)
    if reason is not None:
        assert info.value.reason == reason
    return info.value


def _pack(header: bytes, payload: bytes = b"\x00" * 16, *, version: int = sf.VERSION,
          header_len: int | None = None, payload_len: int | None = None) -> bytes:
    """A file with a valid checksum over ``header + payload`` (lengths overridable)."""
    digest = hashlib.sha256(header + payload).digest()
    hl = len(header) if header_len is None else header_len
    pl = len(payload) if payload_len is None else payload_len
    return struct.pack("<16sIQQ32s", sf.MAGIC, version, hl, pl, digest) + header + payload


def _header(**change: Any) -> dict[str, Any]:
    doc = {"model": dict(MODEL), "context": dict(CONTEXT), "keys": [5, 6, [IMG.hex(), 0], [IMG.hex(), 1], 7],
           "nexts": [1, 2, 3, 3, 4], "created": 1.0}
    doc.update(change)
    return doc


def write_doc(tmp_path: Path, doc: Any, name: str = "s.kvstate") -> Path:
    p = tmp_path / name
    p.write_bytes(_pack(json.dumps(doc).encode()))
    return p


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    p = tmp_path / "conv.kvstate"
    write_state(p, sample_state())
    return p


# --- the good path ---


def test_round_trip(saved: Path) -> None:
    st0 = sample_state()
    got = read(saved)
    assert got == st0
    assert got.keys[3] == (IMG, 0) and isinstance(got.keys[3][0], bytes)
    assert all(type(k) is int for k in got.keys if not isinstance(k, tuple))
    assert got.payload == st0.payload and isinstance(got.payload, bytes)
    assert saved.stat().st_size == sf.PREFIX_SIZE + _header_len(saved) + 4096


def _header_len(p: Path) -> int:
    return struct.unpack_from("<Q", p.read_bytes(), 20)[0]


def test_round_trip_empty_and_numpy_ints(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    p = tmp_path / "a.kvstate"
    write_state(p, SeqState(MODEL, CONTEXT, [], [], b""))
    got = read(p)
    assert got.keys == [] and got.payload == b"" and got.created > 0
    write_state(p, SeqState(MODEL, CONTEXT, [np.int64(4), (bytearray(IMG), np.int32(0))], [np.int64(1), 2],
                            memoryview(b"xyz")))
    got = read(p)
    assert got.keys == [4, (IMG, 0)] and got.nexts == [1, 2] and got.payload == b"xyz"


def test_large_payload_is_read_in_chunks(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sf, "_READ_CHUNK", 1000)
    assert read(saved) == sample_state()


def test_layout(saved: Path) -> None:
    data = saved.read_bytes()
    magic, version, hl, pl, digest = struct.unpack_from("<16sIQQ32s", data)
    assert (magic, version, pl) == (b"PYLLAMA-ERNIE-KV", 1, 4096)
    assert len(data) == 68 + hl + pl
    assert hashlib.sha256(data[68:]).digest() == digest
    doc = json.loads(data[68:68 + hl])
    assert doc["keys"][3] == [IMG.hex(), 0] and doc["model"] == MODEL


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path: Path) -> None:
    p = tmp_path / "conv.kvstate"
    p.write_bytes(b"old contents")
    write_state(p, sample_state(100))
    write_state(p, sample_state(200, seed=1))
    assert read(p).payload == sample_state(200, seed=1).payload
    assert sorted(os.listdir(tmp_path)) == ["conv.kvstate"]


def test_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "conv.kvstate"
    write_state(p, sample_state(100))
    before = p.read_bytes()

    def boom(*a: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(sf.os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        write_state(p, sample_state(200, seed=1))
    assert p.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["conv.kvstate"]


def test_write_refuses_a_bad_state(tmp_path: Path) -> None:
    p = tmp_path / "x.kvstate"
    bad = [
        (SeqState(MODEL, CONTEXT, [1], [1, 2], b""), StateFileError, "1 keys but 2 nexts"),
        (SeqState(MODEL, CONTEXT, [-1], [1], b""), StateFileError, "token id -1"),
        (SeqState(MODEL, CONTEXT, [True], [1], b""), TypeError, "not an integer"),
        (SeqState(MODEL, CONTEXT, ["a"], [1], b""), TypeError, "keys must be"),
        (SeqState(MODEL, CONTEXT, [(IMG, 1)], [1], b""), StateFileError, "row 0 does not precede"),
        (SeqState(MODEL, CONTEXT, [1], [1], b"", created=float("nan")), StateFileError, "not a time"),
        (SeqState({"x": object()}, CONTEXT, [], [], b""), TypeError, "JSON values"),
        (SeqState({"x": float("inf")}, CONTEXT, [], [], b""), TypeError, "JSON values"),
    ]
    for state, kind, match in bad:
        with pytest.raises(kind, match=match):
            write_state(p, state)
    assert not p.exists() and os.listdir(tmp_path) == []


def test_error_class() -> None:
    e = StateFileError("bad")
    assert isinstance(e, ErnieError) and isinstance(e, ValueError)
    assert e.llama_log == "" and str(e) == "bad" and e.reason == "damaged"


# --- the file is not a state file ---


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read(tmp_path / "nope.kvstate")


def test_directory(tmp_path: Path) -> None:
    refused(tmp_path, "is a folder", "foreign")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX only")
def test_pipe_and_device(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.kvstate"
    os.mkfifo(fifo)
    refused(fifo, "not a regular file", "foreign")  # refused without waiting for a writer
    if Path("/dev/zero").exists():
        refused(Path("/dev/zero"), "not a regular file", "foreign")


def test_symlink_to_a_state(saved: Path, tmp_path: Path) -> None:
    link = tmp_path / "link.kvstate"
    try:
        link.symlink_to(saved)
    except OSError:
        pytest.skip("no symlinks here")
    assert read(link).payload == sample_state().payload


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "e.kvstate"
    p.write_bytes(b"")
    refused(p, "empty", "foreign")


def test_gguf_file(tmp_path: Path) -> None:
    p = tmp_path / "m.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))
    refused(p, "GGUF model file", "foreign")


def test_random_bytes(tmp_path: Path) -> None:
    p = tmp_path / "r.kvstate"
    p.write_bytes(random.Random(1).randbytes(5000))
    refused(p, "wrong magic", "foreign")


@pytest.mark.parametrize("n", [1, 10, 16, 19, 20, 30, 67, 68, 100, -1])
def test_truncated(saved: Path, n: int) -> None:
    data = saved.read_bytes()
    saved.write_bytes(data[:n])
    refused(saved, "truncated", "damaged")


def test_trailing_bytes(saved: Path) -> None:
    with open(saved, "ab") as f:
        f.write(b"\x00")
    refused(saved, "1 bytes after the end")


def test_every_flipped_byte(saved: Path) -> None:
    data = saved.read_bytes()
    step = max(1, len(data) // 400)
    for i in list(range(0, 200)) + list(range(200, len(data), step)):
        bad = bytearray(data)
        bad[i] ^= 0x01 << (i % 8)
        saved.write_bytes(bytes(bad))
        with pytest.raises(StateFileError):
            read(saved)


# --- the prefix ---


def test_version_from_the_future(tmp_path: Path) -> None:
    p = tmp_path / "v.kvstate"
    p.write_bytes(_pack(json.dumps(_header()).encode(), version=2))
    e = refused(p, "version 2, newer than version 1", "version")
    assert "upgrade" in str(e)


def test_version_zero(tmp_path: Path) -> None:
    p = tmp_path / "v.kvstate"
    p.write_bytes(_pack(json.dumps(_header()).encode(), version=0))
    refused(p, "unknown format version 0", "version")


def test_future_version_shorter_than_our_prefix(tmp_path: Path) -> None:
    # a later format may lay out its prefix differently: the version is read first
    p = tmp_path / "v.kvstate"
    p.write_bytes(sf.MAGIC + struct.pack("<I", 7))
    refused(p, "version 7", "version")


@pytest.mark.parametrize("hl,pl,match", [
    (2**64 - 1, 16, "at most 67108864"),
    (sf.MAX_HEADER + 1, 16, "at most 67108864"),
    (0, 16, "header is empty"),
    (100, 2**64 - 1, "truncated"),
    (100, 2**40, "truncated"),
    (sf.MAX_HEADER, 2**63, "truncated"),
])
def test_huge_or_wrong_declared_lengths(tmp_path: Path, hl: int, pl: int, match: str) -> None:
    p = tmp_path / "h.kvstate"
    p.write_bytes(_pack(json.dumps(_header()).encode(), header_len=hl, payload_len=pl))
    refused(p, match)


def test_payload_length_mismatch(tmp_path: Path) -> None:
    header = json.dumps(_header()).encode()
    p = tmp_path / "m.kvstate"
    p.write_bytes(_pack(header, payload_len=15))
    refused(p, "1 bytes after the end")
    p.write_bytes(_pack(header, payload_len=17))
    refused(p, "truncated")


def test_max_payload(saved: Path) -> None:
    assert read(saved, max_payload=4096).payload
    refused(saved, r"4096 bytes, more than max_payload \(4095\)", "too_large", max_payload=4095)
    with pytest.raises(ValueError, match="max_payload"):
        read(saved, max_payload=-1)


def test_checksum(saved: Path) -> None:
    data = bytearray(saved.read_bytes())
    data[-1] ^= 0xFF
    saved.write_bytes(bytes(data))
    refused(saved, "checksum does not match", "damaged")


# --- the header ---


def test_header_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "u.kvstate"
    p.write_bytes(_pack(b'{"model": "\xff"}'))
    refused(p, "not UTF-8")


@pytest.mark.parametrize("text", [b"{", b"not json", b"\x00", b"[" * 100_000, b"1" * 5000,
                                  b'{"created": NaN}', b'{"created": Infinity}'])
def test_header_not_json(tmp_path: Path, text: bytes) -> None:
    p = tmp_path / "j.kvstate"
    p.write_bytes(_pack(text))
    refused(p, "not valid JSON|not a JSON number")


@pytest.mark.parametrize("doc", [[], 1, "x", None, True])
def test_header_json_but_not_an_object(tmp_path: Path, doc: Any) -> None:
    refused(write_doc(tmp_path, doc), "JSON but not an object")


def test_header_fields(tmp_path: Path) -> None:
    doc = _header()
    del doc["nexts"]
    refused(write_doc(tmp_path, doc), "lacks nexts")
    refused(write_doc(tmp_path, _header(extra=1)), "unknown fields: extra")
    p = tmp_path / "d.kvstate"
    p.write_bytes(_pack(b'{"keys": [], "keys": []}'))
    refused(p, "'keys' twice")


@pytest.mark.parametrize("change,match", [
    ({"model": []}, "model is not an object"),
    ({"context": "f16"}, "context is not an object"),
    ({"keys": {}}, "must be lists"),
    ({"nexts": None}, "must be lists"),
    ({"created": "yesterday"}, "not a time"),
    ({"created": True}, "not a time"),
    ({"created": -5}, "not a time"),
    ({"keys": [1, 2], "nexts": [1]}, "2 keys but 1 nexts"),
    ({"keys": [1], "nexts": [1, 2]}, "1 keys but 2 nexts"),
    ({"keys": [-1], "nexts": [1]}, "token id -1"),
    ({"keys": [1000], "nexts": [1]}, r"outside the vocabulary \(0..999\)"),
    ({"keys": [1.0], "nexts": [1]}, "neither a token id"),
    ({"keys": [True], "nexts": [1]}, "neither a token id"),
    ({"keys": ["5"], "nexts": [1]}, "neither a token id"),
    ({"keys": [None], "nexts": [1]}, "neither a token id"),
    ({"keys": [[IMG.hex()]], "nexts": [1]}, "neither a token id"),
    ({"keys": [[IMG.hex(), 0, 1]], "nexts": [1]}, "neither a token id"),
    ({"keys": [[IMG.hex(), 0.0]], "nexts": [1]}, "neither a token id"),
    ({"keys": [[5, 0]], "nexts": [1]}, "neither a token id"),
    ({"keys": [["abc", 0]], "nexts": [1]}, "not an even-length hex"),
    ({"keys": [["", 0]], "nexts": [1]}, "not an even-length hex"),
    ({"keys": [["zz", 0]], "nexts": [1]}, "not an even-length hex"),
    ({"keys": [["aa bb", 0]], "nexts": [1]}, "not an even-length hex"),
    ({"keys": [["ab" * 65, 0]], "nexts": [1]}, "not an even-length hex"),
    ({"keys": [[IMG.hex(), -1]], "nexts": [1]}, "row -1"),
    ({"keys": [[IMG.hex(), 2**31]], "nexts": [1]}, "row 2147483648"),
    ({"keys": [[IMG.hex(), 1]], "nexts": [1]}, "row 0 does not precede"),
    ({"keys": [[IMG.hex(), 0], [VID.hex(), 1]], "nexts": [1, 1]}, "row 0 does not precede"),
    ({"keys": [1], "nexts": [0]}, "nexts.0. is 0"),
    ({"keys": [1], "nexts": [-3]}, "nexts.0. is -3"),
    ({"keys": [1], "nexts": [2**31]}, "nexts.0. is 2147483648"),
    ({"keys": [1], "nexts": [1.0]}, "nexts.0. is 1.0"),
    ({"keys": [1], "nexts": ["1"]}, "nexts.0. is '1'"),
    ({"keys": [1], "nexts": [False]}, "nexts.0. is False"),
    ({"keys": [1, 2], "nexts": [1, 3]}, r"position 1 but nexts\[1\] is 3, not 2"),
    ({"keys": [1, 2], "nexts": [2, 3]}, r"position 0 but nexts\[0\] is 2"),
])
def test_header_types(tmp_path: Path, change: dict[str, Any], match: str) -> None:
    e = refused(write_doc(tmp_path, _header(**change)), match, "damaged")
    assert str(e).startswith("s.kvstate: ")


def test_header_valid_edge_cases(tmp_path: Path) -> None:
    # uppercase hex, a chunk right after another, positions that go back (M-RoPE)
    doc = _header(keys=[[IMG.hex().upper(), 0], [VID.hex(), 0], [VID.hex(), 1], 3],
                  nexts=[2**31 - 1, 5, 1, 2])
    got = read(write_doc(tmp_path, doc))
    assert got.keys == [(IMG, 0), (VID, 0), (VID, 1), 3] and got.nexts == [2**31 - 1, 5, 1, 2]


# --- model and context identity ---


def test_wrong_model(saved: Path) -> None:
    e = refused(saved, r"saved from a different model \(n_embd 64, this model has 128\)", "model",
                model={**MODEL, "n_embd": 128})
    assert e.llama_log == ""
    refused(saved, r"different model \(arch 'ernie4_5', this model has 'ernie4_5-moe'\)",
            model={**MODEL, "arch": "ernie4_5-moe"})
    refused(saved, r"different model \(n_embd 64, this model has 64.0\)", model={**MODEL, "n_embd": 64.0})
    refused(saved, r"different model \(n_heads \(none\), this model has 8\)", model={**MODEL, "n_heads": 8})
    less = dict(MODEL)
    del less["size"]
    refused(saved, r"different model \(size 246912, this model has \(none\)\)", model=less)


def test_first_differing_model_field_is_named(saved: Path) -> None:
    refused(saved, r"\(desc ", model={**MODEL, "desc": "other", "n_embd": 1})


def test_wrong_context(saved: Path) -> None:
    refused(saved, r"saved with different context settings \(kv_cache_type 'f16', this context has 'q8_0'\)",
            "context", context={**CONTEXT, "kv_cache_type": "q8_0"})
    refused(saved, r"n_pos_per_embd 4, this context has 1", "context", context={**CONTEXT, "n_pos_per_embd": 1})


def test_token_ids_are_checked_against_this_models_vocabulary(tmp_path: Path) -> None:
    p = tmp_path / "v.kvstate"
    small = {**MODEL, "n_vocab": 5}
    write_state(p, SeqState(small, CONTEXT, [4, 3], [1, 2], b""))
    refused(p, "different model")  # the vocabulary check uses the model it is loaded into
    state = SeqState(MODEL, CONTEXT, [999], [1], b"")
    write_state(p, state)
    with pytest.raises(StateFileError, match="outside the vocabulary"):
        write_state(p, SeqState(small, CONTEXT, [5], [1], b""))


# --- fuzzing ---


_FUZZ = hypothesis.settings(max_examples=150, deadline=None, derandomize=True, database=None,
                            suppress_health_check=list(hypothesis.HealthCheck))


@st.composite
def mutations(draw: Any, base: bytes) -> bytes:
    """``base`` changed by one to four edits: flip, overwrite, insert, delete, truncate, extend."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(("flip", "set", "u64", "insert", "delete", "truncate", "extend")))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[i] = draw(st.integers(0, 255))
        elif op == "u64":  # a length field, or anywhere, gets an extreme value
            v = draw(st.sampled_from((0, 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1, len(base))))
            j = draw(st.sampled_from((16, 20, 28, i)))
            data[j:j + 8] = struct.pack("<Q", v)
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 64))]
        elif op == "truncate":
            del data[i:]
        else:
            data += draw(st.binary(min_size=1, max_size=64))
    return bytes(data)


_BASE = None


def _base() -> bytes:
    global _BASE
    if _BASE is None:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "b.kvstate"
            write_state(p, sample_state(512))
            _BASE = p.read_bytes()
    return _BASE


@_FUZZ
@hypothesis.given(data=st.data())
def test_fuzz_mutated_files(tmp_path_factory: pytest.TempPathFactory, data: Any) -> None:
    base = _base()
    bad = data.draw(mutations(base))
    hypothesis.assume(bad != base)
    p = tmp_path_factory.getbasetemp() / "fuzz.kvstate"
    p.write_bytes(bad)
    with pytest.raises(StateFileError):
        read(p, max_payload=1 << 20)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
    max_leaves=20)
_KEY = st.integers(-3, 1003) | st.tuples(st.sampled_from((IMG.hex(), VID.hex(), "ab", "xyz", "")),
                                        st.integers(-1, 3)).map(list) | _JSON


@_FUZZ
@hypothesis.given(keys=st.lists(_KEY, max_size=6), nexts=st.lists(st.integers(-2, 8) | _JSON, max_size=6),
                  created=st.floats(-1, 2e9) | _JSON, model=st.sampled_from((MODEL, {**MODEL, "n_vocab": 5}, [])),
                  extra=st.dictionaries(st.sampled_from(("extra", "keys", "model")), _JSON, max_size=1))
def test_fuzz_headers_with_a_valid_checksum(tmp_path_factory: pytest.TempPathFactory, keys: list, nexts: list,
                                            created: Any, model: Any, extra: dict) -> None:
    """Arbitrary headers past the checksum: a checked state or StateFileError, nothing else."""
    doc = {"model": model, "context": CONTEXT, "keys": keys, "nexts": nexts, "created": created, **extra}
    p = tmp_path_factory.getbasetemp() / "fuzzh.kvstate"
    p.write_bytes(_pack(json.dumps(doc).encode()))
    try:
        got = read(p)
    except StateFileError:
        return
    assert len(got.keys) == len(got.nexts) and got.model == MODEL
    for k, nx in zip(got.keys, got.nexts):
        assert 1 <= nx < 2**31
        assert (0 <= k < 1000) if isinstance(k, int) else (isinstance(k[0], bytes) and 0 <= k[1])


@_FUZZ
@hypothesis.given(blob=st.binary(max_size=200))
def test_fuzz_random_bytes(tmp_path_factory: pytest.TempPathFactory, blob: bytes) -> None:
    p = tmp_path_factory.getbasetemp() / "fuzzr.kvstate"
    p.write_bytes(blob)
    with pytest.raises(StateFileError):
        read(p)
    p.write_bytes(sf.MAGIC + blob)
    with pytest.raises(StateFileError):
        read(p)
