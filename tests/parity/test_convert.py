"""Tests of the HF -> GGUF converter (pyllama_ernie.convert): read the written files back and check values."""

from __future__ import annotations

import errno
import importlib
import json
import os
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

import pyllama_ernie.convert as convert_pkg
from llama_spm import LlamaSpm
from reference_models import ERNIE_CHAT_TEMPLATE, SAMPLE_TEXTS, TINY_MODELS, model_vocab_size

ConversionError = convert_pkg.ConversionError
convert = convert_pkg.convert
Q = gguf.GGMLQuantizationType
ROOT = Path(__file__).resolve().parents[2]
VENDOR = ROOT / "vendor" / "llama.cpp"

cli = importlib.import_module(f"{convert_pkg.__name__}.cli")
synthetic = importlib.import_module(f"{convert_pkg.__name__}.synthetic")


# -- helpers -----------------------------------------------------------------------------------

def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, tuple[str, tuple[int, ...], np.ndarray]]]:
    """(key/values, tensors: name -> (type name, numpy-order shape, stored data))."""
    r = gguf.GGUFReader(path)
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    ts = {t.name: (t.tensor_type.name, tuple(int(x) for x in reversed(t.shape)), np.array(t.data)) for t in r.tensors}
    return kv, ts


def hf_weights(d: Path) -> dict[str, np.ndarray]:
    """The checkpoint's tensors as float32, read with safetensors + torch (independent of our reader)."""
    from safetensors import safe_open

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k).float().numpy()
    return out


def expected_tensors(name: str, w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """GGUF tensor name -> the float32 values llama.cpp expects, from the HF weights (written out by hand)."""
    spec = TINY_MODELS[name]
    c = spec["config"]
    n = c["num_hidden_layers"]
    exp = {"token_embd.weight": w["model.embed_tokens.weight"], "output_norm.weight": w["model.norm.weight"]}
    if not c["tie_word_embeddings"]:
        exp["output.weight"] = w["lm_head.weight"]
    for i in range(n):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        exp[b + "attn_norm.weight"] = w[p + "input_layernorm.weight"]
        exp[b + "ffn_norm.weight"] = w[p + "post_attention_layernorm.weight"]
        for hf, g in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("o_proj", "attn_output")):
            exp[b + g + ".weight"] = w[p + f"self_attn.{hf}.weight"]
        if p + "mlp.gate.weight" in w:
            E = c["moe_num_experts"]
            exp[b + "ffn_gate_inp.weight"] = w[p + "mlp.gate.weight"]
            exp[b + "exp_probs_b.bias"] = w[p + "mlp.moe_statics.e_score_correction_bias"]
            for proj in ("gate", "up", "down"):
                exp[b + f"ffn_{proj}_exps.weight"] = np.stack([w[p + f"mlp.experts.{e}.{proj}_proj.weight"] for e in range(E)])
                exp[b + f"ffn_{proj}_shexp.weight"] = w[p + f"mlp.shared_experts.{proj}_proj.weight"]
        else:
            for proj in ("gate", "up", "down"):
                exp[b + f"ffn_{proj}.weight"] = w[p + f"mlp.{proj}_proj.weight"]
    return exp


def expected_type(gname: str, shape: tuple[int, ...], outtype: str) -> str:
    if len(shape) <= 1 or gname.endswith("_norm.weight") or gname.endswith("ffn_gate_inp.weight") or not gname.endswith(".weight"):
        return "F32"
    if outtype == "q8_0" and shape[-1] % 32:
        return "F16"
    return outtype.upper()


def dequant(data: np.ndarray, tname: str) -> np.ndarray:
    return gguf.quants.dequantize(data, Q[tname]).astype(np.float32)


def files_in(d: Path) -> set[str]:
    return {p.name for p in d.iterdir()}


# -- hyperparameters ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["dense_a", "dense_b"])
def test_dense_hparams(name, gguf_model):
    kv, _ = read_gguf(gguf_model(name, "f16"))
    c = TINY_MODELS[name]["config"]
    a = "ernie4_5"
    assert kv["general.architecture"] == a
    assert kv["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert kv[f"{a}.block_count"] == c["num_hidden_layers"]
    assert kv[f"{a}.embedding_length"] == c["hidden_size"]
    assert kv[f"{a}.feed_forward_length"] == c["intermediate_size"]
    assert kv[f"{a}.attention.head_count"] == c["num_attention_heads"]
    assert kv[f"{a}.attention.head_count_kv"] == c["num_key_value_heads"]
    assert kv[f"{a}.attention.key_length"] == kv[f"{a}.attention.value_length"] == c["head_dim"]
    assert kv[f"{a}.context_length"] == 4096
    assert kv[f"{a}.rope.freq_base"] == 500000.0
    assert kv[f"{a}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert not any(k.startswith(f"{a}.expert") for k in kv)


@pytest.mark.parametrize("name", ["moe_a", "moe_odd"])
def test_moe_hparams(name, gguf_model):
    kv, _ = read_gguf(gguf_model(name, "f32"))
    c = TINY_MODELS[name]["config"]
    a = "ernie4_5-moe"
    assert kv["general.architecture"] == a
    assert kv["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert kv[f"{a}.expert_count"] == c["moe_num_experts"]
    assert kv[f"{a}.expert_used_count"] == c["moe_k"]
    assert kv[f"{a}.leading_dense_block_count"] == 1
    assert kv[f"{a}.interleave_moe_layer_step"] == 1
    assert kv[f"{a}.expert_feed_forward_length"] == c["moe_intermediate_size"]
    assert kv[f"{a}.expert_shared_count"] == c["moe_num_shared_experts"]
    # hazard 2: the shared FFN is moe_intermediate_size * moe_num_shared_experts wide
    assert kv[f"{a}.expert_shared_feed_forward_length"] == c["moe_intermediate_size"] * c["moe_num_shared_experts"]
    assert f"{a}.attention.key_length" not in kv  # Ernie4_5_MoeConfig has no head_dim
    if name == "moe_odd":
        assert kv[f"{a}.expert_shared_feed_forward_length"] == 80  # upstream writes 72 // 2 = 36


# -- tensors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["dense_a", "dense_b", "moe_a", "moe_odd"])
def test_tensors_f32_exact(name, gguf_model, hf_model_dir):
    _, ts = read_gguf(gguf_model(name, "f32"))
    exp = expected_tensors(name, hf_weights(hf_model_dir(name)))
    assert set(ts) == set(exp)
    for g, ref in exp.items():
        tname, shape, data = ts[g]
        assert tname == "F32", g
        assert shape == ref.shape, g
        np.testing.assert_array_equal(data.reshape(shape), ref, err_msg=g)


@pytest.mark.parametrize("name,outtype", [("dense_a", "f16"), ("moe_odd", "f16"), ("dense_b", "bf16"),
                                          ("moe_a", "bf16"), ("moe_a", "q8_0"), ("dense_a", "q8_0"),
                                          ("moe_odd", "q8_0")])
def test_tensors_converted(name, outtype, gguf_model, hf_model_dir):
    kv, ts = read_gguf(gguf_model(name, outtype))
    exp = expected_tensors(name, hf_weights(hf_model_dir(name)))
    assert set(ts) == set(exp)
    n_quantized = 0
    for g, ref in exp.items():
        tname, shape, data = ts[g]
        assert shape == ref.shape, g
        assert tname == expected_type(g, ref.shape, outtype), g
        if tname == "F32":
            np.testing.assert_array_equal(data.reshape(shape), ref, err_msg=g)
        elif tname == "F16":
            np.testing.assert_array_equal(data.reshape(shape), ref.astype(np.float16), err_msg=g)
        elif tname == "BF16":
            got = dequant(data, tname).reshape(shape)
            assert np.all(np.abs(got - ref) <= np.abs(ref) * 2.0**-8), g
            n_quantized += 1
        else:
            assert tname == "Q8_0"
            got = dequant(data, tname).reshape(shape)
            blocks_ref = ref.reshape(-1, 32)
            err = np.abs(got.reshape(-1, 32) - blocks_ref).max(axis=1)
            bound = 0.6 * np.abs(blocks_ref).max(axis=1) / 127 + 1e-7
            assert np.all(err <= bound), g
            assert err.max() > 0  # it really was quantized
            n_quantized += 1
    if outtype in ("bf16", "q8_0"):
        assert n_quantized > 0
    if outtype == "q8_0":
        # routers stay F32 under q8_0; rows that are not a multiple of 32 fall back to F16
        assert all(ts[g][0] == "F32" for g in ts if g.endswith("ffn_gate_inp.weight"))
        if name == "moe_odd":
            assert ts["blk.1.ffn_down_exps.weight"][0] == "F16"  # rows of 40
            assert ts["blk.1.ffn_gate_exps.weight"][0] == "Q8_0"  # rows of 64
        assert kv["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0


def test_moe_bias_is_nonzero_and_f32(gguf_model):
    _, ts = read_gguf(gguf_model("moe_a", "q8_0"))
    tname, shape, data = ts["blk.1.exp_probs_b.bias"]
    assert tname == "F32" and shape == (1, 4)
    assert np.abs(data).max() > 0.01
    assert "blk.0.exp_probs_b.bias" not in ts and "blk.0.ffn_gate.weight" in ts  # layer 0 is dense


def test_sharded_checkpoint_is_read(hf_model_dir):
    d = hf_model_dir("moe_odd")
    assert (d / "model.safetensors.index.json").is_file()
    assert len(list(d.glob("*.safetensors"))) > 1


def test_reference_models_are_meaningful(reference_model, reference_tokenizer):
    """The fixtures' models give non-trivial logits, and the MoE expert-selection bias changes routing."""
    import torch

    tok = reference_tokenizer("moe_a")
    ids = torch.tensor([tok.encode("Hello world, 你好世界 🚀 the quick brown fox", add_special_tokens=False)])
    for name in ("dense_a", "dense_b", "moe_a", "moe_odd"):
        m = reference_model(name)
        assert next(m.parameters()).dtype == torch.float32 and not m.training
        with torch.no_grad():
            logits = m(ids).logits[0]
        assert logits.std() > 0.3, name
    gate = reference_model("moe_a").model.layers[1].mlp.gate
    bias = gate.moe_statics.e_score_correction_bias
    assert bias.abs().max() > 0.01
    x = torch.randn(256, gate.weight.shape[1], generator=torch.Generator().manual_seed(0))
    probs = torch.softmax(x @ gate.weight.T, dim=-1)
    plain = torch.topk(probs, 2, dim=-1).indices.sort(dim=-1).values
    biased = torch.topk(probs + bias.squeeze(), 2, dim=-1).indices.sort(dim=-1).values
    assert (plain != biased).any(dim=-1).float().mean() > 0.05


# -- vocabulary ---------------------------------------------------------------------------------

def test_vocab_and_special_tokens(gguf_model, ernie_tokenizer):
    kv, _ = read_gguf(gguf_model("dense_a", "f32"))
    n = ernie_tokenizer["n_pieces"]
    sid = ernie_tokenizer["special_ids"]
    tokens = kv["tokenizer.ggml.tokens"]
    types = kv["tokenizer.ggml.token_type"]
    assert kv["tokenizer.ggml.model"] == "llama"
    assert kv["tokenizer.ggml.pre"] == "default"
    assert len(tokens) == len(types) == len(kv["tokenizer.ggml.scores"]) == model_vocab_size(n)
    assert len(set(tokens)) == len(tokens)
    assert tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert kv["tokenizer.ggml.bos_token_id"] == 1
    assert kv["tokenizer.ggml.eos_token_id"] == 2
    assert kv["tokenizer.ggml.unknown_token_id"] == 0
    assert kv["tokenizer.ggml.padding_token_id"] == 0
    assert kv["tokenizer.ggml.seperator_token_id"] == sid["<|end_of_sentence|>"]
    assert kv["tokenizer.ggml.eot_token_id"] == sid["<|end_of_sentence|>"]
    assert kv["tokenizer.ggml.mask_token_id"] == sid["<mask:1>"]
    assert kv["tokenizer.ggml.add_bos_token"] is False
    assert kv["tokenizer.ggml.add_eos_token"] is False
    assert kv["tokenizer.ggml.add_space_prefix"] is False
    assert kv["tokenizer.chat_template"] == ERNIE_CHAT_TEMPLATE
    T = gguf.TokenType
    assert types[tokens.index("<0x41>")] == T.BYTE
    assert types[sid["<|IMAGE_START|>"]] == T.CONTROL
    assert types[sid["<|begin_of_sentence|>"]] == T.CONTROL
    assert types[sid["<think>"]] == T.USER_DEFINED
    assert tokens[sid["<|IMAGE_PLACEHOLDER|>"]] == "<|IMAGE_PLACEHOLDER|>"
    assert tokens[-1] == f"[PAD{model_vocab_size(n) - 1}]" and types[-1] == T.UNUSED
    assert all(types[i] == T.NORMAL for i in range(259, n - 30))


@pytest.mark.parametrize("source", ["tokenizer.model", "tokenizer.json"])
def test_llama_cpp_tokenization_matches_transformers(source, hf_model_dir, reference_tokenizer, tmp_path):
    """llama.cpp's SPM algorithm (transcribed in llama_spm.py) on our vocab == the HF tokenizer."""
    d = hf_model_dir("dense_a")
    if source == "tokenizer.json":  # a checkpoint without tokenizer.model
        d2 = tmp_path / "no_spm"
        shutil.copytree(d, d2)
        (d2 / "tokenizer.model").unlink()
        d = d2
    out = convert(d, tmp_path / "m.gguf", "f32")
    spm = LlamaSpm.from_gguf(out)
    tok = reference_tokenizer("dense_a")
    for text in SAMPLE_TEXTS:
        assert spm.tokenize(text, add_special=True, parse_special=True) == tok.encode(text, add_special_tokens=True), text
    chat = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好 🚀"}],
                                   tokenize=False, add_generation_prompt=True)
    assert spm.tokenize(chat, parse_special=True) == tok.encode(chat, add_special_tokens=False)


def test_tokenizer_json_vocab_matches_spm_vocab(hf_model_dir, tmp_path):
    """Building from tokenizer.json alone gives the same tokens and types (scores differ in scale only)."""
    d = hf_model_dir("dense_a")
    d2 = tmp_path / "no_spm"
    shutil.copytree(d, d2)
    (d2 / "tokenizer.model").unlink()
    kv1, _ = read_gguf(convert(d, tmp_path / "a.gguf", "f32"))
    kv2, _ = read_gguf(convert(d2, tmp_path / "b.gguf", "f32"))
    assert kv1["tokenizer.ggml.tokens"] == kv2["tokenizer.ggml.tokens"]
    assert kv1["tokenizer.ggml.token_type"] == kv2["tokenizer.ggml.token_type"]
    assert kv1["tokenizer.ggml.add_space_prefix"] == kv2["tokenizer.ggml.add_space_prefix"] is False


def test_sentencepiece_reader_matches_sentencepiece(hf_model_dir):
    import sentencepiece as spm

    path = hf_model_dir("dense_a") / "tokenizer.model"
    pieces, trainer, normalizer = convert_pkg.tokenizer.parse_sentencepiece_model(path.read_bytes())
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert len(pieces) == sp.get_piece_size()
    for i, p in enumerate(pieces):
        assert p.piece == sp.id_to_piece(i)
        assert p.score == sp.get_score(i)
        assert (p.type == 2, p.type == 3, p.type == 5, p.type == 6) == (
            sp.is_unknown(i), sp.is_control(i), sp.is_unused(i), sp.is_byte(i))
    assert trainer == {"model_type": "bpe", "byte_fallback": True}
    assert normalizer["add_dummy_prefix"] is False and normalizer["name"] == "identity"


def test_add_space_prefix_falls_back_to_the_sentencepiece_model(hf_model_dir, tmp_path):
    d = _copy(hf_model_dir("dense_a"), tmp_path)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["add_prefix_space"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    kv, _ = read_gguf(convert(d, tmp_path / "m.gguf", "f32"))
    assert kv["tokenizer.ggml.add_space_prefix"] is False  # the model has add_dummy_prefix = false


def test_converter_does_not_import_torch(hf_model_dir, tmp_path):
    # (sentencepiece is not in the list: the gguf package imports it itself when it is installed)
    code = (
        "import sys; import pyllama_ernie.convert as convert_pkg; "
        "convert_pkg.convert(sys.argv[2], sys.argv[3], 'q8_0'); "
        "bad = [m for m in ('torch', 'transformers', 'tokenizers', 'safetensors', 'pyllama_ernie._cffi') "
        "if m in sys.modules]; "
        "assert not bad, bad"
    )
    r = subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parents[1]), str(hf_model_dir("moe_a")),
                        str(tmp_path / "m.gguf")], capture_output=True, text=True, timeout=300,
                       cwd=Path(convert_pkg.__file__).resolve().parents[2])  # beside the imported package
    assert r.returncode == 0, r.stderr[-2000:]


# -- same output as llama.cpp's own converter ---------------------------------------------------

def _upstream(d: Path, out: Path, outtype: str) -> Path:
    if not (VENDOR / "convert_hf_to_gguf.py").is_file():
        pytest.skip("vendor/llama.cpp is not filled (python scripts/vendor.py fill)")
    env = dict(os.environ, PYTHONPATH=str(VENDOR / "gguf-py"), OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, str(VENDOR / "convert_hf_to_gguf.py"), str(d), "--outfile", str(out), "--outtype", outtype],
        capture_output=True, text=True, env=env, timeout=600,
    )
    if r.returncode != 0:
        pytest.fail(f"upstream converter failed:\n{r.stderr[-3000:]}")
    return out


@pytest.mark.upstream
@pytest.mark.parametrize("name,outtype", [("moe_a", "f16"), ("dense_b", "q8_0"), ("moe_odd", "f32")])
def test_same_as_upstream_converter(name, outtype, hf_model_dir, gguf_model, tmp_path):
    up_kv, up_ts = read_gguf(_upstream(hf_model_dir(name), tmp_path / "up.gguf", outtype))
    kv, ts = read_gguf(gguf_model(name, outtype))
    fixed = {"ernie4_5-moe.expert_shared_feed_forward_length"} if name == "moe_odd" else set()
    # the one documented addition: <|end_of_sentence|> as the end-of-turn token (llama.cpp stops there)
    extra = {"tokenizer.ggml.eot_token_id"}
    assert set(kv) == set(up_kv) | extra and not extra & set(up_kv)
    assert kv["tokenizer.ggml.tokens"][kv["tokenizer.ggml.eot_token_id"]] == "<|end_of_sentence|>"
    diff = {k for k in kv if k not in extra and kv[k] != up_kv[k]}
    assert diff == fixed, {k: (kv[k], up_kv[k]) for k in diff}
    if fixed:  # the documented fix (hazard 2): upstream's value is wrong for this shape
        assert up_kv["ernie4_5-moe.expert_shared_feed_forward_length"] == 72 // 2
    assert set(ts) == set(up_ts)
    for g in ts:
        assert ts[g][:2] == up_ts[g][:2], g
        np.testing.assert_array_equal(ts[g][2], up_ts[g][2], err_msg=g)


# -- layouts llama.cpp cannot run, and config handling -------------------------------------------

def test_moe_layout_with_interval_2_has_dense_layers_between(hf_model_dir, tmp_path):
    """MoE layers 1 and 3 of 4: routers and experts there only, dense FFNs in layers 0 and 2."""
    kv, ts = read_gguf(convert(hf_model_dir("moe_step2"), tmp_path / "x.gguf"))
    assert (kv["ernie4_5-moe.leading_dense_block_count"], kv["ernie4_5-moe.interleave_moe_layer_step"]) == (1, 2)
    assert {int(g.split(".")[1]) for g in ts if "ffn_gate_inp" in g} == {1, 3}
    assert {int(g.split(".")[1]) for g in ts if g.endswith("ffn_gate.weight")} == {0, 2}


def _moe_cfg(**kw):
    cfg = dict(architectures=["Ernie4_5_MoeForCausalLM"], hidden_size=64, intermediate_size=64,
               num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, moe_num_experts=4, moe_k=2,
               moe_num_shared_experts=1, moe_intermediate_size=32)
    cfg.update(kw)
    return convert_pkg.hfconfig.parse_config(cfg)


def test_moe_layout_rules():
    layout = convert_pkg.ernie4_5.moe_layout
    assert layout(_moe_cfg().text) == (1, 1)  # defaults: start 1, interval 1
    assert layout(_moe_cfg(moe_layer_start_index=0).text) == (0, 1)
    assert layout(_moe_cfg(moe_layer_start_index=2).text) == (2, 1)
    # interval 2, but the only MoE layer is the last one: expressible, and the step is kept
    assert layout(_moe_cfg(num_hidden_layers=2, moe_layer_interval=2).text) == (1, 2)
    # MoE layers 1 and 3 with dense 2 between: the loader's interval skips layer 2 (patch 0016)
    assert layout(_moe_cfg(moe_layer_interval=2).text) == (1, 2)
    # a trailing dense layer (end index 2 of 4): written without a router, so layer 3 is dense
    assert layout(_moe_cfg(moe_layer_end_index=2).text) == (1, 1)
    with pytest.raises(ConversionError):  # no MoE layer at all
        layout(_moe_cfg(moe_layer_start_index=9).text)


def test_config_formats():
    parse = convert_pkg.hfconfig.parse_config
    # Baidu's remote-code style: top-level rope_theta, "Ernie4_5_ForCausalLM"
    t = parse(dict(architectures=["Ernie4_5_ForCausalLM"], hidden_size=1024, intermediate_size=3072,
                   num_hidden_layers=18, num_attention_heads=16, num_key_value_heads=2, head_dim=128,
                   rope_theta=10000, tie_word_embeddings=True)).text
    assert (t.rope_theta, t.head_dim, t.n_kv_heads, t.vocab_size) == (10000.0, 128, 2, 103424)
    # transformers >= 5 style
    t = parse(dict(model_type="ernie4_5_moe", hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, rope_parameters={"rope_theta": 1e6, "rope_type": "default"})).text
    assert t.rope_theta == 1e6 and t.head_dim == 16 and t.n_kv_heads == 4 and t.moe.n_experts == 64
    with pytest.raises(ConversionError, match="unsupported architecture"):
        parse(dict(architectures=["LlamaForCausalLM"], hidden_size=64))
    with pytest.raises(ConversionError, match="hidden_size"):
        parse(dict(architectures=["Ernie4_5ForCausalLM"], intermediate_size=8, num_hidden_layers=1,
                   num_attention_heads=1))
    with pytest.raises(ConversionError, match="multimodal"):
        parse(dict(architectures=["Ernie4_5_MoeForCausalLM"], hidden_size=64, intermediate_size=64,
                   num_hidden_layers=2, num_attention_heads=4, moe_num_experts=[64, 64]))


def test_fused_baidu_layout(hf_model_dir, gguf_model, tmp_path):
    """qkv_proj / up_gate_proj checkpoints (Baidu's fused layout) give the same file as split ones."""
    from safetensors.numpy import save_file

    src = hf_model_dir("dense_a")
    d = tmp_path / "fused"
    shutil.copytree(src, d)
    w = hf_weights(src)
    fused = {}
    for k, v in w.items():
        if k.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight", "mlp.up_proj.weight")):
            continue  # folded into the fused tensors below
        if k.endswith("self_attn.q_proj.weight"):
            p = k[: -len("q_proj.weight")]
            k, v = p + "qkv_proj.weight", np.concatenate([v, w[p + "k_proj.weight"], w[p + "v_proj.weight"]])
        elif k.endswith("mlp.gate_proj.weight"):
            p = k[: -len("gate_proj.weight")]
            k, v = p + "up_gate_proj.weight", np.concatenate([v, w[p + "up_proj.weight"]])
        fused["ernie." + k[len("model."):] if k.startswith("model.") else k] = v  # Baidu's "ernie." prefix
    for f in d.glob("*.safetensors"):
        f.unlink()
    save_file(fused, str(d / "model.safetensors"))
    _, ts_fused = read_gguf(convert(d, tmp_path / "f.gguf", "f32"))
    _, ts = read_gguf(gguf_model("dense_a", "f32"))
    assert set(ts_fused) == set(ts)
    for g in ts:
        np.testing.assert_array_equal(ts_fused[g][2], ts[g][2], err_msg=g)


# -- errors leave no file -----------------------------------------------------------------------

def _copy(d: Path, tmp_path: Path) -> Path:
    out = tmp_path / "ckpt"
    shutil.copytree(d, out)
    return out


@pytest.mark.parametrize("case", ["no_config", "no_weights", "unsupported_arch", "corrupt_header", "truncated",
                                  "bad_tokenizer", "no_tokenizer", "missing_tensor", "shape_mismatch",
                                  "missing_shard", "bad_json"])
def test_errors_leave_no_file(case, hf_model_dir, tmp_path):
    d = _copy(hf_model_dir("moe_a"), tmp_path)
    st = d / "model.safetensors"
    cfg = json.loads((d / "config.json").read_text())
    match = None
    if case == "no_config":
        (d / "config.json").unlink()
        match = "no config.json"
    elif case == "no_weights":
        st.unlink()
        match = "no model weights"
    elif case == "unsupported_arch":
        cfg["architectures"] = ["LlamaForCausalLM"]
        (d / "config.json").write_text(json.dumps(cfg))
        match = "unsupported architecture 'LlamaForCausalLM'"
    elif case == "corrupt_header":
        data = bytearray(st.read_bytes())
        data[10:30] = b"\xff" * 20
        st.write_bytes(bytes(data))
        match = "corrupt safetensors header"
    elif case == "truncated":
        data = st.read_bytes()
        st.write_bytes(data[: len(data) // 2])
        match = "truncated"
    elif case == "bad_tokenizer":
        (d / "tokenizer.model").write_bytes(b"\x0a\xff\xff\xff garbage")
        match = "not a readable SentencePiece model"
    elif case == "no_tokenizer":
        (d / "tokenizer.model").unlink()
        (d / "tokenizer.json").unlink()
        match = "no tokenizer"
    elif case == "missing_tensor":
        from safetensors.numpy import save_file

        w = hf_weights(d)
        del w["model.layers.2.mlp.experts.3.up_proj.weight"]
        save_file(w, str(st))
        match = "model.layers.2.mlp.experts.3.up_proj.weight"
    elif case == "shape_mismatch":
        cfg["intermediate_size"] = 96
        (d / "config.json").write_text(json.dumps(cfg))
        match = "has shape"
    elif case == "missing_shard":
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00002-of-00002.safetensors"}}))
        match = "missing"
    elif case == "bad_json":
        (d / "tokenizer_config.json").write_text("{not json")
        match = "tokenizer_config.json"
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(ConversionError, match=match):
        convert(d, out_dir / "m.gguf", "q8_0")
    assert files_in(out_dir) == set()


def test_disk_full_leaves_no_file(hf_model_dir, tmp_path, monkeypatch):
    writer = convert_pkg.writer
    real = writer._write_bytes
    calls = {"n": 0}

    def fail_later(fout, data):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fout, data)

    monkeypatch.setattr(writer, "_write_bytes", fail_later)
    with pytest.raises(ConversionError, match="not enough disk space"):
        convert(hf_model_dir("moe_a"), tmp_path / "m.gguf", "f16")
    assert calls["n"] == 6
    assert files_in(tmp_path) == set()


def test_interrupt_leaves_no_file(hf_model_dir, tmp_path):
    def progress(done, total, name):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(hf_model_dir("dense_a"), tmp_path / "m.gguf", "f16", progress=progress)
    assert files_in(tmp_path) == set()


def test_existing_output_is_replaced_only_on_success(hf_model_dir, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    broken = tmp_path / "broken"
    shutil.copytree(hf_model_dir("dense_a"), broken)
    for f in broken.glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[:100])  # truncated weights
    with pytest.raises(ConversionError):
        convert(broken, out)
    assert out.read_bytes() == b"old"
    convert(hf_model_dir("dense_a"), out, "f16")
    assert out.read_bytes()[:4] == b"GGUF"
    assert files_in(tmp_path) - {"broken"} == {"m.gguf"}
    mask = os.umask(0o022)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask


def test_bad_arguments(hf_model_dir, tmp_path):
    with pytest.raises(ConversionError, match="unknown output type"):
        convert(hf_model_dir("dense_a"), tmp_path / "m.gguf", "q4_k")
    with pytest.raises(ConversionError, match="is not a folder"):
        convert(tmp_path / "nope", tmp_path / "m.gguf")
    with pytest.raises(ConversionError, match="is a directory"):
        convert(hf_model_dir("dense_a"), tmp_path)


# -- progress, CLI ------------------------------------------------------------------------------

def test_progress_callback(hf_model_dir, tmp_path):
    seen = []
    convert(hf_model_dir("moe_a"), tmp_path / "m.gguf", "f16", progress=lambda d, t, n: seen.append((d, t, n)))
    _, ts = read_gguf(tmp_path / "m.gguf")
    assert [s[0] for s in seen] == list(range(1, len(ts) + 1))
    assert {s[1] for s in seen} == {len(ts)}
    assert {s[2] for s in seen} == set(ts)


def test_cli(hf_model_dir, tmp_path, capsys):
    out = tmp_path / "c.gguf"
    assert cli.main([str(hf_model_dir("dense_a")), "-o", str(out), "--outtype", "BF16", "-q"]) == 0
    assert "wrote" in capsys.readouterr().out
    kv, _ = read_gguf(out)
    assert kv["general.file_type"] == gguf.LlamaFileType.MOSTLY_BF16
    assert cli.main([str(tmp_path / "missing"), "-o", str(tmp_path / "x.gguf")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert cli.main([str(hf_model_dir("dense_a")), "--outtype", "q4_0"]) == 2
    assert cli.main(["--help"]) == 0
    assert not (tmp_path / "x.gguf").exists()


# -- memory -------------------------------------------------------------------------------------

def _wide_dense_checkpoint(src: Path, d: Path, hidden: int = 1024, ff: int = 4096) -> int:
    """A one-layer dense checkpoint with 16 MiB FFN tensors (random, numpy only); returns its weight bytes."""
    from safetensors.numpy import save_file

    d.mkdir()
    for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / f, d / f)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(hidden_size=hidden, intermediate_size=ff, num_hidden_layers=1, num_attention_heads=8,
               num_key_value_heads=8, head_dim=hidden // 8, tie_word_embeddings=True)
    (d / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)
    V, H = cfg["vocab_size"], hidden
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,),
              "model.layers.0.input_layernorm.weight": (H,), "model.layers.0.post_attention_layernorm.weight": (H,),
              "model.layers.0.mlp.gate_proj.weight": (ff, H), "model.layers.0.mlp.up_proj.weight": (ff, H),
              "model.layers.0.mlp.down_proj.weight": (H, ff)}
    for p in ("q", "k", "v", "o"):
        shapes[f"model.layers.0.self_attn.{p}_proj.weight"] = (H, H)
    w = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
    save_file(w, str(d / "model.safetensors"))
    return sum(a.nbytes for a in w.values())


def test_streaming_memory(hf_model_dir, tmp_path, monkeypatch):
    """Converting a ~70 MiB model (16 MiB tensors) allocates far less than one tensor at a time."""
    total = _wide_dense_checkpoint(hf_model_dir("dense_a"), tmp_path / "wide")
    largest = 4096 * 1024 * 4
    monkeypatch.setattr(convert_pkg.safetensors_reader, "DEFAULT_BLOCK_BYTES", 1 << 20)
    tracemalloc.start()
    try:
        out = convert(tmp_path / "wide", tmp_path / "wide.gguf", "q8_0")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"tracemalloc peak {peak / 2**20:.1f} MiB converting {total / 2**20:.0f} MiB (largest tensor 16 MiB)")
    assert out.stat().st_size > total // 4
    assert peak < largest / 4


@pytest.mark.parametrize("name", ["dense_a", "moe_a"])
def test_end_of_turn_stops_generation(name, gguf_model, ernie_tokenizer):
    """<|end_of_sentence|> (which ends an assistant turn) is an end-of-generation token, as </s> is."""
    pytest.importorskip("pyllama_ernie._lib", reason="pyllama_ernie is not built")
    from pyllama_ernie import Model

    sid = ernie_tokenizer["special_ids"]
    with Model(gguf_model(name, "f32"), n_ctx=64) as m:
        assert m.is_eog(sid["<|end_of_sentence|>"]) and m.is_eog(m.eos_token)
        assert not m.is_eog(sid["<|begin_of_sentence|>"])
        assert set(m.eog_tokens) == {m.eos_token, sid["<|end_of_sentence|>"]}


def test_no_end_of_turn_without_the_token(hf_model_dir, tmp_path):
    """A vocabulary without <|end_of_sentence|> gets no eot key."""
    d = _copy(hf_model_dir("dense_a"), tmp_path)
    (d / "tokenizer.model").unlink()
    data = json.loads((d / "tokenizer.json").read_text())
    tid = data["model"]["vocab"].pop("<|end_of_sentence|>")
    data["model"]["vocab"]["<|not_the_end|>"] = tid
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|end_of_sentence|>"]
    (d / "tokenizer.json").write_text(json.dumps(data))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"].pop(str(tid))
    cfg.pop("sep_token")
    cfg.pop("chat_template")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "special_tokens_map.json").unlink()
    kv, _ = read_gguf(convert(d, tmp_path / "m.gguf", "f32"))
    assert "<|end_of_sentence|>" not in kv["tokenizer.ggml.tokens"]
    assert "tokenizer.ggml.eot_token_id" not in kv


# -- synthetic models ---------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["ernie4_5", "ernie4_5-moe", "ernie4_5-vl-moe"])
def test_synthetic_models(arch, tiny_gguf, tmp_path):
    path = tiny_gguf(arch)
    kv, ts = read_gguf(path)
    assert kv["general.architecture"] == arch
    assert kv["tokenizer.ggml.model"] == "llama"
    tokens = kv["tokenizer.ggml.tokens"]
    assert len(tokens) == len(set(tokens)) == ts["token_embd.weight"][1][0]
    assert 300 < len(tokens) < 1000
    assert "<|begin_of_sentence|>" in tokens and "<think>" in tokens and "<0xFF>" in tokens
    assert kv["tokenizer.chat_template"] == synthetic.CHAT_TEMPLATE
    assert tokens[kv["tokenizer.ggml.eot_token_id"]] == "<|end_of_sentence|>"
    if arch == "ernie4_5-moe":
        assert kv[f"{arch}.leading_dense_block_count"] == 1
        assert np.abs(ts["blk.1.exp_probs_b.bias"][2]).max() > 0
        assert ts["blk.1.ffn_gate_inp.weight"][0] == "F32"
        assert "blk.1.ffn_up_shexp.weight" in ts and "blk.0.ffn_up.weight" in ts
    spm = LlamaSpm.from_gguf(path)
    ids = spm.tokenize(" Hello world, the quick brown fox")
    assert [tokens[i] for i in ids] == ["\u2581Hello", "\u2581world", ",", "\u2581the", "\u2581quick", "\u2581brown", "\u2581fox"]
    ids = spm.tokenize("<|begin_of_sentence|>User: 你好\n", parse_special=True)
    assert ids[0] == tokens.index("<|begin_of_sentence|>")
    # deterministic
    again = synthetic.write_tiny_gguf(arch, tmp_path / "again.gguf")
    assert again.read_bytes() == path.read_bytes()
    other = synthetic.write_tiny_gguf(arch, tmp_path / "other.gguf", seed=1)
    assert other.read_bytes() != path.read_bytes()
