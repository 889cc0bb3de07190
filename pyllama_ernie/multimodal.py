"""Prompts with images and videos: markers in the text become ERNIE-4.5-VL's image runs.

``IMAGE_MARKER`` in a prompt stands for one whole image run,
``<|IMAGE_START|>`` + the image's tokens + ``<|IMAGE_END|>``, and
``VIDEO_MARKER`` for ``<|VIDEO_START|>`` + the tokens of every frame pair +
``<|VIDEO_END|>``. The prompt is tokenized as a whole with each marker
replaced by its start and end tokens (so the text around an image tokenizes
exactly as the reference processor tokenizes it), then the encoded features
are put between them with the reference's 3-D positions
(:mod:`pyllama_ernie.mrope`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, List, Sequence, Tuple, Union

import numpy as np

from . import images as _images
from .context import Embeddings
from .errors import ImageError, PromptTooLongError, TokenizeError
from .mrope import image_embeddings

if TYPE_CHECKING:  # pragma: no cover
    from .model import Model
    from .vision import Features

__all__ = ["IMAGE_MARKER", "VIDEO_MARKER", "multimodal_prompt", "prepare_image", "prepare_video"]

#: where an image goes in a prompt (``Model.generate(f"{IMAGE_MARKER}What is this?", images=[...])``)
IMAGE_MARKER = "<__image__>"
#: where a video (a list of frames) goes in a prompt
VIDEO_MARKER = "<__video__>"

_SPECIAL = {
    "image": ("<|IMAGE_START|>", "<|IMAGE_END|>"),
    "video": ("<|VIDEO_START|>", "<|VIDEO_END|>"),
}


@dataclass
class _Media:
    """One image or video, resized for the projector, not yet encoded."""

    kind: str  # "image" or "video"
    frames: List[np.ndarray]
    grid_h: int
    grid_w: int

    @property
    def n_frames(self) -> int:  # temporal positions: frame pairs for a video
        return 1 if self.kind == "image" else len(self.frames) // 2

    @property
    def n_tokens(self) -> int:
        return self.grid_h * self.grid_w * self.n_frames


def prepare_image(model: "Model", image: Any) -> _Media:
    """Load and resize one image for ``model``'s projector (no encoding yet)."""
    info = model.projector.info
    rgb = _images.resize_for_model(_images.load_image(image), min_pixels=info.min_pixels,
                                   max_pixels=info.max_pixels, factor=info.factor)
    h, w = rgb.shape[:2]
    return _Media("image", [rgb], h // info.factor, w // info.factor)


def prepare_video(model: "Model", frames: Sequence[Any]) -> _Media:
    """Load and resize a video's frames (padded to an even count as the reference pads)."""
    if isinstance(frames, (str, bytes)) or not isinstance(frames, Sequence):
        raise ImageError("a video is a list of frames (paths, bytes, PIL images or arrays)")
    info = model.projector.info
    # the reference's video processor sizes frames with its own limits, not the image ones
    fr = _images.video_frames(frames, min_pixels=_images.VIDEO_MIN_PIXELS, max_pixels=_images.VIDEO_MAX_PIXELS,
                              factor=info.factor)
    h, w = fr[0].shape[:2]
    media = _Media("video", list(fr), h // info.factor, w // info.factor)
    if media.n_frames > max(media.grid_h, media.grid_w):
        # pair k sits at t = pos + k, the text after the video at pos + max(grid_h, grid_w):
        # with more pairs than that, later frames would come after the following text in
        # position order, which llama.cpp's causal mask cannot express as the reference does
        raise ImageError(
            f"a video of {media.n_frames} frame pairs at {w}x{h} ({media.grid_w}x{media.grid_h} tokens a frame) "
            "cannot be placed: use at most max(grid_h, grid_w) frame pairs, i.e. fewer frames or larger frames")
    return media


def _special_id(model: "Model", text: str) -> int:
    ids = model.tokenize(text, add_special=False, parse_special=True)
    if len(ids) != 1:
        raise TokenizeError(f"the model's vocabulary has no {text} token: it is not an ERNIE-4.5-VL model",
                            llama_log="")
    return ids[0]


def multimodal_prompt(model: "Model", prompt: str, images: Sequence[Any], videos: Sequence[Any],
                      n_ctx: int, add_special: bool = True) -> Tuple[List[Union[int, Embeddings]], int]:
    """Token ids and :class:`Embeddings` for ``prompt`` with its images and videos in place.

    Returns the prompt and how many images and videos went through the encoder
    (the others came from the model's feature cache). Raises before any
    encoding when the markers and the media do not match or the prompt would
    not fit in ``n_ctx`` positions.
    """
    if not isinstance(prompt, str):
        raise TypeError("with images or videos, the prompt must be a str containing the markers")
    if model.projector is None:
        raise ImageError("this model has no vision projector: load it with Model(..., mmproj_path=...)")
    pattern = re.compile(f"({re.escape(IMAGE_MARKER)}|{re.escape(VIDEO_MARKER)})")
    kinds = ["image" if m == IMAGE_MARKER else "video" for m in pattern.findall(prompt)]
    n_img, n_vid = kinds.count("image"), kinds.count("video")
    if n_img != len(images) or n_vid != len(videos):
        raise ValueError(f"the prompt has {n_img} image marker(s) and {n_vid} video marker(s) "
                         f"for {len(images)} image(s) and {len(videos)} video(s); put "
                         "pyllama_ernie.IMAGE_MARKER / VIDEO_MARKER where each one goes")

    # load and size everything first: errors (and the length check) come before any encoding
    it_img, it_vid = iter(images), iter(videos)
    media = [prepare_image(model, next(it_img)) if k == "image" else prepare_video(model, next(it_vid))
             for k in kinds]

    ids = {k: tuple(_special_id(model, t) for t in pair) for k, pair in _SPECIAL.items() if k in kinds}
    text = pattern.sub(lambda m: "".join(_SPECIAL["image" if m.group(0) == IMAGE_MARKER else "video"]), prompt)
    tokens = model.tokenize(text, add_special=add_special)

    # where each run goes: a start token directly followed by its end token, in order
    slots: List[int] = []
    j = 0
    for i in range(len(tokens) - 1):
        if j < len(media) and (tokens[i], tokens[i + 1]) == ids[media[j].kind]:
            slots.append(i)
            j += 1
    if len(slots) != len(media):
        raise TokenizeError("could not place every image in the tokenized prompt (does the text itself "
                            "contain <|IMAGE_START|><|IMAGE_END|> or the video equivalents?)", llama_log="")
    n_positions = len(tokens) + sum(m.n_tokens for m in media)
    if n_positions > n_ctx:
        raise PromptTooLongError(
            f"the prompt with its images needs {n_positions} positions; the context holds {n_ctx} "
            "(use a larger n_ctx, smaller images, or a lower max_pixels)", llama_log="")

    start_end = {k: model.token_embeddings(list(v)) for k, v in ids.items()}
    out: List[Union[int, Embeddings]] = []
    pos = 0
    prev = 0
    n_encoded = 0
    for slot, m in zip(slots, media):
        out.extend(tokens[prev:slot])
        pos += slot - prev
        feats, encoded = model._media_features(m)
        n_encoded += encoded
        emb = image_embeddings(feats.data, feats.grid_h, feats.grid_w, pos,
                               start=start_end[m.kind][0], end=start_end[m.kind][1], n_frames=feats.n_frames)
        out.append(emb)
        pos = emb.next_pos
        prev = slot + 2
    out.extend(tokens[prev:])
    return out, n_encoded


def media_key(media: _Media) -> bytes:
    """A content hash of prepared media (the resized pixels), for the model's feature cache."""
    import hashlib

    h = hashlib.blake2b(media.kind.encode(), digest_size=20)
    for f in media.frames:
        h.update(repr(f.shape).encode())
        h.update(np.ascontiguousarray(f).data)
    return h.digest()


def features_of(model: "Model", media: _Media) -> "Features":
    """Encode prepared media with ``model``'s projector."""
    proj = model.projector
    assert proj is not None
    return proj.encode(media.frames) if media.kind == "image" else proj.encode_video(media.frames)
