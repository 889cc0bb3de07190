"""Positions of image tokens for multi-axis (M-RoPE) models such as ERNIE-4.5-VL.

The reference (transformers ``get_rope_index``): a text token at ``cur`` has
``t = h = w = cur``. An image whose merged grid is ``grid_h x grid_w`` tokens
(row-major) placed at ``cur`` has ``t = cur, h = cur + row, w = cur + col``,
and the position after it is ``cur + max(grid_h, grid_w)``. A video is one
such grid per pair of frames, pair ``k`` at ``t = cur + k``; the position
after it is still ``cur + max(grid_h, grid_w)``.
"""

from __future__ import annotations

import numpy as np

from .values import Embeddings

__all__ = ["image_positions", "image_embeddings"]


def image_positions(pos0: int, grid_h: int, grid_w: int, n_frames: int = 1) -> tuple[np.ndarray, int]:
    """Rows ``(t, h, w)`` for a ``grid_h x grid_w`` image (or ``n_frames`` of them: a video) at ``pos0``,
    and the next position."""
    if grid_h <= 0 or grid_w <= 0 or n_frames <= 0:
        raise ValueError("the image grid must be at least 1 x 1 (and a video at least one frame pair)")
    n = grid_h * grid_w
    rows = np.tile(np.repeat(np.arange(grid_h, dtype=np.int64), grid_w), n_frames)
    cols = np.tile(np.arange(grid_w, dtype=np.int64), grid_h * n_frames)
    t = pos0 + np.repeat(np.arange(n_frames, dtype=np.int64), n)
    return np.stack([t, pos0 + rows, pos0 + cols]).astype(np.int32), pos0 + max(grid_h, grid_w)


def image_embeddings(features: np.ndarray, grid_h: int, grid_w: int, pos0: int,
                     start: np.ndarray | None = None, end: np.ndarray | None = None,
                     n_frames: int = 1) -> Embeddings:
    """One :class:`Embeddings` run: ``[start] + image features + [end]`` at ``pos0``.

    ``start``/``end`` are the embedding rows of the image start/end tokens (for
    ERNIE-4.5-VL ``<|IMAGE_START|>``/``<|IMAGE_END|>``): they take text
    positions, the image rows take 3-D positions, and the whole run goes
    through the vision experts as the reference routes it.
    """
    feats = np.asarray(features, dtype=np.float32)
    if feats.ndim != 2 or feats.shape[0] != grid_h * grid_w * n_frames:
        raise ValueError(f"expected {grid_h * grid_w * n_frames} feature rows for {n_frames} frame(s) of "
                         f"{grid_h}x{grid_w}, got {feats.shape}")
    parts, cols = [], []
    cur = pos0
    if start is not None:
        parts.append(np.asarray(start, dtype=np.float32).reshape(1, -1))
        cols.append(np.full((3, 1), cur, dtype=np.int32))
        cur += 1
    img_pos, cur = image_positions(cur, grid_h, grid_w, n_frames)
    parts.append(feats)
    cols.append(img_pos)
    if end is not None:
        parts.append(np.asarray(end, dtype=np.float32).reshape(1, -1))
        cols.append(np.full((3, 1), cur, dtype=np.int32))
        cur += 1
    return Embeddings(np.concatenate(parts), np.concatenate(cols, axis=1), next_pos=cur)
