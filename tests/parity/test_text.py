"""Parity with transformers (ernie4_5, ernie4_5_moe) on tiny random-weight models.

Each model is built with transformers, saved with save_pretrained, converted by
our converter and run through the public API. Error norm: max over all
positions and vocabulary of |ours - reference| divided by max |reference|.
f32 GGUF with an f32 KV cache and flash attention off: < 1e-4 at every
position. f16 GGUF with the default (f16) KV cache and flash attention left on
auto: < 1e-2.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pyllama_ernie._lib", reason="pyllama_ernie is not built (pip install .)")

from pyllama_ernie import Model  # noqa: E402

from reference_models import SAMPLE_TEXTS  # noqa: E402

# dense_h128 and moe_64x6: the released models' head size 128, and 64 experts top-6
MODELS = ["dense_a", "dense_b", "moe_a", "moe_odd", "dense_h128", "moe_64x6"]
PROMPT = "the quick brown fox jumps over the lazy dog. 你好世界，我们测试中文模型。 emoji 🚀🦙"
F32_BOUND = 1e-4
F16_BOUND = 1e-2
ROOT = Path(__file__).resolve().parents[2]


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours.astype(np.float64) - ref).max() / np.abs(ref).max())


def reference_logits(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def reference_greedy(model, ids, n: int) -> list:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module", params=MODELS)
def case(request, gguf_model, reference_model, reference_tokenizer):
    name = request.param
    path = gguf_model(name, "f32")
    with Model(path, n_ctx=512, n_batch=16, kv_cache_type="f32", flash_attn=False) as m:
        yield name, m, reference_model(name), reference_tokenizer(name)


def test_logits_f32_every_position(case):
    name, m, ref_model, tok = case
    ids = tok(PROMPT)["input_ids"]
    assert len(ids) > 16  # more than one batch
    ours = m.logits(ids)
    ref = reference_logits(ref_model, ids)
    assert ours.shape == ref.shape
    per_pos = np.abs(ours - ref).max(axis=1) / np.abs(ref).max()
    print(f"{name}: f32 max rel err {per_pos.max():.2e}")
    assert per_pos.max() < F32_BOUND, (name, per_pos.max())
    # the numbers are not trivially small
    assert np.abs(ref).max() > 1.0


def test_greedy_continuation_identical(case):
    name, m, ref_model, tok = case
    ids = tok("Hello world")["input_ids"]
    ours = m.generate(ids, max_tokens=32, temperature=0, ignore_eos=True).tokens
    assert ours == reference_greedy(ref_model, ids, 32), name


def test_tokenization_identical(case):
    name, m, _, tok = case
    for text in SAMPLE_TEXTS:
        want = tok(text, add_special_tokens=False)["input_ids"]
        assert m.tokenize(text, add_special=False) == want, (name, text)
        if text:
            assert m.detokenize(want) == tok.decode(want), (name, text)


@pytest.mark.parametrize("name", ["dense_a", "moe_a"])
def test_logits_f16_default_settings(name, gguf_model, reference_model, reference_tokenizer):
    ids = reference_tokenizer(name)(PROMPT)["input_ids"]
    with Model(gguf_model(name, "f16"), n_ctx=512) as m:  # defaults: f16 KV, flash attention auto
        ours = m.logits(ids)
    err = rel_err(ours, reference_logits(reference_model(name), ids))
    print(f"{name}: f16 max rel err {err:.2e}")
    assert err < F16_BOUND, err


def test_upstream_written_gguf_loads_and_matches(hf_model_dir, gguf_model, tmp_path):
    """A file written by llama.cpp's own converter loads and gives our converter's numbers."""
    pytest.importorskip("torch")
    vendor = ROOT / "vendor" / "llama.cpp"
    if not (vendor / "convert_hf_to_gguf.py").exists():
        pytest.skip("vendor/llama.cpp is not filled")
    out = tmp_path / "upstream.gguf"
    r = subprocess.run([sys.executable, str(vendor / "convert_hf_to_gguf.py"), str(hf_model_dir("moe_a")),
                        "--outfile", str(out), "--outtype", "f32"],
                       capture_output=True, text=True, env={"PYTHONPATH": str(vendor / "gguf-py"),
                                                            "PATH": "/usr/bin:/bin"}, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    ids = list(range(5, 45))
    with Model(out, n_ctx=256, kv_cache_type="f32", flash_attn=False) as a, \
            Model(gguf_model("moe_a", "f32"), n_ctx=256, kv_cache_type="f32", flash_attn=False) as b:
        np.testing.assert_array_equal(a.logits(ids), b.logits(ids))
