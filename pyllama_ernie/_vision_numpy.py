"""A torch-free NumPy forward of ERNIE 4.5 VL's vision encoder and resampler (``selfcheck``'s reference).

It follows transformers' ``models/ernie4_5_vl_moe/modeling_ernie4_5_vl_moe.py`` step by step
and reads weights by their mmproj GGUF names (a dict name -> array, as ``gguf.GGUFReader``
returns them, i.e. in PyTorch orientation ``[out, in]``). It computes in float64 and returns
float32. The architecture, in the reference's class names:

``Ernie4_5_VLMoeVisionTransformerPretrainedModel`` (the ViT), run on each frame on its own:

1. ``Ernie4_5_VLMoePatchEmbed``: a Linear without bias over each 14x14 patch flattened
   channel-first (c, row, col), i.e. 588 values (``v.patch_embd.weight`` [hidden, 3, 14, 14]).
   The patches come in merge-block order (see :func:`patchify`).
2. ``Ernie4_5_VLMoeVisionBlock`` x depth::

       x += proj(attention(LayerNorm1(x)))            # bidirectional, one frame at a time
       x += fc2(quick_gelu(fc1(LayerNorm2(x))))       # quick_gelu(x) = x * sigmoid(1.702 x)

   Attention has a fused ``qkv`` (rows [q; k; v]) with bias and the 2-D rope of
   ``Ernie4_5_VLMoeVisionRotaryEmbedding`` / ``apply_rotary_pos_emb_vision`` (see :func:`rope_2d`).
3. a final LayerNorm ``ln`` (``v.post_ln``).

``Ernie4_5_VLMoeVariableResolutionResamplerModel`` (the projector, ``mm.0`` ... ``mm.7``):

1. group 4 consecutive ViT rows (one 2x2 merge block) into one row of 4h;
2. ``spatial_linear``: fc1 -> exact (erf) GELU -> fc2 -> LayerNorm (vision eps);
3. ``_temporal_slicing`` + ``temporal_linear``: each merged token is concatenated with its
   counterpart in the other frame of a pair ([even frame, odd frame]; an image is paired
   with itself, [x, x]), then fc1 (8h -> 4h) -> erf GELU -> fc2 -> LayerNorm;
4. ``mlp``: Linear 4h -> text hidden;
5. ``after_norm``: RMSNorm with the TEXT model's eps.

Output rows: the merged tokens row-major over the (H/28, W/28) grid (one row per 2x2 block);
a video gives one such set of rows per pair of frames, pairs in order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

__all__ = [
    "encode_image",
    "encode_video_pair",
    "patchify",
    "resampler",
    "rope_2d",
    "vision_position_ids",
    "vision_tower",
]

Weights = Mapping[str, np.ndarray]

PATCH = 14  #: ViT patch side (pixels)
MERGE = 2  #: spatial merge: 2x2 patches make one token


# --- small building blocks (float64) ------------------------------------------------------------

def _w(weights: Weights, name: str) -> np.ndarray:
    return np.asarray(weights[name], dtype=np.float64)


def _linear(x: np.ndarray, weights: Weights, prefix: str) -> np.ndarray:
    """``nn.Linear`` with bias: x @ W^T + b; W is [out, in]."""
    return x @ _w(weights, prefix + ".weight").T + _w(weights, prefix + ".bias")


def _layer_norm(x: np.ndarray, weights: Weights, prefix: str, eps: float) -> np.ndarray:
    """``nn.LayerNorm`` (biased variance) with weight and bias."""
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * _w(weights, prefix + ".weight") + _w(weights, prefix + ".bias")


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """``Ernie4_5_VLMoeRMSNorm``: x / sqrt(mean(x^2) + eps) * w."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _quick_gelu(x: np.ndarray) -> np.ndarray:
    """The ViT MLP's activation (``hidden_act="quick_gelu"``): x * sigmoid(1.702 x)."""
    return x / (1.0 + np.exp(-1.702 * x))


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _gelu(x: np.ndarray) -> np.ndarray:
    """The resampler's ``nn.GELU()``: the exact erf form, not the tanh approximation."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


# --- input layout and positions -----------------------------------------------------------------

def patchify(pixels: np.ndarray, patch: int = PATCH, merge: int = MERGE) -> np.ndarray:
    """One normalized frame ``[H, W, 3]`` -> patches ``[(H/p)(W/p), 3 p p]`` in the processor's order.

    As ``Ernie4_5_VLMoeImageProcessorPil.patchify`` (and the video processor per frame): patches
    are merge-block-major, layout (H/(p m), W/(p m), m, m, C, p, p): the m x m merge blocks
    row-major, inside a block its patches row-major, each patch flattened channel-first.
    """
    h, w, c = pixels.shape
    if h % (patch * merge) or w % (patch * merge):
        raise ValueError(f"image size {h}x{w} is not a multiple of {patch * merge}")
    gh, gw = h // patch, w // patch
    x = np.asarray(pixels, dtype=np.float64).transpose(2, 0, 1)  # [C, H, W]
    x = x.reshape(c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (block row, block col, row in block, col in block, C, py, px)
    return x.reshape(gh * gw, c * patch * patch)


def vision_position_ids(grid_h: int, grid_w: int, merge: int = MERGE) -> np.ndarray:
    """``[n_patches, 2]`` (row, col) of each patch, in the merge-block order of :func:`patchify`.

    transformers' ``vision_utils.get_vision_position_ids`` for one frame.
    """
    hpos, wpos = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    blocks = (grid_h // merge, merge, grid_w // merge, merge)
    hpos = hpos.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1)
    wpos = wpos.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1)
    return np.stack([hpos, wpos], axis=-1)


def rope_2d(x: np.ndarray, pos: np.ndarray, theta: float) -> np.ndarray:
    """The ViT's 2-D rope. x: ``[N, heads, D]``, pos: ``[N, 2]`` (row, col).

    ``Ernie4_5_VLMoeVisionRotaryEmbedding``: D/4 frequencies ``theta^(-2j/(D/2))``; the angles
    are [row * f, col * f] (D/2 of them), and ``apply_rotary_pos_emb_vision`` rotates the
    NEOX pairs (i, i + D/2) by angle i (``rotate_half``). So the first quarter of each half
    encodes the row, the second quarter the column.
    """
    d = x.shape[-1]
    inv_freq = theta ** (-np.arange(0, d // 2, 2, dtype=np.float64) / (d // 2))  # [D/4]
    ang = np.concatenate([pos[:, :1] * inv_freq, pos[:, 1:2] * inv_freq], axis=-1)  # [N, D/2]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x0, x1 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)


# --- the ViT (Ernie4_5_VLMoeVisionTransformerPretrainedModel) ------------------------------------

def _attention(x: np.ndarray, weights: Weights, prefix: str, pos: np.ndarray, n_head: int,
               theta: float) -> np.ndarray:
    """``Ernie4_5_VLMoeVisionAttention`` over one frame: bidirectional, no mask."""
    n, hidden = x.shape
    qkv = _linear(x, weights, prefix + ".attn_qkv").reshape(n, 3, n_head, hidden // n_head)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # [N, heads, D]
    q, k = rope_2d(q, pos, theta), rope_2d(k, pos, theta)
    att = np.einsum("nhd,mhd->hnm", q, k) / math.sqrt(hidden // n_head)
    att = np.exp(att - att.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    out = np.einsum("hnm,mhd->nhd", att, v).reshape(n, hidden)
    return _linear(out, weights, prefix + ".attn_out")


def _n_blocks(weights: Weights) -> int:
    n = 0
    while f"v.blk.{n}.attn_qkv.weight" in weights:
        n += 1
    return n


def vision_tower(weights: Weights, pixels: np.ndarray, *, n_head: int, eps: float = 1e-6,
                 theta: float = 10000.0) -> np.ndarray:
    """The ViT over ONE frame ``[H, W, 3]`` -> ``[(H/14)(W/14), hidden]`` in merge-block order.

    The reference runs all frames (and images) of a batch packed together, but attention is
    split per frame (``cu_seqlens``, one segment of h*w per frame) and positions restart
    per frame, so each frame is independent: encoding them one at a time is exact.
    """
    grid_h, grid_w = pixels.shape[0] // PATCH, pixels.shape[1] // PATCH
    patches = patchify(pixels)
    w_patch = _w(weights, "v.patch_embd.weight")
    x = patches @ w_patch.reshape(w_patch.shape[0], -1).T  # Ernie4_5_VLMoePatchEmbed, no bias
    pos = vision_position_ids(grid_h, grid_w)
    for i in range(_n_blocks(weights)):  # Ernie4_5_VLMoeVisionBlock
        p = f"v.blk.{i}"
        x = x + _attention(_layer_norm(x, weights, p + ".ln1", eps), weights, p, pos, n_head, theta)
        h = _layer_norm(x, weights, p + ".ln2", eps)
        x = x + _linear(_quick_gelu(_linear(h, weights, p + ".ffn_up")), weights, p + ".ffn_down")
    return _layer_norm(x, weights, "v.post_ln", eps)


# --- the resampler (Ernie4_5_VLMoeVariableResolutionResamplerModel) ------------------------------

def _spatial(features: np.ndarray, weights: Weights, eps: float) -> np.ndarray:
    """Merge 2x2 blocks (4 consecutive rows -> one) and apply ``spatial_linear`` (mm.0-2)."""
    x = features.reshape(-1, features.shape[-1] * MERGE * MERGE)
    x = _linear(_gelu(_linear(x, weights, "mm.0")), weights, "mm.1")
    return _layer_norm(x, weights, "mm.2", eps)


def _temporal_fc1(weights: Weights) -> tuple[np.ndarray, np.ndarray]:
    """The two halves of ``temporal_linear.fc1``'s weight: (for the first frame, for the second).

    The GGUF stores them as ``mm.3.weight`` (2, 4h, 4h); the torch layout [4h, 8h] is accepted too.
    """
    w = _w(weights, "mm.3.weight")
    if w.ndim == 3:
        return w[0], w[1]
    half = w.shape[1] // 2
    return w[:, :half], w[:, half:]


def resampler(first: np.ndarray, second: np.ndarray, weights: Weights, *, eps: float = 1e-6,
              text_eps: float = 1e-5) -> np.ndarray:
    """Project the ViT outputs of a pair of frames to text embeddings ``[n_merged, n_embd_text]``.

    For an image, pass the same features twice (``_temporal_slicing`` duplicates a t=1 input).
    """
    a, b = _spatial(first, weights, eps), _spatial(second, weights, eps)
    w0, w1 = _temporal_fc1(weights)
    x = a @ w0.T + b @ w1.T + _w(weights, "mm.3.bias")  # fc1 over the concatenation [a, b]
    x = _linear(_gelu(x), weights, "mm.4")
    x = _layer_norm(x, weights, "mm.5", eps)
    x = _linear(x, weights, "mm.6")
    return _rms_norm(x, _w(weights, "mm.7.weight"), text_eps)


# --- public entry points ------------------------------------------------------------------------

def encode_image(weights: Weights, pixels: np.ndarray, *, n_head: int, eps: float = 1e-6, text_eps: float = 1e-5,
                 theta: float = 10000.0) -> np.ndarray:
    """Embeddings ``[(H/28)(W/28), n_embd_text]`` (float32) of a normalized image ``[H, W, 3]``.

    Rows are the merged tokens row-major over the (H/28, W/28) grid, as the reference's
    ``get_image_features``. ``eps`` is the vision LayerNorm eps (the vision config's
    ``rms_norm_eps``), ``text_eps`` the text model's RMSNorm eps (used by ``after_norm``),
    ``theta`` the ViT rope base.
    """
    feats = vision_tower(weights, pixels, n_head=n_head, eps=eps, theta=theta)
    return resampler(feats, feats, weights, eps=eps, text_eps=text_eps).astype(np.float32)


def encode_video_pair(weights: Weights, pixels0: np.ndarray, pixels1: np.ndarray, *, n_head: int,
                      eps: float = 1e-6, text_eps: float = 1e-5, theta: float = 10000.0) -> np.ndarray:
    """Embeddings (float32) of one pair of video frames (same size, normalized ``[H, W, 3]``).

    The reference's video path for frames (2k, 2k+1): each frame through the ViT on its own,
    then the temporal MLP on [frame 2k, frame 2k+1]. A video of 2n frames is the pairs'
    outputs concatenated in order.
    """
    if pixels0.shape != pixels1.shape:
        raise ValueError(f"frames differ in size: {pixels0.shape} vs {pixels1.shape}")
    f0 = vision_tower(weights, pixels0, n_head=n_head, eps=eps, theta=theta)
    f1 = vision_tower(weights, pixels1, n_head=n_head, eps=eps, theta=theta)
    return resampler(f0, f1, weights, eps=eps, text_eps=text_eps).astype(np.float32)
