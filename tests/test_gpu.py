"""GPU parity (runs only where a GPU build finds a GPU; benchmarks/gpu_check.sh runs it).

Logits of the tiny models with every layer offloaded, against the CPU and against
transformers; with the MoE experts kept in CPU memory (``cpu_moe``); image features
with the projector on the GPU; greedy continuations. Bounds: GPU kernels sum in
other orders than the CPU's (and cuBLAS may use reduced-precision paths), so the
F32 bound is 1e-3 of the largest logit rather than the CPU suite's 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest

from pyllama_ernie import Model, offload
from test_parity_text import reference_logits, rel_err

pytestmark = pytest.mark.skipif(not offload.gpu_devices(), reason="no GPU found by this build")

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
