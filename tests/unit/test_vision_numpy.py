"""The NumPy vision reference (pyllama_ernie._vision_numpy) against transformers' ERNIE 4.5 VL.

Weights go from the transformers state dict to the mmproj GGUF names by a mapping written
here (not the converter). Pixels: a random normalized HxWx3 array; pixel_values are built in
the processor's layout (the image processor's own ``patchify``; for videos, the video
processor's view/permute reproduced with torch). Error norm:
``max |ours - reference| / max |reference|`` over the whole feature matrix, bound 1e-5.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from pyllama_ernie._vision_numpy import (
    encode_image,
    encode_video_pair,
    patchify,
    vision_position_ids,
    vision_tower,
)

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

pytestmark = pytest.mark.reference

BOUND = 1e-5
IMAGE_SIZES = [(28, 28), (56, 84), (84, 56), (112, 112)]

# a config built here: head_dim 40 (as the real 80, halved), depth 2, a non-default rope theta
# and eps values far from the defaults, so that passing the wrong hyperparameter shows
CUSTOM: dict[str, dict[str, Any]] = {
    "vision": {"depth": 2, "hidden_size": 80, "intermediate_size": 192, "num_heads": 2, "rms_norm_eps": 0.1,
               "rope_parameters": {"rope_type": "axial", "rope_theta": 300.0}},
    "text": {"hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
             "num_key_value_heads": 1, "moe_intermediate_size": [32, 16], "moe_num_experts": 2, "moe_k": 1,
             "moe_num_shared_experts": 1, "vocab_size": 128, "rms_norm_eps": 0.5,
             "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0, "mrope_section": [4, 4, 4]}},
}


def _rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours.astype(np.float64) - ref).max() / np.abs(ref).max())


# --- weights: transformers state dict -> mmproj GGUF names ------------------------------------

def gguf_vision_weights(model: Any) -> dict[str, np.ndarray]:
    """The vision tower and resampler weights under their GGUF names, float32, torch orientation."""
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    vt, rs = "model.vision_tower.", "model.resampler_model."
    out: dict[str, np.ndarray] = {}
    w = sd[vt + "patch_embed.proj.weight"]
    out["v.patch_embd.weight"] = w.reshape(w.shape[0], 3, 14, 14)
    block_names = {"attn.qkv": "attn_qkv", "attn.proj": "attn_out", "norm1": "ln1", "norm2": "ln2",
                   "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"}
    for i in range(model.config.vision_config.depth):
        for src, dst in block_names.items():
            for kind in ("weight", "bias"):
                out[f"v.blk.{i}.{dst}.{kind}"] = sd[f"{vt}blocks.{i}.{src}.{kind}"]
    mm = {"v.post_ln": vt + "ln", "mm.0": rs + "spatial_linear.fc1", "mm.1": rs + "spatial_linear.fc2",
          "mm.2": rs + "spatial_linear.ln", "mm.3": rs + "temporal_linear.fc1", "mm.4": rs + "temporal_linear.fc2",
          "mm.5": rs + "temporal_linear.ln", "mm.6": rs + "mlp"}
    for dst, src in mm.items():
        out[dst + ".weight"], out[dst + ".bias"] = sd[src + ".weight"], sd[src + ".bias"]
    w3 = out["mm.3.weight"]  # [4h, 8h] -> (2, 4h, 4h): [k] multiplies frame k of the pair
    half = w3.shape[1] // 2
    out["mm.3.weight"] = np.ascontiguousarray(np.stack([w3[:, :half], w3[:, half:]]))
    out["mm.7.weight"] = sd[rs + "after_norm.weight"]
    return out


def hparams(model: Any) -> dict[str, Any]:
    v, t = model.config.vision_config, model.config.text_config
    return {"n_head": v.num_heads, "eps": v.rms_norm_eps, "text_eps": t.rms_norm_eps,
            "theta": float(v.rope_parameters["rope_theta"])}


def _build_custom() -> Any:
    from transformers import (
        Ernie4_5_VLMoeConfig,
        Ernie4_5_VLMoeForConditionalGeneration,
    )

    config = Ernie4_5_VLMoeConfig(text_config=CUSTOM["text"], vision_config=CUSTOM["vision"])
    torch.manual_seed(0)
    model = Ernie4_5_VLMoeForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith(("model.vision_tower.", "model.resampler_model.")):
                continue
            if name.endswith(("norm1.weight", "norm2.weight", "ln.weight", "after_norm.weight")):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))  # norm weights that matter
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def vl_models_under_test(vl_reference_model) -> dict[str, Any]:
    torch.set_num_threads(1)
    return {"vl_a": vl_reference_model("vl_a"), "vl_b": vl_reference_model("vl_b"), "custom": _build_custom()}


@pytest.fixture(scope="module", params=["vl_a", "vl_b", "custom"])
def vl(request, vl_models_under_test):
    model = vl_models_under_test[request.param]
    return request.param, model, gguf_vision_weights(model), hparams(model)


# --- inputs in the reference's layout ---------------------------------------------------------

def random_pixels(h: int, w: int, seed: int) -> np.ndarray:
    """A normalized image [H, W, 3] (values of the scale CLIP normalization gives)."""
    return np.random.default_rng(seed).standard_normal((h, w, 3)).astype(np.float32)


def image_inputs(images: list) -> tuple:
    """pixel_values / image_grid_thw as ``Ernie4_5_VLMoeImageProcessorPil`` makes them."""
    from transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe import (
        Ernie4_5_VLMoeImageProcessorPil,
    )

    proc = Ernie4_5_VLMoeImageProcessorPil()
    rows, grids = [], []
    for img in images:
        patches, gh, gw = proc.patchify(img.transpose(2, 0, 1), patch_size=14, merge_size=2, temporal_patch_size=1)
        rows.append(patches)
        grids.append([1, gh, gw])
    return torch.from_numpy(np.concatenate(rows)), torch.tensor(grids)


def video_inputs(frames: np.ndarray) -> tuple:
    """pixel_values_videos / video_grid_thw for one video [T, H, W, 3], as the video processor
    lays them out (its ``_preprocess`` view/permute; the processor itself needs torchvision)."""
    t, h, w, c = frames.shape
    gh, gw = h // 14, w // 14
    v = torch.from_numpy(frames).permute(0, 3, 1, 2)[None]  # [batch, T, C, H, W]
    v = v.reshape(1, t, c, gh // 2, 2, 14, gw // 2, 2, 14).permute(0, 1, 3, 6, 4, 7, 2, 5, 8)
    return v.reshape(t * gh * gw, c * 14 * 14), torch.tensor([[t, gh, gw]])


def ref_image(model: Any, images: list) -> tuple:
    pv, grid = image_inputs(images)
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=pv, image_grid_thw=grid)
    return out.last_hidden_state.double().numpy(), [p.double().numpy() for p in out.pooler_output]


def ref_video(model: Any, frames: np.ndarray) -> tuple:
    pv, grid = video_inputs(frames)
    with torch.no_grad():
        out = model.model.get_video_features(pixel_values_videos=pv, video_grid_thw=grid)
    (emb,) = out.pooler_output
    return out.last_hidden_state.double().numpy(), emb.double().numpy()


# --- layout helpers match the reference's -------------------------------------------------------

@pytest.mark.parametrize("h,w", IMAGE_SIZES)
def test_patchify_matches_image_processor(h, w):
    img = random_pixels(h, w, seed=h * w)
    pv, grid = image_inputs([img])
    assert np.array_equal(patchify(img), pv.numpy())
    assert grid.tolist() == [[1, h // 14, w // 14]]
    # the video layout is the same per frame
    pvv, _ = video_inputs(np.stack([img, img]))
    assert np.array_equal(np.concatenate([patchify(img)] * 2), pvv.numpy())


@pytest.mark.parametrize("h,w", IMAGE_SIZES)
def test_position_ids_match_reference(h, w):
    from transformers.vision_utils import get_vision_position_ids

    ref = get_vision_position_ids(torch.tensor([[1, h // 14, w // 14]]), 2).numpy()
    assert np.array_equal(vision_position_ids(h // 14, w // 14), ref)


# --- images -----------------------------------------------------------------------------------

@pytest.mark.parametrize("h,w", IMAGE_SIZES)
def test_image_matches_reference(vl, h, w):
    name, model, weights, hp = vl
    img = random_pixels(h, w, seed=h + 7 * w)
    ref_vit, (ref_emb,) = ref_image(model, [img])
    vit = vision_tower(weights, img, n_head=hp["n_head"], eps=hp["eps"], theta=hp["theta"])
    assert vit.shape == ref_vit.shape
    assert _rel_err(vit, ref_vit) <= BOUND, f"{name} {h}x{w} ViT"
    ours = encode_image(weights, img, **hp)
    assert ours.dtype == np.float32
    assert ours.shape == (h * w // 28 // 28, model.config.text_config.hidden_size)
    err = _rel_err(ours, ref_emb)
    print(f"{name} image {h}x{w}: rel err {err:.2e}")
    assert err <= BOUND, f"{name} {h}x{w}: {err:.2e}"


def test_images_batched_in_one_call(vl):
    """Several images in one reference call: each is still encoded on its own, in order."""
    name, model, weights, hp = vl
    imgs = [random_pixels(h, w, seed=i) for i, (h, w) in enumerate(IMAGE_SIZES)]
    _, refs = ref_image(model, imgs)
    for img, ref in zip(imgs, refs):
        assert _rel_err(encode_image(weights, img, **hp), ref) <= BOUND, name


def test_hyperparameters_matter(vl_models_under_test):
    """The custom model's theta / eps are far from the defaults: defaults must fail there."""
    model = vl_models_under_test["custom"]
    weights, hp = gguf_vision_weights(model), hparams(model)
    img = random_pixels(56, 84, seed=3)
    _, (ref,) = ref_image(model, [img])
    assert _rel_err(encode_image(weights, img, **hp), ref) <= BOUND
    for wrong in ({"theta": 10000.0}, {"eps": 1e-6}, {"text_eps": 1e-5}):
        err = _rel_err(encode_image(weights, img, **dict(hp, **wrong)), ref)
        assert err > 100 * BOUND, (wrong, err)


# --- videos -----------------------------------------------------------------------------------

@pytest.mark.parametrize("t,h,w", [(2, 56, 84), (4, 84, 56)])
def test_video_matches_reference(vl, t, h, w):
    name, model, weights, hp = vl
    frames = np.stack([random_pixels(h, w, seed=100 + i) for i in range(t)])
    ref_vit, ref_emb = ref_video(model, frames)
    n = (h // 14) * (w // 14)
    for i in range(t):  # the ViT treats every frame as its own image
        vit = vision_tower(weights, frames[i], n_head=hp["n_head"], eps=hp["eps"], theta=hp["theta"])
        assert _rel_err(vit, ref_vit[i * n:(i + 1) * n]) <= BOUND, f"{name} frame {i}"
    ours = np.concatenate([encode_video_pair(weights, frames[k], frames[k + 1], **hp) for k in range(0, t, 2)])
    assert ours.shape == ref_emb.shape == (t // 2 * n // 4, model.config.text_config.hidden_size)
    err = _rel_err(ours, ref_emb)
    print(f"{name} video {t}x{h}x{w}: rel err {err:.2e}")
    assert err <= BOUND, f"{name} video {t}x{h}x{w}: {err:.2e}"


def test_video_is_sensitive_to_frame_order(vl):
    """Swapping the frames of a pair (i.e. the temporal halves) changes the output beyond tolerance,
    and a still video (two equal frames) is exactly the image."""
    name, model, weights, hp = vl
    f = np.stack([random_pixels(56, 56, seed=200 + i) for i in range(2)])
    _, ref = ref_video(model, f)
    assert _rel_err(encode_video_pair(weights, f[0], f[1], **hp), ref) <= BOUND
    swapped = _rel_err(encode_video_pair(weights, f[1], f[0], **hp), ref)
    assert swapped > 100 * BOUND, f"{name}: swapped frames err {swapped:.2e}"
    halves = dict(weights, **{"mm.3.weight": weights["mm.3.weight"][::-1]})
    assert _rel_err(encode_video_pair(halves, f[0], f[1], **hp), ref) > 100 * BOUND
    still = encode_video_pair(weights, f[0], f[0], **hp)
    np.testing.assert_array_equal(still, encode_image(weights, f[0], **hp))


def test_torch_layout_of_temporal_fc1_is_accepted(vl):
    _name, _model, weights, hp = vl
    w3 = weights["mm.3.weight"]
    torch_layout = dict(weights, **{"mm.3.weight": np.concatenate([w3[0], w3[1]], axis=1)})
    img = random_pixels(28, 56, seed=5)
    np.testing.assert_array_equal(encode_image(torch_layout, img, **hp), encode_image(weights, img, **hp))
