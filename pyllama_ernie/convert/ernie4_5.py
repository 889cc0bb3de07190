"""ERNIE 4.5 text models -> llama.cpp's ``ernie4_5`` and ``ernie4_5-moe`` architectures.

Hyperparameters and tensors are written under the names and shapes llama.cpp's
loader reads (``src/models/ernie4-5.cpp``, ``ernie4-5-moe.cpp``), as its own
``convert_hf_to_gguf.py`` does, with one fix: ``expert_shared_feed_forward_length``
is ``moe_intermediate_size * moe_num_shared_experts`` (upstream writes
``intermediate_size // num_key_value_heads``, right only by coincidence for the
released checkpoints).

MoE layout. transformers makes layer ``i`` an MoE layer iff
``moe_layer_start_index <= i <= moe_layer_end_index`` and ``(i + 1) % moe_layer_interval == 0``.
The file says ``leading_dense_block_count`` (the first MoE layer) and
``interleave_moe_layer_step`` (the interval), and has a router and experts for
exactly the MoE layers, dense FFN tensors for the others. Patch 0016's loader
makes a layer MoE iff it is past the lead, on the interval and has a router, so
layers after ``moe_layer_end_index`` are dense; the released layouts (every layer
from the lead on) give the same bytes as before, which upstream llama.cpp loads.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from itertools import chain
from typing import Callable, Protocol

import gguf
import numpy as np

from .errors import ConversionError
from .hfconfig import HFConfig, TextConfig
from .writer import OUTTYPES, Q, TensorSpec

__all__ = ["ARCH_DENSE", "ARCH_MOE", "ARCHITECTURES", "TensorSource", "moe_layout", "gguf_arch", "add_hparams", "tensor_specs"]

ARCH_DENSE = "ernie4_5"
ARCH_MOE = "ernie4_5-moe"
# HF architectures handled by this module -> llama.cpp architecture
ARCHITECTURES = {
    "Ernie4_5ForCausalLM": ARCH_DENSE,
    "Ernie4_5_ForCausalLM": ARCH_DENSE,
    "Ernie4_5_MoeForCausalLM": ARCH_MOE,
}


class TensorSource(Protocol):
    """Where tensors come from: a safetensors Checkpoint, or arrays in memory (synthetic models)."""

    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def iter_rows(self, name: str, row_start: int = 0, row_stop: int | None = None) -> Iterator[np.ndarray]: ...


def gguf_arch(hf: HFConfig) -> str:
    try:
        return ARCHITECTURES[hf.architecture]
    except KeyError:
        raise ConversionError(f"internal error: {hf.architecture} is not an ERNIE 4.5 text architecture.") from None


def moe_layout(text: TextConfig) -> tuple[int, int]:
    """(leading_dense_block_count, interleave_moe_layer_step) for llama.cpp, or ConversionError."""
    moe = text.moe
    assert moe is not None
    n = text.n_layers
    layers = moe.moe_layers(n)
    if not layers:
        raise ConversionError(
            f"config.json puts no MoE layer in the model (moe_layer_start_index={moe.layer_start}, "
            f"moe_layer_end_index={moe.layer_end}, moe_layer_interval={moe.layer_interval}, {n} layers)."
        )
    # the interval the loader checks must select every MoE layer; those it selects that are not
    # MoE (past moe_layer_end_index) get no router and are dense
    step = moe.layer_interval if all((i + 1) % moe.layer_interval == 0 for i in layers) else 1
    return layers[0], step


def add_hparams(gw: gguf.GGUFWriter, text: TextConfig, arch: str) -> None:
    """The architecture's key/values (everything but general.* and tokenizer.*)."""
    gw.add_block_count(text.n_layers)
    gw.add_context_length(text.max_position_embeddings)
    gw.add_embedding_length(text.hidden_size)
    gw.add_feed_forward_length(text.intermediate_size)
    gw.add_head_count(text.n_heads)
    gw.add_head_count_kv(text.n_kv_heads)
    if text.rope_scaling is not None:
        params = text.rope_scaling
        kind, factor = params.get("rope_type"), params.get("factor")
        if kind == "linear" and factor is not None:
            gw.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            gw.add_rope_scaling_factor(float(factor))
        elif kind == "yarn" and factor is not None and "original_max_position_embeddings" in params:
            gw.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            gw.add_rope_scaling_factor(float(factor))
            gw.add_rope_scaling_orig_ctx_len(int(params["original_max_position_embeddings"]))
            if (v := params.get("extrapolation_factor")) is not None:
                gw.add_rope_scaling_yarn_ext_factor(float(v))
            if (v := params.get("attention_factor", params.get("attn_factor"))) is not None:
                gw.add_rope_scaling_yarn_attn_factor(float(v))
            if (v := params.get("beta_fast")) is not None:
                gw.add_rope_scaling_yarn_beta_fast(float(v))
            if (v := params.get("beta_slow")) is not None:
                gw.add_rope_scaling_yarn_beta_slow(float(v))
        else:
            raise ConversionError(f"rope scaling {params!r} is not supported for {arch}.")
    gw.add_rope_freq_base(text.rope_theta)
    gw.add_layer_norm_rms_eps(text.rms_norm_eps)
    if text.head_dim_in_config:
        gw.add_key_length(text.head_dim)
        gw.add_value_length(text.head_dim)
    if arch == ARCH_MOE:
        moe = text.moe
        assert moe is not None
        lead, step = moe_layout(text)
        gw.add_expert_count(moe.n_experts)
        gw.add_expert_used_count(moe.top_k)
        gw.add_interleave_moe_layer_step(step)
        gw.add_leading_dense_block_count(lead)
        gw.add_expert_feed_forward_length(moe.expert_ff)
        gw.add_expert_shared_count(moe.n_shared)
        if moe.n_shared > 0:
            gw.add_expert_shared_feed_forward_length(moe.shared_ff)


# -- tensors -----------------------------------------------------------------------------------

def choose_qtype(name: str, shape: tuple[int, ...], default: Q) -> Q:
    """The tensor type llama.cpp's converter would pick for ``name`` under ``default``."""
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return Q.F32  # norms and 1-D tensors: F32
    if name.endswith((".ffn_gate_inp.weight", ".ffn_gate_inp_shexp.weight", ".ffn_gate_inp_vl.weight")) \
            or not name.endswith(".weight"):
        return Q.F32  # routers (the VL vision router too), biases and exp_probs_b: F32
    if default == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        return Q.F16  # rows that Q8_0 cannot split into blocks: F16, as upstream falls back
    return default


_SKIP = re.compile(r"^model\.mtp_|\.rotary_emb\.inv_freq$|\.attention\.masked_bias$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class _Builder:
    def __init__(self, text: TextConfig, src: TensorSource, outtype: str, arch: str):
        self.text, self.src, self.arch = text, src, arch
        self.default_q = OUTTYPES[outtype][0]
        # checkpoint names, with Baidu's "ernie." prefix normalised to "model."
        self.by_name: dict[str, str] = {}
        for name in src.names():
            norm = "model." + name[len("ernie.") :] if name.startswith("ernie.") else name
            self.by_name[norm] = name
        self.used: set[str] = set()
        self.specs: list[TensorSpec] = []

    # helpers
    def has(self, name: str) -> bool:
        return name in self.by_name

    def take(self, name: str, expect: tuple[int, ...], *, alt_expect: tuple[int, ...] | None = None) -> str:
        if name not in self.by_name:
            raise ConversionError(f"the checkpoint has no tensor {name}, which config.json implies.")
        real = self.by_name[name]
        shape = tuple(self.src.shape(real))
        if shape != expect and shape != alt_expect:
            raise ConversionError(
                f"tensor {real} has shape {list(shape)}, but config.json implies {list(expect)}."
            )
        self.used.add(name)
        return real

    def add(self, gname: str, shape: tuple[int, ...], blocks: Callable[[], Iterable[np.ndarray]]) -> None:
        self.specs.append(TensorSpec(gname, shape, choose_qtype(gname, shape, self.default_q), blocks))

    def direct(self, gname: str, name: str, expect: tuple[int, ...]) -> None:
        real = self.take(name, expect)
        self.add(gname, expect, lambda: self.src.iter_rows(real))

    def rows(self, gname: str, real: str, r0: int, r1: int, cols: int) -> None:
        self.add(gname, (r1 - r0, cols), lambda: self.src.iter_rows(real, r0, r1))

    # the model
    #: checkpoint tensors this converter leaves out on purpose
    skip = _SKIP

    def moe_layers(self) -> set[int]:
        """Check the MoE layout can be written (before any work); return the MoE layer indices."""
        t = self.text
        if self.arch != ARCH_MOE or not t.moe:
            return set()
        moe_layout(t)  # refuse a config without MoE layers
        return set(t.moe.moe_layers(t.n_layers))

    def global_tensors(self) -> None:
        """Tensors written after the token embeddings and before the layers (none for the text models)."""

    def build(self) -> list[TensorSpec]:
        t = self.text
        H, V = t.hidden_size, t.vocab_size
        if t.use_bias:
            raise ConversionError(
                "config.json sets use_bias=true; llama.cpp's ERNIE 4.5 graphs have no biases for these layers."
            )
        moe_layers = self.moe_layers()

        self.direct("token_embd.weight", "model.embed_tokens.weight", (V, H))
        self.global_tensors()
        for i in range(t.n_layers):
            self.layer(i, i in moe_layers)
        self.direct("output_norm.weight", "model.norm.weight", (H,))
        if t.tie_word_embeddings:
            # transformers ties lm_head to the embeddings and ignores a stored lm_head
            if self.has("lm_head.weight"):
                self.used.add("lm_head.weight")
        else:
            if not self.has("lm_head.weight"):
                raise ConversionError("config.json sets tie_word_embeddings=false, but there is no lm_head.weight.")
            self.direct("output.weight", "lm_head.weight", (V, H))

        unknown = sorted(
            real for norm, real in self.by_name.items() if norm not in self.used and not self.skip.search(norm)
        )
        if unknown:
            more = f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""
            raise ConversionError(
                f"the checkpoint has tensors this converter does not know: {', '.join(unknown[:8])}{more} "
                f"(does config.json match the weights?)."
            )
        return self.specs

    def layer(self, i: int, is_moe: bool) -> None:
        t = self.text
        H, hd = t.hidden_size, t.head_dim
        q_dim, kv_dim = t.n_heads * hd, t.n_kv_heads * hd
        p, b = f"model.layers.{i}.", f"blk.{i}."
        self.direct(b + "attn_norm.weight", p + "input_layernorm.weight", (H,))
        if self.has(p + "self_attn.qkv_proj.weight"):  # Baidu's fused layout
            real = self.take(p + "self_attn.qkv_proj.weight", (q_dim + 2 * kv_dim, H))
            self.q_and_k(b, real, 0, real, q_dim)
            self.rows(b + "attn_v.weight", real, q_dim + kv_dim, q_dim + 2 * kv_dim, H)
        else:
            self.q_and_k(b, self.take(p + "self_attn.q_proj.weight", (q_dim, H)), 0,
                         self.take(p + "self_attn.k_proj.weight", (kv_dim, H)), 0)
            self.direct(b + "attn_v.weight", p + "self_attn.v_proj.weight", (kv_dim, H))
        self.direct(b + "attn_output.weight", p + "self_attn.o_proj.weight", (H, q_dim))
        self.direct(b + "ffn_norm.weight", p + "post_attention_layernorm.weight", (H,))
        if is_moe:
            self.moe_ffn(i)
        else:
            self.ffn(p + "mlp.", b + "ffn_", "", t.intermediate_size)

    def q_and_k(self, b: str, real_q: str, q0: int, real_k: str, k0: int) -> None:
        """Q and K projections: rows [q0, q0 + n_heads * head_dim) of real_q, likewise for K."""
        t = self.text
        q_dim, kv_dim = t.n_heads * t.head_dim, t.n_kv_heads * t.head_dim
        self.rows(b + "attn_q.weight", real_q, q0, q0 + q_dim, t.hidden_size)
        self.rows(b + "attn_k.weight", real_k, k0, k0 + kv_dim, t.hidden_size)

    def ffn(self, p: str, b: str, suffix: str, width: int) -> None:
        H = self.text.hidden_size
        if self.has(p + "up_gate_proj.weight"):  # Baidu's fused layout: gate rows first, then up
            real = self.take(p + "up_gate_proj.weight", (2 * width, H))
            self.rows(f"{b}gate{suffix}.weight", real, 0, width, H)
            self.rows(f"{b}up{suffix}.weight", real, width, 2 * width, H)
        else:
            self.direct(f"{b}gate{suffix}.weight", p + "gate_proj.weight", (width, H))
            self.direct(f"{b}up{suffix}.weight", p + "up_proj.weight", (width, H))
        self.direct(f"{b}down{suffix}.weight", p + "down_proj.weight", (H, width))

    def moe_ffn(self, i: int) -> None:
        t, moe = self.text, self.text.moe
        assert moe is not None
        H, E, F = t.hidden_size, moe.n_experts, moe.expert_ff
        p, b = f"model.layers.{i}.mlp.", f"blk.{i}."
        self.direct(b + "ffn_gate_inp.weight", p + "gate.weight", (E, H))
        bias = p + "moe_statics.e_score_correction_bias"
        if self.has(bias):
            real = self.take(bias, (1, E), alt_expect=(E,))
            shape = tuple(self.src.shape(real))
            self.add(b + "exp_probs_b.bias", shape, lambda: self.src.iter_rows(real))
        for proj, expect in (("gate", (F, H)), ("up", (F, H)), ("down", (H, F))):
            reals = [self.take(f"{p}experts.{e}.{proj}_proj.weight", expect) for e in range(E)]
            self.add(
                f"{b}ffn_{proj}_exps.weight",
                (E, *expect),
                lambda reals=reals: chain.from_iterable(self.src.iter_rows(r) for r in reals),
            )
        if moe.n_shared > 0:
            self.ffn(p + "shared_experts.", b + "ffn_", "_shexp", moe.shared_ff)


def tensor_specs(hf: HFConfig, src: TensorSource, outtype: str) -> list[TensorSpec]:
    """Every output tensor of the model (validated against config.json), in writing order."""
    return _Builder(hf.text, src, outtype, gguf_arch(hf)).build()
