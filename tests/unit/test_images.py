"""pyllama_ernie.images against transformers' ERNIE-4.5-VL PIL image processor.

Pixel comparisons are exact (``np.array_equal`` on float32 ``pixel_values``): we make the
same Pillow and NumPy calls in the same order, so there is no tolerance to grant.
"""

from __future__ import annotations

import io
import math
import random
import resource
import struct
import time
import zlib

import numpy as np
import pytest

PIL_Image = pytest.importorskip("PIL.Image")
from PIL import ImageOps

from pyllama_ernie import images
from pyllama_ernie.images import (
    ImageError,
    load_image,
    normalize,
    resize_for_model,
    smart_resize,
    to_patches,
    video_frames,
)

Image = PIL_Image
DEFAULT = (56 * 56, 28 * 28 * 6177)
LOWERED = (28 * 28 * 4, 28 * 28 * 24)  # 4 .. 24 merged tokens


@pytest.fixture(scope="module")
def ref():
    """The reference module (smart_resize and the PIL image processor class)."""
    pytest.importorskip("transformers")
    from transformers.models.ernie4_5_vl_moe import (
        image_processing_pil_ernie4_5_vl_moe as mod,
    )

    return mod


def make_proc(ref, pixels=DEFAULT):
    cls = ref.Ernie4_5_VLMoeImageProcessorPil
    if pixels == DEFAULT:
        return cls()
    return cls(size={"shortest_edge": pixels[0], "longest_edge": pixels[1]})


def reference_out(proc, x, **kwargs):
    out = proc(x, **kwargs)
    pv = np.asarray(out["pixel_values"])
    grid = np.asarray(out["image_grid_thw"])
    assert grid.shape == (1, 3) and grid[0, 0] == 1
    return pv, (int(grid[0, 1]), int(grid[0, 2]))


def ours(x, pixels=DEFAULT):
    rgb = load_image(x)
    resized = resize_for_model(rgb, min_pixels=pixels[0], max_pixels=pixels[1])
    return to_patches(normalize(resized))


def assert_same(a, b):
    pa, ga = a
    pb, gb = b
    assert ga == gb
    assert pa.dtype == np.float32 and pb.dtype == np.float32
    assert pa.shape == pb.shape
    assert np.array_equal(pa, pb), f"max abs diff {np.abs(pa - pb).max()}"


def random_rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def smooth_rgb(h, w, seed=0):
    """A photo-like image (gradients plus noise): resampling differences show up in it."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255.0 / max(w - 1, 1), y * 255.0 / max(h - 1, 1), (x + y) % 97 * 2.5], -1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def encode(img, fmt="PNG", **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


# --------------------------------------------------------------------------- smart_resize

EDGE_CASES = [
    (70, 70, *DEFAULT),
    (42, 98, *DEFAULT),
    (27, 29, *DEFAULT),
    (1000, 30, *DEFAULT),
    (30, 1000, *DEFAULT),
    (14, 14, *DEFAULT),
    (28, 28, *DEFAULT),
    (42, 42, *DEFAULT),
    (98, 98, *DEFAULT),
    (3000, 4000, *DEFAULT),
    (3000, 4000, 56 * 56, 28 * 28 * 1280),
    (3000, 4000, 56 * 56, 28 * 28 * 4),
    (1, 1, *DEFAULT),
    (5, 7, *DEFAULT),
    (40, 40, *DEFAULT),
    (1, 200, *DEFAULT),
    (200, 1, *DEFAULT),
    (56, 11200, *DEFAULT),
    (2201, 2201, *DEFAULT),
    (333, 500, *LOWERED),
    (10000, 50, *DEFAULT),
]


@pytest.mark.parametrize("h,w,lo,hi", EDGE_CASES)
def test_smart_resize_edges_match_reference(ref, h, w, lo, hi):
    got = smart_resize(h, w, factor=28, min_pixels=lo, max_pixels=hi)
    assert got == ref.smart_resize(h, w, factor=28, min_pixels=lo, max_pixels=hi)
    assert got[0] % 28 == 0 and got[1] % 28 == 0


def test_smart_resize_known_values():
    assert smart_resize(70, 70) == (56, 56)  # round(2.5) == 2: half to even
    assert smart_resize(98, 98) == (112, 112)  # round(3.5) == 4
    assert smart_resize(1, 1) == (56, 56)
    assert smart_resize(28, 28) == (56, 56)
    assert smart_resize(56, 84) == (56, 84)


def test_smart_resize_random_sweep(ref):
    rng = random.Random(1234)
    limits = [DEFAULT, LOWERED, (56 * 56, 28 * 28 * 1280), (28 * 28 * 130, 28 * 28 * 16384), (3136, 3136)]
    checked = 0
    while checked < 400:
        h = int(math.exp(rng.uniform(0, math.log(8000))))
        w = int(math.exp(rng.uniform(0, math.log(8000))))
        if max(h, w) / min(h, w) > 200:
            continue
        lo, hi = rng.choice(limits)
        assert smart_resize(h, w, 28, lo, hi) == ref.smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)
        checked += 1


@pytest.mark.parametrize("h,w", [(1, 201), (201, 1), (3, 700), (10000, 49)])
def test_smart_resize_aspect_ratio_limit(ref, h, w):
    with pytest.raises(ImageError, match=r"aspect ratio .* limit of 200:1"):
        smart_resize(h, w)
    with pytest.raises(ValueError, match="aspect ratio"):
        ref.smart_resize(h, w)


@pytest.mark.parametrize("h,w", [(0, 10), (10, 0), (-5, 5)])
def test_smart_resize_rejects_empty_sides(h, w):
    with pytest.raises(ImageError, match="at least 1 pixel"):
        smart_resize(h, w)


def test_resize_for_model_aspect_error_is_image_error():
    with pytest.raises(ImageError, match="aspect ratio"):
        resize_for_model(np.zeros((2, 500, 3), np.uint8), min_pixels=DEFAULT[0], max_pixels=DEFAULT[1])


# --------------------------------------------------------------------------- pixel identity

SIZES = [
    (70, 70),  # 56x56 (rounds down)
    (56, 84),  # no resize
    (112, 168),  # no resize
    (333, 500),
    (47, 301),
    (1, 1),  # grows to 56x56
    (17, 3),
]


@pytest.mark.parametrize("pixels", [DEFAULT, LOWERED], ids=["default", "lowered"])
@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("source", ["path", "bytes", "pil", "numpy"])
def test_pixels_match_reference(ref, tmp_path, source, h, w, pixels):
    arr = smooth_rgb(h, w, seed=h * 1000 + w)
    pil = Image.fromarray(arr)
    proc = make_proc(ref, pixels)
    if source == "path":
        path = tmp_path / "img.png"
        pil.save(path)
        ours_in, ref_in = path, str(path)
    elif source == "bytes":
        data = encode(pil)
        ours_in, ref_in = data, Image.open(io.BytesIO(data))
    elif source == "pil":
        ours_in, ref_in = pil, pil
    else:
        ours_in, ref_in = arr, arr
    # arrays are channels-last by our contract; the reference guesses (and takes 1x1x3 or
    # 17x3x3 as channels-first) unless told
    kwargs = {"input_data_format": "channels_last"} if source == "numpy" else {}
    assert_same(ours(ours_in, pixels), reference_out(proc, ref_in, **kwargs))


def test_reference_guesses_channel_axis_we_do_not(ref):
    """Documented difference: an HxWx3 array with H in (1, 3, 4) is channels-first to the reference."""
    arr = smooth_rgb(3, 90, seed=2)
    proc = make_proc(ref)
    told = reference_out(proc, arr, input_data_format="channels_last")
    assert_same(ours(arr), told)
    guessed = reference_out(proc, arr)
    assert guessed[1] != told[1]


def test_pixels_match_reference_large_downscale(ref):
    arr = smooth_rgb(3000, 4000, seed=5)
    rgb = load_image(arr)
    resized = resize_for_model(rgb, min_pixels=DEFAULT[0], max_pixels=DEFAULT[1])
    assert resized.shape[:2] == smart_resize(3000, 4000)
    assert_same(to_patches(normalize(resized)), reference_out(make_proc(ref), arr))


def test_pixels_match_reference_jpeg(ref, tmp_path):
    path = tmp_path / "photo.jpg"
    Image.fromarray(smooth_rgb(250, 375, seed=9)).save(path, quality=85)
    assert_same(ours(str(path)), reference_out(make_proc(ref), str(path)))
    assert_same(ours(path.read_bytes(), LOWERED), reference_out(make_proc(ref, LOWERED), Image.open(path)))


def test_resize_for_model_skips_matching_size():
    arr = smooth_rgb(56, 84)
    assert resize_for_model(arr, min_pixels=DEFAULT[0], max_pixels=DEFAULT[1]) is arr
    out = resize_for_model(smooth_rgb(70, 70), min_pixels=DEFAULT[0], max_pixels=DEFAULT[1])
    assert out.shape == (56, 56, 3) and out.dtype == np.uint8 and out.flags.c_contiguous


def test_resize_is_pil_bicubic_not_something_else():
    arr = smooth_rgb(333, 500, seed=3)
    out = resize_for_model(arr, min_pixels=LOWERED[0], max_pixels=LOWERED[1])
    h, w = out.shape[:2]
    bicubic = np.asarray(Image.fromarray(arr).resize((w, h), Image.Resampling.BICUBIC))
    bilinear = np.asarray(Image.fromarray(arr).resize((w, h), Image.Resampling.BILINEAR))
    assert np.array_equal(out, bicubic)
    assert not np.array_equal(out, bilinear)


def test_to_patches_layout():
    h, w = 56, 84
    x = np.random.default_rng(0).standard_normal((h, w, 3)).astype(np.float32)
    patches, grid = to_patches(x)
    assert grid == (4, 6) and patches.shape == (24, 3 * 14 * 14) and patches.dtype == np.float32

    def patch(r, c):
        return x[r * 14:(r + 1) * 14, c * 14:(c + 1) * 14].transpose(2, 0, 1).reshape(-1)

    # merge-block-major: block (0, 0) holds patches (0,0) (0,1) (1,0) (1,1), then block (0, 1) ...
    order = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    for i, (r, c) in enumerate(order):
        assert np.array_equal(patches[i], patch(r, c)), i
    # first patch of the second block row
    assert np.array_equal(patches[12], patch(2, 0))
    with pytest.raises(ValueError, match="multiples of 28"):
        to_patches(np.zeros((42, 56, 3), np.float32))


def test_normalize_values():
    rgb = np.array([[[0, 128, 255]]], np.uint8)
    out = normalize(rgb)
    assert out.dtype == np.float32 and out.shape == (1, 1, 3)
    want = (np.array([0, 128, 255]) / 255 - np.array(images.CLIP_MEAN)) / np.array(images.CLIP_STD)
    assert np.allclose(out[0, 0], want, atol=1e-6)
    out2 = normalize(rgb, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert np.allclose(out2[0, 0], [-1.0, 128 / 255 * 2 - 1, 1.0], atol=1e-6)


# --------------------------------------------------------------------------- modes


def _rgba_image(h=60, w=80, seed=1):
    rng = np.random.default_rng(seed)
    a = smooth_rgb(h, w, seed)
    alpha = rng.integers(0, 256, (h, w, 1), dtype=np.uint8)
    alpha[:10] = 0
    alpha[10:20] = 255
    return Image.fromarray(np.concatenate([a, alpha], -1))  # mode RGBA


def _p_transparent():
    im = Image.fromarray(smooth_rgb(60, 80, 2)).quantize(16)
    im.info["transparency"] = 3
    # round-trip through PNG so that tRNS is what a file would carry
    return Image.open(io.BytesIO(encode(im)))


def _rgb_trns():
    arr = smooth_rgb(60, 80, 4)
    arr[:20, :20] = (10, 20, 30)
    im = Image.fromarray(arr)
    return Image.open(io.BytesIO(encode(im, transparency=(10, 20, 30))))


def _i16():
    v = np.random.default_rng(5).integers(0, 65536, (60, 80), dtype=np.uint16)
    v[:5] = np.arange(80, dtype=np.uint16)[None]  # some values below 256 too
    return Image.fromarray(v)


def _cmyk():
    raw = np.random.default_rng(6).integers(0, 256, (60, 80, 4), dtype=np.uint8)
    return Image.frombytes("CMYK", (80, 60), raw.tobytes())


MODE_IMAGES = {
    "RGBA": _rgba_image,
    "LA": lambda: _rgba_image().convert("LA"),
    "PA": lambda: _rgba_image().convert("PA"),
    "P": lambda: Image.fromarray(smooth_rgb(60, 80, 3)).quantize(32),
    "P+transparency": _p_transparent,
    "RGB+tRNS": _rgb_trns,
    "L": lambda: Image.fromarray(smooth_rgb(60, 80, 7)).convert("L"),
    "1": lambda: Image.fromarray(smooth_rgb(60, 80, 8)).convert("1"),
    "CMYK": _cmyk,
    "I;16": _i16,
    "I": lambda: _i16().convert("I"),
    "F": lambda: Image.fromarray(smooth_rgb(60, 80, 9)).convert("F"),
    "YCbCr": lambda: Image.fromarray(smooth_rgb(60, 80, 10)).convert("YCbCr"),
    "RGBa": lambda: _rgba_image().convert("RGBa"),
}


@pytest.mark.parametrize("pixels", [DEFAULT, LOWERED], ids=["default", "lowered"])
@pytest.mark.parametrize("mode", list(MODE_IMAGES))
def test_modes_match_reference(ref, mode, pixels):
    im = MODE_IMAGES[mode]()
    assert im.mode == mode.split("+")[0]
    got = ours(im, pixels)
    assert_same(got, reference_out(make_proc(ref, pixels), MODE_IMAGES[mode]()))


def test_alpha_is_composited_on_white():
    im = Image.new("RGBA", (30, 30), (0, 0, 0, 0))  # fully transparent black
    im.putpixel((0, 0), (255, 0, 0, 255))
    rgb = load_image(im)
    assert tuple(rgb[0, 0]) == (255, 0, 0)
    assert (rgb[1:, :] == 255).all()
    p = _p_transparent()
    rgb = load_image(p)
    mask = np.asarray(p) == 3
    assert mask.any() and (rgb[mask] == 255).all()


def test_unconvertible_mode_raises_like_reference(ref):
    im = _rgba_image().convert("La")
    with pytest.raises(ImageError, match=r"mode=La.*could not be converted to RGB"):
        load_image(im)
    with pytest.raises(ValueError):
        make_proc(ref)(im)


def test_numpy_rgba_matches_reference(ref):
    rgba = np.asarray(_rgba_image(61, 83))
    assert_same(ours(rgba), reference_out(make_proc(ref), rgba))
    # the float blend the reference uses for arrays agrees with Pillow's alpha_composite
    assert np.array_equal(load_image(rgba), load_image(Image.fromarray(rgba)))


def test_numpy_gray_matches_reference(ref):
    gray = smooth_rgb(61, 83)[:, :, 0].copy()
    # the reference refuses a 2-D array, so compare with its HxWx1 and PIL "L" results
    ref_out = reference_out(make_proc(ref), gray[:, :, None])
    assert_same(ours(gray), ref_out)
    assert_same(ours(gray[:, :, None]), ref_out)
    assert_same(ours(Image.fromarray(gray)), ref_out)


def test_numpy_contiguity():
    arr = smooth_rgb(50, 60)
    assert np.shares_memory(load_image(arr), arr)  # taken as is
    flipped = arr[:, ::-1]
    out = load_image(flipped)
    assert out.flags.c_contiguous and np.array_equal(out, flipped)


def test_file_with_alpha_is_composited_unlike_reference_path_route(ref, tmp_path):
    """Documented difference: the reference drops alpha for path strings, we composite."""
    path = tmp_path / "rgba.png"
    _rgba_image().save(path)
    proc = make_proc(ref)
    mine = ours(path)
    assert_same(mine, reference_out(proc, Image.open(path)))  # as the reference treats the PIL image
    ref_path = reference_out(proc, str(path))  # load_image(): convert("RGB"), alpha dropped
    assert_same(ref_path, reference_out(proc, Image.open(path).convert("RGB")))
    assert not np.array_equal(mine[0], ref_path[0])


# --------------------------------------------------------------------------- EXIF


def _exif_jpeg(tmp_path, orientation=6):
    arr = smooth_rgb(60, 100, seed=11)  # stored 100 wide, 60 high
    arr[:10, :10] = (255, 0, 0)  # top-left marker in storage order
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "rotated.jpg"
    Image.fromarray(arr).save(path, quality=95, exif=exif)
    return path


def test_exif_orientation_applied_from_path(ref, tmp_path):
    path = _exif_jpeg(tmp_path)
    rgb = load_image(path)
    assert rgb.shape == (100, 60, 3)  # upright: orientation 6 rotates 90 degrees clockwise
    # the stored top-left corner is now the top-right corner
    assert rgb[2, -3, 0] > 200 and rgb[2, -3, 1] < 60
    # the reference applies exif_transpose for path strings: identical pixels
    assert_same(ours(path), reference_out(make_proc(ref), str(path)))
    assert_same(ours(path.read_bytes()), reference_out(make_proc(ref), str(path)))


def test_exif_orientation_applied_to_pil_unlike_reference(ref, tmp_path):
    """The reference uses a PIL image as stored (no exif_transpose); we rotate it upright."""
    path = _exif_jpeg(tmp_path)
    proc = make_proc(ref)
    mine = ours(Image.open(path))
    assert mine[1] == (8, 4)  # upright 100x60 -> 112x56
    assert_same(mine, reference_out(proc, ImageOps.exif_transpose(Image.open(path))))
    ref_raw = reference_out(proc, Image.open(path))
    assert ref_raw[1] == (4, 8)  # the reference's PIL route keeps the photo on its side
    # exif_transpose drops the tag, so an already-transposed image is not turned twice
    upright = ImageOps.exif_transpose(Image.open(path))
    assert np.array_equal(load_image(upright), load_image(path))


# --------------------------------------------------------------------------- errors


def _png_header(width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _truncated(fmt):
    data = encode(Image.fromarray(random_rgb(120, 160, 3)), fmt)
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "make,pattern",
    [
        (lambda tmp: b"this is not an image at all" * 5, "not an image file"),
        (lambda tmp: b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "(not an image file|could not be decoded)"),
        (lambda tmp: _truncated("PNG"), "could not be decoded.*truncated"),
        (lambda tmp: _truncated("JPEG"), "could not be decoded.*truncated"),
        (lambda tmp: b"", "zero bytes"),
        (lambda tmp: bytearray(), "zero bytes"),
        (lambda tmp: tmp, "is a directory"),
        (lambda tmp: tmp / "missing.png", "no such file"),
        (lambda tmp: str(tmp / "missing.png"), "no such file"),
        (lambda tmp: (tmp / "empty.png").write_bytes(b"") or tmp / "empty.png", "empty"),
        (lambda tmp: (tmp / "notes.txt").write_text("hello\n" * 50) and tmp / "notes.txt", "not an image file"),
        (lambda tmp: (tmp / "cut.jpg").write_bytes(_truncated("JPEG")) and tmp / "cut.jpg", "truncated"),
        (lambda tmp: np.zeros((0, 5, 3), np.uint8), "empty"),
        (lambda tmp: np.zeros((5, 0), np.uint8), "empty"),
        (lambda tmp: np.zeros((5, 5, 3), np.float32), "uint8"),
        (lambda tmp: np.zeros((5, 5, 3), np.float64), "uint8"),
        (lambda tmp: np.zeros((5, 5, 3), np.int64), "uint8"),
        (lambda tmp: np.zeros((5, 5, 2), np.uint8), "shape"),
        (lambda tmp: np.zeros((2, 5, 5, 3), np.uint8), "shape"),
        (lambda tmp: np.zeros((5,), np.uint8), "shape"),
        (lambda tmp: Image.new("RGB", (0, 7)), "empty"),
    ],
    ids=[
        "garbage", "png-signature-only", "truncated-png", "truncated-jpeg", "zero-bytes", "zero-bytearray",
        "directory", "missing-path", "missing-str", "empty-file", "text-file", "truncated-jpeg-file",
        "0xN", "Nx0-gray", "float32", "float64", "int64", "2-channels", "4-d", "1-d", "pil-0x7",
    ],
)
def test_load_errors(tmp_path, make, pattern):
    x = make(tmp_path)
    with pytest.raises(ImageError, match=pattern) as info:
        load_image(x)
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith("image ")  # names the input


def test_error_message_names_path(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(ImageError, match=r"notes\.txt"):
        load_image(path)


def test_unsupported_type():
    with pytest.raises(TypeError, match="PIL.Image.Image"):
        load_image(42)  # type: ignore[arg-type]


def test_one_pixel_image_resizes_to_minimum(ref):
    im = Image.new("RGB", (1, 1), (200, 100, 50))
    rgb = load_image(im)
    assert rgb.shape == (1, 1, 3)
    resized = resize_for_model(rgb, min_pixels=DEFAULT[0], max_pixels=DEFAULT[1])
    assert resized.shape == (56, 56, 3)
    assert (resized == (200, 100, 50)).all()
    got = to_patches(normalize(resized))
    assert got[1] == (4, 4)
    assert_same(got, reference_out(make_proc(ref), im))


@pytest.mark.parametrize("size", [(100_000, 100_000), (10_000, 10_000)], ids=["over-2x-limit", "over-limit"])
def test_decompression_bomb_refused_quickly(size):
    data = _png_header(*size)
    assert len(data) < 100
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(ImageError, match="decompression bomb.*MAX_IMAGE_PIXELS"):
        load_image(data)
    assert time.perf_counter() - t0 < 1.0
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    assert grown_kib < 100 * 1024  # 10_000 x 10_000 RGB would be 300 MB


def test_decompression_bomb_limit_is_pillows(monkeypatch, tmp_path):
    data = encode(Image.fromarray(random_rgb(40, 50)))
    assert load_image(data).shape == (40, 50, 3)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(data)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(path)
    # arrays and PIL images are already in memory: not checked
    assert load_image(random_rgb(40, 50)).shape == (40, 50, 3)


# --------------------------------------------------------------------------- video


def test_video_frames_pads_odd_count():
    frames = [smooth_rgb(70, 90, seed=s) for s in range(3)]
    out = video_frames(frames, min_pixels=DEFAULT[0], max_pixels=DEFAULT[1])
    assert len(out) == 4
    size = smart_resize(70, 90)
    for frame, got in zip(frames, out):
        assert got.shape == (*size, 3)
        assert np.array_equal(got, resize_for_model(frame, min_pixels=DEFAULT[0], max_pixels=DEFAULT[1]))
    assert np.array_equal(out[3], out[2]) and out[3] is not out[2]
    assert not np.array_equal(out[1], out[2])


def test_video_frames_even_count_and_mixed_inputs(tmp_path):
    a, b = smooth_rgb(60, 80, 1), smooth_rgb(60, 80, 2)
    path = tmp_path / "b.png"
    Image.fromarray(b).save(path)
    out = video_frames([Image.fromarray(a), path], min_pixels=LOWERED[0], max_pixels=LOWERED[1])
    assert len(out) == 2
    assert np.array_equal(out[1], resize_for_model(b, min_pixels=LOWERED[0], max_pixels=LOWERED[1]))
    one = video_frames([a], min_pixels=LOWERED[0], max_pixels=LOWERED[1])
    assert len(one) == 2 and np.array_equal(one[0], one[1])


def test_video_frames_errors():
    with pytest.raises(ImageError, match="at least one frame"):
        video_frames([], min_pixels=DEFAULT[0], max_pixels=DEFAULT[1])
    with pytest.raises(ImageError, match=r"frame 2 .* 60x81 .* 60x80"):
        video_frames(
            [smooth_rgb(60, 80), smooth_rgb(60, 80), smooth_rgb(60, 81)],
            min_pixels=DEFAULT[0],
            max_pixels=DEFAULT[1],
        )
    with pytest.raises(ImageError, match="zero bytes"):
        video_frames([smooth_rgb(60, 80), b""], min_pixels=DEFAULT[0], max_pixels=DEFAULT[1])


# --------------------------------------------------------------------------- video sizing rule
#
# transformers' video processor (Ernie4_5_VLMoeVideoProcessor) needs torchvision, which cannot be
# imported beside the CPU torch here (HAZARDS.md item 7), so its rule is written out below from
# its source, and the parity tests in tests/parity/test_media.py feed the reference frames that our own
# preprocessing sized. These tests check that sizing independently.


def transformers_video_size(height, width, n_frames):
    """(height, width, frames) of a video as transformers 5.24.0 sizes it, restated from its source.

    transformers/models/ernie4_5_vl_moe/video_processing_ernie4_5_vl_moe.py:

    * class ``Ernie4_5_VLMoeVideoProcessor``: ``size = {"shortest_edge": 299 * 28 * 28,
      "longest_edge": 1196 * 28 * 28}``, ``patch_size = 14``, ``merge_size = 2``,
      ``temporal_patch_size = 2`` (``__init__`` refuses any other);
    * ``_preprocess`` (and ``get_num_of_video_patches``): ``smart_resize(height, width,
      factor=patch_size * merge_size, min_pixels=size["shortest_edge"],
      max_pixels=size["longest_edge"])``, the size taken from the first frame of the group;
    * ``_prepare_input_videos``: "last frame is copied if uneven" (``grid_t = num_frames +
      -num_frames % temporal_patch_size`` in ``get_num_of_video_patches``).

    ``smart_resize`` is transformers/models/ernie4_5_vl_moe/image_processing_ernie4_5_vl_moe.py's
    (the torchvision module; the PIL module's copy is compared with ours in the tests above).
    """
    factor = 14 * 2  # patch_size * merge_size
    min_pixels, max_pixels = 299 * 28 * 28, 1196 * 28 * 28
    if max(height, width) / min(height, width) > 200:
        raise ValueError("absolute aspect ratio must be smaller than 200")
    h_bar = round(height / factor) * factor  # Python's round: half to even
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar, n_frames + -n_frames % 2


VIDEO_SIZES = [
    # (h, w, frames) -> the size worked out by hand from the rule above
    ((56, 84, 4), (420, 616, 4)),  # below min_pixels: scaled up, sides ceiled
    ((84, 56, 3), (616, 420, 4)),  # odd count: the last frame is repeated
    ((518, 546, 2), (504, 560, 2)),  # in range: 18.5 -> 18 and 19.5 -> 20 (half to even, not half up)
    ((1080, 1920, 1), (700, 1288, 2)),  # above max_pixels: scaled down, sides floored
    ((28, 5600, 2), (56, 6860, 2)),  # aspect ratio 200 (allowed), below min_pixels
]


@pytest.mark.parametrize("size, want", VIDEO_SIZES)
def test_video_size_matches_the_transformers_rule(size, want):
    assert (images.VIDEO_MIN_PIXELS, images.VIDEO_MAX_PIXELS) == (299 * 28 * 28, 1196 * 28 * 28)
    h, w, n = size
    assert transformers_video_size(h, w, n) == want
    frames = [smooth_rgb(h, w, seed=k) for k in range(n)]
    out = video_frames(frames, min_pixels=images.VIDEO_MIN_PIXELS, max_pixels=images.VIDEO_MAX_PIXELS)
    assert (out[0].shape[0], out[0].shape[1], len(out)) == want
    assert all(f.shape == out[0].shape for f in out)


def test_video_size_sweep_matches_the_transformers_rule():
    rng = random.Random(2024)
    sizes = [(rng.randint(1, 3000), rng.randint(1, 3000)) for _ in range(3000)]
    sizes += [(28 * k + 14, 28 * j + 14) for k in range(10, 40) for j in range(10, 40)]  # .5 ties
    checked = 0
    for h, w in sizes:
        if max(h, w) / min(h, w) > 200:
            continue
        th, tw, _ = transformers_video_size(h, w, 2)
        got = smart_resize(h, w, min_pixels=images.VIDEO_MIN_PIXELS, max_pixels=images.VIDEO_MAX_PIXELS)
        assert got == (th, tw), (h, w)
        checked += 1
    assert checked > 3500


def test_model_sizes_videos_with_the_video_limits(tiny_gguf, tmp_path):
    """The public path (Model.video_features) sizes frames by the video limits, not the image
    ones: 56x84 frames are left alone as images, but become 420x616 (15x22 tokens) in a video."""
    from pyllama_ernie import Model
    from pyllama_ernie.convert.synthetic import write_tiny_mmproj

    mmproj = write_tiny_mmproj(tmp_path / "mmproj.gguf", n_embd_text=64)
    frames = [smooth_rgb(56, 84, seed=k) for k in range(3)]
    th, tw, n = transformers_video_size(56, 84, len(frames))
    with Model(tiny_gguf("ernie4_5-vl-moe"), mmproj_path=mmproj, n_ctx=256) as m:
        image = m.image_features(frames[0])
        video = m.video_features(frames)
    assert (image.grid_h, image.grid_w) == (56 // 28, 84 // 28)
    assert (video.grid_h, video.grid_w, video.n_frames) == (th // 28, tw // 28, n // 2)
