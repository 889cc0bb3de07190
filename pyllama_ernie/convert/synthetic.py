"""Tiny random-weight ERNIE 4.5 GGUF files, for self-checks and tests.

``write_tiny_gguf(arch, path)`` for ``"ernie4_5"``, ``"ernie4_5-moe"`` or
``"ernie4_5-vl-moe"`` writes a small, valid model without torch, downloads or
sentencepiece: the
weights are random (seeded), named as a Hugging Face checkpoint would name them,
and go through the converter's own config parsing, tensor mapping and writer;
the vocabulary is a small SentencePiece-style ("llama") one written directly:
``<unk>``, ``<s>``, ``</s>``, the 256 byte-fallback tokens, single characters,
whole words (with every prefix, so llama.cpp's merges reach them) and ERNIE's
special tokens, so tokenizing and generating work.

Shapes: hidden 64, 4 heads (2 KV heads, head_dim 16), FFN 128, 2 layers (dense);
the MoE model has 3 layers (layer 0 dense), 4 experts (top-2, width 32), one
shared expert and a non-zero expert-selection bias (``exp_probs_b``).
The VL model (language model only, config in Baidu's flat format) has 4 layers
(layer 0 dense, then MoE), 4 text experts of width 32 and 6 vision experts of
width 16 (top-2), one shared expert, both selection biases non-zero, and the 3-D
rope split [h, w, t] = [3, 3, 2] pairs (GGUF sections [2, 3, 3, 0]) with its
permuted Q/K and ``rope_freqs``; its vocabulary has the image/video tokens.

``write_tiny_mmproj(path, n_embd_text=...)`` writes a matching ERNIE 4.5 VL vision encoder
(mmproj, projector ``ernie4_5vl``): a ViT of width 32 (2 heads, MLP 64, 1 block, 14 px
patches) and the resampler, with random weights named as Baidu's checkpoints name them,
through the converter's own tensor mapping and mmproj writer.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from . import arch_module, ernie4_5_vl_vision, write_gguf, write_mmproj
from .errors import ConversionError
from .hfconfig import VisionConfig, parse_config
from .tokenizer import TokenType, Vocab

__all__ = ["VL_CHAT_TEMPLATE", "ARCHS", "CHAT_TEMPLATE", "tiny_config", "tiny_vocab", "write_tiny_gguf", "write_tiny_mmproj"]

#: A chat template with the structure of ERNIE-4.5-VL's: system text, "User: " turns with
#: "Picture N:" image runs (the template's own placeholder between <|IMAGE_START|> and <|IMAGE_END|>),
#: "Assistant: " turns closed by <|end_of_sentence|>, and a <think> prefill when enable_thinking is
#: true. For tests and examples: the synthetic and test checkpoints carry a text-only template.
VL_CHAT_TEMPLATE = """
{%- set image_count = namespace(value=0) -%}
{%- set video_count = namespace(value=0) -%}
{{- bos_token -}}
{%- for message in messages -%}
  {%- if message.role == 'system' -%}
    {{- message.content if message.content is string else message.content | map(attribute='text') | join('') -}}
    {{- '\\n' -}}
  {%- elif message.role == 'user' -%}
    {{- 'User: ' -}}
    {%- if message.content is string -%}{{- message.content -}}
    {%- else -%}
      {%- for part in message.content -%}
        {%- if part.type == 'text' -%}{{- part.text -}}
        {%- elif part.type in ['image', 'image_url'] -%}
          {%- set image_count.value = image_count.value + 1 -%}
          {{- 'Picture ' ~ image_count.value ~ ':<|IMAGE_START|><|image@placeholder|><|IMAGE_END|>' -}}
        {%- elif part.type in ['video', 'video_url'] -%}
          {%- set video_count.value = video_count.value + 1 -%}
          {{- 'Video ' ~ video_count.value ~ ':<|VIDEO_START|><|video@placeholder|><|VIDEO_END|>' -}}
        {%- endif -%}
      {%- endfor -%}
    {%- endif -%}
    {{- '\\n' -}}
  {%- elif message.role == 'assistant' -%}
    {{- 'Assistant: ' ~ message.content ~ '<|end_of_sentence|>' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- 'Assistant: ' -}}
  {%- if enable_thinking is defined and enable_thinking -%}{{- '<think>\\n' -}}
  {%- else -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}
{%- endif -%}
"""


ARCHS = ("ernie4_5", "ernie4_5-moe", "ernie4_5-vl-moe")

CHAT_TEMPLATE = (
    "{%- if not add_generation_prompt is defined -%}{%- set add_generation_prompt = true -%}{%- endif -%}"
    '{%- if not cls_token is defined -%}{%- set cls_token = "<|begin_of_sentence|>" -%}{%- endif -%}'
    '{%- if not sep_token is defined -%}{%- set sep_token = "<|end_of_sentence|>" -%}{%- endif -%}'
    "{{- cls_token -}}"
    "{%- for message in messages -%}"
    '{%- if message["role"] == "user" -%}{{- "User: " + message["content"] + "\\n" -}}'
    '{%- elif message["role"] == "assistant" -%}{{- "Assistant: " + message["content"] + sep_token -}}'
    '{%- elif message["role"] == "system" -%}{{- message["content"] + "\\n" -}}'
    "{%- endif -%}"
    "{%- endfor -%}"
    '{%- if add_generation_prompt -%}{{- "Assistant: " -}}{%- endif -%}'
)

_WORDS = (
    "the a an is are was of to in and or not it this that with for on at by be as you I we "
    "Hello hello world model token text ERNIE Baidu user assistant system answer question "
    "Tell me story once upon time there small quick brown fox jumps over lazy dog good day"
).split()
_CJK = ["你", "好", "世", "界", "我", "们", "文", "心", "你好", "世界", "我们", "文心"]
_CONTROL = [
    "<|begin_of_sentence|>", "<|end_of_sentence|>", "<mask:0>", "<mask:1>",
    "<|IMAGE_PLACEHOLDER|>", "<|IMAGE_START|>", "<|IMAGE_END|>", "<|VIDEO_START|>", "<|VIDEO_END|>",
]
_USER_DEFINED = ["<think>", "</think>"]
_CONTROL_LATE = ["<|VIDEO_PLACEHOLDER|>"]  # after the user-defined ones, so earlier ids stay as they were


def tiny_vocab() -> Vocab:
    """A few hundred SPM-style tokens, with ERNIE's special tokens and chat template."""
    tokens: list[str] = ["<unk>", "<s>", "</s>"]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [TokenType.BYTE] * 256
    pieces: list[str] = []

    def piece(p: str) -> None:
        if p not in pieces:
            pieces.append(p)

    # shorter pieces first: they get higher scores and merge earlier, as in a BPE vocabulary
    words = ["\u2581" + w for w in _WORDS]
    for length in range(2, max(len(w) for w in words) + 1):
        for w in words:
            if len(w) >= length:
                piece(w[:length])
    for p in _CJK:
        piece(p)
    for c in "\u2581abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?:;'\"()-\n":
        piece(c)
    n_fixed = len(tokens)
    tokens += pieces
    types += [TokenType.NORMAL] * len(pieces)
    scores = [0.0] * n_fixed + [-float(i) for i in range(len(pieces))]
    for t in _CONTROL:
        tokens.append(t)
        types.append(TokenType.CONTROL)
        scores.append(0.0)
    for t in _USER_DEFINED:
        tokens.append(t)
        types.append(TokenType.USER_DEFINED)
        scores.append(0.0)
    for t in _CONTROL_LATE:
        tokens.append(t)
        types.append(TokenType.CONTROL)
        scores.append(0.0)
    ids = {t: i for i, t in enumerate(tokens)}
    return Vocab(
        tokens=[t.encode("utf-8") for t in tokens],
        scores=scores,
        types=[int(t) for t in types],
        add_space_prefix=False,
        special_ids={
            "bos": ids["<s>"], "eos": ids["</s>"], "unk": ids["<unk>"],
            "sep": ids["<|end_of_sentence|>"], "pad": ids["<unk>"], "mask": ids["<mask:1>"],
            "eot": ids["<|end_of_sentence|>"],
        },
        add_special={"bos": False, "eos": False},
        chat_template=CHAT_TEMPLATE,
        source="synthetic",
    )


def tiny_config(arch: str, vocab_size: int, token_ids: dict[str, int] | None = None) -> dict[str, Any]:
    """The config.json (as a dict) of the tiny model for ``arch``.

    ``token_ids`` (token text -> id) places the VL model's image/video token ids.
    """
    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
        rope_parameters={"rope_theta": 500000.0, "rope_type": "default"},
        use_bias=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    if arch == "ernie4_5":
        return dict(common, architectures=["Ernie4_5ForCausalLM"], model_type="ernie4_5",
                    num_hidden_layers=2, head_dim=16, tie_word_embeddings=True)
    if arch == "ernie4_5-moe":
        return dict(common, architectures=["Ernie4_5_MoeForCausalLM"], model_type="ernie4_5_moe",
                    num_hidden_layers=3, tie_word_embeddings=False, moe_num_experts=4, moe_k=2,
                    moe_num_shared_experts=1, moe_intermediate_size=32, moe_layer_start_index=1,
                    moe_layer_end_index=-1, moe_layer_interval=1)
    if arch == "ernie4_5-vl-moe":
        ids = token_ids or {}
        special = {
            key: ids[tok] for key, tok in (
                ("im_patch_id", "<|IMAGE_PLACEHOLDER|>"), ("image_start_token_id", "<|IMAGE_START|>"),
                ("image_end_token_id", "<|IMAGE_END|>"), ("video_token_id", "<|VIDEO_PLACEHOLDER|>"),
                ("video_start_token_id", "<|VIDEO_START|>"), ("video_end_token_id", "<|VIDEO_END|>"),
            ) if tok in ids
        }
        # Baidu's flat remote-code format: it can give the two expert pools different sizes
        return dict(
            {k: v for k, v in common.items() if k != "rope_parameters"}, **special,
            architectures=["Ernie4_5_VLMoeForConditionalGeneration"], model_type="ernie4_5_moe_vl",
            num_hidden_layers=4, tie_word_embeddings=True, rope_theta=500000.0, rope_3d=True, freq_allocation=2,
            moe_num_experts=[4, 6], moe_intermediate_size=[32, 16], moe_k=2, moe_num_shared_experts=1,
            moe_layer_start_index=[1, 1], moe_layer_end_index=[3, 3], moe_layer_interval=1,
            vision_config={"depth": 1, "embed_dim": 16, "hidden_size": 64, "mlp_ratio": 2, "num_heads": 2,
                           "patch_size": 14, "spatial_merge_size": 2, "in_channels": 3},
            pixel_hidden_size=16, spatial_conv_size=2, temporal_conv_size=2,
        )
    raise ConversionError(f"no tiny model for architecture {arch!r}; choose one of {', '.join(ARCHS)}.")


class _ArraySource:
    """Named arrays in memory, readable like a Checkpoint."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def names(self) -> list[str]:
        return list(self.arrays)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.arrays[name].shape)

    def iter_rows(self, name: str, row_start: int = 0, row_stop: int | None = None) -> Iterator[np.ndarray]:
        a = self.arrays[name]
        yield a if a.ndim <= 1 else a[row_start:row_stop]


def _random_weights(cfg: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    hf = parse_config(cfg)
    t = hf.text
    H, V, hd = t.hidden_size, t.vocab_size, t.head_dim

    def w(*shape: int, std: float = 0.15) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(H)).astype(np.float32)

    a: dict[str, np.ndarray] = {"model.embed_tokens.weight": w(V, H, std=0.5)}
    moe_layers = set(t.moe.moe_layers(t.n_layers)) if t.moe else set()
    for i in range(t.n_layers):
        p = f"model.layers.{i}."
        a[p + "input_layernorm.weight"] = norm()
        a[p + "self_attn.q_proj.weight"] = w(t.n_heads * hd, H)
        a[p + "self_attn.k_proj.weight"] = w(t.n_kv_heads * hd, H)
        a[p + "self_attn.v_proj.weight"] = w(t.n_kv_heads * hd, H)
        a[p + "self_attn.o_proj.weight"] = w(H, t.n_heads * hd)
        a[p + "post_attention_layernorm.weight"] = norm()
        if i in moe_layers and t.moe is not None and t.moe.n_experts_vl is not None:
            m = t.moe
            assert m.expert_ff_vl is not None
            # the HF/Baidu VL layout: routers stored transposed, biases [2, E], vision experts after the text ones
            a[p + "mlp.gate.weight"] = w(H, m.n_experts, std=0.5)
            a[p + "mlp.gate.weight_1"] = w(H, m.n_experts_vl, std=0.5)
            a[p + "mlp.moe_statics.e_score_correction_bias"] = w(2, max(m.n_experts, m.n_experts_vl), std=0.05)
            for e in range(m.n_experts + m.n_experts_vl):
                ff = m.expert_ff if e < m.n_experts else m.expert_ff_vl
                a[p + f"mlp.experts.{e}.gate_proj.weight"] = w(ff, H)
                a[p + f"mlp.experts.{e}.up_proj.weight"] = w(ff, H)
                a[p + f"mlp.experts.{e}.down_proj.weight"] = w(H, ff)
            if m.n_shared:
                a[p + "mlp.shared_experts.gate_proj.weight"] = w(m.shared_ff, H)
                a[p + "mlp.shared_experts.up_proj.weight"] = w(m.shared_ff, H)
                a[p + "mlp.shared_experts.down_proj.weight"] = w(H, m.shared_ff)
        elif i in moe_layers:
            m = t.moe
            assert m is not None
            a[p + "mlp.gate.weight"] = w(m.n_experts, H, std=0.5)
            a[p + "mlp.moe_statics.e_score_correction_bias"] = w(1, m.n_experts, std=0.05)
            for e in range(m.n_experts):
                a[p + f"mlp.experts.{e}.gate_proj.weight"] = w(m.expert_ff, H)
                a[p + f"mlp.experts.{e}.up_proj.weight"] = w(m.expert_ff, H)
                a[p + f"mlp.experts.{e}.down_proj.weight"] = w(H, m.expert_ff)
            if m.n_shared:
                a[p + "mlp.shared_experts.gate_proj.weight"] = w(m.shared_ff, H)
                a[p + "mlp.shared_experts.up_proj.weight"] = w(m.shared_ff, H)
                a[p + "mlp.shared_experts.down_proj.weight"] = w(H, m.shared_ff)
        else:
            a[p + "mlp.gate_proj.weight"] = w(t.intermediate_size, H)
            a[p + "mlp.up_proj.weight"] = w(t.intermediate_size, H)
            a[p + "mlp.down_proj.weight"] = w(H, t.intermediate_size)
    a["model.norm.weight"] = norm()
    if not t.tie_word_embeddings:
        a["lm_head.weight"] = w(V, H, std=0.5)
    if t.mrope_section is not None:  # a vision-tower tensor, which the language-model converter skips
        a["vision_model.ln.weight"] = np.ones(16, dtype=np.float32)
    return a


def write_tiny_gguf(arch: str, path: str | os.PathLike[str], *, seed: int = 0, outtype: str = "f32") -> Path:
    """Write a tiny random ``ernie4_5``, ``ernie4_5-moe`` or ``ernie4_5-vl-moe`` model to ``path``; returns the path."""
    vocab = tiny_vocab()
    ids = {t.decode("utf-8"): i for i, t in enumerate(vocab.tokens)}
    cfg = tiny_config(arch, len(vocab.tokens), ids)
    hf = parse_config(cfg)
    module = arch_module(hf)
    src = _ArraySource(_random_weights(cfg, seed))
    specs = module.tensor_specs(hf, src, outtype)
    return write_gguf(
        path, hf=hf, arch=module.gguf_arch(hf), outtype=outtype, specs=specs, vocab=vocab,
        name=f"tiny-{arch}-seed{seed}",
    )


def _random_vision_weights(v: VisionConfig, n_embd_text: int, seed: int) -> dict[str, np.ndarray]:
    """Random ViT + resampler weights under Baidu's Hub names (``vision_model.*``, ``model.resampler_model.*``)."""
    rng = np.random.default_rng(seed)
    h, ff = v.hidden_size, v.intermediate_size
    S = h * v.spatial_merge_size ** 2
    a: dict[str, np.ndarray] = {}

    def linear(name: str, n_out: int, n_in: int, bias: bool = True) -> None:
        a[name + ".weight"] = (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)
        if bias:
            a[name + ".bias"] = (0.05 * rng.standard_normal(n_out)).astype(np.float32)

    def norm(name: str, n: int, bias: bool = True) -> None:
        a[name + ".weight"] = (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)
        if bias:
            a[name + ".bias"] = (0.05 * rng.standard_normal(n)).astype(np.float32)

    linear("vision_model.patch_embed.proj", h, v.in_channels * v.patch_size ** 2, bias=False)
    for i in range(v.depth):
        p = f"vision_model.blocks.{i}."
        norm(p + "norm1", h)
        linear(p + "attn.qkv", 3 * h, h)
        linear(p + "attn.proj", h, h)
        norm(p + "norm2", h)
        linear(p + "mlp.fc1", ff, h)
        linear(p + "mlp.fc2", h, ff)
    norm("vision_model.ln", h)
    r = "model.resampler_model."
    linear(r + "spatial_linear.0", S, S)
    linear(r + "spatial_linear.2", S, S)
    norm(r + "spatial_linear.3", S)
    linear(r + "temporal_linear.0", S, 2 * S)
    linear(r + "temporal_linear.2", S, S)
    norm(r + "temporal_linear.3", S)
    linear(r + "mlp", n_embd_text, S)
    norm(r + "after_norm", n_embd_text, bias=False)
    return a


def write_tiny_mmproj(
    path: str | os.PathLike[str],
    *,
    n_embd_text: int,
    seed: int = 0,
    outtype: str = "f32",
    hidden: int = 32,
    depth: int = 1,
    heads: int = 2,
    ff: int = 64,
) -> Path:
    """Write a tiny random ERNIE 4.5 VL mmproj (vision tower + resampler) to ``path``; returns the path.

    ``n_embd_text`` is the hidden size of the language model it feeds (64 for
    ``write_tiny_gguf("ernie4_5-vl-moe")``). Keys and tensors are exactly those of a converted
    checkpoint (:mod:`.ernie4_5_vl_vision`); preprocessing keys have the reference defaults.
    """
    if outtype not in ("f32", "f16", "bf16", "q8_0"):
        raise ConversionError(f"unknown output type {outtype!r}; choose one of f32, f16, bf16, q8_0.")
    vision = VisionConfig(
        depth=depth, hidden_size=hidden, intermediate_size=ff, n_heads=heads, patch_size=14, in_channels=3,
        spatial_merge_size=2, temporal_merge_size=2, hidden_act="quick_gelu", layer_norm_eps=1e-6,
    )
    ernie4_5_vl_vision.check_supported(vision, ernie4_5_vl_vision.TEXT_RMS_EPS)
    src = _ArraySource(_random_vision_weights(vision, n_embd_text, seed))
    specs = ernie4_5_vl_vision.tensor_specs(vision, n_embd_text, src, outtype)
    return write_mmproj(
        path, vision=vision, n_embd_text=n_embd_text, preprocessor=ernie4_5_vl_vision.Preprocessor(),
        outtype=outtype, specs=specs, name=f"tiny-mmproj-seed{seed}",
    )
