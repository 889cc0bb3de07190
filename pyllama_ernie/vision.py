"""Projector: owns one ``mtmd_context`` (an mmproj GGUF) and turns pixels into embeddings.

It sizes images and videos as the reference processor does (:meth:`Projector.prepare_image`,
:meth:`Projector.prepare_video`, giving :class:`~pyllama_ernie.values.Media`), encodes them
(:meth:`Projector.features`, with a cache of recent results by pixel content) and borrows the
language model's handle for as long as the mtmd context lives (mtmd reads its vocabulary).

Images reach the encoder already resized in Python exactly as the reference
processor resizes them (:mod:`pyllama_ernie.images`), so mtmd only normalizes
them (its ERNIE preprocessor computes the same size and does not resample).
The features come back as float32 rows in the order the language model takes
them: merged tokens row-major over the ``grid_h x grid_w`` grid, and for a
video one such grid per pair of frames.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import _lib, errors
from . import images as _images
from ._lib import ModelHandle, ffi, lib
from .errors import (
    ClosedError,
    EncodeError,
    ImageError,
    InvalidModelFileError,
    ModelLoadError,
)
from .gguf_check import GGUFSummary, validate_gguf
from .values import Features, Media

# Features is defined in .values; it stays importable from here as before.
__all__ = ["Projector", "Features", "ProjectorInfo", "read_projector_info"]

_MARKER = "<__media__>"


@dataclass(frozen=True)
class ProjectorInfo:
    """What an mmproj file says about its input (read from its GGUF metadata)."""

    projector_type: str
    patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int
    projection_dim: int
    #: video frames' pixel limits (the reference's video processor defaults for files without them)
    video_min_pixels: int = _images.VIDEO_MIN_PIXELS
    video_max_pixels: int = _images.VIDEO_MAX_PIXELS

    @property
    def factor(self) -> int:
        """Image sides are resized to multiples of this (patch size x merge size)."""
        return self.patch_size * self.merge_size


def read_projector_info(path: Path | GGUFSummary) -> ProjectorInfo:
    """Check an ERNIE-4.5-VL mmproj file (see :mod:`.gguf_check`) and read its input sizes
    (or read them from what :func:`~pyllama_ernie.gguf_check.validate_gguf` read of it)."""
    summary = path if isinstance(path, GGUFSummary) else validate_gguf(path, role="mmproj")
    path = summary.path
    keys = {
        "patch_size": "clip.vision.patch_size",
        "merge_size": "clip.vision.spatial_merge_size",
        "min_pixels": "clip.vision.image_min_pixels",
        "max_pixels": "clip.vision.image_max_pixels",
        "projection_dim": "clip.vision.projection_dim",
    }
    got: dict[str, int] = {}
    for name, key in keys.items():
        v = summary.get(key)
        if not isinstance(v, int) or v <= 0:  # validate_gguf refuses these already
            raise InvalidModelFileError(f"{path}: missing or invalid {key} ({v!r})", llama_log="")
        got[name] = v
    for name in ("video_min_pixels", "video_max_pixels"):  # optional; validate_gguf checks them
        v = summary.get("clip.vision." + name)
        if v is not None:
            got[name] = int(v)
    ptype = summary.get("clip.projector_type") or summary.get("clip.vision.projector_type")
    return ProjectorInfo(projector_type=str(ptype), **got)


class Projector(_lib.CResource):
    """The vision encoder and resampler of an ERNIE-4.5-VL model (an mmproj GGUF).

    Made by :class:`pyllama_ernie.Model` when given ``mmproj_path``; it borrows
    the language model (mtmd reads its vocabulary) until :meth:`close`.
    Encoding is serialized: one image at a time per projector.
    """

    #: how many encoded images/videos :meth:`features` keeps (by content hash of their resized pixels)
    cache_size = 32

    def __init__(self, path: "os.PathLike[str] | str", model: ModelHandle, *, n_threads: int,
                 use_gpu: bool = False, flash_attn: bool | None = None) -> None:
        self._ptr = None
        self._model: ModelHandle | None = None  # set while the projector borrows the model
        self._lock = threading.Lock()
        self._cache: "OrderedDict[bytes, Features]" = OrderedDict()
        self._cache_lock = threading.Lock()
        summary = validate_gguf(path, role="mmproj")  # the file is read once, here
        self.path = summary.path
        model_name = Path(model.path).name
        if model.n_pos_per_embd != 4:
            raise InvalidModelFileError(
                f"{model_name} is not an ERNIE-4.5-VL language model (no 3-D positions): "
                f"it cannot take the images of {self.path.name}", llama_log="")
        self.info = read_projector_info(summary)
        if self.info.projection_dim != model.n_embd:
            raise InvalidModelFileError(
                f"{self.path.name} projects to width {self.info.projection_dim} but {model_name} "
                f"embeds tokens in {model.n_embd}: the mmproj belongs to another model", llama_log="")
        _lib.ensure_init()
        params = lib.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.print_timings = False
        params.n_threads = int(n_threads)
        params.warmup = False
        if flash_attn is not None:
            params.flash_attn_type = (lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                      else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        self._marker = ffi.new("char[]", _MARKER.encode())
        params.media_marker = self._marker
        model_ptr = model.acquire()
        self._model = model
        errors.clear_log_line()
        ptr = lib.mtmd_init_from_file(str(self.path).encode(), model_ptr, params)
        if ptr == ffi.NULL:
            self.close()
            errors.raise_error(ModelLoadError, f"loading the projector {self.path}")
        self._ptr = ptr
        self._track()
        self.n_embd = int(model.n_embd)

    def close(self) -> None:
        """Free the projector (an encode running in another thread finishes first). Safe to call twice."""
        with self._lock:
            if self._ptr is not None:
                lib.mtmd_free(self._ptr)
                self._ptr = None
                self._untrack()
            model, self._model = self._model, None
        if model is not None:
            model.release()

    @property
    def closed(self) -> bool:
        return self._ptr is None

    def _handle(self) -> Any:
        if self._ptr is None:
            raise ClosedError("the projector is closed")
        return self._ptr

    def encode(self, frames: Sequence[np.ndarray], *, check_size: bool = True) -> Features:
        """Encode one image (one frame) or one pair of video frames.

        ``frames`` are HxWx3 uint8 RGB arrays whose sides are multiples of
        :attr:`ProjectorInfo.factor` and whose pixel count is within the image limits
        (one frame) or the video limits (a pair), as :meth:`prepare_image` and
        :meth:`prepare_video` size them. ``check_size=False`` lets mtmd resize them itself
        (its bicubic filter differs slightly from PIL's, which the reference uses).
        """
        if len(frames) not in (1, 2):
            raise ValueError("encode takes one image or one pair of video frames")
        h, w = frames[0].shape[:2]
        f = self.info.factor
        for fr in frames:
            if fr.dtype != np.uint8 or fr.ndim != 3 or fr.shape[2] != 3 or fr.shape[:2] != (h, w):
                raise ImageError("frames must be HxWx3 uint8 arrays of one size")
        lo, hi = ((self.info.min_pixels, self.info.max_pixels) if len(frames) == 1
                  else (self.info.video_min_pixels, self.info.video_max_pixels))
        if check_size and (h % f or w % f or h * w > hi or h * w < lo):
            kind = "an image" if len(frames) == 1 else "video frames"
            raise ImageError(f"{w}x{h} {kind} not resized for this projector "
                             f"(sides multiples of {f}, {lo}..{hi} pixels)")
        with self._lock:
            return self._encode_locked(frames)

    def _encode_locked(self, frames: Sequence[np.ndarray]) -> Features:
        ctx = self._handle()
        bitmaps: list[Any] = []
        chunks = ffi.NULL
        try:
            for fr in frames:
                data = np.ascontiguousarray(fr)
                bm = lib.mtmd_bitmap_init(data.shape[1], data.shape[0], ffi.from_buffer(data))
                if bm == ffi.NULL:
                    raise EncodeError("mtmd_bitmap_init failed")
                bitmaps.append(bm)
                if len(frames) == 2:
                    lib.mtmd_bitmap_set_mergeable(bm, True)
            text = ffi.new("mtmd_input_text *")
            marker_text = (_MARKER * len(frames)).encode()
            text_buf = ffi.new("char[]", marker_text)
            text.text = text_buf
            text.text_len = len(marker_text)
            text.add_special = False
            text.parse_special = True
            arr = ffi.new("const mtmd_bitmap *[]", bitmaps)
            chunks = lib.mtmd_input_chunks_init()
            errors.clear_log_line()
            rc = lib.mtmd_tokenize(ctx, chunks, text, arr, len(bitmaps))
            if rc != 0:
                errors.raise_error(EncodeError, "preparing the image for the encoder (mtmd_tokenize)", rc)
            image_chunks = [lib.mtmd_input_chunks_get(chunks, i) for i in range(lib.mtmd_input_chunks_size(chunks))]
            image_chunks = [c for c in image_chunks
                            if lib.mtmd_input_chunk_get_type(c) == lib.MTMD_INPUT_CHUNK_TYPE_IMAGE]
            if len(image_chunks) != 1:
                raise EncodeError(f"expected one image chunk, mtmd made {len(image_chunks)}", llama_log="")
            chunk = image_chunks[0]
            tokens = lib.mtmd_input_chunk_get_tokens_image(chunk)
            n = int(lib.mtmd_image_tokens_get_n_tokens(tokens))
            last = lib.mtmd_image_tokens_get_decoder_pos(tokens, 0, n - 1)
            grid_h, grid_w = int(last.y) + 1, int(last.x) + 1
            if grid_h * grid_w != n:
                raise EncodeError(f"unexpected token grid {grid_h}x{grid_w} for {n} tokens", llama_log="")
            rc = lib.mtmd_encode_chunk(ctx, chunk)
            if rc != 0:
                errors.raise_error(EncodeError, "encoding the image (mtmd_encode_chunk)", rc)
            out = lib.mtmd_get_output_embd(ctx)
            data = np.frombuffer(ffi.buffer(out, n * self.n_embd * 4), dtype=np.float32)
            data = data.reshape(n, self.n_embd).copy()
        finally:
            if chunks != ffi.NULL:
                lib.mtmd_input_chunks_free(chunks)
            for bm in bitmaps:
                lib.mtmd_bitmap_free(bm)
        if not np.isfinite(data).all():
            raise EncodeError("the vision encoder produced NaN or infinite values", llama_log="")
        return Features(data, grid_h, grid_w)

    def prepare_image(self, image: Any) -> Media:
        """Load one image (path, bytes, PIL image or HxWx3 uint8 array) and resize it for this projector."""
        info = self.info
        rgb = _images.resize_for_model(_images.load_image(image), min_pixels=info.min_pixels,
                                       max_pixels=info.max_pixels, factor=info.factor)
        h, w = rgb.shape[:2]
        return Media("image", [rgb], h // info.factor, w // info.factor)

    def prepare_video(self, frames: Sequence[Any]) -> Media:
        """Load and resize a video's frames (padded to an even count as the reference pads)."""
        if isinstance(frames, (str, bytes)) or not isinstance(frames, Sequence):
            raise ImageError("a video is a list of frames (paths, bytes, PIL images or arrays)")
        info = self.info
        # the reference's video processor sizes frames with its own limits, not the image ones
        fr = _images.video_frames(frames, min_pixels=info.video_min_pixels, max_pixels=info.video_max_pixels,
                                  factor=info.factor)
        h, w = fr[0].shape[:2]
        media = Media("video", list(fr), h // info.factor, w // info.factor)
        if media.n_frames > max(media.grid_h, media.grid_w):
            # pair k sits at t = pos + k, the text after the video at pos + max(grid_h, grid_w):
            # with more pairs than that, later frames would come after the following text in
            # position order, which llama.cpp's causal mask cannot express as the reference does
            raise ImageError(
                f"a video of {media.n_frames} frame pairs at {w}x{h} ({media.grid_w}x{media.grid_h} tokens a "
                "frame) cannot be placed: use at most max(grid_h, grid_w) frame pairs, i.e. fewer frames or "
                "larger frames")
        return media

    def features(self, media: Media) -> tuple[Features, bool]:
        """Encode prepared media; returns the features and whether the encoder ran.

        The last :attr:`cache_size` results are kept by pixel content, so the same
        image in a later prompt is not encoded again.
        """
        key = media.key()
        with self._cache_lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit, False
        if media.kind == "image":
            feats = self.encode(media.frames)
        else:
            feats = self._encode_video(media.frames)
        if (feats.grid_h, feats.grid_w, feats.n_frames) != (media.grid_h, media.grid_w, media.n_frames):
            # the prompt (and its length check) was planned with media's grid: never encode another
            raise EncodeError(f"the encoder made a {feats.grid_w}x{feats.grid_h} grid ({feats.n_frames} frame(s)) "
                              f"of a {media.kind} planned as {media.grid_w}x{media.grid_h} "
                              f"({media.n_frames})", llama_log="")
        with self._cache_lock:
            self._cache[key] = feats
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return feats, True

    def cache_clear(self) -> None:
        """Forget the encoded images and videos kept for reuse."""
        with self._cache_lock:
            self._cache.clear()

    def _encode_video(self, frames: Sequence[np.ndarray]) -> Features:
        """Encode an even number of frames as consecutive pairs (the reference's temporal merge)."""
        if len(frames) < 2 or len(frames) % 2:
            raise ImageError("a video needs an even, non-zero number of frames (pad by repeating the last)")
        # frames are sized by the video limits, which mtmd applies to frame pairs (patch 0014)
        parts = [self.encode(frames[i:i + 2]) for i in range(0, len(frames), 2)]
        return Features(np.concatenate([p.data for p in parts]), parts[0].grid_h, parts[0].grid_w,
                        n_frames=len(parts))
