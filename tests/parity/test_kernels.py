"""The ggml-cpu kernels our patches add, op by op, on each CPU backend variant of the build.

* Patch 0012 (``ggml_vec_max_f32`` with AVX-512 / AVX / NEON maxima and a scalar tail): soft_max
  and the tiled CPU flash attention take every row's maximum with it. Softmax does not depend on
  the maximum it subtracts, so the inputs are built so that a wrong one shows: a peak 120 above
  the rest of the row (missing it overflows ``exp``), rows of ``-inf`` but one finite entry (a
  maximum of ``-inf`` makes every entry NaN; in flash attention it skips the KV tile), logits
  near -1000 (a maximum taken from memory past the row underflows every ``exp`` to 0), the peak
  at every position of rows of length 1..40 and around the vector widths (8, 16) and their tails.
* Patch 0013 (AVX-512 VNNI Q8_0 tile of ``llamafile_sgemm``): its message says the results are
  bit-identical to the 256-bit kernel's. Q8_0 x F32 products whose shapes reach every ``gemm4xN``
  tile (4x4, 4x3, 4x2, 4x1) and the remainder kernels, with blocks of extreme values, must come
  out the same bit for bit on a variant with the tile (icelake, zen4, ...) as on one without it
  (skylakex, haswell, ...), and match exact arithmetic.

Each op runs in a subprocess (tests/_ggml_ops.py) that loads one ``libggml-cpu-<variant>.so`` from
the package folder with ``ggml_backend_load``. ``PYLLAMA_ERNIE_GGML_DIR`` points the tests at
another folder of ggml libraries (``libggml-base.so``, ``libggml.so``, ``libggml-cpu-*.so``),
e.g. a build with a deliberately broken kernel, to see them fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pyllama_ernie = pytest.importorskip("pyllama_ernie._lib", reason="pyllama_ernie is not built (pip install .)")

HELPER = Path(__file__).resolve().parents[1] / "_ggml_ops.py"
LIB_DIR = Path(os.environ.get("PYLLAMA_ERNIE_GGML_DIR") or Path(pyllama_ernie.__file__).resolve().parent)
VARIANTS = sorted(p.name[len("libggml-cpu-"):-len(".so")] for p in LIB_DIR.glob("libggml-cpu-*.so"))

# x86 variants built with AVX-512 F, BW and VNNI: they have patch 0013's tile
VNNI512 = {"cascadelake", "icelake", "cooperlake", "zen4", "sapphirerapids"}
# variants whose Q8_0 llamafile_sgemm is the 256-bit gemm4xN (AVX2, with or without AVX-VNNI / AVX-512)
AVX2_256 = {"haswell", "skylakex", "cannonlake", "alderlake"}


def run_op(variant: str, tmp_path: Path, op: str, **arrays) -> dict:
    """Runs ``op`` on ``variant`` ("-": the variant the package picks) in a subprocess; skips
    (the test is marked cpu_feature) when this CPU cannot run the variant."""
    job, out = tmp_path / f"{op}-{variant}-job.npz", tmp_path / f"{op}-{variant}-out.npz"
    np.savez(job, op=op, **arrays)
    r = subprocess.run([sys.executable, str(HELPER), str(LIB_DIR), variant, str(job), str(out)],
                       capture_output=True, text=True, timeout=300)
    if r.returncode == 3:
        pytest.skip(f"this CPU cannot run the {variant} CPU backend variant ({r.stderr.strip()})")
    assert r.returncode == 0, f"{op} on {variant} failed (status {r.returncode}):\n{r.stderr[-3000:]}"
    return dict(np.load(out))


def supported(variant: str, tmp_path: Path) -> bool:
    return int(run_op(variant, tmp_path, "score")["score"]) > 0


def _variant_params() -> list:
    # a build without CPU variants has one CPU backend: "-" takes it
    return [pytest.param(v, marks=pytest.mark.cpu_feature) for v in VARIANTS] or ["-"]


# --------------------------------------------------------------------------- patch 0012: soft_max

LENGTHS = list(range(1, 41)) + [47, 48, 49, 63, 64, 65, 100, 129]


def _softmax_rows(n: int, rng: np.random.Generator) -> np.ndarray:
    rows = []
    for p in range(n):  # the peak at every position: every SIMD lane and every tail slot
        for base in (1000.0, -1000.0):
            # a maximum that misses x[p] is <= base + 10: exp(x[p] - max) >= e^110 overflows;
            # near -1000 a maximum that reads past the row (0 or more) underflows every exp to 0
            x = base + rng.uniform(-10, 10, n)
            x[p] = base + 120
            rows.append(x)
        x = np.full(n, -np.inf)  # one finite entry: a maximum of -inf gives NaN everywhere
        x[p] = (-1000.0, 3.0, 1000.0)[p % 3]
        rows.append(x)
    rows += list(rng.normal(0, 3, (4, n)))  # ordinary rows
    return np.array(rows, dtype=np.float32)


def _softmax_ref(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("variant", _variant_params())
def test_soft_max_takes_the_row_maximum(variant, tmp_path):
    rng = np.random.default_rng(12)
    xs = {f"x{i}": _softmax_rows(n, rng) for i, n in enumerate(LENGTHS)}
    ys = run_op(variant, tmp_path, "soft_max", **xs)
    for i, n in enumerate(LENGTHS):
        x, y = xs[f"x{i}"], ys[f"y{i}"]
        bad = ~np.isfinite(y).all(axis=1)
        assert not bad.any(), (f"{variant}: soft_max of length {n} gave NaN/inf in {bad.sum()} rows "
                               f"(peak at {[int(np.argmax(r)) for r in x[bad][:8]]})")
        np.testing.assert_allclose(y, _softmax_ref(x), rtol=1e-5, atol=1e-7, err_msg=f"{variant}, length {n}")


@pytest.mark.parametrize("variant", _variant_params())
def test_flash_attention_tile_maximum(variant, tmp_path):
    """The tiled CPU flash attention (>= 64 queries) takes each KV tile's (64 keys) maximum with
    ggml_vec_max_f32. K is the identity, so Q's rows are the scores themselves."""
    rng = np.random.default_rng(13)
    n_q = n_kv = d = 128
    scores = rng.normal(0, 2, (n_q, n_kv))
    mask = np.full((n_q, n_kv), -np.inf)
    for q in range(64):  # one visible key per tile, at every lane of both tiles
        mask[q, q] = 0
        mask[q, 64 + (q * 37 + 5) % 64] = 0
    for q in range(64, 128):  # every key visible, a peak 200 above the rest at every lane of tile 0
        mask[q] = 0
        scores[q, q - 64] = 200 + rng.uniform(0, 5)
        scores[q, 64 + (q * 11) % 64] = 150  # and 150 in tile 1
    v = rng.normal(0, 1, (n_kv, 64))
    out = run_op(variant, tmp_path, "flash_attn", q=scores.astype(np.float32), k=np.eye(n_kv, d, dtype=np.float32),
                 v=v.astype(np.float32), mask=mask.astype(np.float16), scale=np.float32(1.0))["y"]
    ref = _softmax_ref((scores + mask).astype(np.float32)) @ v
    assert np.isfinite(out).all(), f"{variant}: NaN/inf in rows {np.where(~np.isfinite(out).all(axis=1))[0][:16]}"
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5, err_msg=variant)


# --------------------------------------------------------------------------- patch 0013: Q8_0 tile

# (m weight rows, n activation rows, K): m % 4 == 3 and n % 4 in 0..3 reach gemm4xN<4>, <3>, <2>,
# <1> (32 vector registers; 16: <2>, <1>), gemmMx4 and gemm<3, x>; n >= 2, else ggml's vec_dot runs
MATMULS = [(67, 7, 512), (36, 6, 256), (12, 5, 512), (8, 2, 512), (8, 3, 512), (130, 33, 1024), (4, 4, 256)]


def _q8_0_blocks(rows: int, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random Q8_0 values q (int8 in [-127, 127]) and scales d (f16) with some extreme blocks."""
    nb = k // 32
    q = rng.integers(-127, 128, (rows, nb, 32))
    ext = rng.random((rows, nb)) < 0.15  # blocks of +-127 only: the largest products
    q[ext] = np.where(rng.random((int(ext.sum()), 32)) < 0.5, -127, 127)
    q[rng.random((rows, nb)) < 0.05] = 0
    d = (rng.uniform(0.001, 0.05, (rows, nb)) * rng.choice([-1, 1], (rows, nb))).astype(np.float16)
    return q.astype(np.int8), d


def _matmul_case(m: int, n: int, k: int, rng: np.random.Generator):
    qw, dw = _q8_0_blocks(m, k, rng)
    w = np.empty((m, k // 32, 34), np.uint8)  # block_q8_0: f16 d, int8 qs[32]
    w[:, :, :2] = dw.view(np.uint8).reshape(m, k // 32, 2)
    w[:, :, 2:] = qw.view(np.uint8)
    # activations that quantize to Q8_0 exactly: every block's largest |q| is 127, x = q * d
    qx, dx = _q8_0_blocks(n, k, rng)
    qx[..., 0] = np.where(rng.random((n, k // 32)) < 0.5, -127, 127)
    dx = np.abs(dx)
    x = (qx.astype(np.float32) * dx.astype(np.float32)[..., None]).reshape(n, k)
    dots = np.einsum("ibk,jbk->jib", qw.astype(np.int64), qx.astype(np.int64))  # [n, m, blocks]
    scale = dx.astype(np.float64)[:, None, :] * dw.astype(np.float64)[None, :, :]
    ref = (dots * scale).sum(-1)
    mag = (np.abs(dots) * np.abs(scale)).sum(-1)
    return w.reshape(m, -1), x, ref, mag


@pytest.mark.cpu_feature
def test_q8_0_vnni_tile_is_bit_identical_to_256_bit_kernel(tmp_path):
    tile = [v for v in VARIANTS if v in VNNI512]
    base = [v for v in VARIANTS if v in AVX2_256]
    if not tile or not base:
        pytest.skip(f"this build has no CPU variant with{'' if base else 'out'} the AVX-512 VNNI Q8_0 tile "
                    f"(variants: {', '.join(VARIANTS) or 'none, one CPU backend'})")
    tile = [v for v in tile if supported(v, tmp_path)]
    if not tile:
        pytest.skip("this CPU lacks AVX-512 VNNI (F, BW, VNNI): no variant with the Q8_0 tile can run")
    base = [v for v in base if supported(v, tmp_path)]
    if not base:
        pytest.skip("this CPU runs no variant with the 256-bit Q8_0 kernel (AVX2)")
    rng = np.random.default_rng(14)
    cases = [_matmul_case(m, n, k, rng) for m, n, k in MATMULS]
    arrays = {}
    for i, (w, x, _, _) in enumerate(cases):
        arrays[f"w{i}"], arrays[f"x{i}"] = w, x
    results = {v: run_op(v, tmp_path, "mul_mat", **arrays) for v in tile + base}
    for i, ((m, n, k), (_, _, ref, mag)) in enumerate(zip(MATMULS, cases)):
        for v, res in results.items():
            y = res[f"y{i}"]
            # exact integer dots, f32 sums: within a few roundings of the exact result
            err = np.abs(y - ref) / np.maximum(mag, 1e-30)
            assert err.max() < 1e-5, f"{v}: {m}x{k} by {n}x{k}: off the exact product by {err.max():.1e} of its scale"
        ref_bits = results[base[0]][f"y{i}"].view(np.uint32)
        for v in tile + base[1:]:
            diff = results[v][f"y{i}"].view(np.uint32) != ref_bits
            assert not diff.any(), (f"{m}x{k} by {n}x{k}: {v} differs from {base[0]} in {diff.sum()} of {diff.size} "
                                    f"products, first at (token, row) {tuple(int(a[0]) for a in np.nonzero(diff))}")
