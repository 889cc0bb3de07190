"""ERNIE 4.5 VL vision tower + resampler -> a llama.cpp "clip" mmproj file (projector ``ernie4_5vl``).

The language model goes to its own file (:mod:`.ernie4_5_vl`); this module writes the image
encoder that our patched llama.cpp's mtmd reads beside it. The file has
``general.architecture = "clip"`` and ``general.type = "mmproj"``, and these keys:

==========================================  ===============================================
``clip.projector_type``                     ``"ernie4_5vl"``
``clip.has_vision_encoder``                 true
``clip.vision.image_size``                  560 (dynamic resolution; Qwen2-VL's convention)
``clip.vision.patch_size``                  14
``clip.vision.embedding_length``            ViT width (1280)
``clip.vision.feed_forward_length``         ViT MLP width (5120)
``clip.vision.block_count``                 ViT depth (32)
``clip.vision.attention.head_count``        ViT heads (16)
``clip.vision.attention.layer_norm_epsilon`` the vision ``rms_norm_eps`` (1e-6), used by the
                                            ViT's and the resampler's LayerNorms
``clip.vision.projection_dim``              the text model's hidden size
``clip.vision.spatial_merge_size``          2
``clip.vision.image_mean`` / ``image_std``  3 floats each (``preprocessor_config.json``)
``clip.vision.image_min_pixels`` / ``max``  smart_resize's pixel bounds (same file)
``clip.vision.video_min_pixels`` / ``max``  the same for video frames (``video_preprocessor_config.json``)
==========================================  ===============================================

``clip.use_gelu`` / ``clip.use_silu`` are not written: without them llama.cpp's loader takes
quick-GELU, which is the ViT MLP's activation. The resampler's ``after_norm`` eps is not a key:
the C side uses the text model's 1e-5, so other values are refused here.

Tensors (shapes in numpy/PyTorch order, i.e. as stored in the checkpoint; h = ViT width,
S = 4h the merged width, E = text hidden):

* ``v.patch_embd.weight`` [h, 3, 14, 14]: the patch Linear [h, 588] viewed as a conv kernel
  (the processor flattens a patch as (channel, row, col)); F32 for ``f32``, else F16
  (ggml's im2col takes the kernel's type);
* ``v.blk.{i}.``: ``ln1`` (norm1), ``attn_qkv`` (the fused qkv [3h, h], rows q; k; v, as
  stored), ``attn_out`` (attn.proj), ``ln2`` (norm2), ``ffn_up`` (mlp.fc1), ``ffn_down``
  (mlp.fc2), each ``.weight`` and ``.bias``;
* ``v.post_ln.{weight,bias}``: the ViT's final LayerNorm ``ln``;
* the resampler: ``mm.0`` / ``mm.1`` / ``mm.2`` spatial fc1 [S, S], fc2 [S, S], LayerNorm;
  ``mm.3.weight`` the temporal fc1, whose torch weight W [S, 2S] is stored as (2, S, S)
  with ``[k] = W[:, k S:(k + 1) S]`` (k = 0 applies to the first, even frame of a pair,
  k = 1 to the second; an image feeds both the same features, which is the reference's
  concatenation [x, x]); ``mm.3.bias``; ``mm.4`` temporal fc2 [S, S]; ``mm.5`` temporal
  LayerNorm; ``mm.6`` the ``mlp`` Linear [E, S]; ``mm.7.weight`` ``after_norm`` (RMSNorm).

Norms and biases are F32; matrices take the output type (Q8_0 only where a row is a multiple
of 32 long, else F16, as for the language model).

Checkpoint names. Baidu's Hub layout (``vision_model.*``, ``model.resampler_model.*`` with
``spatial_linear.{0,2,3}`` / ``temporal_linear.{0,2,3}``), transformers' ``save_pretrained``
(the same names with ``model.vision_model.*``) and transformers' module names
(``model.vision_tower.*``, ``spatial_linear.{fc1,fc2,ln}``) are all read; error messages
use the Hub's names.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from .ernie4_5 import TensorSource, choose_qtype
from .errors import ConversionError
from .hfconfig import TextConfig, VisionConfig
from .writer import OUTTYPES, Q, TensorSpec

__all__ = ["ARCH_CLIP", "IMAGE_SIZE", "PROJECTOR_TYPE", "TEXT_RMS_EPS", "Preprocessor", "add_hparams",
           "canonical_name", "check_supported", "has_vision_tensors", "load_preprocessor", "parse_preprocessor",
           "tensor_specs"]

ARCH_CLIP = "clip"
PROJECTOR_TYPE = "ernie4_5vl"
#: clip.vision.image_size: the models take any size; 560 as llama.cpp writes for Qwen2-VL's same ViT
IMAGE_SIZE = 560
#: the resampler's after_norm eps the C side uses (the text model's)
TEXT_RMS_EPS = 1e-5

# transformers' Ernie4_5_VLMoeImageProcessor defaults
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 6177
# the keys patch 0014 reads (gguf-py has no constants for them)
KEY_VIDEO_MIN_PIXELS = "clip.vision.video_min_pixels"
KEY_VIDEO_MAX_PIXELS = "clip.vision.video_max_pixels"
# transformers' Ernie4_5_VLMoeVideoProcessor.size (shortest_edge, longest_edge)
DEFAULT_VIDEO_MIN_PIXELS = 299 * 28 * 28
DEFAULT_VIDEO_MAX_PIXELS = 1196 * 28 * 28
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# -- preprocessing ---------------------------------------------------------------------------------

@dataclass
class Preprocessor:
    """What the image preprocessing needs from the checkpoint's processor config."""

    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    source: str | None = None  # the file the values came from (None: the defaults)
    # the video processor's own bounds (the reference sizes video frames with these, not the image ones)
    video_min_pixels: int = DEFAULT_VIDEO_MIN_PIXELS
    video_max_pixels: int = DEFAULT_VIDEO_MAX_PIXELS
    video_source: str | None = None


def _three(val: Any, key: str, where: str) -> tuple[float, float, float]:
    if isinstance(val, (int, float)) and not isinstance(val, bool):
        val = [val] * 3
    if not (isinstance(val, list) and len(val) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in val)):
        raise ConversionError(f"{where}: {key!r} should be 3 numbers (one per RGB channel), not {val!r}.")
    return float(val[0]), float(val[1]), float(val[2])


def _pixels(val: Any, key: str, where: str) -> int:
    if isinstance(val, float) and val.is_integer():
        val = int(val)
    if not isinstance(val, int) or isinstance(val, bool) or not 1 <= val < 2**32:
        raise ConversionError(f"{where}: {key!r} should be a positive number of pixels, not {val!r}.")
    return val


def parse_preprocessor(cfg: dict[str, Any], where: str = "preprocessor_config.json") -> Preprocessor:
    """The image processor's settings; absent ones get the reference defaults.

    Pixel bounds: ``size: {shortest_edge, longest_edge}`` (transformers' image processor, which
    reads only these), else top-level ``min_pixels`` / ``max_pixels`` (Baidu's remote-code
    processor), else ``size: {min_pixels, max_pixels}``.
    """
    if not isinstance(cfg, dict):
        raise ConversionError(f"{where} is not a JSON object.")
    pre = Preprocessor(source=where)
    if cfg.get("image_mean") is not None:
        pre.image_mean = _three(cfg["image_mean"], "image_mean", where)
    if cfg.get("image_std") is not None:
        pre.image_std = _three(cfg["image_std"], "image_std", where)
        if min(pre.image_std) <= 0:
            raise ConversionError(f"{where}: 'image_std' must be positive, not {list(pre.image_std)}.")
    pre.min_pixels, pre.max_pixels = _pixel_bounds(cfg, where, pre.min_pixels, pre.max_pixels)
    return pre


def _pixel_bounds(cfg: dict[str, Any], where: str, lo: int, hi: int) -> tuple[int, int]:
    """``size: {shortest_edge, longest_edge}``, else top-level ``min_pixels`` / ``max_pixels``, else
    ``size: {min_pixels, max_pixels}``; ``lo``/``hi`` where none is given."""
    size = cfg.get("size")
    size = size if isinstance(size, dict) else {}
    out = [lo, hi]
    for i, keys in enumerate(((("size", "shortest_edge"), ("", "min_pixels"), ("size", "min_pixels")),
                              (("size", "longest_edge"), ("", "max_pixels"), ("size", "max_pixels")))):
        for scope, key in keys:
            val = (size if scope else cfg).get(key)
            if val is not None:
                out[i] = _pixels(val, f"{scope}.{key}" if scope else key, where)
                break
    if out[0] > out[1]:
        raise ConversionError(f"{where}: min pixels ({out[0]}) exceed max pixels ({out[1]}).")
    return out[0], out[1]


def parse_video_preprocessor(cfg: dict[str, Any], pre: Preprocessor,
                             where: str = "video_preprocessor_config.json") -> Preprocessor:
    """The video processor's pixel bounds into ``pre`` (same keys as the image processor's)."""
    if not isinstance(cfg, dict):
        raise ConversionError(f"{where} is not a JSON object.")
    pre.video_min_pixels, pre.video_max_pixels = _pixel_bounds(cfg, where, pre.video_min_pixels,
                                                               pre.video_max_pixels)
    pre.video_source = where
    return pre


def _processor_config(hf_dir: Path, fname: str, sub: str) -> tuple[dict[str, Any], str] | None:
    """``fname``'s settings (``processor_config.json``: its ``sub`` section), or None."""
    path = hf_dir / fname
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"cannot read {path}: {e}") from e
    if fname == "processor_config.json":
        if not isinstance(cfg, dict) or not isinstance(cfg.get(sub), dict):
            return None  # a processor config without these settings
        return cfg[sub], f"{fname} ({sub})"
    return cfg, fname


def load_preprocessor(hf_dir: str | Path) -> Preprocessor:
    """Image settings from ``preprocessor_config.json``, else ``processor_config.json``'s
    ``image_processor``; video pixel bounds from ``video_preprocessor_config.json``, else its
    ``video_processor``; the reference defaults for what is missing."""
    hf_dir = Path(hf_dir)
    pre = Preprocessor()
    for fname in ("preprocessor_config.json", "processor_config.json"):
        got = _processor_config(hf_dir, fname, "image_processor")
        if got is not None:
            pre = parse_preprocessor(*got)
            break
    for fname in ("video_preprocessor_config.json", "processor_config.json"):
        got = _processor_config(hf_dir, fname, "video_processor")
        if got is not None:
            parse_video_preprocessor(got[0], pre, got[1])
            break
    return pre


# -- what the C side supports ----------------------------------------------------------------------

def check_supported(vision: VisionConfig, text_rms_eps: float) -> None:
    """Refuse configurations our llama.cpp's ``ernie4_5vl`` projector cannot run."""
    v = vision
    fixed = (("patch_size", v.patch_size, 14), ("spatial_merge_size", v.spatial_merge_size, 2),
             ("temporal merge size (temporal_merge_size / temporal_conv_size)", v.temporal_merge_size, 2),
             ("in_channels", v.in_channels, 3))
    for what, got, want in fixed:
        if got != want:
            raise ConversionError(
                f"config.json: vision {what} is {got}; the ernie4_5vl projector supports only {want}."
            )
    if v.hidden_act != "quick_gelu":
        raise ConversionError(
            f"config.json: the vision tower's hidden_act is {v.hidden_act!r}; the ernie4_5vl projector "
            "supports only quick_gelu (ERNIE 4.5 VL's)."
        )
    if not v.use_temporal_conv:
        raise ConversionError(
            "config.json sets use_temporal_conv=false (a resampler without temporal_linear); "
            "the ernie4_5vl projector needs it."
        )
    if v.hidden_size % v.n_heads or (v.hidden_size // v.n_heads) % 4:
        raise ConversionError(
            f"config.json: vision width {v.hidden_size} over {v.n_heads} heads does not give a head size that "
            "is a multiple of 4, which the vision tower's 2-D rope needs."
        )
    if not math.isclose(text_rms_eps, TEXT_RMS_EPS, rel_tol=1e-6):
        raise ConversionError(
            f"config.json: the text model's rms_norm_eps is {text_rms_eps:g}; the resampler's after_norm uses "
            f"that eps, and our llama.cpp's ernie4_5vl projector hard-codes it as {TEXT_RMS_EPS:g}."
        )


def add_hparams(gw: gguf.GGUFWriter, vision: VisionConfig, n_embd_text: int, pre: Preprocessor) -> None:
    """The clip.* keys (everything but general.*)."""
    gw.add_clip_projector_type(PROJECTOR_TYPE)
    gw.add_clip_has_vision_encoder(True)
    gw.add_vision_image_size(IMAGE_SIZE)
    gw.add_vision_patch_size(vision.patch_size)
    gw.add_vision_embedding_length(vision.hidden_size)
    gw.add_vision_feed_forward_length(vision.intermediate_size)
    gw.add_vision_block_count(vision.depth)
    gw.add_vision_head_count(vision.n_heads)
    gw.add_vision_attention_layernorm_eps(vision.layer_norm_eps)
    gw.add_vision_projection_dim(n_embd_text)
    gw.add_vision_spatial_merge_size(vision.spatial_merge_size)
    gw.add_vision_image_mean(list(pre.image_mean))
    gw.add_vision_image_std(list(pre.image_std))
    gw.add_vision_min_pixels(pre.min_pixels)
    gw.add_vision_max_pixels(pre.max_pixels)
    gw.add_uint32(KEY_VIDEO_MIN_PIXELS, pre.video_min_pixels)
    gw.add_uint32(KEY_VIDEO_MAX_PIXELS, pre.video_max_pixels)


# -- checkpoint names ------------------------------------------------------------------------------

# prefixes -> the Hub's (Baidu's) prefix
_PREFIXES = (
    ("model.vision_model.", "vision_model."),  # transformers' save_pretrained
    ("vision_model.", "vision_model."),  # Baidu's Hub checkpoints
    ("model.vision_tower.", "vision_model."),  # transformers' module names
    ("vision_tower.", "vision_model."),
    ("ernie.vision_model.", "vision_model."),
    ("model.resampler_model.", "model.resampler_model."),
    ("resampler_model.", "model.resampler_model."),
    ("ernie.resampler_model.", "model.resampler_model."),
)
_MLP_PART = re.compile(r"^(model\.resampler_model\.(?:spatial|temporal)_linear)\.(fc1|fc2|ln)\.")
_MLP_INDEX = {"fc1": "0", "fc2": "2", "ln": "3"}  # transformers' names -> Baidu's nn.Sequential indices
_SKIP = re.compile(r"\.inv_freq$")


def canonical_name(name: str) -> str | None:
    """A vision or resampler tensor's name in the Hub's spelling; None for other tensors."""
    for prefix, hub in _PREFIXES:
        if name.startswith(prefix):
            canon = hub + name[len(prefix):]
            return _MLP_PART.sub(lambda m: f"{m.group(1)}.{_MLP_INDEX[m.group(2)]}.", canon)
    return None


def has_vision_tensors(names: Iterable[str]) -> bool:
    return any(canonical_name(n) is not None for n in names)


# -- tensors ---------------------------------------------------------------------------------------

class _Builder:
    def __init__(self, vision: VisionConfig, n_embd_text: int, src: TensorSource, outtype: str):
        self.v, self.n_embd_text, self.src, self.outtype = vision, n_embd_text, src, outtype
        self.default_q = OUTTYPES[outtype][0]
        self.by_name: dict[str, str] = {}
        for real in src.names():
            canon = canonical_name(real)
            if canon is None:
                continue
            if canon in self.by_name:
                raise ConversionError(f"the checkpoint has both {self.by_name[canon]} and {real} (the same tensor).")
            self.by_name[canon] = real
        self.used: set[str] = set()
        self.specs: list[TensorSpec] = []

    def take(self, canon: str, *expect: tuple[int, ...]) -> str:
        real = self.by_name.get(canon)
        if real is None:
            raise ConversionError(
                f"the checkpoint has no tensor {canon} (vision tower / resampler), which config.json implies."
            )
        shape = tuple(self.src.shape(real))
        if shape not in expect:
            raise ConversionError(f"tensor {real} has shape {list(shape)}, but config.json implies {list(expect[0])}.")
        self.used.add(canon)
        return real

    def add(self, gname: str, shape: tuple[int, ...], blocks: Callable[[], Iterable[np.ndarray]],
            qtype: Q | None = None) -> None:
        self.specs.append(TensorSpec(gname, shape, qtype or choose_qtype(gname, shape, self.default_q), blocks))

    def direct(self, gname: str, canon: str, expect: tuple[int, ...]) -> None:
        real = self.take(canon, expect)
        self.add(gname, expect, lambda: self.src.iter_rows(real))

    def linear(self, gname: str, canon: str, n_out: int, n_in: int) -> None:
        """``gname.weight`` [n_out, n_in] and ``gname.bias`` [n_out] from ``canon.weight`` / ``.bias``."""
        self.direct(gname + ".weight", canon + ".weight", (n_out, n_in))
        self.direct(gname + ".bias", canon + ".bias", (n_out,))

    def layer_norm(self, gname: str, canon: str, n: int) -> None:
        self.direct(gname + ".weight", canon + ".weight", (n,))
        self.direct(gname + ".bias", canon + ".bias", (n,))

    def patch_embd(self) -> None:
        v = self.v
        h, c, p = v.hidden_size, v.in_channels, v.patch_size
        # a Linear [h, c p p] (the Hub's) or the same as a conv kernel [h, c, p, p]
        real = self.take("vision_model.patch_embed.proj.weight", (h, c * p * p), (h, c, p, p))
        kernel = (h, c, p, p)
        qtype = Q.F32 if self.outtype == "f32" else Q.F16

        def blocks() -> Iterator[np.ndarray]:
            for b in self.src.iter_rows(real):
                yield b.reshape(-1, c, p, p)

        self.add("v.patch_embd.weight", kernel, blocks, qtype)

    def temporal_fc1(self, canon: str, S: int) -> None:
        """W [S, 2S] -> (2, S, S), [k] = W[:, k S:(k + 1) S] (read twice, one half per pass)."""
        real = self.take(canon, (S, 2 * S))

        def blocks() -> Iterator[np.ndarray]:
            for k in range(2):
                for b in self.src.iter_rows(real):
                    yield b[:, k * S:(k + 1) * S]

        self.add("mm.3.weight", (2, S, S), blocks)

    def build(self) -> list[TensorSpec]:
        v = self.v
        h, ff = v.hidden_size, v.intermediate_size
        S = h * v.spatial_merge_size ** 2
        E = self.n_embd_text
        vm, rm = "vision_model.", "model.resampler_model."

        self.patch_embd()
        for i in range(v.depth):
            p, b = f"{vm}blocks.{i}.", f"v.blk.{i}."
            self.layer_norm(b + "ln1", p + "norm1", h)
            self.linear(b + "attn_qkv", p + "attn.qkv", 3 * h, h)
            self.linear(b + "attn_out", p + "attn.proj", h, h)
            self.layer_norm(b + "ln2", p + "norm2", h)
            self.linear(b + "ffn_up", p + "mlp.fc1", ff, h)
            self.linear(b + "ffn_down", p + "mlp.fc2", h, ff)
        self.layer_norm("v.post_ln", vm + "ln", h)

        self.linear("mm.0", rm + "spatial_linear.0", S, S)
        self.linear("mm.1", rm + "spatial_linear.2", S, S)
        self.layer_norm("mm.2", rm + "spatial_linear.3", S)
        self.temporal_fc1(rm + "temporal_linear.0.weight", S)
        self.direct("mm.3.bias", rm + "temporal_linear.0.bias", (S,))
        self.linear("mm.4", rm + "temporal_linear.2", S, S)
        self.layer_norm("mm.5", rm + "temporal_linear.3", S)
        self.linear("mm.6", rm + "mlp", E, S)
        self.direct("mm.7.weight", rm + "after_norm.weight", (E,))

        unknown = sorted(real for canon, real in self.by_name.items()
                         if canon not in self.used and not _SKIP.search(canon))
        if unknown:
            more = f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""
            raise ConversionError(
                f"the checkpoint has vision tensors this converter does not know: {', '.join(unknown[:8])}{more} "
                f"(does config.json's vision_config match the weights?)."
            )
        return self.specs


def tensor_specs(vision: VisionConfig, text: TextConfig | int, src: TensorSource, outtype: str) -> list[TensorSpec]:
    """Every mmproj tensor (validated against the config), in writing order.

    ``text`` is the language model's config (or just its hidden size).
    """
    n_embd_text = text if isinstance(text, int) else text.hidden_size
    return _Builder(vision, n_embd_text, src, outtype).build()
