"""Batched expert matmuls against one token per ubatch.

With several tokens in a ubatch, an expert that several of them route to is computed
as one matrix product, with the routed rows gathered per expert and the products
scattered back: patch 0007 (``MUL_MAT_ID`` through ``llamafile_sgemm``) and, for
repacked weights, patch 0010 (``gemm`` on 4 rows at a time). With one token per
ubatch every expert sees one row and ggml's row-by-row kernels run.
Both see the same weights and the same converted activations, so the logits may differ
only by the order of the sums; F32 weights show that order alone. With F16 weights, the
batch's dense products also take F32 activations (patch 0011) where one token rounds them
to F16 (ggml's vec_dot path), which the random models amplify at a few positions.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from pyllama_ernie import Model  # noqa: E402
from pyllama_ernie.quantize import quantize  # noqa: E402

EXACT = dict(kv_cache_type="f32", flash_attn=False, n_ctx=512)


def _prompt(model: Model, n: int = 96, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(3, model.n_vocab, n)]


def _gguf(kind: str, name: str, qtype: str, gguf_model, vl_gguf, tmp_path):
    get = vl_gguf if kind == "vl" else gguf_model
    if qtype in ("F32", "F16"):
        return get(name, qtype.lower())
    return quantize(get(name, "f32"), tmp_path / f"{name}-{qtype}.gguf", qtype)


@pytest.mark.parametrize("kind, name, qtype", [
    ("moe", "moe_a", "F32"),
    ("moe", "moe_a", "F16"),
    ("moe", "moe_a", "Q8_0"),
    ("moe", "moe_odd", "F16"),  # expert width 40: not a multiple of every SIMD width
    ("vl", "vl_a", "F32"),
    ("vl", "vl_a", "F16"),
    ("vl", "vl_a", "Q8_0"),
    # repacked weights (patch 0010: gemm on the routed rows 4 at a time)
    ("moe", "moe_a", "Q4_0"),
    ("vl", "vl_a", "Q4_K_M"),  # hidden 256: the gate and up experts are Q4_K
])
def test_batched_prompt_matches_one_token_ubatches(kind, name, qtype, gguf_model, vl_gguf, tmp_path):
    path = _gguf(kind, name, qtype, gguf_model, vl_gguf, tmp_path)
    with Model(path, n_ubatch=512, **EXACT) as batched, Model(path, n_ubatch=1, **EXACT) as single:
        ids = _prompt(batched)
        a = batched.logits(ids)
        b = single.logits(ids)
    assert a.shape == b.shape == (len(ids), batched.n_vocab)
    # per position, relative to the largest logit. Measured: F32 at most 2.4e-6 (median 8e-7);
    # F16 median 3.5e-4..1.9e-3, 90% below 1.3e-2 (vl_a: F32 activations in the batch's dense
    # products, F16 in one token's), max 6.9e-4 / 8.1e-4 (moe_a / moe_odd) but 0.20 for vl_a at
    # one position; Q8_0 0 at most positions, up to 1.5e-2 at the few where a rounding step of
    # the random model's activations or router comes out the other way (Q4_K_M: max 1.2e-3).
    # (Max figures: Intel Xeon, zen4 CPU variant; Q8_0/Q4_0 were 0 everywhere there.) A row
    # gathered from the wrong token or scattered to the wrong slot moves nearly every position
    # by O(1e-1): median 0.2-0.44 with a scatter off by one in patch 0007 or 0010.
    err = np.abs(a - b).max(axis=1) / np.abs(a).max()
    q90 = np.quantile(err, 0.9)
    print(f"{name} {qtype}: batched vs one token per ubatch, rel logit difference per position: "
          f"median {np.median(err):.1e}, 90% below {q90:.1e}, max {err.max():.1e}")
    median_tol, q90_tol = {"F32": (1e-5, 1e-5), "F16": (1e-2, 5e-2)}.get(qtype, (1e-3, 2e-3))
    max_tol = {"F32": 1e-5, "F16": 0.5 if kind == "vl" else 1e-2}.get(qtype, 5e-2)
    assert np.median(err) < median_tol
    assert q90 < q90_tol
    assert err.max() < max_tol
