"""ERNIE 4.5 VL language model -> our patched llama.cpp's ``ernie4_5-vl-moe`` architecture.

Only the language model is written here; the vision tower and the resampler
(``vision_model.*``, ``model.vision_model.*``, ``model.resampler_model.*``) are
skipped (they go to a separate mmproj file).

3-D rope. transformers rotates adjacent element pairs: pair ``j`` (0 <= j < D/2,
D = head_dim) turns ``(x[2j], x[2j+1])`` by ``P(j) * theta^(-2j/D)``, where with
``mrope_section = [h, w, t]`` (h == w) the position ``P(j)`` is the h position for
even ``j < h + w``, the w position for odd ``j < h + w`` and the t position for
``j >= h + w``. ggml's M-RoPE rotates the pairs ``(p, p + D/2)`` instead, with
contiguous sections ``[t, h, w, 0]`` over position rows ``[t, h, w, 0]`` and the
frequency ``theta^(-2p/D) / rope_freqs[p]``. Both are made to agree at conversion:

    src(p) = h + w + p          for 0 <= p < t            (t pairs, in order)
             2 (p - t)          for t <= p < t + h        (the even pairs: h)
             2 (p - t - h) + 1  for t + h <= p < D/2      (the odd pairs: w)

* per head, new Q/K row ``p`` is old row ``2 src(p)`` and new row ``p + D/2`` is
  old row ``2 src(p) + 1`` (V and o_proj stay; attention scores are unchanged by a
  common permutation of the Q and K dimensions);
* ``rope_freqs[p] = theta^(2 (src(p) - p) / D)`` (F32), so ggml's frequency for
  pair ``p`` is the reference's frequency for pair ``src(p)``.

For the 28B checkpoint (D = 128, [22, 22, 20]) this is sections [20, 22, 22, 0] and
src = 44..63, then 0, 2, .., 42, then 1, 3, .., 43.

MoE. A layer holds a text pool (router ``mlp.gate.weight``, stored transposed
[H, E]; experts ``0 .. E-1``; bias row 0) and a vision pool (``mlp.gate.weight_1``;
experts ``E .. E+E_vl-1``; bias row 1), split by index, plus the shared experts.
Our loader makes layer ``i`` an MoE layer iff ``i >= leading_dense_block_count``
and ``(i + 1) % interleave_moe_layer_step == 0``; other layouts are refused.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from itertools import chain

import gguf
import numpy as np

from .ernie4_5 import TensorSource, _Builder
from .errors import ConversionError
from .hfconfig import VL_ARCHITECTURE, HFConfig, TextConfig
from .writer import TensorSpec

__all__ = ["ARCH_VL", "ARCHITECTURES", "rope_layout", "rope_freqs", "qk_row_order", "moe_layout",
           "gguf_arch", "add_hparams", "tensor_specs"]

ARCH_VL = "ernie4_5-vl-moe"
ARCHITECTURES = {VL_ARCHITECTURE: ARCH_VL}


def gguf_arch(hf: HFConfig) -> str:
    try:
        return ARCHITECTURES[hf.architecture]
    except KeyError:
        raise ConversionError(f"internal error: {hf.architecture} is not an ERNIE 4.5 VL architecture.") from None


# -- the 3-D rope --------------------------------------------------------------------------------

def rope_layout(head_dim: int, mrope_section: tuple[int, int, int] | list[int]) -> tuple[list[int], np.ndarray]:
    """(GGUF rope sections [t, h, w, 0], src) for transformers' ``mrope_section`` [h, w, t].

    ``src[p]`` is the reference rope pair that ggml's pair ``p`` stands for (see the module doc).
    """
    h, w, t = (int(v) for v in mrope_section)
    half = head_dim // 2
    if head_dim % 2 or h != w or min(h, w, t) < 0 or h + w + t != half:
        raise ConversionError(
            f"rope sections [h, w, t] = {[h, w, t]} do not fit head_dim {head_dim} "
            f"(need h == w and h + w + t == {half})."
        )
    src = np.concatenate([
        np.arange(t) + h + w,          # t pairs: the last t reference pairs, in order
        2 * np.arange(h),              # h pairs: the even reference pairs below h + w
        2 * np.arange(w) + 1,          # w pairs: the odd ones
    ]).astype(np.int64)
    assert sorted(src.tolist()) == list(range(half))
    return [t, h, w, 0], src


def rope_freqs(head_dim: int, theta: float, src: np.ndarray) -> np.ndarray:
    """The F32 freq_factors: ``theta^(2 (src[p] - p) / head_dim)``."""
    p = np.arange(len(src), dtype=np.float64)
    return (float(theta) ** (2.0 * (src.astype(np.float64) - p) / head_dim)).astype(np.float32)


def qk_row_order(src: np.ndarray) -> np.ndarray:
    """Within one head: new row ``r`` of Q/K is old row ``order[r]``."""
    return np.concatenate([2 * src, 2 * src + 1])


# -- layer layout and hyperparameters ------------------------------------------------------------

def moe_layout(text: TextConfig) -> tuple[int, int]:
    """(leading_dense_block_count, interleave_moe_layer_step), or ConversionError."""
    moe = text.moe
    assert moe is not None
    n = text.n_layers
    layers = moe.moe_layers(n)
    if not layers:
        raise ConversionError(f"config.json puts no MoE layer in the model ({n} layers).")
    lead = layers[0]
    want = set(layers)
    steps = [s for s in range(1, n + 1) if {i for i in range(lead, n) if (i + 1) % s == 0} == want]
    if not steps:
        raise ConversionError(
            f"llama.cpp's ernie4_5-vl-moe cannot represent this layer layout: MoE layers {layers} of {n} "
            "are not 'every layer i >= leading_dense_block_count with (i + 1) % interleave_moe_layer_step == 0'."
        )
    step = moe.layer_interval if moe.layer_interval in steps else steps[0]
    return lead, step


def add_hparams(gw: gguf.GGUFWriter, text: TextConfig, arch: str = ARCH_VL) -> None:
    """The architecture's key/values (everything but general.* and tokenizer.*)."""
    moe = text.moe
    assert moe is not None and moe.n_experts_vl is not None and moe.expert_ff_vl is not None
    assert text.mrope_section is not None
    if text.rope_scaling is not None:
        raise ConversionError(f"rope scaling {text.rope_scaling!r} is not supported for {arch}.")
    sections, _ = rope_layout(text.head_dim, text.mrope_section)
    lead, step = moe_layout(text)
    gw.add_context_length(text.max_position_embeddings)
    gw.add_embedding_length(text.hidden_size)
    gw.add_block_count(text.n_layers)
    gw.add_feed_forward_length(text.intermediate_size)
    gw.add_head_count(text.n_heads)
    gw.add_head_count_kv(text.n_kv_heads)
    gw.add_layer_norm_rms_eps(text.rms_norm_eps)
    gw.add_rope_freq_base(text.rope_theta)
    gw.add_rope_dimension_count(text.head_dim)
    gw.add_key_value(f"{arch}.rope.dimension_sections", sections, gguf.GGUFValueType.ARRAY,
                     sub_type=gguf.GGUFValueType.UINT32)
    if text.head_dim != text.hidden_size // text.n_heads:
        gw.add_key_length(text.head_dim)
        gw.add_value_length(text.head_dim)
    gw.add_expert_count(moe.n_experts)
    gw.add_expert_used_count(moe.top_k)
    gw.add_expert_feed_forward_length(moe.expert_ff)
    # keys only our patched llama.cpp reads (PyPI's gguf has no constants for them)
    gw.add_uint32(f"{arch}.expert_count_vl", moe.n_experts_vl)
    gw.add_uint32(f"{arch}.expert_feed_forward_length_vl", moe.expert_ff_vl)
    gw.add_expert_shared_count(moe.n_shared)
    if moe.n_shared > 0:
        gw.add_expert_shared_feed_forward_length(moe.shared_ff)
    gw.add_leading_dense_block_count(lead)
    gw.add_interleave_moe_layer_step(step)


# -- tensors -------------------------------------------------------------------------------------

# not part of the language model (the vision tower and resampler go to the mmproj), or not used
_SKIP_VL = re.compile(
    r"^(model\.)?(vision_model|vision_tower|resampler_model)\."
    r"|^model\.mtp_|\.rotary_emb\.inv_freq$|\.attention\.masked_bias$"
)


def _whole(src: TensorSource, real: str) -> np.ndarray:
    """A small tensor read completely (blocks are copied: a reader may reuse their memory)."""
    shape = tuple(src.shape(real))
    blocks = [np.array(b, dtype=np.float32, copy=True).reshape(-1, *shape[1:]) for b in src.iter_rows(real)]
    return np.concatenate(blocks).reshape(shape)


class _VLBuilder(_Builder):
    def __init__(self, text: TextConfig, src: TensorSource, outtype: str):
        super().__init__(text, src, outtype, ARCH_VL)
        assert text.mrope_section is not None
        self.sections, self.src_pairs = rope_layout(text.head_dim, text.mrope_section)
        self.order = qk_row_order(self.src_pairs)

    skip = _SKIP_VL

    def moe_layers(self) -> set[int]:
        t = self.text
        moe_layout(t)  # refuse layouts llama.cpp cannot run, before any work
        return set(t.moe.moe_layers(t.n_layers)) if t.moe else set()

    def global_tensors(self) -> None:
        t = self.text
        freqs = rope_freqs(t.head_dim, t.rope_theta, self.src_pairs)
        self.add("rope_freqs.weight", freqs.shape, lambda: [freqs])

    def permuted(self, gname: str, real: str, row0: int, n_heads: int) -> None:
        """Q or K rows [row0, row0 + n_heads * head_dim) of ``real``, each head's rows reordered for ggml's M-RoPE."""
        hd, H = self.text.head_dim, self.text.hidden_size
        order = self.order

        def blocks() -> Iterable[np.ndarray]:
            for h in range(n_heads):
                r = row0 + h * hd
                rows = np.concatenate([np.array(b, copy=True) for b in self.src.iter_rows(real, r, r + hd)])
                yield rows[order]

        self.add(gname, (n_heads * hd, H), blocks)

    def q_and_k(self, b: str, real_q: str, q0: int, real_k: str, k0: int) -> None:
        """Q and K with each head's rows reordered for ggml's M-RoPE (V and o_proj stay as they are)."""
        self.permuted(b + "attn_q.weight", real_q, q0, self.text.n_heads)
        self.permuted(b + "attn_k.weight", real_k, k0, self.text.n_kv_heads)

    def router(self, gname: str, name: str, n_experts: int) -> None:
        """An HF router stored transposed, [H, E] -> written [E, H] (GGUF ne [H, E])."""
        H = self.text.hidden_size
        real = self.take(name, (H, n_experts))
        self.add(gname, (n_experts, H), lambda: [np.ascontiguousarray(_whole(self.src, real).T)])

    def experts(self, gname: str, p: str, proj: str, first: int, count: int, width: int) -> None:
        H = self.text.hidden_size
        expect = (H, width) if proj == "down" else (width, H)
        reals = [self.take(f"{p}experts.{e}.{proj}_proj.weight", expect) for e in range(first, first + count)]
        self.add(gname, (count, *expect),
                 lambda: chain.from_iterable(self.src.iter_rows(r) for r in reals))

    def moe_ffn(self, i: int) -> None:
        moe = self.text.moe
        assert moe is not None and moe.n_experts_vl is not None and moe.expert_ff_vl is not None
        E, E_vl = moe.n_experts, moe.n_experts_vl
        p, b = f"model.layers.{i}.mlp.", f"blk.{i}."

        self.router(b + "ffn_gate_inp.weight", p + "gate.weight", E)
        self.router(b + "ffn_gate_inp_vl.weight", p + "gate.weight_1", E_vl)
        # e_score_correction_bias [2, E]: row 0 text, row 1 vision (pools of different sizes: [2, max])
        bias = self.take(p + "moe_statics.e_score_correction_bias", (2, max(E, E_vl)))
        for suffix, row, n in (("", 0, E), ("_vl", 1, E_vl)):
            self.add(f"{b}exp_probs_b{suffix}.bias", (n,),
                     lambda row=row, n=n: [np.ascontiguousarray(_whole(self.src, bias)[row, :n])])
        for suffix, first, count, width in (("", 0, E, moe.expert_ff), ("_vl", E, E_vl, moe.expert_ff_vl)):
            for proj in ("gate", "up", "down"):
                self.experts(f"{b}ffn_{proj}_exps{suffix}.weight", p, proj, first, count, width)
        if moe.n_shared > 0:
            self.ffn(p + "shared_experts.", b + "ffn_", "_shexp", moe.shared_ff)


def tensor_specs(hf: HFConfig, src: TensorSource, outtype: str) -> list[TensorSpec]:
    """Every output tensor of the language model (validated against config.json), in writing order."""
    gguf_arch(hf)
    return _VLBuilder(hf.text, src, outtype).build()
