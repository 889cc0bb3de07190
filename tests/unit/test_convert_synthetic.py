"""Random-weight models of any shape (``write_random_gguf``, ``a3b_config``): the GPU check's 28B-A3B-shaped model.

The 28B shapes are checked from the tensor specs alone (no file is written); a small model made
the same way (pooled weights, padded vocabulary) is written, loaded and run.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from pyllama_ernie.convert import arch_module, synthetic
from pyllama_ernie.convert.hfconfig import parse_config


def _specs(cfg):
    hf = parse_config(cfg)
    draw = synthetic._Draw(0, pooled=True)
    return {s.name: s for s in arch_module(hf).tensor_specs(hf, draw.source(synthetic._random_weights(cfg, draw)), "f16")}


def test_a3b_config_has_the_real_shapes_and_parameter_counts():
    specs = _specs(synthetic.a3b_config(28))
    total = sum(math.prod(s.shape) for s in specs.values())
    assert 28.0e9 < total < 29.0e9  # the language model of ERNIE-4.5-VL-28B-A3B (vision tower apart)
    assert specs["token_embd.weight"].shape == (103424, 2560)
    assert "output.weight" not in specs  # tied
    assert specs["blk.0.ffn_up.weight"].shape == (12288, 2560)
    assert "blk.0.ffn_up_exps.weight" not in specs and "blk.27.ffn_up_exps.weight" in specs
    assert specs["blk.1.attn_q.weight"].shape == (2560, 2560)
    assert specs["blk.1.attn_k.weight"].shape == (512, 2560)
    assert specs["blk.5.ffn_gate_exps.weight"].shape == (64, 1536, 2560)
    assert specs["blk.5.ffn_down_exps_vl.weight"].shape == (64, 2560, 512)
    assert specs["blk.5.ffn_up_shexp.weight"].shape == (3072, 2560)
    # active per text token: attention, shared experts, 6 of 64 text experts, embeddings read once
    per_layer = {n.split(".", 2)[2]: math.prod(s.shape) for n, s in specs.items() if n.startswith("blk.5.")}
    active = 27 * (sum(v for k, v in per_layer.items() if "exps" not in k)
                   + 6 / 64 * sum(v for k, v in per_layer.items() if k.endswith("_exps.weight")))
    assert 2.8e9 < active < 3.3e9  # "A3B"
    assert parse_config(synthetic.a3b_config(4)).text.mrope_section == (22, 22, 20)


def test_a3b_config_depth_is_cut_only():
    a, b = synthetic.a3b_config(3), synthetic.a3b_config(28)
    assert {k: v for k, v in a.items() if "layer" not in k} == {k: v for k, v in b.items() if "layer" not in k}
    assert _specs(a).keys() == {n for n in _specs(b) if not n.startswith("blk.") or int(n.split(".")[1]) < 3}
    with pytest.raises(ValueError):
        synthetic.a3b_config(1)


def test_pooled_rows_do_not_depend_on_how_they_are_read():
    draw = synthetic._Draw(5, pooled=True)
    t = draw((3000, 1536), 0.5, 0.25)
    src = draw.source({"w": t})
    whole = np.concatenate(list(src.iter_rows("w")))
    parts = np.concatenate([b for r in range(0, 3000, 128) for b in src.iter_rows("w", r, min(3000, r + 128))])
    assert whole.shape == (3000, 1536) and np.array_equal(whole, parts)
    assert abs(float(whole.mean()) - 0.25) < 0.05 and abs(float(whole.std()) - 0.5) < 0.05
    assert not np.array_equal(whole[0], whole[1])
    vec = next(draw.source({"v": draw((64,), 0.1, 1.0)}).iter_rows("v"))
    assert vec.shape == (64,) and abs(float(vec.mean()) - 1.0) < 0.1


def test_padded_vocab():
    v = synthetic.padded_vocab(2000)
    n = len(synthetic.tiny_vocab().tokens)
    assert len(v.tokens) == len(v.scores) == len(v.types) == 2000
    assert v.tokens[:n] == synthetic.tiny_vocab().tokens and v.tokens[-1] == b"[PAD1999]"
    with pytest.raises(ValueError):
        synthetic.padded_vocab(10)


def test_write_random_gguf_runs(tmp_path):
    pytest.importorskip("pyllama_ernie._lib", reason="pyllama_ernie is not built (pip install .)")
    from pyllama_ernie import Model

    cfg = synthetic.tiny_config("ernie4_5-vl-moe", 1024, {})
    cfg.update(hidden_size=256, intermediate_size=512)
    path = synthetic.write_random_gguf(tmp_path / "r.gguf", cfg, outtype="f16")
    with Model(path, n_ctx=256) as m:
        assert m.n_vocab == 1024
        logits = m.logits("the quick brown fox")
        assert logits.shape[-1] == 1024 and np.isfinite(logits).all() and float(np.ptp(logits[-1])) > 0
