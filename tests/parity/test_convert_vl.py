"""The ERNIE 4.5 VL language-model converter (``ernie4_5-vl-moe``): read the written GGUFs back and
check values against the transformers checkpoint and the reference model itself."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

import pyllama_ernie.convert as convert_pkg
from reference_models import VL_MODELS, VL_TOKEN_KEYS, model_vocab_size
from test_convert import dequant, files_in, hf_weights, read_gguf

ConversionError = convert_pkg.ConversionError
convert = convert_pkg.convert
parse = convert_pkg.hfconfig.parse_config
vl = importlib.import_module(f"{convert_pkg.__name__}.ernie4_5_vl")
synthetic = importlib.import_module(f"{convert_pkg.__name__}.synthetic")

A = "ernie4_5-vl-moe"
HF_MODELS = ["vl_a", "vl_b", "vl_c"]
BOUND = 1e-4
EXACT = dict(kv_cache_type="f32", flash_attn=False)


def _spec(name: str) -> dict[str, Any]:
    spec = VL_MODELS[name]
    return VL_MODELS[spec["baidu_of"]] if "baidu_of" in spec else spec


def _layout(name: str) -> tuple[list[int], int, int]:
    """(MoE layers, leading dense count, step) of a fixture model, from its mlp_layer_types."""
    t = _spec(name)["text"]
    n = t["num_hidden_layers"]
    types = t.get("mlp_layer_types", ["dense"] + ["sparse"] * (n - 1))
    layers = [i for i, k in enumerate(types) if k == "sparse"]
    return layers, layers[0], (layers[1] - layers[0]) if len(layers) > 1 else 1


def _pairs_of_reference(ref) -> tuple[np.ndarray, np.ndarray]:
    """For each reference rope pair j: the position axis it uses (0 t, 1 h, 2 w) and its frequency,
    measured on the reference's own rotary embedding (position 1 on one axis, 0 on the others)."""
    import torch

    rot = ref.model.language_model.rotary_emb
    axis, freq = None, None
    for a in range(3):
        pos = torch.zeros(3, 1, 1)
        pos[a] = 1.0
        cos, sin = rot(torch.zeros(1, dtype=torch.float32), pos)
        ang = torch.atan2(sin[0, 0, 0::2], cos[0, 0, 0::2]).double().numpy()  # pair j = elements (2j, 2j+1)
        if axis is None:
            axis, freq = np.full(len(ang), -1), np.zeros(len(ang))
        used = np.abs(ang) > 0
        assert not (used & (axis >= 0)).any()
        axis[used], freq[used] = a, ang[used]
    assert (axis >= 0).all()
    return axis, freq


# -- hyperparameters --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", HF_MODELS)
def test_hparams(name, vl_gguf, ernie_tokenizer):
    kv, ts = read_gguf(vl_gguf(name))
    spec = _spec(name)
    t = spec["text"]
    hd = t["hidden_size"] // t["num_attention_heads"]
    h, w, tt = spec["mrope"]
    layers, lead, step = _layout(name)
    E, (F, F_vl), n_shared = t["moe_num_experts"], t["moe_intermediate_size"], t["moe_num_shared_experts"]
    assert kv["general.architecture"] == A
    expect = {
        "context_length": 4096, "embedding_length": t["hidden_size"], "block_count": t["num_hidden_layers"],
        "feed_forward_length": t["intermediate_size"], "attention.head_count": t["num_attention_heads"],
        "attention.head_count_kv": t["num_key_value_heads"], "rope.freq_base": 500000.0,
        "rope.dimension_count": hd, "rope.dimension_sections": [tt, h, w, 0],
        "expert_count": E, "expert_used_count": t["moe_k"], "expert_feed_forward_length": F,
        "expert_count_vl": E, "expert_feed_forward_length_vl": F_vl,
        "expert_shared_count": n_shared, "expert_shared_feed_forward_length": F * n_shared,
        "leading_dense_block_count": lead, "interleave_moe_layer_step": step,
    }
    for k, v in expect.items():
        assert kv[f"{A}.{k}"] == v, k
    assert kv[f"{A}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    arch_keys = {k[len(A) + 1:] for k in kv if k.startswith(A + ".")}
    assert arch_keys == set(expect) | {"attention.layer_norm_rms_epsilon"}  # no rope scaling, no key_length
    # the sections are an array of uint32
    field = gguf.GGUFReader(vl_gguf(name)).fields[f"{A}.rope.dimension_sections"]
    assert field.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32]
    # the loader's MoE rule picks exactly the reference's MoE layers
    n = t["num_hidden_layers"]
    assert [i for i in range(n) if i >= lead and (i + 1) % step == 0] == layers
    assert all(f"blk.{i}.ffn_gate_inp_vl.weight" in ts for i in layers)
    assert all(f"blk.{i}.ffn_gate.weight" in ts for i in range(n) if i not in layers)
    assert kv["tokenizer.ggml.eot_token_id"] == ernie_tokenizer["special_ids"]["<|end_of_sentence|>"]


def test_28b_rope_layout():
    """Spec section 4: sections {20, 22, 22, 0}, src = 44.., 0, 2, .., 1, 3, .. and the factors."""
    sections, src = vl.rope_layout(128, [22, 22, 20])
    assert sections == [20, 22, 22, 0]
    exp = [44 + p for p in range(20)] + [2 * (p - 20) for p in range(20, 42)] + [2 * (p - 42) + 1 for p in range(42, 64)]
    assert src.tolist() == exp
    f = vl.rope_freqs(128, 500000.0, src)
    assert f.dtype == np.float32
    np.testing.assert_allclose(f, [500000.0 ** (2 * (s - p) / 128) for p, s in enumerate(exp)], rtol=1e-6)
    order = vl.qk_row_order(src)
    assert order[0] == 88 and order[64] == 89 and sorted(order.tolist()) == list(range(128))
    for bad in ([22, 21, 21], [22, 22, 21], [23, 21, 20]):
        with pytest.raises(ConversionError):
            vl.rope_layout(128, bad)


# -- tensors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", HF_MODELS)
def test_tensors_f32(name, vl_gguf, vl_model_dir, vl_reference_model):
    """Every tensor against the checkpoint; Q/K un-permuted exactly; rope_freqs and the permutation
    against the reference's own rotary embedding; routers, pools and biases against the reference."""
    kv, ts = read_gguf(vl_gguf(name))
    w = hf_weights(vl_model_dir(name))
    spec = _spec(name)
    t = spec["text"]
    H, nh, nkv, n = t["hidden_size"], t["num_attention_heads"], t["num_key_value_heads"], t["num_hidden_layers"]
    hd, half = H // nh, H // nh // 2
    E, (F, F_vl), n_shared = t["moe_num_experts"], t["moe_intermediate_size"], t["moe_num_shared_experts"]
    layers, _, _ = _layout(name)
    ref = vl_reference_model(name)

    def get(g):
        tname, shape, data = ts[g]
        assert tname == "F32", g
        return data.reshape(shape)

    # which reference row each written Q row holds (rows are random, so the match is unique)
    q_ref, q_out = w["model.layers.0.self_attn.q_proj.weight"][:hd], get("blk.0.attn_q.weight")[:hd]
    order = np.array([int(np.flatnonzero((q_ref == row).all(axis=1))[0]) for row in q_out])
    src = order[:half] // 2
    assert (order[:half] % 2 == 0).all() and (order[half:] == order[:half] + 1).all()
    assert sorted(src.tolist()) == list(range(half))

    # ggml pair p: axis from the sections (rows t, h, w), frequency theta^(-2p/D) / rope_freqs[p];
    # it must be the reference's pair src[p]
    sections = kv[f"{A}.rope.dimension_sections"]
    axis = np.repeat([0, 1, 2], sections[:3])
    freqs = get("rope_freqs.weight")
    assert freqs.shape == (half,)
    ggml_freq = 500000.0 ** (-2.0 * np.arange(half) / hd) / freqs.astype(np.float64)
    ref_axis, ref_freq = _pairs_of_reference(ref)
    assert (axis == ref_axis[src]).all()
    np.testing.assert_allclose(ggml_freq, ref_freq[src], rtol=2e-6)
    assert not np.allclose(freqs, 1.0)

    exp: dict[str, np.ndarray] = {"token_embd.weight": w["model.embed_tokens.weight"],
                                  "output_norm.weight": w["model.norm.weight"]}
    if not spec["tie"]:
        exp["output.weight"] = w["lm_head.weight"]
    for i in range(n):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        exp[b + "attn_norm.weight"] = w[p + "input_layernorm.weight"]
        exp[b + "ffn_norm.weight"] = w[p + "post_attention_layernorm.weight"]
        for proj, heads, g in (("q", nh, "attn_q"), ("k", nkv, "attn_k")):
            orig = w[p + f"self_attn.{proj}_proj.weight"].reshape(heads, hd, H)
            exp[b + g + ".weight"] = orig[:, order].reshape(heads * hd, H)
            # and back: un-permuting gives the checkpoint exactly
            back = np.empty_like(orig)
            back[:, order] = get(b + g + ".weight").reshape(heads, hd, H)
            np.testing.assert_array_equal(back.reshape(-1, H), w[p + f"self_attn.{proj}_proj.weight"])
        exp[b + "attn_v.weight"] = w[p + "self_attn.v_proj.weight"]
        exp[b + "attn_output.weight"] = w[p + "self_attn.o_proj.weight"]
        if i in layers:
            m = p + "mlp."
            exp[b + "ffn_gate_inp.weight"] = w[m + "gate.weight"].T
            exp[b + "ffn_gate_inp_vl.weight"] = w[m + "gate.weight_1"].T
            bias = w[m + "moe_statics.e_score_correction_bias"]
            assert bias.shape == (2, E) and np.abs(bias[0] - bias[1]).max() > 0.01
            exp[b + "exp_probs_b.bias"], exp[b + "exp_probs_b_vl.bias"] = bias[0], bias[1]
            for proj in ("gate", "up", "down"):
                exp[b + f"ffn_{proj}_exps.weight"] = np.stack([w[m + f"experts.{e}.{proj}_proj.weight"] for e in range(E)])
                exp[b + f"ffn_{proj}_exps_vl.weight"] = np.stack(
                    [w[m + f"experts.{e}.{proj}_proj.weight"] for e in range(E, 2 * E)])
                exp[b + f"ffn_{proj}_shexp.weight"] = w[m + f"shared_experts.{proj}_proj.weight"]
        else:
            for proj in ("gate", "up", "down"):
                exp[b + f"ffn_{proj}.weight"] = w[p + f"mlp.{proj}_proj.weight"]
    assert set(ts) == set(exp) | {"rope_freqs.weight"}
    for g, val in exp.items():
        assert ts[g][1] == val.shape, g
        np.testing.assert_array_equal(get(g), val, err_msg=g)

    # against the reference model's own modules (not the file layout): pools split by index
    i = layers[0]
    b, mlp = f"blk.{i}.", ref.model.language_model.layers[i].mlp
    np.testing.assert_array_equal(get(b + "ffn_gate_inp.weight"), mlp.text_moe.gate.weight.detach().numpy())
    np.testing.assert_array_equal(get(b + "ffn_gate_inp_vl.weight"), mlp.vision_moe.gate.weight.detach().numpy())
    np.testing.assert_array_equal(get(b + "exp_probs_b.bias"),
                                  mlp.text_moe.gate.moe_statics.e_score_correction_bias.detach().numpy()[0])
    np.testing.assert_array_equal(get(b + "exp_probs_b_vl.bias"),
                                  mlp.vision_moe.gate.moe_statics.e_score_correction_bias.detach().numpy()[0])
    for pool, suffix, ff in ((mlp.text_moe, "", F), (mlp.vision_moe, "_vl", F_vl)):
        gate_up = pool.experts.gate_up_proj.detach().numpy()  # [E, 2F, H]: gate rows, then up rows
        assert gate_up.shape == (E, 2 * ff, H)
        np.testing.assert_array_equal(get(b + f"ffn_gate_exps{suffix}.weight"), gate_up[:, :ff])
        np.testing.assert_array_equal(get(b + f"ffn_up_exps{suffix}.weight"), gate_up[:, ff:])
        np.testing.assert_array_equal(get(b + f"ffn_down_exps{suffix}.weight"), pool.experts.down_proj.detach().numpy())
    assert ts[b + "ffn_up_shexp.weight"][1] == (F * n_shared, H)
    assert mlp.shared_experts.up_proj.weight.shape == (F * n_shared, H)


@pytest.mark.parametrize("name,outtype", [("vl_c", "q8_0"), ("vl_b", "q8_0"), ("vl_a", "f16")])
def test_types_under_quantization(name, outtype, vl_gguf):
    kv, ts = read_gguf(vl_gguf(name, outtype))
    _, ts32 = read_gguf(vl_gguf(name))
    assert set(ts) == set(ts32)
    for g, (tname, shape, data) in ts.items():
        must_f32 = (len(shape) == 1 or g.endswith(("_norm.weight", ".ffn_gate_inp.weight", ".ffn_gate_inp_vl.weight"))
                    or g.endswith(".bias") or g == "rope_freqs.weight")
        if must_f32:
            assert tname == "F32", g
            np.testing.assert_array_equal(data.reshape(shape), ts32[g][2].reshape(shape), err_msg=g)
        elif outtype == "q8_0":
            assert tname == ("Q8_0" if shape[-1] % 32 == 0 else "F16"), g
            got = dequant(data, tname).reshape(shape)
            assert np.abs(got - ts32[g][2].reshape(shape)).max() <= np.abs(ts32[g][2]).max() / 100, g
        else:
            assert tname == "F16", g
    routers = [g for g in ts if "ffn_gate_inp" in g]
    assert routers and any(g.endswith("_vl.weight") for g in routers)
    if outtype == "q8_0":
        assert kv["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
        assert any(ts[g][0] == "Q8_0" for g in ts if "_exps_vl" in g)


def test_special_tokens(vl_gguf, vl_reference_model, ernie_tokenizer):
    kv, _ = read_gguf(vl_gguf("vl_a"))
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    cfg = vl_reference_model("vl_a").config
    assert len(tokens) == model_vocab_size(ernie_tokenizer["n_pieces"])
    for key, text in VL_TOKEN_KEYS.items():
        tid = getattr(cfg, key)
        assert tokens[tid] == text and types[tid] == gguf.TokenType.CONTROL, key
    assert tokens[kv["tokenizer.ggml.eot_token_id"]] == "<|end_of_sentence|>"


# -- the converted files run like the reference -----------------------------------------------------

def _ref_logits(ref, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return ref(input_ids=torch.tensor([ids])).logits[0].double().numpy()


@pytest.mark.parametrize("name", HF_MODELS)
def test_text_logits_match_reference(name, vl_gguf, vl_reference_model, reference_tokenizer_vl):
    """Text only (t = h = w): this checks the Q/K permutation and rope_freqs end to end."""
    pytest.importorskip("pyllama_ernie._lib", reason="pyllama_ernie is not built")
    from pyllama_ernie import Model

    ids = reference_tokenizer_vl(name)("the quick brown fox jumps over the lazy dog. 你好世界 🚀 emoji")["input_ids"]
    ref = _ref_logits(vl_reference_model(name), ids)
    with Model(vl_gguf(name), n_ctx=256, **EXACT) as m:
        assert m.n_pos_per_embd == 4  # M-RoPE
        ours = m.logits(ids)
        sep = m.tokenize("<|end_of_sentence|>", add_special=False, parse_special=True)
        assert len(sep) == 1 and m.is_eog(sep[0])
        img = m.tokenize("<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>", add_special=False, parse_special=True)
        cfg = vl_reference_model(name).config
        assert img == [cfg.image_start_token_id, cfg.image_token_id, cfg.image_end_token_id]
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    print(f"{name}: max rel err {err:.2e} over {len(ids)} positions")
    assert err < BOUND, (name, err)


def test_logits_check_can_fail(vl_model_dir, vl_reference_model, reference_tokenizer_vl, tmp_path, monkeypatch):
    """Without the frequency factors (plain M-RoPE frequencies) the same check fails by far."""
    pytest.importorskip("pyllama_ernie._lib", reason="pyllama_ernie is not built")
    from pyllama_ernie import Model

    monkeypatch.setattr(vl, "rope_freqs", lambda hd, theta, src: np.ones(len(src), dtype=np.float32))
    out = convert(vl_model_dir("vl_b"), tmp_path / "wrong.gguf", "f32")
    ids = reference_tokenizer_vl("vl_b")("the quick brown fox jumps over the lazy dog")["input_ids"]
    ref = _ref_logits(vl_reference_model("vl_b"), ids)
    with Model(out, n_ctx=256, **EXACT) as m:
        err = np.abs(m.logits(ids) - ref).max() / np.abs(ref).max()
    assert err > 100 * BOUND


# -- Baidu's original config format -----------------------------------------------------------------

def test_baidu_format_gives_the_same_file(vl_gguf, vl_model_dir):
    d = vl_model_dir("vl_baidu")
    raw = json.loads((d / "config.json").read_text())
    assert raw["model_type"] == "ernie4_5_moe_vl" and "text_config" not in raw
    assert isinstance(raw["moe_num_experts"], list) and raw["freq_allocation"] == 4
    names = set(hf_weights(d))
    assert any(k.startswith("vision_model.") for k in names) and "lm_head.weight" in names
    hf = convert_pkg.hfconfig.load_config(d)
    hf_native = convert_pkg.hfconfig.load_config(vl_model_dir("vl_c"))
    assert hf.extra["format"] == "baidu" and hf_native.extra["format"] == "hf"
    assert _same_text(hf.text, hf_native.text)
    # Baidu's config names only the image placeholder (im_patch_id); the other ids keep the 28B's values
    assert hf.extra["image_token_id"] == hf_native.extra["image_token_id"] == raw["im_patch_id"]
    assert hf.extra["image_start_token_id"] == 101304
    assert hf.extra["vision"] == {**hf_native.extra["vision"]}
    assert vl_gguf("vl_baidu").read_bytes() == vl_gguf("vl_c").read_bytes()


def test_fused_and_prefixed_layout(vl_model_dir, vl_gguf, tmp_path):
    """qkv_proj / up_gate_proj (Baidu's fused layout) and the "ernie." prefix give the same tensors."""
    from safetensors.numpy import save_file

    src = vl_model_dir("vl_a")
    d = tmp_path / "fused"
    shutil.copytree(src, d)
    w = hf_weights(src)
    fused = {}
    for k, v in w.items():
        if k.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight", "up_proj.weight")) and ".experts." not in k:
            continue  # folded into the fused tensors below
        if k.endswith("self_attn.q_proj.weight"):
            p = k[: -len("q_proj.weight")]
            k, v = p + "qkv_proj.weight", np.concatenate([v, w[p + "k_proj.weight"], w[p + "v_proj.weight"]])
        elif k.endswith("gate_proj.weight") and ".experts." not in k:
            p = k[: -len("gate_proj.weight")]
            k, v = p + "up_gate_proj.weight", np.concatenate([v, w[p + "up_proj.weight"]])
        fused["ernie." + k[len("model."):] if k.startswith("model.layers") else k] = v
    for f in d.glob("*.safetensors"):
        f.unlink()
    save_file(fused, str(d / "model.safetensors"))
    _, ts_fused = read_gguf(convert(d, tmp_path / "f.gguf", "f32"))
    _, ts = read_gguf(vl_gguf("vl_a"))
    assert set(ts_fused) == set(ts)
    for g in ts:
        np.testing.assert_array_equal(ts_fused[g][2], ts[g][2], err_msg=g)


def _same_text(a, b) -> bool:
    """TextConfigs equal but for how the MoE layer range was spelled."""
    ma, mb = a.moe, b.moe
    assert ma.moe_layers(a.n_layers) == mb.moe_layers(b.n_layers)
    assert vl.moe_layout(a) == vl.moe_layout(b)
    fields = ("n_experts", "top_k", "n_shared", "expert_ff", "n_experts_vl", "expert_ff_vl")
    assert all(getattr(ma, f) == getattr(mb, f) for f in fields)
    strip = dict(moe=None)
    return a.__class__(**{**a.__dict__, **strip}) == b.__class__(**{**b.__dict__, **strip})


def _baidu(**kw) -> dict[str, Any]:
    cfg = dict(architectures=["Ernie4_5_VLMoeForConditionalGeneration"], model_type="ernie4_5_moe_vl",
               hidden_size=2560, intermediate_size=12288, num_hidden_layers=28, num_attention_heads=20,
               num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=500000, max_position_embeddings=131072,
               vocab_size=103424, tie_word_embeddings=True, moe_num_experts=[64, 64],
               moe_intermediate_size=[1536, 512], moe_k=6, moe_layer_start_index=[1, 1],
               moe_layer_end_index=[29, 28], moe_layer_interval=1, moe_num_shared_experts=2,
               freq_allocation=20, rope_3d=True, im_patch_id=100295, pixel_hidden_size=1280,
               spatial_conv_size=2, temporal_conv_size=2,
               vision_config=dict(depth=32, embed_dim=1280, hidden_size=1280, mlp_ratio=4, num_heads=16,
                                  patch_size=14, spatial_merge_size=2, in_channels=3))
    cfg.update(kw)
    return cfg


def test_baidu_config_28b():
    hf = parse(_baidu())
    t, m = hf.text, hf.text.moe
    assert (t.head_dim, t.mrope_section, t.rope_theta, t.tie_word_embeddings) == (128, (22, 22, 20), 500000.0, True)
    assert (m.n_experts, m.n_experts_vl, m.expert_ff, m.expert_ff_vl, m.top_k, m.n_shared, m.shared_ff) == (
        64, 64, 1536, 512, 6, 2, 3072)
    assert m.moe_layers(28) == list(range(1, 28)) and vl.moe_layout(t) == (1, 1)
    assert vl.rope_layout(t.head_dim, t.mrope_section)[0] == [20, 22, 22, 0]
    assert hf.extra["image_token_id"] == 100295 and hf.extra["vision"]["hidden_size"] == 1280
    assert hf.extra["vision"]["intermediate_size"] == 5120
    # the same from transformers' HF-native form of that config
    native = parse(dict(architectures=["Ernie4_5_VLMoeForConditionalGeneration"], model_type="ernie4_5_vl_moe",
                        text_config=dict(hidden_size=2560, intermediate_size=12288, num_hidden_layers=28,
                                         num_attention_heads=20, num_key_value_heads=4, rms_norm_eps=1e-5,
                                         moe_num_experts=64, moe_intermediate_size=[1536, 512],
                                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0,
                                                          "mrope_section": [22, 22, 20]}),
                        vision_config=dict(depth=32, hidden_size=1280)))
    assert native.text.moe.moe_layers(28) == m.moe_layers(28)
    assert (native.text.mrope_section, native.text.moe.shared_ff, native.text.moe.top_k) == ((22, 22, 20), 3072, 6)


@pytest.mark.parametrize("kw,layers,layout", [
    (dict(moe_layer_start_index=1, moe_layer_end_index=-1), list(range(1, 28)), (1, 1)),
    (dict(moe_layer_start_index=[3, 3], moe_layer_end_index=27), list(range(3, 28)), (3, 1)),
    (dict(moe_layer_start_index=0, moe_layer_interval=2), list(range(1, 28, 2)), (1, 2)),
    (dict(moe_layer_start_index=2, moe_layer_interval=2, moe_layer_end_index=[27, 27]), list(range(3, 28, 2)), (3, 2)),
    (dict(moe_layer_interval=2, moe_layer_end_index=[26, 26]), list(range(1, 26, 2)), None),  # layer 27 dense
    (dict(rope_scaling={"rope_type": "ernie_3d", "freq_allocation": 20}), list(range(1, 28)), (1, 1)),
])
def test_baidu_layouts(kw, layers, layout):
    t = parse(_baidu(**kw)).text
    assert t.moe.moe_layers(28) == layers
    if layout is None:
        with pytest.raises(ConversionError, match="cannot represent"):
            vl.moe_layout(t)
    else:
        assert vl.moe_layout(t) == layout


@pytest.mark.parametrize("kw,match", [
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope scaling"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope scaling"),
    (dict(freq_allocation=21), "freq_allocation"),
    (dict(rope_3d=False), "rope_3d"),
    (dict(moe_layer_start_index=[1, 2]), "different layers"),
    (dict(moe_num_experts=[64, 0]), "moe_num_experts"),
    (dict(moe_k=65), "moe_k"),
    (dict(moe_intermediate_size=[1536, 512, 3]), "moe_intermediate_size"),
])
def test_baidu_config_errors(kw, match):
    with pytest.raises(ConversionError, match=match):
        parse(_baidu(**kw))


def test_baidu_layout_with_trailing_dense_layers_is_refused():
    t = parse(_baidu(moe_layer_end_index=[20, 20])).text  # MoE 1..20, dense 21..27
    with pytest.raises(ConversionError, match="cannot represent"):
        vl.moe_layout(t)


def _native(**text_kw) -> dict[str, Any]:
    text = dict(hidden_size=128, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, moe_num_experts=4, moe_k=2, moe_intermediate_size=[32, 16],
                rope_parameters={"rope_type": "default", "rope_theta": 500000.0, "mrope_section": [6, 6, 4]})
    text.update(text_kw)
    return dict(architectures=["Ernie4_5_VLMoeForConditionalGeneration"], model_type="ernie4_5_vl_moe",
                text_config=text, vision_config={})


@pytest.mark.parametrize("types,layout", [
    (["dense", "sparse", "sparse", "sparse"], (1, 1)),
    (["sparse", "sparse", "sparse", "sparse"], (0, 1)),
    (["dense", "sparse", "dense", "sparse"], (1, 2)),
    (["dense", "sparse", "dense", "dense"], None),  # step 2 would make layer 3 MoE too
    (["dense", "sparse", "dense"], (1, 2)),  # ... unless it does not exist
    (["dense", "dense", "dense", "sparse"], (3, 1)),
    (["sparse", "dense", "sparse", "dense"], None),
    (["dense", "sparse", "sparse", "dense"], None),
    (["dense", "dense", "dense", "dense"], None),
])
def test_native_layouts(types, layout):
    t = parse(_native(mlp_layer_types=types, num_hidden_layers=len(types))).text
    if layout is None:
        with pytest.raises(ConversionError):
            vl.moe_layout(t)
    else:
        assert vl.moe_layout(t) == layout


@pytest.mark.parametrize("kw,match", [
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0, "mrope_section": [6, 6, 4]}),
     "rope scaling"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 5e5, "mrope_section": [7, 5, 4]}), "h == w"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 5e5, "mrope_section": [6, 6, 6]}), "head_dim"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 5e5}), "head_dim"),  # default [22, 22, 20]
    (dict(mlp_layer_types=["dense", "sparse"]), "mlp_layer_types"),
    (dict(hidden_act="gelu"), "hidden_act"),
])
def test_native_config_errors(kw, match):
    with pytest.raises(ConversionError, match=match):
        parse(_native(**kw))


# -- errors leave no file ---------------------------------------------------------------------------

def _copy(d: Path, tmp_path: Path) -> Path:
    out = tmp_path / "ckpt"
    shutil.copytree(d, out)
    return out


@pytest.mark.parametrize("case", ["rope_scaling", "layout", "missing_vision_router", "wrong_router_shape",
                                  "baidu_rope_scaling"])
def test_errors_leave_no_file(case, vl_model_dir, tmp_path):
    d = _copy(vl_model_dir("vl_baidu" if case.startswith("baidu") else "vl_a"), tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    if case == "rope_scaling":
        cfg["text_config"]["rope_parameters"].update(rope_type="yarn", factor=4.0, original_max_position_embeddings=1024)
        match = "rope scaling"
    elif case == "layout":
        cfg["text_config"]["mlp_layer_types"] = ["sparse", "dense", "sparse"]
        match = "cannot represent this layer layout"
    elif case == "baidu_rope_scaling":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
        match = "rope scaling"
    else:
        from safetensors.numpy import save_file

        w = hf_weights(d)
        if case == "missing_vision_router":
            del w["model.layers.2.mlp.gate.weight_1"]
            match = "model.layers.2.mlp.gate.weight_1"
        else:
            w["model.layers.1.mlp.gate.weight"] = np.ascontiguousarray(w["model.layers.1.mlp.gate.weight"].T)
            match = "has shape"
        save_file(w, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ConversionError, match=match):
        convert(d, out / "m.gguf", "q8_0")
    assert files_in(out) == set()


# -- command line, synthetic model ------------------------------------------------------------------

def test_cli_dispatches_on_the_architecture(vl_model_dir, tmp_path, capsys):
    from pyllama_ernie.cli import main

    out = tmp_path / "c.gguf"
    assert main(["convert", str(vl_model_dir("vl_baidu")), "-o", str(out), "--outtype", "f16", "-q"]) == 0
    assert "wrote" in capsys.readouterr().out
    kv, ts = read_gguf(out)
    assert kv["general.architecture"] == A and "blk.3.ffn_gate_inp_vl.weight" in ts


def test_synthetic_vl_model(tiny_gguf, tmp_path):
    path = tiny_gguf(A)
    kv, ts = read_gguf(path)
    assert kv["general.architecture"] == A
    assert kv[f"{A}.rope.dimension_sections"] == [2, 3, 3, 0] and kv[f"{A}.rope.dimension_count"] == 16
    assert (kv[f"{A}.expert_count"], kv[f"{A}.expert_count_vl"]) == (4, 6)
    assert (kv[f"{A}.expert_feed_forward_length"], kv[f"{A}.expert_feed_forward_length_vl"]) == (32, 16)
    assert (kv[f"{A}.expert_shared_count"], kv[f"{A}.expert_shared_feed_forward_length"]) == (1, 32)
    assert kv[f"{A}.leading_dense_block_count"] == 1 and "blk.0.ffn_up.weight" in ts
    assert ts["blk.1.ffn_gate_exps_vl.weight"][1] == (6, 16, 64) and ts["blk.1.ffn_gate_exps.weight"][1] == (4, 32, 64)
    assert ts["blk.1.ffn_gate_inp_vl.weight"][1] == (6, 64)
    for g in ("blk.1.exp_probs_b.bias", "blk.1.exp_probs_b_vl.bias"):
        assert np.abs(ts[g][2]).max() > 0
    _, src = vl.rope_layout(16, [3, 3, 2])
    np.testing.assert_array_equal(ts["rope_freqs.weight"][2], vl.rope_freqs(16, 500000.0, src))
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    for tok in VL_TOKEN_KEYS.values():
        assert types[tokens.index(tok)] == gguf.TokenType.CONTROL, tok
    assert tokens[kv["tokenizer.ggml.eot_token_id"]] == "<|end_of_sentence|>"
    assert synthetic.write_tiny_gguf(A, tmp_path / "again.gguf").read_bytes() == path.read_bytes()
    q8 = synthetic.write_tiny_gguf(A, tmp_path / "q8.gguf", outtype="q8_0")
    _, tq = read_gguf(q8)
    assert tq["blk.1.ffn_gate_inp_vl.weight"][0] == "F32" and tq["blk.1.ffn_gate_exps.weight"][0] == "Q8_0"

    pytest.importorskip("pyllama_ernie._lib", reason="pyllama_ernie is not built")
    from pyllama_ernie import Model

    for p in (path, q8):
        with Model(p, n_ctx=128, **EXACT) as m:
            logits = m.logits([1, 5, 6, 7, 8])
            assert np.isfinite(logits).all() and logits.std() > 0.1
            assert m.is_eog(kv["tokenizer.ggml.eot_token_id"])
