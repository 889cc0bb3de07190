"""Turning user images into exactly the pixels ERNIE 4.5 VL's reference processor uses.

The reference is transformers' ``Ernie4_5_VLMoeImageProcessorPil`` (the PIL/NumPy
backend of the ERNIE-4.5-VL image processor). For an image it does:

1. convert to RGB (``transformers.image_transforms.convert_to_rgb``): a PIL image
   whose bands include ``A`` or whose ``info`` carries a ``transparency`` key is
   converted to RGBA and alpha-composited onto opaque white (``Image.alpha_composite``),
   any other PIL image is ``image.convert("RGB")``; a NumPy ``HxWx4`` array is blended
   onto white in float64 and rounded (``np.round``); ``HxWx1`` is repeated to 3 channels;
2. :func:`smart_resize` the size to multiples of ``factor`` (28) inside
   ``[min_pixels, max_pixels]`` and resize the uint8 image with ``PIL.Image.resize(...,
   BICUBIC)``;
3. rescale by ``1/255`` (in float64, then cast to float32) and normalize with the
   OpenAI CLIP mean/std in float32;
4. cut it into 14x14 patches, merge-block-major (see :func:`to_patches`).

:func:`load_image` does step 1 with the very same Pillow calls, :func:`resize_for_model`
step 2, :func:`normalize` step 3 and :func:`to_patches` step 4, so that
``to_patches(normalize(resize_for_model(load_image(x), ...)))`` equals the reference's
``pixel_values`` bit for bit (tests/unit/test_images.py checks it).

Where this module deliberately differs from the reference:

* **EXIF orientation.** The reference applies ``ImageOps.exif_transpose`` only when it
  is given a path string (``transformers.image_utils.load_image``); a ``PIL.Image``
  passed to it is used as stored, so a phone photo with orientation 6 reaches the model
  on its side. We apply ``exif_transpose`` to every decoded file and every PIL image,
  because users expect the photo upright: for a PIL image ours equals the reference's
  output for ``ImageOps.exif_transpose(image)`` (and for an image without an orientation
  tag, the reference's output for ``image`` itself).
* **Transparency in files.** Given a path string, the reference's ``load_image`` calls
  ``image.convert("RGB")``, which drops alpha (transparent pixels get whatever colour
  they store, often black) before its white compositing can see it. We decode files and
  bytes to a PIL image and convert that like the reference converts a PIL image
  (composited onto white), so a file gives the same pixels as the same image opened with
  Pillow. For files without transparency both routes agree.
* **Path strings only.** The reference also takes URLs and base64 strings; a ``str``
  here is always a filesystem path.
* **Arrays are channels-last.** The reference guesses the channel axis of an array
  (an ``HxWx3`` array with ``H`` in ``(1, 3, 4)`` is taken as channels-first); here an
  array is always ``HxW``, ``HxWx1``, ``HxWx3`` or ``HxWx4``. A 2-D array (which the
  reference refuses) is a grayscale image.
* **Video.** The reference video processor (``Ernie4_5_VLMoeVideoProcessor``) draws a
  ``time: hh:mm:ss.ss`` timestamp onto each frame when ``draw_on_frames`` is set (its
  default) and resizes with torchvision's antialiased bicubic on tensors. :func:`video_frames`
  draws nothing and resizes each frame with PIL bicubic exactly as images are resized; like
  the reference it computes the size once from the first frame and repeats the last frame
  when the count is odd (``temporal_patch_size`` is 2).

Decompression bombs: files and bytes are opened with Pillow's own guard. An image with
more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (89,478,485 by default, about 9459x9459)
raises :class:`ImageError` from its header alone, before any pixel memory is allocated
(Pillow only warns up to twice that limit; here the warning is an error too). Set
``PIL.Image.MAX_IMAGE_PIXELS`` to change the limit, or to ``None`` to remove it. PIL
images and arrays are already in memory and are not checked.

Pillow is imported lazily; it is needed for everything except :func:`smart_resize`,
:func:`normalize` and :func:`to_patches` (a dependency of the package).
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from .errors import ImageError  # defined with the other errors; raised here

if TYPE_CHECKING:  # pragma: no cover
    import PIL.Image

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "FACTOR",
    "MAX_ASPECT_RATIO",
    "MAX_PIXELS",
    "MIN_PIXELS",
    "ImageError",
    "ImageInput",
    "load_image",
    "normalize",
    "resize_for_model",
    "smart_resize",
    "to_patches",
    "video_frames",
]

ImageInput = Union[str, "os.PathLike[Any]", bytes, bytearray, memoryview, "PIL.Image.Image", np.ndarray]
"""Anything :func:`load_image` accepts: a path, encoded file bytes, a PIL image or an array."""

#: OpenAI CLIP normalization (the reference's ``image_mean`` / ``image_std``).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
#: patch_size (14) * merge_size (2): resized sides are multiples of this.
FACTOR = 28
#: The reference image processor's defaults (``size.shortest_edge`` / ``size.longest_edge``).
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 6177
#: ``max(h, w) / min(h, w)`` above this is refused, as the reference refuses it.
MAX_ASPECT_RATIO = 200
#: The reference video processor's defaults: video frames have their own pixel limits.
VIDEO_MIN_PIXELS = 299 * 28 * 28
VIDEO_MAX_PIXELS = 1196 * 28 * 28

_RESCALE = 1 / 255  # the reference's rescale_factor (multiplied in float64)


def _pil() -> Any:
    try:
        import PIL.Image
        import PIL.ImageOps
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "reading images needs Pillow: pip install 'pillow>=10'"
        ) from e
    return PIL


def _describe(image: object) -> str:
    """A short name of an input for error messages."""
    if isinstance(image, (str, os.PathLike)):
        return repr(os.fsdecode(image))
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"<{memoryview(image).nbytes} bytes>"
    if isinstance(image, np.ndarray):
        return f"<array shape={image.shape} dtype={image.dtype}>"
    mode, size = getattr(image, "mode", None), getattr(image, "size", None)
    if mode is not None and size is not None:
        return f"<PIL image mode={mode} size={size[0]}x{size[1]}>"
    return f"<{type(image).__name__}>"


def _to_rgb_pil(im: PIL.Image.Image) -> np.ndarray:
    """transformers' ``convert_to_rgb`` for a PIL image: composite alpha onto white."""
    PIL = _pil()
    has_alpha = "A" in im.getbands() or im.info.get("transparency") is not None
    if has_alpha:
        rgba = im.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = PIL.Image.alpha_composite(background, rgba).convert("RGB")
    else:
        rgb = im.convert("RGB")
    return np.array(rgb)


def _from_array(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise ImageError(
            f"image {what}: arrays must be uint8 (0..255) HxW, HxWx1, HxWx3 (RGB) or HxWx4 (RGBA); "
            f"got dtype {arr.dtype}"
        )
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ImageError(
            f"image {what}: arrays must be HxW, HxWx1, HxWx3 (RGB) or HxWx4 (RGBA), channels last; "
            f"got shape {arr.shape}"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"image {what}: the image is empty ({arr.shape[0]}x{arr.shape[1]} pixels)")
    if arr.ndim == 2:
        return np.repeat(arr[:, :, None], 3, axis=2)
    if arr.shape[2] == 4:
        # transformers' convert_to_rgb for a uint8 RGBA array, to the last rounding
        alpha = arr[..., 3:4] / 255
        composite = alpha * arr[..., :3] + (1 - alpha) * 255
        return np.round(composite).astype(np.uint8)
    return np.ascontiguousarray(arr)


def _open_file(image: str | os.PathLike[Any] | bytes | bytearray | memoryview, what: str) -> PIL.Image.Image:
    PIL = _pil()
    Image = PIL.Image
    if isinstance(image, (bytes, bytearray, memoryview)):
        if memoryview(image).nbytes == 0:
            raise ImageError(f"image {what}: no data (zero bytes)")
        source: Any = io.BytesIO(image)
    else:
        source = os.fspath(image)
        if os.path.isdir(source):
            raise ImageError(f"image {what}: is a directory, not an image file")
        if not os.path.exists(source):
            raise ImageError(f"image {what}: no such file")
        if os.path.getsize(source) == 0:
            raise ImageError(f"image {what}: the file is empty (zero bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                im.load()
                return PIL.ImageOps.exif_transpose(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(
            f"image {what}: refused as a possible decompression bomb, its header claims more than "
            f"PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS} pixels ({e}); raise that limit "
            "if the image is genuine"
        ) from e
    except Image.UnidentifiedImageError as e:
        raise ImageError(f"image {what}: not an image file Pillow can read") from e
    except MemoryError:
        raise
    except Exception as e:  # OSError (truncated), SyntaxError (broken PNG), ValueError, ...
        raise ImageError(f"image {what}: could not be decoded: {type(e).__name__}: {e}") from e


def load_image(image: ImageInput) -> np.ndarray:
    """Load ``image`` as an ``HxWx3`` uint8 C-contiguous RGB array, as the reference converts it.

    * ``str`` / ``os.PathLike``: a file path; ``bytes``/``bytearray``/``memoryview``: the
      encoded file. Decoded with Pillow (``Image.open`` + ``load``; the first frame of an
      animation), EXIF orientation applied (``ImageOps.exif_transpose``), then converted
      like a PIL image. The decompression-bomb limit applies (see the module docstring).
    * ``PIL.Image.Image``: EXIF orientation applied, then converted to RGB as transformers'
      ``convert_to_rgb`` converts it: modes with an alpha band (RGBA, LA, PA) and images with
      a ``transparency`` entry (P/L/RGB with tRNS, GIF) are composited onto white; others
      (L, 1, P, CMYK, YCbCr, LAB, HSV, I, I;16, F, RGBa) use ``image.convert("RGB")``. A mode
      Pillow cannot convert (e.g. ``La``) raises :class:`ImageError`, as the reference raises.
    * ``np.ndarray`` (uint8, channels last): ``HxWx3`` as is (copied only when not
      C-contiguous), ``HxW``/``HxWx1`` grayscale repeated to RGB, ``HxWx4`` RGBA blended onto
      white exactly as the reference blends an RGBA array (float64, ``np.round``; with
      Pillow 13 this gives the same levels as Pillow's ``alpha_composite`` used for PIL
      images, for all 256x256 value/alpha pairs).

    Raises :class:`ImageError` (a ``ValueError``) for unreadable, corrupt, truncated, empty
    or oversized files, zero-size images and arrays of another dtype or shape;
    ``TypeError`` for inputs of another type.
    """
    what = _describe(image)
    if isinstance(image, np.ndarray):
        return _from_array(image, what)
    if isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
        im = _open_file(image, what)
    else:
        PIL = _pil()
        if not isinstance(image, PIL.Image.Image):
            raise TypeError(
                "image must be a path, encoded image bytes, a PIL.Image.Image or a uint8 numpy array; "
                f"got {type(image).__name__}"
            )
        try:
            im = PIL.ImageOps.exif_transpose(image)
        except MemoryError:
            raise
        except Exception as e:
            raise ImageError(f"image {what}: could not be read: {type(e).__name__}: {e}") from e
    if im.width == 0 or im.height == 0:
        raise ImageError(f"image {what}: the image is empty ({im.width}x{im.height} pixels)")
    try:
        rgb = _to_rgb_pil(im)
    except MemoryError:
        raise
    except Exception as e:
        raise ImageError(
            f"image {what}: could not be converted to RGB: {type(e).__name__}: {e}"
        ) from e
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:  # pragma: no cover - Pillow contract
        raise ImageError(f"image {what}: RGB conversion gave an array of shape {rgb.shape}, dtype {rgb.dtype}")
    return np.ascontiguousarray(rgb)


def smart_resize(
    height: int,
    width: int,
    factor: int = FACTOR,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> tuple[int, int]:
    """The reference's ``smart_resize``: the ``(height, width)`` the model sees.

    Both sides become multiples of ``factor`` (Python ``round``, half to even: 70 -> 56),
    keeping the aspect ratio as well as possible; if the area exceeds ``max_pixels`` the
    sides are floored after scaling down by ``sqrt(h*w/max_pixels)``, if it is below
    ``min_pixels`` they are ceiled after scaling up by ``sqrt(min_pixels/(h*w))``.

    Raises :class:`ImageError` when a side is below 1 or the aspect ratio exceeds
    :data:`MAX_ASPECT_RATIO` (200), which the reference refuses too.
    """
    if height < 1 or width < 1:
        raise ImageError(f"image size {height}x{width}: both sides must be at least 1 pixel")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageError(
            f"image size {height}x{width}: aspect ratio {ratio:.1f} exceeds the model's limit of "
            f"{MAX_ASPECT_RATIO}:1 (the longer side may be at most {MAX_ASPECT_RATIO} times the shorter)"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _check_rgb(rgb: np.ndarray) -> None:
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        desc = _describe(rgb)
        raise ValueError(f"expected an HxWx3 uint8 RGB array (see load_image); got {desc}")


def resize_for_model(
    rgb: np.ndarray,
    *,
    min_pixels: int,
    max_pixels: int,
    factor: int = FACTOR,
) -> np.ndarray:
    """Resize an ``HxWx3`` uint8 RGB array to :func:`smart_resize`'s size as the reference does.

    The reference resizes with ``PIL.Image.fromarray(rgb).resize((w, h), resample=BICUBIC)``
    on the uint8 image; this makes the same call, so the pixels are identical. When the size
    already matches, ``rgb`` itself is returned (PIL's resize would return a copy of the same
    pixels). Raises :class:`ImageError` for an aspect ratio above 200.
    """
    _check_rgb(rgb)
    height, width = rgb.shape[:2]
    new_h, new_w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    if (new_h, new_w) == (height, width):
        return rgb
    return _resize_to(rgb, new_h, new_w)


def video_frames(
    frames: Sequence[ImageInput],
    *,
    min_pixels: int,
    max_pixels: int,
    factor: int = FACTOR,
) -> list[np.ndarray]:
    """Load video frames, resize them to one model size and pad them to an even count.

    Every frame is loaded with :func:`load_image` and must have the same size as the first
    (else :class:`ImageError`); the target size is computed once from the first frame (as the
    reference video processor does) and each frame is resized like :func:`resize_for_model`.
    An odd count gets a copy of the last frame appended (the reference does this because the
    temporal patch size is 2). No timestamps are drawn on the frames (the reference draws them
    when ``draw_on_frames`` is set). Note the reference video processor's own default sizes
    (``min_pixels = 299*28*28``, ``max_pixels = 1196*28*28``) differ from the image
    processor's; pass the ones the model's preprocessor config gives for video.

    Raises :class:`ImageError` for an empty sequence.
    """
    if isinstance(frames, (str, bytes, bytearray, memoryview, np.ndarray)) or not isinstance(frames, Sequence):
        raise TypeError("frames must be a sequence (list or tuple) of images")
    if len(frames) == 0:
        raise ImageError("a video needs at least one frame; got none")
    loaded = [load_image(frame) for frame in frames]
    height, width = loaded[0].shape[:2]
    for i, frame in enumerate(loaded):
        if frame.shape[:2] != (height, width):
            raise ImageError(
                f"video frame {i} ({_describe(frames[i])}) is {frame.shape[0]}x{frame.shape[1]} "
                f"(HxW) but frame 0 is {height}x{width}; all frames of a video must have one size"
            )
    new_h, new_w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    out = []
    for frame in loaded:
        if (new_h, new_w) == (height, width):
            out.append(frame)
        else:
            out.append(_resize_to(frame, new_h, new_w))
    if len(out) % 2:
        out.append(out[-1].copy())
    return out


def _resize_to(rgb: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """The reference's resize call: PIL bicubic on the uint8 image, no reducing gap."""
    Image = _pil().Image
    resized = Image.fromarray(np.ascontiguousarray(rgb)).resize((new_w, new_h), resample=Image.Resampling.BICUBIC, reducing_gap=None)
    return np.ascontiguousarray(np.asarray(resized, dtype=np.uint8))


def normalize(
    rgb_uint8: np.ndarray,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> np.ndarray:
    """Rescale by 1/255 and normalize, exactly as the reference does: ``HxWx3`` float32.

    ``x = (rgb.astype(float64) * (1/255)).astype(float32)``, then ``(x - mean) / std`` with
    ``mean``/``std`` as float32, in float32 (the reference's ``rescale`` and ``normalize``).
    """
    _check_rgb(rgb_uint8)
    x = (rgb_uint8.astype(np.float64) * _RESCALE).astype(np.float32)
    mean_a = np.asarray(mean, dtype=np.float32)
    std_a = np.asarray(std, dtype=np.float32)
    if mean_a.shape != (3,) or std_a.shape != (3,):
        raise ValueError("mean and std must have 3 values (R, G, B)")
    return (x - mean_a) / std_a


def to_patches(
    pixels_f32_hwc: np.ndarray,
    patch: int = 14,
    merge: int = 2,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Cut ``HxWxC`` pixels into the reference's ``pixel_values`` layout.

    Returns ``(patches, (grid_h, grid_w))`` with ``grid_h = H/patch``, ``grid_w = W/patch``
    and ``patches`` float32 ``[grid_h*grid_w, C*patch*patch]``: patches in merge-block-major
    order (``merge x merge`` blocks row-major, patches row-major inside a block), each
    flattened channel-first (``C, patch_row, patch_col``). ``H`` and ``W`` must be multiples
    of ``patch * merge``.
    """
    x = np.asarray(pixels_f32_hwc, dtype=np.float32)
    if x.ndim != 3:
        raise ValueError(f"expected HxWxC pixels; got shape {x.shape}")
    height, width, channels = x.shape
    unit = patch * merge
    if height == 0 or width == 0 or height % unit or width % unit:
        raise ValueError(f"height and width must be positive multiples of {unit}; got {height}x{width}")
    grid_h, grid_w = height // patch, width // patch
    p = x.transpose(2, 0, 1).reshape(channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    p = p.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh, gw, mh, mw, C, ph, pw)
    return np.ascontiguousarray(p.reshape(grid_h * grid_w, channels * patch * patch)), (grid_h, grid_w)
