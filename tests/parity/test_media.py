"""ERNIE-4.5-VL vision: our mmproj (patched mtmd) and image/video prompts against transformers.

Error norm: max |ours - reference| / max |reference|, over every row and column
(image features: every token and channel; logits: every position, image
positions included, and the whole vocabulary). f32 GGUFs, f32 KV cache, flash
attention off. Bound 1e-4. What remains is ggml's quick-GELU, which looks its
result up in an F16 table (measured about 6e-5 on these models).

Images reach both sides as identical pixels: our preprocessing resizes with
PIL exactly as the reference's PIL image processor does (tests/unit/test_images.py),
and here the reference gets its pixel values from that processor.

Videos do not: transformers' video processor needs torchvision, which cannot be imported
beside the CPU torch here (HAZARDS.md item 7), so the reference's ``pixel_values_videos`` are
built with OUR preprocessing (``pyllama_ernie.images.video_frames`` with the video pixel limits,
then ``to_patches``, laid out as the processor's ``_preprocess`` lays them out). The video cases
check the encoder and the language model on identical pixels, not the video preprocessing; the
video sizing rule is checked against the rule as transformers writes it in tests/unit/test_images.py
(``test_video_size_matches_the_transformers_rule`` and the tests beside it).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("pyllama_ernie._lib", reason="pyllama_ernie is not built (pip install .)")

from pyllama_ernie import (
    IMAGE_MARKER,
    VIDEO_MARKER,
    Embeddings,
    ImageError,
    InvalidModelFileError,
    Model,
    ModelLoadError,
    PromptTooLongError,
)
from pyllama_ernie import images as imgs
from pyllama_ernie.convert import convert_mmproj
from pyllama_ernie.multimodal import multimodal_prompt

BOUND = 1e-4
EXACT = dict(kv_cache_type="f32", flash_attn=False)


def _rel(ours, ref):
    return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


def _rgb(h, w, seed):
    """A smooth random image (so that resizing is meaningful)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, h // 7), max(2, w // 7), 3), dtype=np.uint8)
    from PIL import Image

    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR))


def _processor(min_pixels=56 * 56, max_pixels=28 * 28 * 6177):
    from transformers.models.ernie4_5_vl_moe import Ernie4_5_VLMoeImageProcessorPil

    return Ernie4_5_VLMoeImageProcessorPil(size={"shortest_edge": min_pixels, "longest_edge": max_pixels})


def _ref_pixels(images, **size):
    """The reference processor's pixel_values and image_grid_thw for PIL versions of ``images``."""
    import torch
    from PIL import Image

    out = _processor(**size)(images=[Image.fromarray(i) for i in images], return_tensors="pt")
    return out["pixel_values"].to(torch.float32), out["image_grid_thw"]


def _ref_features(ref, images, **size):
    import torch

    pv, grid = _ref_pixels(images, **size)
    with torch.no_grad():
        out = ref.model.get_image_features(pv, grid, return_dict=True)
    return [f.double().numpy() for f in out.pooler_output], grid


@pytest.fixture(scope="module", params=["vl_a", "vl_b", "vl_h80"])  # vl_h80: vision head size 80
def enc_case(request, vl_gguf, vl_mmproj, vl_reference_model):
    name = request.param
    with Model(vl_gguf(name), mmproj_path=vl_mmproj(name), n_ctx=512, **EXACT) as m:
        yield name, m, vl_reference_model(name)


@pytest.mark.parametrize("h, w", [(56, 84), (84, 56), (112, 112), (70, 70), (41, 97)])
def test_encoder_matches_reference(enc_case, h, w):
    name, m, ref = enc_case
    image = _rgb(h, w, seed=h * 1000 + w)
    feats = m.image_features(image)
    (want,), grid = _ref_features(ref, [image])
    assert (feats.grid_h, feats.grid_w) == (int(grid[0, 1]) // 2, int(grid[0, 2]) // 2)
    assert feats.data.shape == want.shape
    err = _rel(feats.data, want)
    print(f"{name} {h}x{w}: grid {feats.grid_h}x{feats.grid_w}, rel err {err:.1e}")
    assert err < BOUND


def test_encoder_detects_a_transposed_image(enc_case):
    """The test can fail: the same pixels transposed give other features."""
    _, m, ref = enc_case
    image = _rgb(56, 84, seed=3)
    (want,), _ = _ref_features(ref, [image])
    got = m.image_features(np.ascontiguousarray(image.transpose(1, 0, 2))).data
    assert got.shape != want.shape or _rel(got, want) > 100 * BOUND


@pytest.fixture(scope="module")
def small_pixels_mmproj(vl_model_dir, tmp_path_factory):
    """vl_a's mmproj converted with min_pixels 28*28 and max_pixels 84*112 in preprocessor_config.json."""
    d = tmp_path_factory.mktemp("small_pixels") / "vl_a"
    shutil.copytree(vl_model_dir("vl_a"), d)
    (d / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 28 * 28,
                                                                     "longest_edge": 84 * 112}}))
    return convert_mmproj(d, d.parent / "mmproj-small.gguf", "f32")


@pytest.mark.parametrize("h, w, grid", [(28, 28, (1, 1)), (300, 200, (4, 2)), (200, 300, (2, 4))])
def test_encoder_min_and_max_pixels(vl_gguf, small_pixels_mmproj, vl_reference_model, h, w, grid):
    """A 28x28 image (one token) and images that hit max_pixels, with the checkpoint's own limits."""
    ref = vl_reference_model("vl_a")
    image = _rgb(h, w, seed=h + w)
    with Model(vl_gguf("vl_a"), mmproj_path=small_pixels_mmproj, n_ctx=256, **EXACT) as m:
        assert (m.projector.info.min_pixels, m.projector.info.max_pixels) == (784, 84 * 112)
        feats = m.image_features(image)
    (want,), g = _ref_features(ref, [image], min_pixels=784, max_pixels=84 * 112)
    assert (feats.grid_h, feats.grid_w) == grid == (int(g[0, 1]) // 2, int(g[0, 2]) // 2)
    assert _rel(feats.data, want) < BOUND


@pytest.fixture(scope="module")
def small_video_mmproj(vl_model_dir, tmp_path_factory):
    """vl_a's mmproj with its video limits from video_preprocessor_config.json: 28*28 .. 28*28*3, all
    below the image minimum (the image limits are the defaults)."""
    d = tmp_path_factory.mktemp("small_video") / "vl_a"
    shutil.copytree(vl_model_dir("vl_a"), d)
    (d / "video_preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 28 * 28,
                                                                           "longest_edge": 28 * 28 * 3}}))
    return convert_mmproj(d, d.parent / "mmproj-small-video.gguf", "f32")


@pytest.mark.parametrize("limits", ["image max below video min", "video max below image min"])
def test_video_frames_keep_the_video_limits(vl_gguf, small_pixels_mmproj, small_video_mmproj, vl_reference_model,
                                            reference_tokenizer_vl, limits):
    """Frames sized for video reach the encoder as sized (patch 0014: mtmd used to resize them again
    with the image limits), and the prompt matches the reference fed the same frames."""
    if limits == "image max below video min":
        mmproj, video_pixels, frames = small_pixels_mmproj, (299 * 28 * 28, 1196 * 28 * 28), (56, 84)
    else:
        mmproj, video_pixels, frames = small_video_mmproj, (28 * 28, 28 * 28 * 3), (420, 560)
    ref, tok = vl_reference_model("vl_a"), reference_tokenizer_vl("vl_a")
    videos = [[_rgb(*frames, seed=300 + k) for k in range(4)]]
    prompt = f"User: Video 1:{VIDEO_MARKER}What happens?\nAssistant: "
    ids, kw = _reference_case(ref, tok, prompt, [], videos, video_pixels=video_pixels)
    with Model(vl_gguf("vl_a"), mmproj_path=mmproj, n_ctx=1024, n_batch=64, **EXACT) as m:
        info = m.projector.info
        assert (info.video_min_pixels, info.video_max_pixels) == video_pixels
        feats = m.video_features(videos[0])
        assert feats.n_frames == 2
        assert feats.data.shape[0] == ids.count(ref.config.video_token_id)  # the reference's token count
        got = m.logits(prompt, videos=videos)
    want = _ref_logits(ref, ids, kw)
    assert got.shape == want.shape
    assert _rel(got, want) < BOUND


def test_mtmd_preprocessor_rounds_half_to_even(enc_case):
    """mtmd's own ERNIE preprocessor (C users) sizes 70x70 to 56x56 as Python's round() does."""
    _, m, _ = enc_case
    raw = _rgb(70, 70, seed=7)
    feats = m.projector.encode([raw], check_size=False)
    assert (feats.grid_h, feats.grid_w) == (2, 2)  # 84x84 (3x3) with round-half-up
    for h, w in ((1000, 30), (42, 98), (27, 29)):
        th, tw = imgs.smart_resize(h, w)
        f = m.projector.encode([_rgb(h, w, seed=h)], check_size=False)
        assert (f.grid_h, f.grid_w) == (th // 28, tw // 28)


# --- end to end: prompts with images and videos ----------------------------------------------

@pytest.fixture(scope="module", params=["vl_b", "vl_c"])
def e2e(request, vl_gguf, vl_mmproj, vl_reference_model, reference_tokenizer_vl):
    name = request.param
    with Model(vl_gguf(name), mmproj_path=vl_mmproj(name), n_ctx=1024, n_batch=64, **EXACT) as m:
        yield name, m, vl_reference_model(name), reference_tokenizer_vl(name)


def _video_inputs(frames):
    """pixel_values_videos / video_grid_thw as the reference video processor lays them out.

    The frames come from our own preprocessing (see the module docstring): the reference's
    video processor needs torchvision, which is not importable here.
    """
    import torch

    patches, grid = zip(*(imgs.to_patches(imgs.normalize(f)) for f in frames))
    return torch.from_numpy(np.concatenate(patches)), torch.tensor([[len(frames), grid[0][0], grid[0][1]]])


def _reference_case(ref, tok, prompt, images, videos, video_pixels=(299 * 28 * 28, 1196 * 28 * 28)):
    """input ids and model kwargs of the reference for a prompt with our markers."""
    import re

    import torch

    cfg = ref.config
    kw = {}
    img_tokens, vid_tokens = [], []
    if images:
        pv, grid = _ref_pixels(images)
        kw.update(pixel_values=pv, image_grid_thw=grid)
        img_tokens = [int(g.prod()) // 4 for g in grid]
    if videos:
        # OUR preprocessing stands in for the reference's video processor (it needs torchvision):
        # its default pixel limits, as its _preprocess applies them (the rule: tests/unit/test_images.py)
        frames = [imgs.video_frames(v, min_pixels=video_pixels[0], max_pixels=video_pixels[1]) for v in videos]
        parts = [_video_inputs(f) for f in frames]
        kw.update(pixel_values_videos=torch.cat([p[0] for p in parts]),
                  video_grid_thw=torch.cat([p[1] for p in parts]))
        vid_tokens = [int(p[1][0].prod()) // 8 for p in parts]
    it_i, it_v = iter(img_tokens), iter(vid_tokens)

    def expand(mk):
        if mk.group(0) == IMAGE_MARKER:
            return "<|IMAGE_START|>" + "<|IMAGE_PLACEHOLDER|>" * next(it_i) + "<|IMAGE_END|>"
        return "<|VIDEO_START|>" + "<|VIDEO_PLACEHOLDER|>" * next(it_v) + "<|VIDEO_END|>"

    text = re.sub(f"{re.escape(IMAGE_MARKER)}|{re.escape(VIDEO_MARKER)}", expand, prompt)
    ids = tok(text)["input_ids"]
    t = torch.tensor([ids])
    mm = (t == cfg.image_token_id).long() + 2 * (t == cfg.video_token_id).long()
    moe = mm.clone()
    for tid, kind in ((cfg.image_start_token_id, 1), (cfg.image_end_token_id, 1),
                      (cfg.video_start_token_id, 2), (cfg.video_end_token_id, 2)):
        moe[t == tid] = kind
    kw.update(mm_token_type_ids=mm, moe_mm_token_type_ids=moe)
    return ids, kw


def _ref_logits(ref, ids, kw):
    import torch

    kw = dict(kw)
    for key in ("mm_token_type_ids", "moe_mm_token_type_ids"):  # generated tokens are text
        pad = len(ids) - kw[key].shape[1]
        kw[key] = torch.nn.functional.pad(kw[key], (0, pad))
    ref.model.rope_deltas = None
    with torch.no_grad():
        return ref(input_ids=torch.tensor([ids]), **kw).logits[0].double().numpy()


CASES = {
    "one image": (f"User: Picture 1:{IMAGE_MARKER}Describe the picture.\nAssistant: ", [(56, 84)], []),
    "two images": (f"User: Picture 1:{IMAGE_MARKER}Picture 2:{IMAGE_MARKER}Which is larger?\nAssistant: ",
                   [(84, 56), (112, 140)], []),
    "image first": (f"{IMAGE_MARKER}what is this", [(56, 56)], []),
    "image in the middle": (f"look at {IMAGE_MARKER} and tell me", [(84, 84)], []),
    "video": (f"User: Video 1:{VIDEO_MARKER}What happens?\nAssistant: ", [], [[(56, 84)] * 4]),
    "video and image": (f"{VIDEO_MARKER} then {IMAGE_MARKER} end", [(56, 56)], [[(84, 56)] * 3]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_prompt_with_media_matches_reference(e2e, case):
    """Logits and a greedy continuation of prompts with images and videos, against transformers.

    Video cases: the reference's pixel inputs are built with our own video preprocessing
    (``imgs.video_frames`` with the video limits, in ``_reference_case``), not by transformers'
    video processor (it needs torchvision); the frames (56x84, 84x56) are below the video
    min_pixels, so both sides see the frames as our resize made them. The sizing rule itself
    is tested against transformers' rule in tests/unit/test_images.py.
    """
    name, m, ref, tok = e2e
    prompt, image_sizes, video_sizes = CASES[case]
    images = [_rgb(h, w, seed=i + h) for i, (h, w) in enumerate(image_sizes)]
    videos = [[_rgb(h, w, seed=100 * v + k) for k, (h, w) in enumerate(frames)]
              for v, frames in enumerate(video_sizes)]
    ids, kw = _reference_case(ref, tok, prompt, images, videos)

    # the text around the media tokenizes as the reference tokenizes it
    ours_prompt, n_encoded = multimodal_prompt(m.vocab, m.projector, prompt, images, videos, m.n_ctx)
    assert n_encoded <= len(images) + len(videos)  # the others were encoded by an earlier case
    assert sum(isinstance(t, Embeddings) for t in ours_prompt) == len(images) + len(videos)
    specials = {ref.config.image_start_token_id, ref.config.image_end_token_id, ref.config.image_token_id,
                ref.config.video_start_token_id, ref.config.video_end_token_id, ref.config.video_token_id}
    assert [t for t in ours_prompt if not isinstance(t, Embeddings)] == [t for t in ids if t not in specials]

    want = _ref_logits(ref, ids, kw)
    got = m.logits(prompt, images=images, videos=videos)
    assert got.shape == want.shape
    err = _rel(got, want)
    print(f"{name} {case}: {len(ids)} positions, rel err {err:.1e}")
    assert err < BOUND

    out = m.generate(prompt, images=images, videos=videos, max_tokens=8, temperature=0, ignore_eos=True)
    seq = list(ids)
    for _ in range(8):
        seq.append(int(_ref_logits(ref, seq, kw)[-1].argmax()))
    assert out.tokens == seq[len(ids):]


def test_video_pairs_are_ordered(e2e):
    """The test can fail: the same frames in another order change the logits."""
    _, m, _, _ = e2e
    frames = [_rgb(56, 84, seed=k) for k in range(4)]
    prompt = f"{VIDEO_MARKER} what happens"
    a = m.logits(prompt, videos=[frames])
    b = m.logits(prompt, videos=[[frames[1], frames[0], frames[2], frames[3]]])
    assert _rel(b, a) > 100 * BOUND


def test_odd_frame_count_repeats_the_last(e2e):
    _, m, _, _ = e2e
    frames = [_rgb(56, 56, seed=k) for k in range(3)]
    a = m.video_features(frames)
    b = m.video_features(frames + [frames[-1]])
    assert a.n_frames == b.n_frames == 2
    np.testing.assert_array_equal(a.data, b.data)


def test_image_inputs_all_kinds(e2e, tmp_path):
    """Path, bytes, PIL and numpy give the same features (PNG is lossless)."""
    from PIL import Image

    _, m, _, _ = e2e
    rgb = _rgb(70, 98, seed=11)
    p = tmp_path / "x.png"
    Image.fromarray(rgb).save(p)
    ref = m.image_features(rgb).data
    for x in (p, str(p), p.read_bytes(), Image.open(p)):
        np.testing.assert_array_equal(m.image_features(x).data, ref)


# --- errors: before any encoding or decoding --------------------------------------------------

def test_marker_count_must_match(e2e):
    _, m, _, _ = e2e
    img = _rgb(56, 56, 1)
    with pytest.raises(ValueError, match="marker"):
        m.generate("no marker here", images=[img])
    with pytest.raises(ValueError, match="marker"):
        m.logits(f"{IMAGE_MARKER}{IMAGE_MARKER}", images=[img])


def test_image_too_large_for_the_context_fails_before_encoding(vl_gguf, vl_mmproj, monkeypatch):
    with Model(vl_gguf("vl_a"), mmproj_path=vl_mmproj("vl_a"), n_ctx=256) as m:
        def never(*a, **k):
            raise AssertionError("encoded an image that cannot fit")

        monkeypatch.setattr(m.projector, "encode", never)
        with pytest.raises(PromptTooLongError, match="positions"):
            m.generate(f"{IMAGE_MARKER} hi", images=[_rgb(560, 560, 1)])  # 400 tokens
        with pytest.raises(ImageError, match="aspect ratio"):
            m.logits(f"{IMAGE_MARKER}", images=[np.zeros((2, 600, 3), np.uint8)])


def test_projector_pairing_errors(vl_gguf, vl_mmproj):
    with pytest.raises(InvalidModelFileError, match="belongs to another model"):
        Model(vl_gguf("vl_a"), mmproj_path=vl_mmproj("vl_c"))  # widths 256 vs 128
    with pytest.raises(InvalidModelFileError, match="not an mmproj"):
        Model(vl_gguf("vl_a"), mmproj_path=vl_gguf("vl_a"))
    with pytest.raises(ModelLoadError):
        Model(vl_mmproj("vl_a"))
    with Model(vl_gguf("vl_a")) as m:
        with pytest.raises(ImageError, match="mmproj_path"):
            m.generate(f"{IMAGE_MARKER}", images=[_rgb(56, 56, 1)])
