"""GPU parity (runs only where a GPU build finds a GPU; benchmarks/gpu_check.sh runs it).

Logits of the tiny models with every layer offloaded, against the CPU and against
transformers; with the MoE experts kept in CPU memory (``cpu_moe``); image features
and an image prompt's logits with the projector on the GPU, against the CPU and
against transformers; greedy continuations. Bounds: GPU kernels sum in
other orders than the CPU's (and cuBLAS may use reduced-precision paths), so the
F32 bound is 1e-3 of the largest logit rather than the CPU suite's 1e-4.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from pyllama_ernie import IMAGE_MARKER, Model, offload

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parity"))  # the CPU parity tests' helpers
from test_text import reference_logits, rel_err  # noqa: E402
from test_media import _ref_features, _ref_logits, _reference_case, _rgb  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not offload.gpu_devices(), reason="no GPU found by this build")]

GPU_BOUND = 1e-3
EXACT = dict(kv_cache_type="f32", flash_attn=False, n_ctx=512)
PROMPT = "the quick brown fox jumps over the lazy dog. 你好世界"


@pytest.mark.parametrize("name", ["dense_a", "moe_a"])
def test_text_logits_gpu_vs_cpu_and_reference(name, gguf_model, reference_model, reference_tokenizer):
    path = gguf_model(name, "f32")
    ids = reference_tokenizer(name)(PROMPT)["input_ids"]
    with Model(path, **EXACT) as cpu:
        want_cpu = cpu.logits(ids)
    with Model(path, n_gpu_layers=-1, **EXACT) as gpu:
        assert gpu.offload.uses_gpu
        got = gpu.logits(ids)
    assert rel_err(got, want_cpu.astype(np.float64)) < GPU_BOUND
    assert rel_err(got, reference_logits(reference_model(name), ids)) < GPU_BOUND


def test_expert_offload_matches_full_offload(gguf_model, reference_tokenizer):
    path = gguf_model("moe_a", "f32")
    ids = reference_tokenizer("moe_a")(PROMPT)["input_ids"]
    with Model(path, n_gpu_layers=-1, **EXACT) as full:
        want = full.logits(ids)
    with Model(path, n_gpu_layers=-1, cpu_moe=True, **EXACT) as split:
        assert split.offload.patterns
        got = split.logits(ids)
    assert rel_err(got, want.astype(np.float64)) < GPU_BOUND


def test_vl_logits_and_image_features_on_gpu(vl_gguf, vl_mmproj):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (56, 84, 3), dtype=np.uint8)
    prompt = "<__image__>describe"
    runs = {}
    for where, kw in (("cpu", {}), ("gpu", dict(n_gpu_layers=-1, mmproj_gpu=True))):
        with Model(vl_gguf("vl_a"), mmproj_path=vl_mmproj("vl_a"), **EXACT, **kw) as m:
            feats = m.image_features(image).data
            logits = m.logits(prompt, images=[image])
            tokens = m.generate(prompt, images=[image], max_tokens=12, temperature=0, ignore_eos=True).tokens
            runs[where] = (feats, logits, tokens)
    (f_cpu, l_cpu, t_cpu), (f_gpu, l_gpu, t_gpu) = runs["cpu"], runs["gpu"]
    assert rel_err(f_gpu, f_cpu.astype(np.float64)) < GPU_BOUND
    assert rel_err(l_gpu, l_cpu.astype(np.float64)) < GPU_BOUND
    assert t_gpu == t_cpu


@pytest.mark.parametrize("name", ["vl_a", "vl_b"])
def test_vl_image_prompt_on_gpu_matches_reference(name, vl_gguf, vl_mmproj, vl_reference_model, reference_tokenizer_vl):
    ref, tok = vl_reference_model(name), reference_tokenizer_vl(name)
    image = _rgb(56, 84, seed=7)
    prompt = f"User: Picture 1:{IMAGE_MARKER}Describe the picture.\nAssistant: "
    with Model(vl_gguf(name), mmproj_path=vl_mmproj(name), n_gpu_layers=-1, mmproj_gpu=True,
               kv_cache_type="f32", flash_attn=False, n_ctx=1024, n_batch=64) as m:
        assert m.offload.uses_gpu
        (want_feats,), _ = _ref_features(ref, [image])
        assert rel_err(m.image_features(image).data, want_feats) < GPU_BOUND
        ids, kw = _reference_case(ref, tok, prompt, [image], [])
        got = m.logits(prompt, images=[image])
    want = _ref_logits(ref, ids, kw)
    assert got.shape == want.shape
    assert rel_err(got, want) < GPU_BOUND
