"""vision.Projector: sizing media, encoding through its cache, and borrowing the model.

Synthetic files (no torch): a tiny ERNIE-4.5-VL language model and a tiny mmproj. Parity of
the features with the reference is in tests/parity/test_media.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from pyllama_ernie import ClosedError, Features, ImageError, Media, Model
from pyllama_ernie._lib import live_handles
from pyllama_ernie.convert.synthetic import write_tiny_mmproj


@pytest.fixture(scope="module")
def vl(tiny_gguf, tmp_path_factory):
    path = tiny_gguf("ernie4_5-vl-moe")
    mmproj = write_tiny_mmproj(tmp_path_factory.mktemp("mmproj") / "mmproj.gguf", n_embd_text=64, seed=0)
    return path, mmproj


def _rgb(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_prepare_gives_media_with_the_token_grid(vl):
    path, mmproj = vl
    with Model(path, mmproj_path=mmproj, n_ctx=256) as m:
        media = m.projector.prepare_image(_rgb(56, 84, 0))
        assert isinstance(media, Media) and media.kind == "image"
        assert (media.grid_h, media.grid_w, media.n_frames, media.n_tokens) == (2, 3, 1, 6)
        video = m.projector.prepare_video([_rgb(56, 84, i) for i in range(3)])  # padded to 4 frames
        assert video.kind == "video" and len(video.frames) == 4 and video.n_frames == 2
        assert video.n_tokens == video.grid_h * video.grid_w * 2
        with pytest.raises(ImageError):
            m.projector.prepare_video("not a list of frames")


def test_features_are_cached_by_pixels(vl):
    path, mmproj = vl
    with Model(path, mmproj_path=mmproj, n_ctx=256) as m:
        p = m.projector
        a, b = p.prepare_image(_rgb(56, 84, 1)), p.prepare_image(_rgb(56, 84, 2))
        fa, ran = p.features(a)
        assert ran and isinstance(fa, Features) and fa.data.shape == (6, 64)
        again, ran = p.features(p.prepare_image(_rgb(56, 84, 1)))  # same pixels, new objects
        assert not ran and again is fa
        fb, ran = p.features(b)
        assert ran and not np.array_equal(fa.data, fb.data)
        p.cache_clear()
        assert p.features(a)[1]


def test_media_cache_size_bounds_the_cache(vl):
    path, mmproj = vl
    with Model(path, mmproj_path=mmproj, n_ctx=256) as m:
        assert m.media_cache_size == 32
        m.media_cache_size = 1
        assert m.projector.cache_size == 1
        p = m.projector
        a, b = p.prepare_image(_rgb(56, 56, 3)), p.prepare_image(_rgb(56, 56, 4))
        assert p.features(a)[1] and p.features(b)[1]
        assert p.features(a)[1]  # a was pushed out by b
        with pytest.raises(ValueError):
            m.media_cache_size = -1
    with Model(path, n_ctx=64) as text_only:
        text_only.media_cache_clear()  # nothing to clear: no error
        with pytest.raises(ImageError):
            text_only.media_cache_size = 4


def test_projector_borrows_the_model(vl):
    """The projector keeps the llama_model alive; the model is freed after both are closed."""
    path, mmproj = vl
    before = live_handles()
    m = Model(path, mmproj_path=mmproj, n_ctx=64)
    proj = m.projector
    m.close()
    assert proj.closed and m.closed
    assert live_handles().get("Model", 0) == before.get("Model", 0)
    with pytest.raises(ClosedError):
        m.image_features(_rgb(56, 56, 0))


# --- video frames keep the video limits (patch 0014) -------------------------------------------

def _mmproj_with(tmp_path, name, **limits):
    from pyllama_ernie.convert.ernie4_5_vl_vision import Preprocessor

    return write_tiny_mmproj(tmp_path / name, n_embd_text=64, seed=0, preprocessor=Preprocessor(**limits))


def test_video_sized_by_video_limits_when_the_image_max_is_smaller(vl, tmp_path):
    """Image max 12544 (below the video minimum), four 560x420 frames: the reference's video
    processor keeps them (2 pairs of 15x20 = 600 tokens); mtmd used to shrink them to 24."""
    path, _ = vl
    mmproj = _mmproj_with(tmp_path, "small-image.gguf", min_pixels=784, max_pixels=12544)
    with Model(path, mmproj_path=mmproj, n_ctx=1024) as m:
        info = m.projector.info
        assert (info.max_pixels, info.video_min_pixels, info.video_max_pixels) == (12544, 299 * 784, 1196 * 784)
        frames = [_rgb(420, 560, k) for k in range(4)]
        media = m.projector.prepare_video(frames)
        assert (media.grid_h, media.grid_w, media.n_tokens) == (15, 20, 600)
        feats = m.video_features(frames)
        assert (feats.grid_h, feats.grid_w, feats.n_frames, feats.data.shape[0]) == (15, 20, 2, 600)
        image = m.image_features(_rgb(420, 560, 9))  # images still use the image limits
        assert image.grid_h * image.grid_w * 784 <= 12544


def test_video_limits_below_the_image_minimum(vl, tmp_path):
    """Video max 28*28*3 below image min 3136: frames stay small (mtmd used to enlarge them)."""
    path, _ = vl
    mmproj = _mmproj_with(tmp_path, "small-video.gguf", video_min_pixels=784, video_max_pixels=784 * 3)
    with Model(path, mmproj_path=mmproj, n_ctx=256) as m:
        feats = m.video_features([_rgb(420, 560, k) for k in range(4)])
        assert (feats.grid_h, feats.grid_w, feats.n_frames) == (1, 2, 2)


def test_encoded_grid_must_equal_the_planned_grid(vl):
    """The grid the prompt was planned with is asserted against the grid encoded."""
    from pyllama_ernie import EncodeError

    path, mmproj = vl
    with Model(path, mmproj_path=mmproj, n_ctx=256) as m:
        media = m.projector.prepare_image(_rgb(56, 84, 5))
        media.grid_w += 1  # a plan that does not match the pixels
        with pytest.raises(EncodeError, match="planned as"):
            m.projector.features(media)
