"""Property-based fuzzing (hypothesis) of the three places untrusted input enters.

* the GGUF validator (:func:`pyllama_ernie.gguf_check.validate_gguf`) on mutations of the
  first 64 KiB of valid tiny model and projector files: it returns, or raises
  ``InvalidModelFileError`` / ``ModelLoadError``; nothing else (no IndexError,
  struct.error, MemoryError, OverflowError, UnicodeDecodeError...), and quickly;
* image input (:func:`pyllama_ernie.images.load_image`) on random bytes and mutations of
  small PNG, JPEG and GIF files, given as bytes and as a file: an ``HxWx3`` uint8 array
  or ``ImageError``;
* chat messages (:func:`pyllama_ernie.chat.prepare_chat`, then
  :func:`pyllama_ernie.chat.render_template` with a real template) on random JSON-like
  structures: a result or ``ValueError`` (``ImageError`` is one).

``HYPOTHESIS_PROFILE=ci`` (the default) runs about 400 examples in all (a few seconds),
derandomized; ``HYPOTHESIS_PROFILE=long`` runs about 35 000 with fresh randomness
(10 000 for the chat test, 5 000 per validator and image-mutation test, 2 500 per
random-bytes test; about 5 minutes on 2 cores); ``HYPOTHESIS_PROFILE=<N>`` scales the
same way from N. See docs/reliability.md for what the runs found::

    HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest tests/hostile/test_fuzz.py -q -s
"""

from __future__ import annotations

import io
import os
import struct
import tempfile
import time
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
st = pytest.importorskip("hypothesis.strategies")
HealthCheck, settings = hypothesis.HealthCheck, hypothesis.settings

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
_COMMON: dict[str, Any] = {"deadline": None, "suppress_health_check": list(HealthCheck), "print_blob": True}
settings.register_profile("ci", max_examples=120, derandomize=True, database=None, **_COMMON)
settings.register_profile("long", max_examples=10_000, database=None, **_COMMON)
if PROFILE not in ("ci", "long"):
    settings.register_profile(PROFILE, max_examples=int(PROFILE) if PROFILE.isdigit() else 120, **_COMMON)


def fuzz_settings(share: float = 1.0) -> settings:
    """This module's profile; ``share`` scales the number of examples of one test."""
    base = settings.get_profile(PROFILE)
    return settings(base, max_examples=max(1, int(base.max_examples * share)))


_TMP = Path(tempfile.mkdtemp(prefix="pyllama_ernie_fuzz_"))
STATS: dict[str, Any] = {}


def _count(name: str, outcome: str) -> None:
    c = STATS.setdefault(name, {})
    c[outcome] = c.get(outcome, 0) + 1


@pytest.fixture(scope="module", autouse=True)
def _report():
    t = time.perf_counter()
    yield
    print(f"\nfuzz ({PROFILE}, {time.perf_counter() - t:.1f} s): {STATS}")


# -- byte mutations ------------------------------------------------------------------------------

_INTERESTING = (0, 1, 2, 3, 4, 7, 8, 9, 12, 13, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x7FFF_FFFF, 0x8000_0000,
                0xFFFF_FFFF, 1 << 32, 1 << 40, (1 << 62) - 1, (1 << 63) - 1, 1 << 63, (1 << 64) - 1)


@st.composite
def mutations(draw: Any, base: bytes, anchors: tuple[int, ...], limit: int = 65536) -> bytes:
    """``base`` with 1-6 random edits in its first ``limit`` bytes (biased to field boundaries)."""
    data = bytearray(base)
    end = min(limit, len(data))
    for _ in range(draw(st.integers(1, 6))):
        if anchors and draw(st.booleans()):
            pos = draw(st.sampled_from(anchors)) + draw(st.integers(-2, 2))
        else:
            pos = draw(st.integers(0, end - 1))
        pos = min(max(pos, 0), max(len(data) - 1, 0))
        op = draw(st.sampled_from(("bit", "bit", "byte", "u32", "u64", "truncate", "insert", "delete", "copy")))
        if op == "bit":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte":
            data[pos] = draw(st.integers(0, 255))
        elif op in ("u32", "u64"):
            v = draw(st.sampled_from(_INTERESTING + (len(data), len(data) - pos)))
            raw = struct.pack("<Q", v % (1 << 64))[: 4 if op == "u32" else 8]
            data[pos:pos + len(raw)] = raw
            del data[len(base):]
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 16))]
        else:  # copy a chunk over another place (duplicates keys, tokens, names)
            n = draw(st.integers(4, 64))
            src = draw(st.integers(0, max(end - n, 0)))
            data[pos:pos + n] = data[src:src + n]
        if not data:
            break
    return bytes(data)


# -- (a) the GGUF validator ----------------------------------------------------------------------

@cache
def _gguf_base(kind: str) -> tuple[bytes, tuple[int, ...]]:
    """A valid tiny file and the offsets where its fields (and their parts) start."""
    import gguf

    from pyllama_ernie.convert.synthetic import write_tiny_gguf, write_tiny_mmproj

    p = _TMP / f"base-{kind}.gguf"
    if kind == "mmproj":
        write_tiny_mmproj(p, n_embd_text=64)
    else:
        write_tiny_gguf(kind, p)
    r = gguf.GGUFReader(str(p))
    anchors = set()
    for f in list(r.fields.values()) + [t.field for t in r.tensors]:
        off = f.offset
        for part in f.parts[:64]:  # the first strings of the token list are enough
            anchors.add(off)
            off += part.nbytes
    return p.read_bytes(), tuple(sorted(anchors))


def _check_validator(data: bytes, role: str) -> None:
    from pyllama_ernie.errors import InvalidModelFileError, ModelLoadError
    from pyllama_ernie.gguf_check import validate_gguf

    p = _TMP / f"case-{os.getpid()}.gguf"
    p.write_bytes(data)
    t = time.perf_counter()
    try:
        s = validate_gguf(p, role=role)
    except (InvalidModelFileError, ModelLoadError) as e:
        assert str(e) and e.llama_log == ""
        _count(f"validator/{role}", "refused")
    else:
        assert s.tensors and s.file_size == len(data)
        _count(f"validator/{role}", "accepted")
    assert time.perf_counter() - t < 2.0, "validation took too long"


@pytest.mark.parametrize("kind", ["ernie4_5", "ernie4_5-vl-moe", "mmproj"])
def test_validator_on_mutated_files(kind):
    base, anchors = _gguf_base(kind)

    @fuzz_settings(0.5)
    @hypothesis.given(data=mutations(base, anchors), role=st.sampled_from(("model", "mmproj", "auto")))
    def run(data: bytes, role: str) -> None:
        _check_validator(data, role)

    run()


@fuzz_settings(0.25)
@hypothesis.given(header=st.sampled_from((b"", b"GGUF", b"GGUF\x03\x00\x00\x00", b"GGUF\x02\x00\x00\x00")),
                  rest=st.binary(max_size=512))
def test_validator_on_random_bytes(header: bytes, rest: bytes):
    if header or rest:
        _check_validator(header + rest, "model")


# -- (b) images ----------------------------------------------------------------------------------

@cache
def _image_bases() -> tuple[bytes, ...]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for fmt, mode, size in (("PNG", "RGB", (8, 6)), ("PNG", "RGBA", (5, 7)), ("PNG", "P", (9, 4)),
                            ("JPEG", "RGB", (16, 16)), ("GIF", "P", (6, 6)), ("BMP", "RGB", (4, 4))):
        im = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
        buf = io.BytesIO()
        im.save(buf, format=fmt)
        out.append(buf.getvalue())
    return tuple(out)


def _check_image(data: bytes, as_file: bool) -> None:
    from pyllama_ernie.errors import ImageError
    from pyllama_ernie.images import load_image

    src: Any = data
    if as_file:
        src = _TMP / f"img-{os.getpid()}"
        src.write_bytes(data)
    try:
        rgb = load_image(src)
    except ImageError as e:
        assert str(e)
        _count("load_image", "ImageError")
    else:
        assert isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8
        assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.shape[0] > 0 and rgb.shape[1] > 0
        assert rgb.flags.c_contiguous
        _count("load_image", "decoded")


@st.composite
def _mutated_image(draw: Any) -> bytes:
    base = draw(st.sampled_from(_image_bases()))
    return draw(mutations(base, (), limit=len(base)))


@fuzz_settings(0.5)
@hypothesis.given(data=_mutated_image(), as_file=st.booleans())
def test_load_image_on_mutated_images(data: bytes, as_file: bool):
    _check_image(data, as_file)


@fuzz_settings(0.25)
@hypothesis.given(data=st.one_of(st.binary(max_size=256),
                                 st.sampled_from((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM")).flatmap(
                                     lambda h: st.binary(max_size=256).map(lambda b: h + b))),
                  as_file=st.booleans())
def test_load_image_on_random_bytes(data: bytes, as_file: bool):
    _check_image(data, as_file)


# -- (c) chat messages ---------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
_urls = st.sampled_from(("data:image/png;base64,iVBORw0KGgo=", "data:image/png,raw", "data:;base64,@@@",
                         "file:///tmp/x.png", "file:", "http://example.com/x.png", "https://[::1", "ftp://x/y",
                         "C:\\\\img.png", "~/img.png", "", "x" * 300, "<__media__>", "data:,"))
_part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text")}, optional={"text": st.one_of(st.text(max_size=30), _json)}),
    st.fixed_dictionaries({"type": st.just("image_url")}, optional={
        "image_url": st.one_of(_urls, st.fixed_dictionaries({}, optional={"url": st.one_of(_urls, _json)}), _json)}),
    st.fixed_dictionaries({"type": st.just("image")}, optional={"image": _json}),
    st.fixed_dictionaries({"type": st.just("video")}, optional={"video": st.one_of(_json, st.lists(_json))}),
    st.fixed_dictionaries({"type": st.one_of(st.text(max_size=8), _json)}),
    _json,
)
_message = st.one_of(
    st.fixed_dictionaries({"role": st.one_of(st.sampled_from(("user", "assistant", "system", "tool")), _json)},
                          optional={"content": st.one_of(st.text(max_size=40), st.lists(_part, max_size=4), _json),
                                    "name": _json, "tool_calls": _json}),
    _json,
)
_messages = st.one_of(st.lists(_message, max_size=4), _json)


@fuzz_settings(1.0)
@hypothesis.given(messages=_messages, thinking=st.sampled_from((None, True, False)))
def test_chat_messages(messages: Any, thinking: Any):
    from pyllama_ernie.chat import prepare_chat, render_template
    from pyllama_ernie.convert.synthetic import CHAT_TEMPLATE

    try:
        out, _images, _videos = prepare_chat(messages)
    except ValueError as e:  # ImageError is a ValueError
        assert str(e)
        _count("prepare_chat", "ValueError")
        return
    _count("prepare_chat", "accepted")
    assert isinstance(out, list) and len(out) == len(messages)
    try:
        text = render_template(CHAT_TEMPLATE, out, add_generation_prompt=True, enable_thinking=thinking)
    except ValueError as e:
        assert str(e)
        _count("render_template", "ValueError")
    else:
        assert isinstance(text, str)
        _count("render_template", "rendered")
