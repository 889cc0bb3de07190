"""Every MoE layer layout transformers accepts on a 6-layer ernie4_5_moe model converts and runs
with parity (start index 0/1/2, end index 3/5, interval 1/2/3; patch 0016).

Before patch 0016 llama.cpp's ernie4_5-moe loader wanted experts in every layer from
leading_dense_block_count on, so the converter refused intervals > 1 and end indices before the
last layer. The released layouts (every layer from the lead on) must stay as they were, bytes
included: tests/parity/test_convert.py compares them with llama.cpp's own converter.
"""

from __future__ import annotations

import numpy as np
import pytest

from pyllama_ernie import Model
from reference_models import MOE_LAYOUTS

F32_BOUND = 1e-4
PROMPT = "the quick brown fox jumps over the lazy dog. 你好世界 hello world model token"


@pytest.mark.parametrize("layout", MOE_LAYOUTS, ids=[f"start{s}-end{e}-every{k}" for s, e, k in MOE_LAYOUTS])
def test_layout_converts_and_matches(layout, gguf_model, reference_model, reference_tokenizer):
    import torch

    s, e, k = layout
    name = f"moe_layout_{s}_{e}_{k}"
    ref = reference_model(name)
    moe = [i for i in range(6) if s <= i <= e and (i + 1) % k == 0]
    # the reference's own layout, as its modules say
    assert [i for i, layer in enumerate(ref.model.layers) if hasattr(layer.mlp, "gate")] == moe
    ids = reference_tokenizer(name)(PROMPT)["input_ids"]
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].double().numpy()
    with Model(gguf_model(name, "f32"), n_ctx=128, kv_cache_type="f32", flash_attn=False) as m:
        got = m.logits(ids)
        greedy = m.generate(ids, max_tokens=8, temperature=0, ignore_eos=True).tokens
    err = float(np.abs(got - want).max() / np.abs(want).max())
    assert err < F32_BOUND, (layout, err)
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, min_new_tokens=8,
                           eos_token_id=None, pad_token_id=0)
    assert greedy == out[0, len(ids):].tolist()
