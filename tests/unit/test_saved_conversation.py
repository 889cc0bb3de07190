"""Conversations to disk: ``Model.save_state`` / ``Model.load_state``, with and without
``n_parallel``, images included; a loaded conversation continues exactly as the original
would, evaluating only what is new; foreign and damaged files never reach llama.cpp.
(The file format's own checks: tests/unit/test_state_file.py.)"""

from __future__ import annotations

import numpy as np
import pytest

import pyllama_ernie as pe
from pyllama_ernie import IMAGE_MARKER
from pyllama_ernie.state_file import StateFileError

EXACT = dict(kv_cache_type="f32", flash_attn=False)


@pytest.fixture(scope="module")
def vl(tiny_vl):
    return tiny_vl


IMAGE = np.random.default_rng(3).integers(0, 256, (56, 42, 3), dtype=np.uint8)
FIRST = f"describe {IMAGE_MARKER} in a few words"


def _continue(m, first):
    """The follow-up call: the first prompt, its answer and more text (a prompt string)."""
    return FIRST + first.text + " and then some more", dict(images=[IMAGE], max_tokens=10, temperature=0,
                                                            ignore_eos=True)


@pytest.mark.parametrize("n_parallel", [None, 3])
def test_a_saved_conversation_with_an_image_resumes_exactly(vl, tmp_path, n_parallel):
    path, mmproj = vl
    saved = tmp_path / "chat.kv"
    with pe.Model(path, mmproj_path=mmproj, n_ctx=1024, n_parallel=n_parallel, **EXACT) as m:
        first = m.generate(FIRST, images=[IMAGE], max_tokens=8, temperature=0, ignore_eos=True)
        n_saved = m.save_state(saved)
        text, kw = _continue(m, first)
        expected = m.generate(text, **kw)  # the original conversation going on
    # the engine leaves the last answer token unevaluated (nobody needs its logits); one context does not
    assert n_saved == first.prompt_tokens + first.completion_tokens - (n_parallel is not None)
    with pe.Model(path, mmproj_path=mmproj, n_ctx=1024, n_parallel=n_parallel, **EXACT) as m:
        assert m.load_state(saved) == n_saved
        resumed = m.generate(text, **kw)
    assert resumed.tokens == expected.tokens
    # resuming from the file is as good as never having stopped: the image and the first prompt
    # (at least) came from the cache
    assert resumed.prompt_tokens_evaluated == expected.prompt_tokens_evaluated
    assert resumed.prompt_tokens_evaluated <= resumed.prompt_tokens - first.prompt_tokens + 1


def test_a_state_loads_into_either_kind_of_model(vl, tmp_path):
    path, mmproj = vl
    saved = tmp_path / "chat.kv"
    with pe.Model(path, mmproj_path=mmproj, n_ctx=1024, n_parallel=2, **EXACT) as m:
        first = m.generate(FIRST, images=[IMAGE], max_tokens=6, temperature=0, ignore_eos=True)
        m.save_state(saved)
        text, kw = _continue(m, first)
        expected = m.generate(text, **kw)
    with pe.Model(path, mmproj_path=mmproj, n_ctx=1024, **EXACT) as m:
        m.load_state(saved)
        resumed = m.generate(text, **kw)
    assert resumed.tokens == expected.tokens
    assert resumed.prompt_tokens_evaluated <= resumed.prompt_tokens - first.prompt_tokens + 1


def test_foreign_and_damaged_states_are_refused(vl, tiny_gguf, tmp_path):
    path, mmproj = vl
    saved = tmp_path / "chat.kv"
    with pe.Model(path, mmproj_path=mmproj, n_ctx=512, **EXACT) as m:
        with pytest.raises(ValueError, match="generate first"):
            m.save_state(saved)
        m.generate("a short exchange", max_tokens=4, temperature=0)
        m.save_state(saved)
    other = tiny_gguf("ernie4_5")
    with pe.Model(other, n_ctx=512, **EXACT) as m:
        with pytest.raises(StateFileError) as e:
            m.load_state(saved)
        assert e.value.reason == "model"
        with pytest.raises(StateFileError):
            m.load_state(other)  # a GGUF file is no state file
    with pe.Model(path, n_ctx=512, kv_cache_type="f16", flash_attn=False) as m:
        with pytest.raises(StateFileError) as e:
            m.load_state(saved)
        assert e.value.reason == "context"
    data = bytearray(saved.read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "bad.kv").write_bytes(bytes(data))
    with pe.Model(path, n_ctx=512, **EXACT) as m:
        with pytest.raises(StateFileError):
            m.load_state(tmp_path / "bad.kv")
        with pytest.raises(FileNotFoundError):
            m.load_state(tmp_path / "missing.kv")
        assert m.load_state(saved) > 0  # the good one still loads
        assert m.generate("a short exchange", max_tokens=4, temperature=0).prompt_tokens_evaluated == 1


def test_a_state_too_long_for_the_window_is_refused(tiny_gguf, tmp_path):
    path = tiny_gguf("ernie4_5")
    saved = tmp_path / "long.kv"
    with pe.Model(path, n_ctx=512, **EXACT) as m:
        m.generate(list(range(10, 300)), max_tokens=2, temperature=0)
        m.save_state(saved)
    with pe.Model(path, n_ctx=256, **EXACT) as m:
        with pytest.raises(pe.PromptTooLongError):
            m.load_state(saved)
