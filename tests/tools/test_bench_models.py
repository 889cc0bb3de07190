"""benchmarks/make_models.py and benchmarks/vs_transformers.py at the tiny shape: the GGUFs written have
the architecture, shapes and tensor types asked for, and the transformers benchmark returns sane figures."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("pyllama_ernie._lib", reason="pyllama_ernie is not built (pip install .)")
for _mod in ("torch", "transformers", "sentencepiece", "tokenizers", "safetensors"):
    pytest.importorskip(_mod, reason=f"the benchmark models need {_mod} (not installed)")

import gguf

pytestmark = pytest.mark.reference  # builds its models with the transformers reference stack

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
Q = gguf.GGMLQuantizationType


def _load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


make_models_mod = _load("make_models")
vs_transformers = _load("vs_transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, dict[str, Path]]:
    import torch

    threads = torch.get_num_threads()
    try:
        return make_models_mod.make_models(tmp_path_factory.mktemp("bench_models"), tiny=True, threads=1)
    finally:
        torch.set_num_threads(threads)


def _field(r: gguf.GGUFReader, key: str) -> Any:
    f = r.get_field(key)
    assert f is not None, f"{key} missing"
    return f.contents()


def _types(r: gguf.GGUFReader) -> dict[str, Q]:
    return {t.name: Q(t.tensor_type) for t in r.tensors}


def test_paths(tiny):
    assert set(tiny) == {"vl", "moe"}
    assert set(tiny["vl"]) == {"hf", "F16", "Q8_0", "Q4_K_M", "mmproj", "mmproj_Q8_0"}
    assert set(tiny["moe"]) == {"hf", "F16", "Q8_0", "Q4_K_M"}
    for paths in tiny.values():
        assert (paths["hf"] / "config.json").is_file()
        assert list(paths["hf"].glob("*.safetensors"))
        for key, p in paths.items():
            if key != "hf":
                assert p.is_file() and p.stat().st_size > 0, p
                assert p.read_bytes()[:4] == b"GGUF"
    assert not list(tiny["vl"]["hf"].parent.glob("*.part"))


@pytest.mark.parametrize("kind", ["vl", "moe"])
@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_K_M"])
def test_gguf_metadata(tiny, kind, qtype):
    shape = make_models_mod.TINY
    t = shape["text"]
    arch = {"vl": "ernie4_5-vl-moe", "moe": "ernie4_5-moe"}[kind]
    r = gguf.GGUFReader(tiny[kind][qtype])
    assert _field(r, "general.architecture") == arch
    assert _field(r, f"{arch}.block_count") == t["num_hidden_layers"]
    assert _field(r, f"{arch}.embedding_length") == t["hidden_size"]
    assert _field(r, f"{arch}.attention.head_count") == t["num_attention_heads"]
    assert _field(r, f"{arch}.attention.head_count_kv") == t["num_key_value_heads"]
    assert _field(r, f"{arch}.expert_count") == t["moe_num_experts"]
    assert _field(r, f"{arch}.expert_used_count") == t["moe_k"]
    assert _field(r, f"{arch}.leading_dense_block_count") == 1
    assert _field(r, f"{arch}.feed_forward_length") == t["intermediate_size"]
    assert _field(r, f"{arch}.expert_feed_forward_length") == shape["moe_ff"][0]
    assert _field(r, f"{arch}.expert_shared_count") == t["moe_num_shared_experts"]
    if kind == "vl":
        assert _field(r, f"{arch}.expert_count_vl") == t["moe_num_experts"]
        assert _field(r, f"{arch}.expert_feed_forward_length_vl") == shape["moe_ff"][1]
    n_vocab = len(_field(r, "tokenizer.ggml.tokens"))
    tensors = {x.name: x for x in r.tensors}
    assert [int(d) for d in tensors["token_embd.weight"].shape] == [t["hidden_size"], n_vocab]
    # layer 0 dense, the others MoE (text experts, in the VL model vision experts too)
    assert "blk.0.ffn_gate.weight" in tensors and "blk.0.ffn_gate_exps.weight" not in tensors
    for i in range(1, t["num_hidden_layers"]):
        gate = tensors[f"blk.{i}.ffn_gate_exps.weight"]
        assert [int(d) for d in gate.shape] == [t["hidden_size"], shape["moe_ff"][0], t["moe_num_experts"]]
        shexp = tensors[f"blk.{i}.ffn_gate_shexp.weight"]
        assert int(shexp.shape[1]) == shape["moe_ff"][0] * t["moe_num_shared_experts"]
        if kind == "vl":
            vgate = tensors[f"blk.{i}.ffn_gate_exps_vl.weight"]
            assert [int(d) for d in vgate.shape] == [t["hidden_size"], shape["moe_ff"][1], t["moe_num_experts"]]
    types = set(_types(r).values())
    want = {"F16": {Q.F16}, "Q8_0": {Q.Q8_0}, "Q4_K_M": {Q.Q4_K, Q.Q6_K}}[qtype]
    assert want <= types, f"{qtype}: tensor types {sorted(x.name for x in types)}"
    if qtype != "F16":
        assert Q.F16 not in types


@pytest.mark.parametrize("key, weight_type", [("mmproj", Q.F16), ("mmproj_Q8_0", Q.Q8_0)])
def test_mmproj(tiny, key, weight_type):
    v = make_models_mod.TINY["vision"]
    r = gguf.GGUFReader(tiny["vl"][key])
    assert _types(r)["v.blk.0.attn_qkv.weight"] == weight_type
    assert _field(r, "general.architecture") == "clip"
    assert _field(r, "clip.projector_type") == "ernie4_5vl"
    assert _field(r, "clip.vision.block_count") == v["depth"]
    assert _field(r, "clip.vision.embedding_length") == v["hidden_size"]
    assert _field(r, "clip.vision.feed_forward_length") == v["intermediate_size"]
    assert _field(r, "clip.vision.attention.head_count") == v["num_heads"]
    assert _field(r, "clip.vision.projection_dim") == make_models_mod.TINY["text"]["hidden_size"]


def test_vocab_padded(tiny):
    """The tiny shape pads the tokenizer's pieces to a multiple of 64 (the bench shape to 32000)."""
    r = gguf.GGUFReader(tiny["moe"]["F16"])
    n = len(_field(r, "tokenizer.ggml.tokens"))
    assert n % 64 == 0 and n > 259
    assert make_models_mod.BENCH["vocab"] == 32000
    assert "<|IMAGE_START|>" in _field(gguf.GGUFReader(tiny["vl"]["F16"]), "tokenizer.chat_template")


def test_skips_existing(tiny):
    before = {k: p.stat().st_mtime_ns for k, p in tiny["moe"].items() if k != "hf"}
    again = make_models_mod.make_models(tiny["moe"]["hf"].parent, types="Q8_0", tiny=True, threads=1)
    assert set(again["moe"]) == {"hf", "F16", "Q8_0"}
    assert {k: p.stat().st_mtime_ns for k, p in again["moe"].items() if k != "hf"} == \
        {k: before[k] for k in ("F16", "Q8_0")}
    with pytest.raises(ValueError):
        make_models_mod.make_models(tiny["moe"]["hf"].parent, types="Q3_K", tiny=True)


def test_patches_match_image_processor():
    """vs_transformers.patches lays pixels out as transformers' image processor does."""
    from PIL import Image
    from transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe import (
        Ernie4_5_VLMoeImageProcessorPil,
    )

    img = np.random.default_rng(0).integers(0, 256, (56, 84, 3), dtype=np.uint8)
    ref = Ernie4_5_VLMoeImageProcessorPil()(images=Image.fromarray(img), return_tensors="np")
    pv, thw = vs_transformers.patches(img)
    assert thw.tolist() == ref["image_grid_thw"].tolist() == [[1, 4, 6]]
    np.testing.assert_allclose(pv.numpy(), ref["pixel_values"], atol=1e-5)


@pytest.mark.parametrize("kind", ["vl", "moe"])
def test_vs_transformers_measure(tiny, kind):
    import torch

    threads = torch.get_num_threads()
    try:
        res = vs_transformers.measure(tiny[kind]["hf"], "float32", threads=1, reps=1, prompt_tokens=64,
                                      gen_tokens=8, image_sizes=(56, 112) if kind == "vl" else (),
                                      experts="eager" if kind == "moe" else None)
    finally:
        torch.set_num_threads(threads)
    keys = ["pp64_tok_s", "tg8_tok_s"] + (["image_56_ms", "image_112_ms"] if kind == "vl" else [])
    assert [k for k in res if not k.endswith("_all") and k != "info"] == keys
    for k in keys:
        assert res[k] > 0 and math.isfinite(res[k]), (k, res[k])
        assert len(res[k + "_all"]) == 1
    assert res["info"]["vl"] is (kind == "vl")
    if kind == "moe":
        assert res["info"]["experts_implementation"] == "eager"


def test_vs_transformers_cli_json(tiny, capsys):
    """--json prints {dtype: {key: median}} on stdout, keys named after the sizes measured."""
    import json

    import torch

    threads = torch.get_num_threads()
    try:
        assert vs_transformers.main([str(tiny["vl"]["hf"]), "--threads", "1", "--dtype", "bfloat16", "-r", "1",
                                     "--json", "-q", "--prompt-tokens", "32", "--gen-tokens", "4",
                                     "--image-sizes", "56"]) == 0
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert list(out) == ["bfloat16"]
    assert list(out["bfloat16"]) == ["pp32_tok_s", "tg4_tok_s", "image_56_ms"]
    assert all(v > 0 and math.isfinite(v) for v in out["bfloat16"].values())
    assert "pp32_tok_s" in captured.err  # the table
    # the default sizes give the documented keys
    assert vs_transformers.KEYS == (f"pp{vs_transformers.PROMPT_TOKENS}_tok_s", f"tg{vs_transformers.GEN_TOKENS}_tok_s",
                                    *(f"image_{n}_ms" for n in vs_transformers.IMAGE_SIZES))
    assert vs_transformers.KEYS == ("pp512_tok_s", "tg128_tok_s", "image_448_ms", "image_896_ms")


def test_host_time_measure(tiny):
    """host_time.measure: three interleaved variants with per-token figures; the decode timer
    covers part of each token's wall time, and the summary's differences are the medians'."""
    import statistics

    host_time = _load("host_time")
    res = host_time.measure(str(tiny["moe"]["Q8_0"]), threads=1, n=8, repetitions=2)
    assert list(res) == ["decode-only", "raw", "ours", "ours-stream"]
    for name, r in res.items():
        assert len(r["wall"]) == len(r["timer"]) == 2
        assert all(w > 0 and math.isfinite(w) for w in r["wall"])
        if name == "decode-only":
            assert all(math.isnan(t) for t in r["timer"])  # one synchronisation: the timer cannot split it
        else:
            assert all(0 < t < w for t, w in zip(r["timer"], r["wall"]))
    s = host_time.summary(res)
    med = {k: statistics.median(v["wall"]) for k, v in res.items()}
    assert s["ours_minus_raw_us"] == pytest.approx(med["ours"] - med["raw"])
    assert s["ours_vs_decode_only"] == pytest.approx(med["decode-only"] / med["ours"])
    assert "ours - raw" in host_time.format(res)


def test_dual_experts_measure(tiny):
    """dual_experts.measure: one pp and one tg figure per pair and file; the summary's ratios are
    the per-pair quotients, so a pair's slow phase cancels out."""
    import statistics

    dual = _load("dual_experts")
    res = dual.measure(str(tiny["vl"]["Q8_0"]), str(tiny["moe"]["Q8_0"]), threads=1, pairs=3, n_prompt=32, n_gen=8)
    assert list(res) == ["vl", "moe"]
    for r in res.values():
        assert len(r["pp"]) == len(r["tg"]) == 3
        assert all(x > 0 and math.isfinite(x) for x in r["pp"] + r["tg"])
    s = dual.summary(res)
    for key in ("pp", "tg"):
        ratios = [a / b for a, b in zip(res["vl"][key], res["moe"][key])]
        assert s[key]["ratio"] == pytest.approx(statistics.median(ratios))
        assert s[key]["ratio_min"] <= s[key]["ratio"] <= s[key]["ratio_max"]
        assert s[key]["vl"] == pytest.approx(statistics.median(res["vl"][key]))
    assert "VL/MoE per pair" in dual.format(res)
