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


# --- quantized files against the reference ------------------------------------------------------
#
# vl_trained (vl_a's shape) has memorised TRAIN_TEXTS, so its next-token distributions are
# confident, as a trained model's are (a random model's are nearly flat, and any rounding flips
# its top-1). Scored against transformers in float32: top-1 agreement and the mean KL divergence
# KL(reference || ours) in nats per position, over the memorised texts and unseen corpus lines,
# and over prompts with an image for the mmproj types. Bounds: the figures measured on an Intel
# Xeon (zen4 CPU variant), in benchmarks/RESULTS.md, with margin.

#: qtype -> (least top-1 agreement, largest mean KL) on text
# measured: F32 100% / 4.4e-11, Q8_0 97.0% / 4.8e-3, Q5_K_M 89.8% / 5.7e-2, Q4_K_M 81.5% / 0.178 (2797 positions)
TEXT_BOUNDS = {"F32": (0.999, 1e-6), "Q8_0": (0.95, 1e-2), "Q5_K_M": (0.86, 0.09), "Q4_K_M": (0.77, 0.27)}
#: mmproj type -> (least top-1 agreement, largest mean KL) on image prompts (language model f32)
# measured: f32 100% / 1.1e-10, f16 99.7% / 3.7e-6, q8_0 96.5% / 4.0e-3 (342 positions)
MMPROJ_BOUNDS = {"f32": (0.999, 1e-6), "f16": (0.99, 1e-4), "q8_0": (0.93, 1e-2)}


def _log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _agreement_and_kl(pairs):
    """(top-1 agreement, mean KL(reference || ours), positions) over (reference, ours) logit pairs."""
    agree = kl = n = 0.0
    for want, got in pairs:
        lp, lq = _log_softmax(want), _log_softmax(got)
        agree += float((want.argmax(-1) == got.argmax(-1)).sum())
        kl += float((np.exp(lp) * (lp - lq)).sum())
        n += len(want)
    return agree / n, kl / n, int(n)


@pytest.fixture(scope="module")
def trained_text(vl_reference_model, reference_tokenizer_vl):
    """(ids, reference logits) for the memorised texts and as many unseen corpus lines."""
    from reference_models import TRAIN_TEXTS, _corpus
    from test_media import _ref_logits, _reference_case

    ref, tok = vl_reference_model("vl_trained"), reference_tokenizer_vl("vl_trained")
    unseen = [line for line in _corpus(600, seed=11) if len(line) > 40][:len(TRAIN_TEXTS) * 2]
    out = []
    for text in TRAIN_TEXTS + unseen:
        ids, kw = _reference_case(ref, tok, text, [], [])
        out.append((ids, _ref_logits(ref, ids, kw)))
    return out


@pytest.fixture(scope="module")
def quantized_trained(vl_gguf, tmp_path_factory):
    from pyllama_ernie.quantize import quantize

    made = {}

    def get(qtype):
        src = vl_gguf("vl_trained", "f32")
        if qtype == "F32":
            return src
        if qtype not in made:
            made[qtype] = quantize(src, tmp_path_factory.mktemp("quant") / f"{qtype}.gguf", qtype)
        return made[qtype]

    return get


@pytest.mark.parametrize("qtype", list(TEXT_BOUNDS))
def test_quantized_text_against_the_reference(qtype, trained_text, quantized_trained):
    path = quantized_trained(qtype)
    if qtype != "F32":
        import gguf

        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
        routers = {k: v for k, v in types.items() if "ffn_gate_inp" in k or "exp_probs_b" in k}
        assert any(k.endswith("ffn_gate_inp_vl.weight") for k in routers)
        assert set(routers.values()) == {"F32"}, routers  # quantizing keeps both routers in F32
        assert any(v not in ("F32", "F16") for v in types.values())  # something was quantized
    with Model(path, n_ctx=256, **EXACT) as m:
        top1, kl, n = _agreement_and_kl((want, m.logits(ids)) for ids, want in trained_text)
    print(f"{qtype} (vl_trained, text): {n} positions, top-1 agreement {top1:.2%}, mean KL {kl:.2e}")
    least, most = TEXT_BOUNDS[qtype]
    assert top1 >= least and kl <= most, (top1, kl)


@pytest.mark.parametrize("mm_type", list(MMPROJ_BOUNDS))
def test_quantized_mmproj_against_the_reference(mm_type, vl_gguf, vl_mmproj, vl_reference_model,
                                                reference_tokenizer_vl):
    from pyllama_ernie import IMAGE_MARKER
    from reference_models import TRAIN_TEXTS
    from test_media import _ref_logits, _reference_case, _rgb

    ref, tok = vl_reference_model("vl_trained"), reference_tokenizer_vl("vl_trained")
    sizes = [(56, 84), (112, 112), (84, 140), (140, 84), (168, 112), (56, 56), (112, 196), (196, 112)]
    pairs = []
    with Model(vl_gguf("vl_trained", "f32"), mmproj_path=vl_mmproj("vl_trained", mm_type), n_ctx=512,
               n_batch=128, **EXACT) as m:
        for k, (h, w) in enumerate(sizes):
            prompt = f"User: Picture 1:{IMAGE_MARKER}{TRAIN_TEXTS[k]}"
            image = _rgb(h, w, seed=500 + k)
            ids, kw = _reference_case(ref, tok, prompt, [image], [])
            pairs.append((_ref_logits(ref, ids, kw), m.logits(prompt, images=[image])))
    top1, kl, n = _agreement_and_kl(pairs)
    print(f"mmproj {mm_type} (vl_trained, image prompts): {n} positions, top-1 agreement {top1:.2%}, "
          f"mean KL {kl:.2e}")
    least, most = MMPROJ_BOUNDS[mm_type]
    assert top1 >= least and kl <= most, (top1, kl)


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
