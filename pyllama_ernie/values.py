"""Value classes: what goes into a call and what comes out of it.

Nothing here touches C: these are plain data (with their own validation), shared
by every floor above. The markers that stand for images and videos in prompts
live here too, so that templates, prompts and the CLI agree on them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["IMAGE_MARKER", "VIDEO_MARKER", "Timings", "Completion", "SamplingParams", "ContextParams",
           "Embeddings", "Features", "Media", "KV_CACHE_TYPES"]

#: where an image goes in a prompt (``Model.generate(f"{IMAGE_MARKER}What is this?", images=[...])``)
IMAGE_MARKER = "<__image__>"
#: where a video (a list of frames) goes in a prompt
VIDEO_MARKER = "<__video__>"

#: the KV cache types a context takes (``kv_cache_type``)
KV_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0")


@dataclass(frozen=True)
class Timings:
    """Wall-clock timings of one call, in milliseconds."""

    prompt_ms: float
    generation_ms: float
    prompt_tokens: int
    generated_tokens: int

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prompt_tokens / (self.prompt_ms / 1e3) if self.prompt_ms > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / (self.generation_ms / 1e3) if self.generation_ms > 0 else 0.0


@dataclass
class Completion:
    """The result of :meth:`Model.generate`."""

    text: str
    tokens: list[int]
    #: "stop" (end-of-generation token or stop string), "length" or "cancelled"
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    #: prompt tokens actually evaluated (the rest came from the KV cache)
    prompt_tokens_evaluated: int
    timings: Timings
    #: the stop string that ended generation, if any
    stop: str | None = field(default=None)
    #: images and videos run through the vision encoder for this call (the rest came from the cache)
    images_encoded: int = 0


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings. ``temperature <= 0`` means greedy (argmax)."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None

    def validate(self) -> None:
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 (0 disables it)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError("min_p must be in [0, 1]")
        if self.repeat_penalty <= 0:
            raise ValueError("repeat_penalty must be > 0 (1.0 disables it)")
        if self.seed is not None and not 0 <= self.seed < 2**32 - 1:
            raise ValueError("seed must be in [0, 2**32 - 2]")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0 and self.repeat_penalty == 1.0


class Embeddings:
    """Input embedding rows with their rope positions, to evaluate in place of tokens.

    Args:
        data: ``(n, n_embd)`` float32 rows, one per position.
        positions: ``(n,)`` positions, or ``(k, n)`` rows of positions for
            multi-axis rope (for ERNIE-4.5-VL: rows ``t, h, w``, see
            :func:`pyllama_ernie.mrope.image_positions`).
        next_pos: the position of whatever follows (default: ``max(t) + 1``).

    For ERNIE-4.5-VL an embedding batch goes through the vision experts: pass
    image features (with the image start/end token rows around them) this way.
    """

    __slots__ = ("data", "positions", "next_pos", "key", "n")

    def __init__(self, data: Any, positions: Any, next_pos: int | None = None) -> None:
        arr = np.ascontiguousarray(data, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[0] == 0:
            raise ValueError("embeddings must be a non-empty 2-D array (n_positions, n_embd)")
        pos = np.asarray(positions)
        if pos.ndim == 1:
            pos = pos[None, :]
        if pos.ndim != 2 or pos.shape[1] != arr.shape[0] or pos.shape[0] not in (1, 3, 4):
            raise ValueError(f"positions must have shape (n,), (3, n) or (4, n) with n = {arr.shape[0]}")
        if not np.issubdtype(pos.dtype, np.integer) or (pos < 0).any() or (pos >= 2**31 - 1).any():
            raise ValueError("positions must be non-negative integers")
        pos = np.ascontiguousarray(pos, dtype=np.int32)
        if not np.isfinite(arr).all():
            raise ValueError("embeddings contain NaN or infinity")
        self.data = arr
        self.positions = pos
        self.n = arr.shape[0]
        self.next_pos = int(pos[0].max()) + 1 if next_pos is None else int(next_pos)
        if self.next_pos <= int(pos[0].max()):
            raise ValueError("next_pos must come after every position of the embeddings")
        h = hashlib.blake2b(arr.tobytes(), digest_size=16)
        h.update(pos.tobytes())
        h.update(self.next_pos.to_bytes(8, "little"))
        self.key = h.digest()

    def positions_for(self, n_rows: int) -> np.ndarray:
        """Positions as ``n_rows`` rows (1 for plain rope, 4 for M-RoPE: t, h, w, 0)."""
        have = self.positions.shape[0]
        if have == n_rows:
            return self.positions
        if n_rows == 1:
            return self.positions[:1]
        out = np.zeros((n_rows, self.n), dtype=np.int32)
        # one row (text-like): t = h = w; more rows: t, h, w as given; the 4th row stays 0
        out[:3] = self.positions[0] if have == 1 else self.positions[:3]
        return out

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"<Embeddings n={self.n} width={self.data.shape[1]} next_pos={self.next_pos}>"




@dataclass(frozen=True)
class ContextParams:
    """Settings of one llama.cpp context (see :class:`pyllama_ernie.Model` for their meaning)."""

    n_ctx: int = 4096
    n_batch: int = 512
    n_ubatch: int | None = None
    n_threads: int | None = None
    n_threads_batch: int | None = None
    flash_attn: bool | None = None
    kv_cache_type: str = "f16"

    def validate(self) -> None:
        if self.n_ctx < 0 or self.n_batch <= 0:
            raise ValueError("n_ctx must be >= 0 (0 = the model's training context) and n_batch > 0")
        if self.n_ubatch is not None and self.n_ubatch <= 0:
            raise ValueError("n_ubatch must be > 0")
        for name in ("n_threads", "n_threads_batch"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"{name} must be > 0 (0 or None = the physical cores available)")
        if self.kv_cache_type not in KV_CACHE_TYPES:
            raise ValueError(f"kv_cache_type must be one of {sorted(KV_CACHE_TYPES)}")


@dataclass(frozen=True)
class Features:
    """Encoder output for one image or video: ``data`` is ``(n_frames * grid_h * grid_w, n_embd)``."""

    data: np.ndarray
    grid_h: int
    grid_w: int
    n_frames: int = 1  # temporal positions: 1 for an image, frame pairs for a video


@dataclass
class Media:
    """One image or video resized for the projector, not yet encoded.

    ``frames`` are HxWx3 uint8 arrays (one for an image, an even number for a
    video); ``grid_h x grid_w`` is the token grid of each frame (pair).
    """

    kind: str  # "image" or "video"
    frames: list[np.ndarray]
    grid_h: int
    grid_w: int

    @property
    def n_frames(self) -> int:
        """Temporal positions: 1 for an image, frame pairs for a video."""
        return 1 if self.kind == "image" else len(self.frames) // 2

    @property
    def n_tokens(self) -> int:
        return self.grid_h * self.grid_w * self.n_frames

    def key(self) -> bytes:
        """A content hash of the resized pixels (the projector's feature cache key)."""
        h = hashlib.blake2b(self.kind.encode(), digest_size=20)
        for f in self.frames:
            h.update(repr(f.shape).encode())
            h.update(np.ascontiguousarray(f).data)
        return h.digest()
