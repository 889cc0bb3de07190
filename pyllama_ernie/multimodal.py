"""Prompts with images and videos: markers in the text become ERNIE-4.5-VL's image runs.

``IMAGE_MARKER`` in a prompt stands for one whole image run,
``<|IMAGE_START|>`` + the image's tokens + ``<|IMAGE_END|>``, and
``VIDEO_MARKER`` for ``<|VIDEO_START|>`` + the tokens of every frame pair +
``<|VIDEO_END|>``. The prompt is tokenized as a whole with each marker
replaced by its start and end tokens (so the text around an image tokenizes
exactly as the reference processor tokenizes it), then the encoded features
are put between them with the reference's 3-D positions
(:mod:`pyllama_ernie.mrope`).

This floor takes a :class:`~pyllama_ernie.vocab.Vocab` and a
:class:`~pyllama_ernie.vision.Projector`; it knows nothing of the Model above it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Callable

from .errors import PromptTooLongError, TokenizeError
from .mrope import image_embeddings
from .values import IMAGE_MARKER, VIDEO_MARKER, Embeddings, Features, Media
from .vision import Projector
from .vocab import Vocab

# IMAGE_MARKER and VIDEO_MARKER are defined in .values; they stay importable from here as before.
__all__ = ["IMAGE_MARKER", "VIDEO_MARKER", "multimodal_prompt"]

_SPECIAL = {
    "image": ("<|IMAGE_START|>", "<|IMAGE_END|>"),
    "video": ("<|VIDEO_START|>", "<|VIDEO_END|>"),
}
_MARKERS = re.compile(f"({re.escape(IMAGE_MARKER)}|{re.escape(VIDEO_MARKER)})")


def multimodal_prompt(vocab: Vocab, projector: Projector, prompt: str, images: Sequence[Any],
                      videos: Sequence[Any], n_ctx: int, add_special: bool = True,
                      encode: Callable[[Media], tuple[Features, bool]] | None = None,
                      ) -> tuple[list[int | Embeddings], int]:
    """Token ids and :class:`Embeddings` for ``prompt`` with its images and videos in place.

    Returns the prompt and how many images and videos went through the encoder
    (the others came from the projector's feature cache). Raises before any
    encoding when the markers and the media do not match or the prompt would
    not fit in ``n_ctx`` positions. ``encode`` runs ``projector.features`` (default:
    in this thread; the batching engine runs it in its own).
    """
    if not isinstance(prompt, str):
        raise TypeError("with images or videos, the prompt must be a str containing the markers")
    kinds = ["image" if m == IMAGE_MARKER else "video" for m in _MARKERS.findall(prompt)]
    n_img, n_vid = kinds.count("image"), kinds.count("video")
    if n_img != len(images) or n_vid != len(videos):
        raise ValueError(f"the prompt has {n_img} image marker(s) and {n_vid} video marker(s) "
                         f"for {len(images)} image(s) and {len(videos)} video(s); put "
                         "pyllama_ernie.IMAGE_MARKER / VIDEO_MARKER where each one goes")

    # load and size everything first: errors (and the length check) come before any encoding
    it_img, it_vid = iter(images), iter(videos)
    media = [projector.prepare_image(next(it_img)) if k == "image" else projector.prepare_video(next(it_vid))
             for k in kinds]
    ids = {k: tuple(vocab.special_id(t) for t in pair) for k, pair in _SPECIAL.items() if k in kinds}
    text = _MARKERS.sub(lambda m: "".join(_SPECIAL["image" if m.group(0) == IMAGE_MARKER else "video"]), prompt)
    tokens = vocab.tokenize(text, add_special=add_special)
    slots = _media_slots(tokens, media, ids)
    n_positions = len(tokens) + sum(m.n_tokens for m in media)
    if n_positions > n_ctx:
        raise PromptTooLongError(
            f"the prompt with its images needs {n_positions} positions; the context holds {n_ctx} "
            "(use a larger n_ctx, smaller images, or a lower max_pixels)", llama_log="")

    start_end = {k: vocab.token_embeddings(list(v)) for k, v in ids.items()}
    out: list[int | Embeddings] = []
    pos = 0
    prev = 0
    n_encoded = 0
    for slot, m in zip(slots, media):
        out.extend(tokens[prev:slot])
        pos += slot - prev
        feats, encoded = projector.features(m) if encode is None else encode(m)
        n_encoded += encoded
        emb = image_embeddings(feats.data, feats.grid_h, feats.grid_w, pos,
                               start=start_end[m.kind][0], end=start_end[m.kind][1], n_frames=feats.n_frames)
        out.append(emb)
        pos = emb.next_pos
        prev = slot + 2
    out.extend(tokens[prev:])
    return out, n_encoded


def _media_slots(tokens: Sequence[int], media: Sequence[Media], ids: dict) -> list[int]:
    """Where each run goes: a start token directly followed by its end token, in order."""
    slots: list[int] = []
    j = 0
    for i in range(len(tokens) - 1):
        if j < len(media) and (tokens[i], tokens[i + 1]) == ids[media[j].kind]:
            slots.append(i)
            j += 1
    if len(slots) != len(media):
        raise TokenizeError("could not place every image in the tokenized prompt (does the text itself "
                            "contain <|IMAGE_START|><|IMAGE_END|> or the video equivalents?)", llama_log="")
    return slots
