"""ERNIE-4.5-VL language model (ernie4_5-vl-moe): expert pools, 3-D rope, parity.

Error norm as in parity/test_text.py: max |ours - reference| / max |reference| over
every position and the whole vocabulary, f32 GGUF, f32 KV cache, flash
attention off: < 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pyllama_ernie._lib", reason="pyllama_ernie is not built (pip install .)")

from pyllama_ernie import Embeddings, Model  # noqa: E402
from pyllama_ernie.convert.synthetic import write_tiny_gguf  # noqa: E402
from pyllama_ernie.mrope import image_embeddings, image_positions  # noqa: E402

BOUND = 1e-4
EXACT = dict(kv_cache_type="f32", flash_attn=False)


# --- graph structure: one pool computed per ubatch kind ------------------------------------

def _observe(path, prompt, **kw):
    seen = []
    with Model(path, n_ctx=256, **EXACT) as m:
        with m.context(n_ctx=256, observe_nodes=lambda *a: seen.append(a), **kw) as ctx:
            ctx.logits(prompt(m) if callable(prompt) else prompt)
    return seen


def _expert_nodes(seen, suffix):
    """(computed, not computed) counts of nodes reading expert/router weights whose name ends in suffix."""
    hit = [computed for (_name, _op, srcs, computed, _buffer) in seen
           if any(s.startswith("blk.") and s.endswith(suffix) for s in srcs)]
    return sum(hit), len(hit) - sum(hit)


@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory):
    return write_tiny_gguf("ernie4_5-vl-moe", tmp_path_factory.mktemp("vl") / "tiny-vl.gguf", seed=4)


def test_text_ubatch_computes_no_vision_expert_node(tiny_vl):
    seen = _observe(tiny_vl, [1, 5, 6, 7, 8])
    for vl, txt in (("ffn_gate_exps_vl.weight", "ffn_gate_exps.weight"),
                    ("ffn_down_exps_vl.weight", "ffn_down_exps.weight"),
                    ("ffn_gate_inp_vl.weight", "ffn_gate_inp.weight")):
        assert _expert_nodes(seen, vl)[0] == 0, vl
        assert _expert_nodes(seen, txt)[0] > 0, txt  # the observer does see expert nodes


def test_embedding_ubatch_computes_no_text_expert_node(tiny_vl):
    def prompt(m):
        rows = np.random.default_rng(0).standard_normal((6, m.n_embd)).astype(np.float32)
        pos, nxt = image_positions(0, 2, 3)
        return [Embeddings(rows, pos, next_pos=nxt)]

    seen = _observe(tiny_vl, prompt)
    for vl, txt in (("ffn_gate_exps_vl.weight", "ffn_gate_exps.weight"),
                    ("ffn_down_exps_vl.weight", "ffn_down_exps.weight"),
                    ("ffn_gate_inp_vl.weight", "ffn_gate_inp.weight")):
        assert _expert_nodes(seen, txt)[0] == 0, txt
        assert _expert_nodes(seen, vl)[0] > 0, vl


def test_text_moe_computes_every_expert_node(tiny_gguf):
    """ernie4_5-moe after the build_moe_ffn change: nothing of its MoE is skipped."""
    seen = _observe(tiny_gguf("ernie4_5-moe"), [1, 5, 6, 7, 8])
    computed, skipped = _expert_nodes(seen, "_exps.weight")
    assert computed > 0 and skipped == 0
    assert all(c for (_n, _o, _s, c, _b) in seen if _n.startswith("ffn_moe_")), "an MoE node was left uncomputed"


def test_image_positions_follow_reference():
    pos, nxt = image_positions(7, 2, 3)
    np.testing.assert_array_equal(pos[0], [7] * 6)
    np.testing.assert_array_equal(pos[1], [7, 7, 7, 8, 8, 8])
    np.testing.assert_array_equal(pos[2], [7, 8, 9, 7, 8, 9])
    assert nxt == 10
    e = image_embeddings(np.zeros((6, 4)), 2, 3, 7, start=np.ones(4), end=np.ones(4))
    np.testing.assert_array_equal(e.positions[:, 0], [7, 7, 7])      # start: text position
    np.testing.assert_array_equal(e.positions[:, -1], [11, 11, 11])  # end: after max(h, w)
    assert e.next_pos == 12 and len(e) == 8


def test_embeddings_validation():
    with pytest.raises(ValueError):
        Embeddings(np.zeros((3, 4)), [0, 1])
    with pytest.raises(ValueError):
        Embeddings(np.full((2, 4), np.nan), [0, 1])
    with pytest.raises(ValueError):
        Embeddings(np.zeros((2, 4)), [0, 1], next_pos=1)
    with pytest.raises(ValueError):
        Embeddings(np.zeros((2, 4)), [[0, 1], [0, 1]])  # two rows: neither plain nor t, h, w
    three = Embeddings(np.zeros((2, 4)), [[5, 5], [5, 6], [7, 8]])
    np.testing.assert_array_equal(three.positions_for(4), [[5, 5], [5, 6], [7, 8], [0, 0]])
    np.testing.assert_array_equal(Embeddings(np.zeros((2, 4)), [3, 4]).positions_for(4),
                                  [[3, 4], [3, 4], [3, 4], [0, 0]])


# --- parity with transformers Ernie4_5_VLMoeForConditionalGeneration ------------------------

VL_MODELS = ["vl_a", "vl_b", "vl_c"]


def _reference_forward(ref, ids, pixel_values=None, grid=None):
    import torch

    cfg = ref.config
    t = torch.tensor([ids])
    kw = {}
    if pixel_values is not None:
        mm = (t == cfg.image_token_id).long()
        moe = mm | (t == cfg.image_start_token_id).long() | (t == cfg.image_end_token_id).long()
        kw = dict(pixel_values=pixel_values, image_grid_thw=grid, mm_token_type_ids=mm,
                  moe_mm_token_type_ids=moe)
    with torch.no_grad():
        return ref(input_ids=t, **kw).logits[0].double().numpy()


def _image_case(ref, gh, gw, seed):
    """Pixel values for a merged grid gh x gw, and the reference's image features for them."""
    import torch

    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor([[1, 2 * gh, 2 * gw]])
    patch = ref.config.vision_config.patch_size
    pv = torch.randn(4 * gh * gw, 3 * patch * patch, generator=g)
    with torch.no_grad():
        out = ref.model.get_image_features(pv, grid, return_dict=True)
    feats = torch.cat(list(out.pooler_output), dim=0).double().numpy()
    assert feats.shape[0] == gh * gw
    return pv, grid, feats


@pytest.fixture(scope="module", params=VL_MODELS)
def vl_case(request, vl_gguf, vl_reference_model, reference_tokenizer_vl):
    name = request.param
    with Model(vl_gguf(name, "f32"), n_ctx=512, n_batch=16, **EXACT) as m:
        yield name, m, vl_reference_model(name), reference_tokenizer_vl(name)


def test_text_only_logits_and_greedy(vl_case):
    name, m, ref, tok = vl_case
    ids = tok("the quick brown fox 你好世界 🚀")["input_ids"]
    err = np.abs(m.logits(ids) - _reference_forward(ref, ids)).max() / np.abs(_reference_forward(ref, ids)).max()
    assert err < BOUND, (name, err)
    ours = m.generate(ids, max_tokens=16, temperature=0, ignore_eos=True).tokens
    seq = list(ids)
    for _ in range(16):
        seq.append(int(_reference_forward(ref, seq)[-1].argmax()))
    assert ours == seq[len(ids):], name


@pytest.mark.parametrize("gh, gw", [(2, 3), (3, 2)])
def test_image_features_through_vision_experts(vl_case, gh, gw):
    """Reference image features fed as an embedding run [start, image, end] with 3-D positions."""
    name, m, ref, tok = vl_case
    cfg = ref.config
    pv, grid, feats = _image_case(ref, gh, gw, seed=gh * 10 + gw)
    before = tok("User: look at this ")["input_ids"]
    after = tok(" and describe it.")["input_ids"]
    ids = before + [cfg.image_start_token_id] + [cfg.image_token_id] * (gh * gw) + [cfg.image_end_token_id] + after
    ref_logits = _reference_forward(ref, ids, pv, grid)

    start, end = m.token_embeddings([cfg.image_start_token_id, cfg.image_end_token_id])
    image = image_embeddings(feats, gh, gw, pos0=len(before), start=start, end=end)
    prompt = before + [image] + after
    ours = m.logits(prompt)
    assert ours.shape == ref_logits.shape
    per_pos = np.abs(ours - ref_logits).max(axis=1) / np.abs(ref_logits).max()
    print(f"{name} {gh}x{gw}: max rel err {per_pos.max():.2e}")
    assert per_pos.max() < BOUND, (name, per_pos.max(), per_pos.argmax())

    # greedy continuation after the image, against the reference step by step
    out = m.generate(prompt, max_tokens=12, temperature=0, ignore_eos=True).tokens
    seq = list(ids)
    for _ in range(12):
        seq.append(int(_reference_forward(ref, seq, pv, grid)[-1].argmax()))
    assert out == seq[len(ids):], name


def test_swapped_grid_is_detected(vl_case):
    """The test can fail: giving a 2x3 image 3x2 positions changes the logits."""
    name, m, ref, tok = vl_case
    cfg = ref.config
    pv, grid, feats = _image_case(ref, 2, 3, seed=23)
    before = tok("look ")["input_ids"]
    ids = before + [cfg.image_start_token_id] + [cfg.image_token_id] * 6 + [cfg.image_end_token_id]
    ref_logits = _reference_forward(ref, ids, pv, grid)
    start, end = m.token_embeddings([cfg.image_start_token_id, cfg.image_end_token_id])
    wrong = m.logits(before + [image_embeddings(feats, 3, 2, len(before), start=start, end=end)])
    assert np.abs(wrong - ref_logits).max() / np.abs(ref_logits).max() > 10 * BOUND


def test_prefix_cache_across_an_image(vl_case):
    name, m, ref, tok = vl_case
    cfg = ref.config
    _, _, feats = _image_case(ref, 2, 2, seed=5)
    start, end = m.token_embeddings([cfg.image_start_token_id, cfg.image_end_token_id])
    before = tok("hi ")["input_ids"]
    image = image_embeddings(feats, 2, 2, len(before), start=start, end=end)
    first = m.generate(before + [image] + tok(" one")["input_ids"], max_tokens=4, temperature=0)
    second = m.generate(before + [image] + tok(" one two")["input_ids"], max_tokens=4, temperature=0)
    assert second.prompt_tokens_evaluated < second.prompt_tokens - 6  # the image was not evaluated again
    m.ctx.reset()
    cold = m.generate(before + [image] + tok(" one two")["input_ids"], max_tokens=4, temperature=0)
    assert cold.tokens == second.tokens and first.completion_tokens >= 0


# --- quantized files -------------------------------------------------------------------------

# measured (Intel Xeon, zen4 CPU variant): Q8_0 866/882 = 98.2%, Q4_K_M 781/882 = 88.5%
@pytest.mark.parametrize("qtype, min_top1", [("Q8_0", 0.95), ("Q4_K_M", 0.80)])
def test_quantized_top1_agreement_and_f32_routers(qtype, min_top1, vl_gguf, reference_tokenizer_vl, tmp_path):
    import gguf

    from pyllama_ernie.quantize import quantize

    # a random model's next-token distributions are nearly flat, so any rounding flips its
    # top-1; vl_trained (vl_a's shape) has memorised TRAIN_TEXTS and predicts them confidently
    src = vl_gguf("vl_trained", "f32")
    dst = quantize(src, tmp_path / f"{qtype}.gguf", qtype)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(dst)).tensors}
    routers = {k: v for k, v in types.items() if "ffn_gate_inp" in k or "exp_probs_b" in k}
    assert any(k.endswith("ffn_gate_inp_vl.weight") for k in routers)
    assert set(routers.values()) == {"F32"}, routers
    assert any(v not in ("F32", "F16") for v in types.values())  # something was quantized

    from reference_models import TRAIN_TEXTS

    tok = reference_tokenizer_vl("vl_trained")
    prompts = TRAIN_TEXTS
    agree = total = 0
    worst = 0.0
    with Model(src, n_ctx=256, **EXACT) as f32, Model(dst, n_ctx=256, **EXACT) as q:
        for text in prompts:
            ids = tok(text)["input_ids"]
            a, b = f32.logits(ids), q.logits(ids)
            agree += int((a.argmax(1) == b.argmax(1)).sum())
            total += len(ids)
            worst = max(worst, float(np.abs(a - b).max() / np.abs(a).max()))
    print(f"{qtype} (vl_trained): top-1 agreement {agree}/{total} = {agree / total:.1%}, max rel logit err {worst:.2e}")
    assert agree / total >= min_top1


# --- load-time validation in the patched loader ------------------------------------------

def _rewrite(src, dst, drop=(), add=None):
    """Copy an f32 GGUF, leaving out keys in ``drop`` and adding ``add`` (key -> (value, type))."""
    import gguf

    r = gguf.GGUFReader(str(src))
    arch = str(r.fields["general.architecture"].contents())
    w = gguf.GGUFWriter(str(dst), arch)
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in drop:
            continue
        sub = f.types[1] if len(f.types) > 1 else None
        w.add_key_value(name, f.contents(), f.types[0], sub)
    for key, (val, vtype) in (add or {}).items():
        w.add_key_value(key, val, vtype)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_loader_requires_rope_sections(tiny_vl, tmp_path):
    import pyllama_ernie

    ok = _rewrite(tiny_vl, tmp_path / "copy.gguf")
    with Model(ok, n_ctx=64) as m:  # the copy itself loads
        assert m.n_pos_per_embd == 4
    bad = _rewrite(tiny_vl, tmp_path / "nosections.gguf", drop=("ernie4_5-vl-moe.rope.dimension_sections",))
    with pytest.raises(pyllama_ernie.ModelLoadError, match="dimension_sections"):
        Model(bad, n_ctx=64)


def test_loader_refuses_rope_scaling(tiny_vl, tmp_path):
    import gguf

    import pyllama_ernie

    bad = _rewrite(tiny_vl, tmp_path / "yarn.gguf", add={
        "ernie4_5-vl-moe.rope.scaling.type": ("yarn", gguf.GGUFValueType.STRING),
        "ernie4_5-vl-moe.rope.scaling.factor": (4.0, gguf.GGUFValueType.FLOAT32),
    })
    with pytest.raises(pyllama_ernie.ModelLoadError, match="rope scaling"):
        Model(bad, n_ctx=64)
