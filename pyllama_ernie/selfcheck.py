"""``python -m pyllama_ernie selfcheck``: does this install compute the right numbers?

For each supported architecture it writes a tiny random-weight GGUF (no torch,
no download), runs it through the installed library on every compiled backend
device, and compares the logits with an independent NumPy forward pass of the
same weights. It also checks that greedy generation is deterministic and
prints tokens/s.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

import numpy as np

__all__ = ["run_selfcheck", "numpy_forward", "ARCHITECTURES"]

ARCHITECTURES = ("ernie4_5", "ernie4_5-moe", "ernie4_5-vl-moe")
#: max |ours - numpy| / max |numpy| allowed (f32 weights, f32 KV cache)
TOLERANCE = 1e-3


# --- an independent NumPy forward pass over the GGUF's f32 weights ---------

def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope_norm(x: np.ndarray, pos: np.ndarray, base: float) -> np.ndarray:
    """llama.cpp's NORM rope: rotate adjacent pairs (2i, 2i+1). x: [T, H, D]."""
    d = x.shape[-1]
    inv = base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    ang = pos[:, None].astype(np.float64) * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def _rope_multi(x: np.ndarray, pos: np.ndarray, base: float, sections: list[int], factors: np.ndarray) -> np.ndarray:
    """ggml's M-RoPE: NEOX pairs (p, p + D/2); pair p takes the position row of its section
    (rows t, h, w) and the frequency base^(-2p/D) / factors[p]. x: [T, H, D], pos: [3, T]."""
    d = x.shape[-1]
    half = d // 2
    inv = base ** (-np.arange(0, d, 2, dtype=np.float64) / d) / factors
    row = np.repeat(np.arange(len(sections)), sections)[:half]
    ang = pos[row].T.astype(np.float64) * inv[None, :]  # [T, half]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x0, x1 = x[..., :half], x[..., half:]
    return np.concatenate([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def numpy_forward(gguf_path: Path, tokens: list[int], embeddings: np.ndarray | None = None,
                  positions: np.ndarray | None = None) -> np.ndarray:
    """Logits of an f32 ``ernie4_5`` / ``ernie4_5-moe`` / ``ernie4_5-vl-moe`` GGUF, in float64.

    With ``embeddings`` (rows in place of ``tokens``) and ``positions`` (``[3, T]``
    rows t, h, w) it evaluates an embedding input, which the VL model routes
    through its vision experts.
    """
    from .gguf_check import validate_gguf

    summary = validate_gguf(gguf_path, role="model")
    arch = str(summary.architecture)

    def kv(key: str, default: float | None = None) -> Any:
        v = summary.get(f"{arch}.{key}")
        if v is None:
            if default is None:
                raise KeyError(key)
            return default
        return v

    W: dict[str, np.ndarray] = {name: summary.read_tensor(name).astype(np.float64) for name in summary.tensors}
    n_layer = int(kv("block_count"))
    n_head, n_head_kv = int(kv("attention.head_count")), int(kv("attention.head_count_kv"))
    eps, base = float(kv("attention.layer_norm_rms_epsilon")), float(kv("rope.freq_base"))
    n_dense = int(kv("leading_dense_block_count", 0))
    step = int(kv("interleave_moe_layer_step", 1))
    n_used = int(kv("expert_used_count", 0))
    vl = arch == "ernie4_5-vl-moe"
    sections = [int(v) for v in kv("rope.dimension_sections", 0)][:3] if vl else []  # type: ignore[union-attr]

    x = W["token_embd.weight"][tokens] if embeddings is None else np.asarray(embeddings, dtype=np.float64)
    T = x.shape[0]
    pos = np.arange(T)
    pos3 = np.stack([pos] * 3) if positions is None else np.asarray(positions)[:3]
    pool = "_vl" if (vl and embeddings is not None) else ""
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for il in range(n_layer):
        p = f"blk.{il}."
        h = _rms_norm(x, W[p + "attn_norm.weight"], eps)
        q = (h @ W[p + "attn_q.weight"].T).reshape(T, n_head, -1)
        k = (h @ W[p + "attn_k.weight"].T).reshape(T, n_head_kv, -1)
        v = (h @ W[p + "attn_v.weight"].T).reshape(T, n_head_kv, -1)
        d = q.shape[-1]
        if vl:
            q = _rope_multi(q, pos3, base, sections, W["rope_freqs.weight"])
            k = _rope_multi(k, pos3, base, sections, W["rope_freqs.weight"])
        else:
            q, k = _rope_norm(q, pos, base), _rope_norm(k, pos, base)
        rep = n_head // n_head_kv
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        att = np.einsum("thd,shd->hts", q, k) / np.sqrt(d) + mask  # causal by sequence order
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", att, v).reshape(T, -1)
        x = x + o @ W[p + "attn_output.weight"].T

        h = _rms_norm(x, W[p + "ffn_norm.weight"], eps)
        is_moe = arch != "ernie4_5" and il >= n_dense and (il + 1) % step == 0
        if not is_moe:
            ff = (_silu(h @ W[p + "ffn_gate.weight"].T) * (h @ W[p + "ffn_up.weight"].T)) @ W[p + "ffn_down.weight"].T
        else:
            logits = h @ W[p + f"ffn_gate_inp{pool}.weight"].T
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            sel_score = probs + W.get(p + f"exp_probs_b{pool}.bias", np.zeros(probs.shape[-1])).reshape(-1)
            ff = np.zeros_like(h)
            for t in range(T):
                idx = np.argsort(-sel_score[t], kind="stable")[:n_used]
                w = probs[t, idx] / max(probs[t, idx].sum(), 1e-12)
                for e, we in zip(idx, w):
                    g = W[p + f"ffn_gate_exps{pool}.weight"][e] @ h[t]
                    u = W[p + f"ffn_up_exps{pool}.weight"][e] @ h[t]
                    ff[t] += we * (W[p + f"ffn_down_exps{pool}.weight"][e] @ (_silu(g) * u))
            if p + "ffn_gate_shexp.weight" in W:
                ff += (_silu(h @ W[p + "ffn_gate_shexp.weight"].T) * (h @ W[p + "ffn_up_shexp.weight"].T)) \
                    @ W[p + "ffn_down_shexp.weight"].T
        x = x + ff
    x = _rms_norm(x, W["output_norm.weight"], eps)
    out = W.get("output.weight", W["token_embd.weight"])
    return x @ out.T


# --- the check --------------------------------------------------------------

@dataclass
class CheckResult:
    arch: str
    device: str
    ok: bool
    detail: str
    tokens_per_second: float


def _devices() -> list[tuple]:
    from .system import devices

    out = [("CPU", 0)]
    for d in devices():
        if d["type"] in ("gpu", "igpu"):
            out.append((d["name"], -1))
            break  # one GPU run covers the offload path
    return out


def _mmproj_weights(path: Path) -> dict:
    from .gguf_check import validate_gguf

    summary = validate_gguf(path, role="mmproj")
    return {name: summary.read_tensor(name) for name in summary.tensors}


def check_vision(model_path: Path, mmproj_path: Path, n_gpu_layers: int) -> tuple:
    """Encode an image with the mmproj and with NumPy; generate with it. Returns (rel. error, ok greedy)."""
    from . import _vision_numpy
    from .images import normalize
    from .model import Model
    from .values import IMAGE_MARKER

    rgb = np.random.default_rng(1).integers(0, 256, (56, 84, 3), dtype=np.uint8)
    with Model(model_path, mmproj_path=mmproj_path, n_ctx=256, n_gpu_layers=n_gpu_layers, kv_cache_type="f32",
               flash_attn=False, seed=0) as m:
        ours = m.image_features(rgb).data.astype(np.float64)
        ref = _vision_numpy.encode_image(_mmproj_weights(mmproj_path), normalize(rgb), n_head=2)
        err = float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-9))
        prompt = f"Picture 1:{IMAGE_MARKER}What is in it?"
        a = m.generate(prompt, images=[rgb], max_tokens=8, temperature=0)
        m.ctx.reset()
        b = m.generate(prompt, images=[rgb], max_tokens=8, temperature=0)
    return err, a.tokens == b.tokens


def check_one(path: Path, arch: str, device: str, n_gpu_layers: int) -> CheckResult:
    from .model import Model

    prompt = "Hello world, this is a selfcheck of ERNIE."
    try:
        # flash attention on the CPU works in f16 internally: off for an exact comparison
        with Model(path, n_ctx=256, n_gpu_layers=n_gpu_layers, kv_cache_type="f32", flash_attn=False,
                   seed=0) as m:
            toks = m.tokenize(prompt)
            ours = m.logits(toks).astype(np.float64)
            ref = numpy_forward(path, toks)
            err = float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-9))
            if arch == "ernie4_5-vl-moe":
                # an image-like embedding run: vision experts and 3-D positions
                from .mrope import image_positions
                from .values import Embeddings

                rows = np.random.default_rng(0).standard_normal((6, m.n_embd)).astype(np.float32)
                pos, nxt = image_positions(0, 2, 3)
                ours_e = m.logits([Embeddings(rows, pos, next_pos=nxt)]).astype(np.float64)
                ref_e = numpy_forward(path, [], embeddings=rows, positions=pos)
                err = max(err, float(np.abs(ours_e - ref_e).max() / max(np.abs(ref_e).max(), 1e-9)))
                # the vision projector on an image, and a prompt with that image
                from .convert.synthetic import write_tiny_mmproj

                mmproj = write_tiny_mmproj(path.with_name("mmproj-" + path.name), n_embd_text=m.n_embd, seed=0)
                vision_err, vision_det = check_vision(path, mmproj, n_gpu_layers)
            a = m.generate(toks, max_tokens=32, temperature=0)
            m.ctx.reset()
            b = m.generate(toks, max_tokens=32, temperature=0)
            m.ctx.reset()
            t0 = time.perf_counter()
            speed = m.generate(toks, max_tokens=32, temperature=0, ignore_eos=True)
            dt = time.perf_counter() - t0
    except Exception as e:  # report, do not crash: this is a diagnostic command
        return CheckResult(arch, device, False, f"{type(e).__name__}: {e}", 0.0)
    problems = []
    if arch == "ernie4_5-vl-moe":
        if vision_err > TOLERANCE:
            problems.append(f"image features differ from NumPy by {vision_err:.2e} (> {TOLERANCE:g})")
        if not vision_det:
            problems.append("greedy generation with an image is not deterministic")
        err = max(err, vision_err)
    if not np.isfinite(ours).all():
        problems.append("non-finite logits")
    if err > TOLERANCE:
        problems.append(f"logits differ from NumPy by {err:.2e} (> {TOLERANCE:g})")
    if a.tokens != b.tokens:
        problems.append("greedy generation is not deterministic")
    detail = "; ".join(problems) or f"logits rel. err {err:.1e}, greedy deterministic"
    if arch == "ernie4_5-vl-moe" and not problems:
        detail += f", image features rel. err {vision_err:.1e}"
    tps = speed.completion_tokens / dt if dt > 0 else 0.0
    return CheckResult(arch, device, not problems, detail, tps)


def run_selfcheck(verbose: bool = False, out: TextIO = sys.stdout,
                  write_model: Callable[[str, Path], Path] | None = None) -> bool:
    """Run the self-check, print a table, return True when everything passed."""
    from ._version import __version__
    from .convert.synthetic import write_tiny_gguf
    from .system import system_info

    write = write_model or (lambda arch, p: write_tiny_gguf(arch, p, seed=0))
    info = system_info()
    print(f"pyllama_ernie {__version__}, llama.cpp {info['llama_cpp_commit'][:9]}, "
          f"patches: {len(info['patches'])}, backends: {', '.join(info['backends'])}", file=out)
    if verbose:
        print(f"  {info['llama_system_info']}", file=out)
    results = []
    with tempfile.TemporaryDirectory(prefix="pyllama_ernie-selfcheck-") as tmp:
        for arch in ARCHITECTURES:
            path = write(arch, Path(tmp) / f"{arch}.gguf")
            for device, ngl in _devices():
                res = check_one(path, arch, device, ngl)
                results.append(res)
                status = "PASS" if res.ok else "FAIL"
                print(f"{status}  {arch:14s} {device:8s} {res.tokens_per_second:8.1f} tok/s  {res.detail}", file=out)
    ok = all(r.ok for r in results)
    print("selfcheck passed" if ok else "selfcheck FAILED", file=out)
    return ok
