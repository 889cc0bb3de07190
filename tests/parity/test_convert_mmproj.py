"""The ERNIE 4.5 VL mmproj converter (vision tower + resampler -> a "clip" GGUF, projector ``ernie4_5vl``):
read the written files back and check keys and values against the transformers reference model."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from reference_models import VL_MODELS
from test_convert import dequant, files_in, hf_weights, read_gguf

import pyllama_ernie.convert as convert_pkg

ConversionError = convert_pkg.ConversionError
convert = convert_pkg.convert
convert_mmproj = convert_pkg.convert_mmproj
hfconfig = convert_pkg.hfconfig
vision = importlib.import_module(f"{convert_pkg.__name__}.ernie4_5_vl_vision")
synthetic = importlib.import_module(f"{convert_pkg.__name__}.synthetic")
cli = importlib.import_module(f"{convert_pkg.__name__}.cli")

MODELS = ["vl_a", "vl_b", "vl_c", "vl_baidu"]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _spec(name: str) -> dict[str, Any]:
    spec = VL_MODELS[name]
    return VL_MODELS[spec["baidu_of"]] if "baidu_of" in spec else spec


def _np(t) -> np.ndarray:
    return t.detach().float().numpy()


def expected_mmproj(ref) -> dict[str, np.ndarray]:
    """GGUF name -> float32 values, from the reference model's own modules (written out by hand)."""
    vt, rs = ref.model.vision_tower, ref.model.resampler_model
    h = vt.config.hidden_size
    exp = {"v.patch_embd.weight": _np(vt.patch_embed.proj.weight).reshape(h, 3, 14, 14)}
    for i, blk in enumerate(vt.blocks):
        b = f"v.blk.{i}."
        for g, mod in (("ln1", blk.norm1), ("attn_qkv", blk.attn.qkv), ("attn_out", blk.attn.proj),
                       ("ln2", blk.norm2), ("ffn_up", blk.mlp.fc1), ("ffn_down", blk.mlp.fc2)):
            exp[b + g + ".weight"], exp[b + g + ".bias"] = _np(mod.weight), _np(mod.bias)
    exp["v.post_ln.weight"], exp["v.post_ln.bias"] = _np(vt.ln.weight), _np(vt.ln.bias)
    sp, tp = rs.spatial_linear, rs.temporal_linear
    w = _np(tp.fc1.weight)
    S = w.shape[0]
    assert w.shape == (S, 2 * S)
    for g, mod in (("mm.0", sp.fc1), ("mm.1", sp.fc2), ("mm.2", sp.ln), ("mm.3", tp.fc1), ("mm.4", tp.fc2),
                   ("mm.5", tp.ln), ("mm.6", rs.mlp)):
        exp[g + ".weight"], exp[g + ".bias"] = _np(mod.weight), _np(mod.bias)
    exp["mm.3.weight"] = np.stack([w[:, :S], w[:, S:]])  # (2, S, S): [k] multiplies frame k of a pair
    exp["mm.7.weight"] = _np(rs.after_norm.weight)
    return exp


# -- keys ------------------------------------------------------------------------------------------

def _expected_keys(name: str) -> dict[str, Any]:
    spec = _spec(name)
    v = spec["vision"]
    return {
        "general.architecture": "clip",
        "general.type": "mmproj",
        "general.file_type": int(gguf.LlamaFileType.ALL_F32),
        "general.quantization_version": gguf.GGML_QUANT_VERSION,
        "clip.projector_type": "ernie4_5vl",
        "clip.has_vision_encoder": True,
        "clip.vision.image_size": 560,
        "clip.vision.patch_size": 14,
        "clip.vision.embedding_length": v["hidden_size"],
        "clip.vision.feed_forward_length": v["intermediate_size"],
        "clip.vision.block_count": v["depth"],
        "clip.vision.attention.head_count": v["num_heads"],
        "clip.vision.attention.layer_norm_epsilon": pytest.approx(1e-6, rel=1e-6),
        "clip.vision.projection_dim": spec["text"]["hidden_size"],
        "clip.vision.spatial_merge_size": 2,
        "clip.vision.image_mean": pytest.approx(CLIP_MEAN, rel=1e-6),
        "clip.vision.image_std": pytest.approx(CLIP_STD, rel=1e-6),
        "clip.vision.image_min_pixels": 56 * 56,
        "clip.vision.image_max_pixels": 28 * 28 * 6177,
        # no video_preprocessor_config.json: the reference video processor's defaults (patch 0014 reads them)
        "clip.vision.video_min_pixels": 299 * 28 * 28,
        "clip.vision.video_max_pixels": 1196 * 28 * 28,
    }


@pytest.mark.parametrize("name", MODELS)
def test_keys(name, vl_mmproj, vl_gguf):
    kv, _ = read_gguf(vl_mmproj(name))
    expect = _expected_keys(name)
    for k, val in expect.items():
        assert kv[k] == val, k
    # nothing else but general.* metadata: no use_gelu / use_silu (absent = quick-GELU in llama.cpp)
    assert {k for k in kv if not k.startswith("general.")} == {k for k in expect if not k.startswith("general.")}
    assert kv["general.name"] == read_gguf(vl_gguf(name))[0]["general.name"]  # named as its language model
    # value types, as llama.cpp's clip loader reads them
    V = gguf.GGUFValueType
    fields = gguf.GGUFReader(vl_mmproj(name)).fields
    types = {k: [V(t) for t in f.types] for k, f in fields.items() if k.startswith("clip.")}
    for k, t in types.items():
        if k in ("clip.vision.image_mean", "clip.vision.image_std"):
            assert t == [V.ARRAY, V.FLOAT32], k
        elif k == "clip.vision.attention.layer_norm_epsilon":
            assert t == [V.FLOAT32], k
        elif k == "clip.projector_type":
            assert t == [V.STRING], k
        elif k == "clip.has_vision_encoder":
            assert t == [V.BOOL], k
        else:
            assert t == [V.UINT32], k
    # the reference model agrees with what the keys say
    assert _spec(name)["vision"].get("hidden_act", "quick_gelu") == "quick_gelu"


# -- tensors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_tensors_f32(name, vl_mmproj, vl_reference_model):
    _, ts = read_gguf(vl_mmproj(name))
    exp = expected_mmproj(vl_reference_model(name))
    assert list(ts) == list(exp)  # names and writing order
    for g, want in exp.items():
        tname, shape, data = ts[g]
        assert tname == "F32", g
        assert shape == want.shape, g
        np.testing.assert_array_equal(data.reshape(shape), want, err_msg=g)


def test_tensors_match_the_stored_weights(vl_mmproj, vl_model_dir):
    """The same, against the safetensors files read independently (vl_b is stored as bf16)."""
    w = hf_weights(vl_model_dir("vl_b"))
    _, ts = read_gguf(vl_mmproj("vl_b"))
    S = w["model.resampler_model.spatial_linear.0.weight"].shape[0]
    pairs = {
        "v.patch_embd.weight": w["model.vision_model.patch_embed.proj.weight"].reshape(-1, 3, 14, 14),
        "v.blk.1.attn_qkv.weight": w["model.vision_model.blocks.1.attn.qkv.weight"],
        "v.blk.1.ffn_down.bias": w["model.vision_model.blocks.1.mlp.fc2.bias"],
        "mm.2.weight": w["model.resampler_model.spatial_linear.3.weight"],
        "mm.3.weight": np.stack([w["model.resampler_model.temporal_linear.0.weight"][:, :S],
                                 w["model.resampler_model.temporal_linear.0.weight"][:, S:]]),
        "mm.5.bias": w["model.resampler_model.temporal_linear.3.bias"],
        "mm.7.weight": w["model.resampler_model.after_norm.weight"],
    }
    for g, want in pairs.items():
        np.testing.assert_array_equal(ts[g][2].reshape(ts[g][1]), want, err_msg=g)


def test_temporal_fc1_halves_reproduce_the_reference(vl_mmproj, vl_reference_model):
    """mm.3.weight[0] @ even + mm.3.weight[1] @ odd + bias == the reference fc1 on the concatenation
    [even, odd]; for an image (even == odd) that is the reference's [x, x]."""
    import torch

    ref = vl_reference_model("vl_a")
    fc1 = ref.model.resampler_model.temporal_linear.fc1
    _, ts = read_gguf(vl_mmproj("vl_a"))
    w3 = ts["mm.3.weight"][2].reshape(ts["mm.3.weight"][1]).astype(np.float64)
    b3 = ts["mm.3.bias"][2].astype(np.float64)
    rng = np.random.default_rng(0)
    even, odd = rng.standard_normal((2, 5, w3.shape[2]))
    with torch.no_grad():
        want = fc1(torch.from_numpy(np.concatenate([even, odd], axis=1)).float()).double().numpy()
        want_img = fc1(torch.from_numpy(np.concatenate([even, even], axis=1)).float()).double().numpy()
    got = even @ w3[0].T + odd @ w3[1].T + b3
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(even @ (w3[0] + w3[1]).T + b3, want_img, rtol=1e-4, atol=1e-4)
    swapped = odd @ w3[0].T + even @ w3[1].T + b3
    assert np.abs(swapped - want).max() > 1e-2  # the check tells the halves apart


def test_patch_kernel_is_a_conv_over_processor_patches(vl_mmproj, vl_reference_model):
    """A stride-14 convolution with v.patch_embd.weight over the image gives the reference patch embedding
    of the image processor's flattened patches (so the kernel's (channel, row, col) order is right)."""
    import torch
    from transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe import (
        Ernie4_5_VLMoeImageProcessorPil,
    )

    ref = vl_reference_model("vl_a")
    _, ts = read_gguf(vl_mmproj("vl_a"))
    kernel = ts["v.patch_embd.weight"][2].reshape(ts["v.patch_embd.weight"][1]).astype(np.float64)
    image = np.random.default_rng(1).standard_normal((3, 56, 84)).astype(np.float32)
    flat, gh, gw = Ernie4_5_VLMoeImageProcessorPil().patchify(image, 14, 2, 1)
    with torch.no_grad():
        want = ref.model.vision_tower.patch_embed(torch.from_numpy(np.ascontiguousarray(flat))).double().numpy()
    # our conv, then the processor's merge-block order: (gh/2, gw/2, 2, 2)
    conv = np.einsum("ocij,chiwj->hwo", kernel, image.reshape(3, gh, 14, gw, 14).astype(np.float64))
    got = conv.reshape(gh // 2, 2, gw // 2, 2, -1).transpose(0, 2, 1, 3, 4).reshape(gh * gw, -1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    transposed = np.einsum("ocji,chiwj->hwo", kernel, image.reshape(3, gh, 14, gw, 14).astype(np.float64))
    assert np.abs(transposed.reshape(gh // 2, 2, gw // 2, 2, -1).transpose(0, 2, 1, 3, 4).reshape(gh * gw, -1)
                  - want).max() > 1e-2


def test_baidu_layout_gives_the_same_file(vl_mmproj, vl_model_dir):
    names = set(hf_weights(vl_model_dir("vl_baidu")))
    assert any(k.startswith("vision_model.") for k in names)
    assert not any(k.startswith("model.vision_model.") for k in names)
    _, ta = read_gguf(vl_mmproj("vl_baidu"))
    _, tc = read_gguf(vl_mmproj("vl_c"))
    assert list(ta) == list(tc)
    for g in tc:
        assert ta[g][:2] == tc[g][:2], g
        np.testing.assert_array_equal(ta[g][2], tc[g][2], err_msg=g)
    assert vl_mmproj("vl_baidu").read_bytes() == vl_mmproj("vl_c").read_bytes()


def test_transformers_module_names_give_the_same_file(vl_mmproj, vl_model_dir, tmp_path):
    """model.vision_tower.* and spatial_linear.fc1/fc2/ln (transformers' module names) read as the Hub's."""
    from safetensors.numpy import save_file

    src = vl_model_dir("vl_a")
    d = tmp_path / src.name
    shutil.copytree(src, d)
    renamed = {}
    for k, v in hf_weights(src).items():
        k = k.replace("model.vision_model.", "model.vision_tower.")
        for i, part in (("0", "fc1"), ("2", "fc2"), ("3", "ln")):
            k = k.replace(f"_linear.{i}.", f"_linear.{part}.")
        renamed[k] = v
    assert "model.resampler_model.temporal_linear.fc1.weight" in renamed
    for f in d.glob("*.safetensors"):
        f.unlink()
    save_file(renamed, str(d / "model.safetensors"))
    out = convert_mmproj(d, tmp_path / "m.gguf", "f32")
    assert out.read_bytes() == vl_mmproj("vl_a").read_bytes()


@pytest.mark.parametrize("name,outtype", [("vl_c", "f16"), ("vl_a", "q8_0"), ("vl_b", "bf16")])
def test_types_under_other_outtypes(name, outtype, vl_mmproj):
    kv, ts = read_gguf(vl_mmproj(name, outtype))
    _, t32 = read_gguf(vl_mmproj(name))
    assert kv["general.file_type"] == convert_pkg.OUTTYPES[outtype][1]
    default = convert_pkg.OUTTYPES[outtype][0].name
    assert list(ts) == list(t32)
    for g, (tname, shape, data) in ts.items():
        if g == "v.patch_embd.weight":
            want = "F16"  # the conv kernel: F16 for every type but f32
        elif len(shape) == 1:
            want = "F32"
        elif default == "Q8_0" and shape[-1] % 32:
            want = "F16"
        else:
            want = default
        assert tname == want, g
        assert shape == t32[g][1], g
        values = dequant(data, tname).reshape(shape)
        ref = t32[g][2].reshape(shape)
        tol = {"F32": 0, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 1e-2}[tname]
        np.testing.assert_allclose(values, ref, atol=tol * max(1.0, np.abs(ref).max()), err_msg=g)
    assert any(t[0] == default for t in ts.values() if len(t[1]) > 1 and t[1] != ts["v.patch_embd.weight"][1])
    assert len(ts["mm.3.weight"][1]) == 3 and ts["mm.3.weight"][0] == default


# -- preprocessing ---------------------------------------------------------------------------------

def _copy(src: Path, tmp_path: Path) -> Path:
    d = tmp_path / "ckpt"
    shutil.copytree(src, d)
    return d


@pytest.mark.parametrize("style", ["transformers", "baidu", "processor_config"])
def test_preprocessor_config_reaches_the_keys(style, vl_model_dir, tmp_path):
    d = _copy(vl_model_dir("vl_a"), tmp_path)
    mean, std = [0.5, 0.4, 0.3], [0.25, 0.5, 0.75]
    if style == "transformers":  # the image processor's own save_pretrained
        from transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe import (
            Ernie4_5_VLMoeImageProcessorPil,
        )

        Ernie4_5_VLMoeImageProcessorPil(size={"shortest_edge": 1024, "longest_edge": 200704}, image_mean=mean,
                                        image_std=std).save_pretrained(d)
        assert json.loads((d / "preprocessor_config.json").read_text())["size"]["longest_edge"] == 200704
    elif style == "baidu":  # Baidu's remote-code processor: flat min_pixels / max_pixels
        (d / "preprocessor_config.json").write_text(json.dumps({
            "min_pixels": 1024, "max_pixels": 200704, "image_mean": mean, "image_std": std, "patch_size": 14,
            "merge_size": 2, "image_processor_type": "Ernie4_5_VLImageProcessor"}))
    else:  # transformers' combined processor_config.json
        (d / "processor_config.json").write_text(json.dumps({"image_processor": {
            "size": {"shortest_edge": 1024, "longest_edge": 200704}, "image_mean": mean, "image_std": std}}))
    kv, _ = read_gguf(convert_mmproj(d, tmp_path / "m.gguf", "f32"))
    assert (kv["clip.vision.image_min_pixels"], kv["clip.vision.image_max_pixels"]) == (1024, 200704)
    assert kv["clip.vision.image_mean"] == pytest.approx(mean, rel=1e-6)
    assert kv["clip.vision.image_std"] == pytest.approx(std, rel=1e-6)


def test_preprocessor_parsing():
    parse = vision.parse_preprocessor
    p = parse({})
    assert (p.min_pixels, p.max_pixels, p.image_mean, p.image_std) == (3136, 4842768, tuple(CLIP_MEAN),
                                                                        tuple(CLIP_STD))
    # transformers reads size and ignores flat min/max_pixels
    p = parse({"size": {"shortest_edge": 10, "longest_edge": 20}, "min_pixels": 1, "max_pixels": 2})
    assert (p.min_pixels, p.max_pixels) == (10, 20)
    p = parse({"size": {"min_pixels": 7, "max_pixels": 9}})
    assert (p.min_pixels, p.max_pixels) == (7, 9)
    assert parse({"image_mean": 0.5}).image_mean == (0.5, 0.5, 0.5)
    for bad, match in (({"image_mean": [1, 2]}, "image_mean"), ({"image_std": [0.1, 0.0, 0.2]}, "positive"),
                       ({"size": {"shortest_edge": 100, "longest_edge": 10}}, "exceed"),
                       ({"max_pixels": -5}, "max_pixels"), ({"min_pixels": "many"}, "min_pixels")):
        with pytest.raises(ConversionError, match=match):
            parse(bad)


# -- refusals --------------------------------------------------------------------------------------

def _edit_config(d: Path, fn) -> None:
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def _set_vision(**kw):
    return lambda cfg: cfg["vision_config"].update(kw)


@pytest.mark.parametrize("case,edit,match", [
    ("hidden_act", _set_vision(hidden_act="gelu"), "quick_gelu"),
    ("patch_size", _set_vision(patch_size=16), "patch_size is 16"),
    ("merge", _set_vision(spatial_merge_size=4), "spatial_merge_size is 4"),
    ("temporal", _set_vision(temporal_merge_size=1), "temporal merge size"),
    ("text_eps", lambda cfg: cfg["text_config"].update(rms_norm_eps=1e-6), "hard-codes it as 1e-05"),
    ("baidu_conv", lambda cfg: cfg.update(spatial_conv_size=4), "contradicts"),
    ("baidu_no_temporal", lambda cfg: cfg.update(use_temporal_conv=False), "use_temporal_conv"),
])
def test_config_refusals_leave_no_file(case, edit, match, vl_model_dir, tmp_path):
    d = _copy(vl_model_dir("vl_baidu" if case.startswith("baidu") else "vl_a"), tmp_path)
    _edit_config(d, edit)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ConversionError, match=match):
        convert_mmproj(d, out / "mmproj.gguf", "f16")
    with pytest.raises(ConversionError, match=match):  # convert() checks the mmproj before writing anything
        convert(d, out / "model.gguf", "f16")
    assert files_in(out) == set()
    assert convert(d, out / "model.gguf", "f16", mmproj_path=False) == out / "model.gguf"  # the LM alone is fine


@pytest.mark.parametrize("case", ["missing", "wrong_shape", "unknown", "twice"])
def test_weight_refusals_leave_no_file(case, vl_model_dir, tmp_path):
    from safetensors.numpy import save_file

    d = _copy(vl_model_dir("vl_a"), tmp_path)
    w = hf_weights(d)
    qkv = "model.vision_model.blocks.0.attn.qkv.bias"
    if case == "missing":
        del w[qkv]
        match = "vision_model.blocks.0.attn.qkv.bias"
    elif case == "wrong_shape":
        fc1 = "model.resampler_model.temporal_linear.0.weight"
        w[fc1] = w[fc1].T.copy()
        match = "has shape"
    elif case == "unknown":
        w["model.vision_model.blocks.1.norm1.weight"] = w["model.vision_model.blocks.0.norm1.weight"]
        match = "does not know: model.vision_model.blocks.1.norm1.weight"
    else:
        w["vision_model.ln.weight"] = w["model.vision_model.ln.weight"]
        match = "both"
    save_file({k: np.ascontiguousarray(v) for k, v in w.items()}, str(d / "model.safetensors"))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ConversionError, match=match):
        convert_mmproj(d, out / "mmproj.gguf", "q8_0")
    with pytest.raises(ConversionError, match=match):
        convert(d, out / "model.gguf", "q8_0")
    assert files_in(out) == set()


def test_text_checkpoint_is_refused(hf_model_dir, tmp_path):
    d = hf_model_dir("dense_a")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ConversionError, match="text-only"):
        convert_mmproj(d, out / "mmproj.gguf")
    with pytest.raises(ConversionError, match="text-only"):
        convert(d, out / "model.gguf", mmproj_path=out / "mmproj.gguf")
    assert files_in(out) == set()
    # no mmproj asked for (the default, or False): just the model
    assert convert_pkg.convert_checkpoint(d, out / "model.gguf", "f16") == (out / "model.gguf", None)
    assert convert(d, out / "m2.gguf", "f16", mmproj_path=False) == out / "m2.gguf"
    assert files_in(out) == {"model.gguf", "m2.gguf"}


def test_vl_checkpoint_without_vision_weights(vl_model_dir, tmp_path):
    from safetensors.numpy import save_file

    d = _copy(vl_model_dir("vl_a"), tmp_path)
    w = {k: v for k, v in hf_weights(d).items() if vision.canonical_name(k) is None}
    save_file(w, str(d / "model.safetensors"))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ConversionError, match="--no-mmproj"):
        convert(d, out / "model.gguf", "f32")
    assert files_in(out) == set()
    convert(d, out / "model.gguf", "f32", mmproj_path=False)
    assert files_in(out) == {"model.gguf"}


def test_mmproj_failure_removes_the_model(vl_model_dir, tmp_path, monkeypatch):
    """All or nothing: if writing the mmproj fails after the model was written, the model goes too."""
    out = tmp_path / "out"
    out.mkdir()

    def disk_full(*a, **kw):
        raise ConversionError("not enough disk space (simulated)")

    monkeypatch.setattr(vision, "add_hparams", disk_full)
    seen = []
    with pytest.raises(ConversionError, match="simulated"):
        convert(vl_model_dir("vl_a"), out / "model.gguf", "f32", progress=lambda d, t, n: seen.append(n))
    assert "output_norm.weight" in seen  # the model was written, then removed
    assert files_in(out) == set()


def test_same_path_for_both_is_refused(vl_model_dir, tmp_path):
    with pytest.raises(ConversionError, match="both"):
        convert(vl_model_dir("vl_a"), tmp_path / "m.gguf", mmproj_path=tmp_path / "m.gguf")
    assert files_in(tmp_path) == set()


# -- convert() and the command line ----------------------------------------------------------------

def test_convert_writes_the_mmproj_beside_the_model(vl_model_dir, vl_mmproj, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    names = []
    path = convert(vl_model_dir("vl_c"), out / "model-f32.gguf", "f32", progress=lambda d, t, n: names.append(n))
    assert path == out / "model-f32.gguf"
    assert files_in(out) == {"model-f32.gguf", "mmproj-model-f32.gguf"}
    assert (out / "mmproj-model-f32.gguf").read_bytes() == vl_mmproj("vl_c").read_bytes()
    kv, _ = read_gguf(path)
    assert kv["general.architecture"] == "ernie4_5-vl-moe"
    # progress: the model's tensors, then the mmproj's
    first_mm = names.index("v.patch_embd.weight")
    assert names[first_mm - 1] == "output_norm.weight" and names[-1] == "mm.7.weight"
    assert convert_pkg.default_mmproj_path("x/y.gguf") == Path("x/mmproj-y.gguf")


def test_cli(vl_model_dir, hf_model_dir, tmp_path, capsys):
    d = str(vl_model_dir("vl_a"))
    # default: both files, side by side
    assert cli.main([d, "-o", str(tmp_path / "a" / "m.gguf"), "-q"]) == 1  # no such folder: exit 1
    capsys.readouterr()
    (tmp_path / "a").mkdir()
    assert cli.main([d, "-o", str(tmp_path / "a" / "m.gguf"), "-q"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[1] for ln in lines] == [str(tmp_path / "a" / "m.gguf"), str(tmp_path / "a" / "mmproj-m.gguf")]
    assert files_in(tmp_path / "a") == {"m.gguf", "mmproj-m.gguf"}
    assert read_gguf(tmp_path / "a" / "mmproj-m.gguf")[0]["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    # --mmproj elsewhere
    (tmp_path / "b").mkdir()
    mm = tmp_path / "b" / "vision.gguf"
    assert cli.main([d, "-o", str(tmp_path / "b" / "m.gguf"), "--mmproj", str(mm), "--outtype", "q8_0", "-q"]) == 0
    assert files_in(tmp_path / "b") == {"m.gguf", "vision.gguf"}
    assert read_gguf(mm)[0]["general.type"] == "mmproj"
    assert str(mm) in capsys.readouterr().out
    # --no-mmproj
    (tmp_path / "c").mkdir()
    assert cli.main([d, "-o", str(tmp_path / "c" / "m.gguf"), "--no-mmproj", "-q"]) == 0
    assert files_in(tmp_path / "c") == {"m.gguf"}
    assert len(capsys.readouterr().out.splitlines()) == 1
    # usage errors: exit 2; a text model with --mmproj: exit 1 with one line, nothing written
    assert cli.main([d, "--mmproj", "x.gguf", "--no-mmproj"]) == 2
    capsys.readouterr()
    (tmp_path / "t").mkdir()
    assert cli.main([str(hf_model_dir("dense_a")), "-o", str(tmp_path / "t" / "m.gguf"),
                     "--mmproj", str(tmp_path / "t" / "mm.gguf"), "-q"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "text-only" in err and len(err.strip().splitlines()) == 1
    assert files_in(tmp_path / "t") == set()


def test_cli_progress_labels_each_file(vl_model_dir, tmp_path, monkeypatch):
    import io

    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    monkeypatch.setattr(cli.sys, "stderr", stream)
    assert cli.main([str(vl_model_dir("vl_a")), "-o", str(tmp_path / "m.gguf")]) == 0
    finished = [seg for seg in stream.getvalue().split("\r") if seg.endswith("\n")]
    assert [seg.split()[0] for seg in finished] == ["model", "mmproj"]


# -- config ----------------------------------------------------------------------------------------

def test_vision_config_both_formats(vl_model_dir):
    a = hfconfig.load_vision_config(hfconfig.load_config(vl_model_dir("vl_baidu")))
    b = hfconfig.load_vision_config(hfconfig.load_config(vl_model_dir("vl_c")))
    assert a == b
    v = _spec("vl_c")["vision"]
    assert (b.depth, b.hidden_size, b.intermediate_size, b.n_heads) == (
        v["depth"], v["hidden_size"], v["intermediate_size"], v["num_heads"])
    assert (b.patch_size, b.spatial_merge_size, b.temporal_merge_size, b.hidden_act, b.layer_norm_eps) == (
        14, 2, 2, "quick_gelu", 1e-6)


def test_vision_config_28b_defaults():
    """Baidu's 28B config.json (vision part) and an HF-native config that leaves the vision defaults."""
    baidu = hfconfig.parse_config({
        "architectures": ["Ernie4_5_VLMoeForConditionalGeneration"], "model_type": "ernie4_5_moe_vl",
        "hidden_size": 2560, "intermediate_size": 12288, "num_hidden_layers": 28, "num_attention_heads": 20,
        "num_key_value_heads": 4, "rms_norm_eps": 1e-5, "rope_theta": 500000, "vocab_size": 103424,
        "moe_num_experts": [64, 64], "moe_intermediate_size": [1536, 512], "moe_k": 6,
        "moe_layer_start_index": [1, 1], "moe_layer_end_index": [29, 28], "moe_layer_interval": 1,
        "moe_num_shared_experts": 2, "freq_allocation": 20, "pixel_hidden_size": 1280,
        "spatial_conv_size": 2, "temporal_conv_size": 2, "use_temporal_conv": True,
        "vision_config": {"depth": 32, "embed_dim": 1280, "hidden_size": 1280, "hidden_act": "quick_gelu",
                          "mlp_ratio": 4, "num_heads": 16, "in_channels": 3, "patch_size": 14,
                          "spatial_merge_size": 2}})
    native = hfconfig.parse_config({
        "architectures": ["Ernie4_5_VLMoeForConditionalGeneration"], "model_type": "ernie4_5_vl_moe",
        "text_config": {"hidden_size": 2560, "intermediate_size": 12288, "num_hidden_layers": 28,
                        "num_attention_heads": 20, "num_key_value_heads": 4},
        "vision_config": {}})
    for hf in (baidu, native):
        v = hfconfig.load_vision_config(hf)
        assert (v.depth, v.hidden_size, v.intermediate_size, v.n_heads, v.patch_size, v.in_channels) == (
            32, 1280, 5120, 16, 14, 3)
        assert (v.spatial_merge_size, v.temporal_merge_size, v.hidden_act, v.layer_norm_eps) == (
            2, 2, "quick_gelu", 1e-6)
        vision.check_supported(v, hf.text.rms_norm_eps)
    with pytest.raises(ConversionError, match="text-only"):
        hfconfig.load_vision_config(hfconfig.parse_config({
            "architectures": ["Ernie4_5ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 1, "num_attention_heads": 4}))
    with pytest.raises(ConversionError, match="depth"):
        hfconfig.load_vision_config(hfconfig.parse_config(dict(
            native.raw, vision_config={"depth": "many"})))


def test_canonical_names():
    c = vision.canonical_name
    for name in ("vision_model.blocks.3.attn.qkv.weight", "model.vision_model.blocks.3.attn.qkv.weight",
                 "model.vision_tower.blocks.3.attn.qkv.weight", "vision_tower.blocks.3.attn.qkv.weight"):
        assert c(name) == "vision_model.blocks.3.attn.qkv.weight"
    for name in ("model.resampler_model.spatial_linear.0.weight", "resampler_model.spatial_linear.fc1.weight",
                 "model.resampler_model.spatial_linear.fc1.weight"):
        assert c(name) == "model.resampler_model.spatial_linear.0.weight"
    assert c("model.resampler_model.temporal_linear.ln.bias") == "model.resampler_model.temporal_linear.3.bias"
    assert c("model.resampler_model.mlp.weight") == "model.resampler_model.mlp.weight"
    assert c("model.layers.0.mlp.fc1.weight") is None and c("model.embed_tokens.weight") is None


# -- the synthetic mmproj --------------------------------------------------------------------------

def test_synthetic_mmproj_matches_a_converted_one(vl_mmproj, tmp_path):
    # vl_a's vision tower has the synthetic defaults (width 32, 2 heads, MLP 64, one block); text width 256
    path = synthetic.write_tiny_mmproj(tmp_path / "tiny.gguf", n_embd_text=256)
    kv, ts = read_gguf(path)
    kv_ref, ts_ref = read_gguf(vl_mmproj("vl_a"))
    assert [(g, t[0], t[1]) for g, t in ts.items()] == [(g, t[0], t[1]) for g, t in ts_ref.items()]
    skip = ("general.name", "general.size_label", "general.basename", "general.finetune")
    assert {k: v for k, v in kv.items() if k not in skip} == {k: v for k, v in kv_ref.items() if k not in skip}
    assert synthetic.write_tiny_mmproj(tmp_path / "again.gguf", n_embd_text=256).read_bytes() == path.read_bytes()
    # random, non-degenerate weights
    assert all(np.abs(t[2]).max() > 0 for t in ts.values())
    assert not np.array_equal(ts["mm.0.weight"][2], ts["mm.1.weight"][2])
    # other sizes and types follow the same pattern
    _, t8 = read_gguf(synthetic.write_tiny_mmproj(tmp_path / "q8.gguf", n_embd_text=64, outtype="q8_0", depth=2))
    _, t8_ref = read_gguf(vl_mmproj("vl_a", "q8_0"))
    assert "v.blk.1.ffn_down.bias" in t8 and t8["mm.6.weight"][1] == (64, 128)
    assert {g: t[0] for g, t in t8.items() if not g.startswith("v.blk.1.")} == {g: t[0] for g, t in t8_ref.items()}
