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

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import arch_module, ernie4_5_vl_vision, write_gguf, write_mmproj
from .errors import ConversionError
from .hfconfig import VisionConfig, parse_config
from .tokenizer import TokenType, Vocab

__all__ = [
    "A3B_TEXT", "A3B_VISION", "ARCHS", "CHAT_TEMPLATE", "VL_CHAT_TEMPLATE", "a3b_config", "padded_vocab", "tiny_config",
    "tiny_vocab", "write_random_gguf", "write_tiny_gguf", "write_tiny_mmproj",
]

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


@dataclass(frozen=True)
class _PoolTensor:
    """A tensor of ``shift + scale * N(0, 1)`` values read from a shared pool of draws, made on demand.

    Row ``r`` is the window of the pool starting at ``offset + r * _POOL_STEP`` (wrapped, so that the
    window fits): drawing multi-GB models value by value would take minutes, windows take no time. The
    values are normal draws but rows are shifted copies of each other, which is fine for speed and
    memory benchmarks and wrong for anything statistical.
    """

    shape: tuple[int, ...]
    scale: float
    shift: float
    offset: int


_POOL_SIZE = 1 << 24
_POOL_STEP = 7
_BLOCK_VALUES = 1 << 22


class _ArraySource:
    """Named arrays in memory (or :class:`_PoolTensor` s over ``pool``), readable like a Checkpoint."""

    def __init__(self, arrays: dict[str, np.ndarray | _PoolTensor], pool: np.ndarray | None = None):
        self.arrays = arrays
        self.pool = pool

    def names(self) -> list[str]:
        return list(self.arrays)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.arrays[name].shape)

    def iter_rows(self, name: str, row_start: int = 0, row_stop: int | None = None) -> Iterator[np.ndarray]:
        a = self.arrays[name]
        if isinstance(a, _PoolTensor):
            yield from self._pool_rows(a, row_start, row_stop)
        else:
            yield a if a.ndim <= 1 else a[row_start:row_stop]

    def _pool_rows(self, t: _PoolTensor, row_start: int, row_stop: int | None) -> Iterator[np.ndarray]:
        assert self.pool is not None
        if len(t.shape) <= 1:
            row_start, row_stop, row_shape = 0, 1, tuple(t.shape)
        else:
            row_stop = t.shape[0] if row_stop is None else row_stop
            row_shape = tuple(t.shape[1:])
        cols = math.prod(row_shape)
        starts = _POOL_SIZE - cols + 1  # row r starts at (offset + r * step) % starts, whoever reads it
        size = self.pool.itemsize
        for r0 in range(row_start, row_stop, max(1, _BLOCK_VALUES // cols)):
            r1 = min(row_stop, r0 + max(1, _BLOCK_VALUES // cols))
            parts = []
            r = r0
            while r < r1:  # runs of rows whose starts do not wrap: strided windows of the pool
                first = (t.offset + r * _POOL_STEP) % starts
                n = min(r1 - r, (starts - 1 - first) // _POOL_STEP + 1)
                parts.append(np.lib.stride_tricks.as_strided(
                    self.pool[first:], shape=(n, cols), strides=(_POOL_STEP * size, size)))
                r += n
            block = (parts[0] if len(parts) == 1 else np.concatenate(parts)) * np.float32(t.scale) + np.float32(t.shift)
            yield block.reshape(row_shape) if len(t.shape) <= 1 else block.reshape(r1 - r0, *row_shape)


class _Draw:
    """Makes the random tensors: independent draws, or (``pooled``) :class:`_PoolTensor` s."""

    def __init__(self, seed: int, pooled: bool = False):
        self.rng = np.random.default_rng(seed)
        self.pool = self.rng.standard_normal(_POOL_SIZE, dtype=np.float32) if pooled else None

    def __call__(self, shape: tuple[int, ...], scale: float, shift: float = 0.0) -> np.ndarray | _PoolTensor:
        if self.pool is not None:
            return _PoolTensor(tuple(shape), scale, shift, int(self.rng.integers(_POOL_SIZE)))
        return (shift + scale * self.rng.standard_normal(shape)).astype(np.float32)

    def source(self, arrays: dict[str, np.ndarray | _PoolTensor]) -> _ArraySource:
        return _ArraySource(arrays, self.pool)


def _random_weights(cfg: dict[str, Any], draw: _Draw) -> dict[str, np.ndarray | _PoolTensor]:
    hf = parse_config(cfg)
    t = hf.text
    H, V, hd = t.hidden_size, t.vocab_size, t.head_dim

    def w(*shape: int, std: float = 0.15) -> np.ndarray | _PoolTensor:
        return draw(shape, std)

    def norm() -> np.ndarray | _PoolTensor:
        return draw((H,), 0.1, 1.0)

    a: dict[str, np.ndarray | _PoolTensor] = {"model.embed_tokens.weight": w(V, H, std=0.5)}
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
    draw = _Draw(seed)
    specs = module.tensor_specs(hf, draw.source(_random_weights(cfg, draw)), outtype)
    return write_gguf(
        path, hf=hf, arch=module.gguf_arch(hf), outtype=outtype, specs=specs, vocab=vocab,
        name=f"tiny-{arch}-seed{seed}",
    )


#: ERNIE-4.5-VL-28B-A3B's language model (its config.json, Baidu's flat format), less the layer count
A3B_TEXT: dict[str, Any] = dict(
    hidden_size=2560, intermediate_size=12288, num_attention_heads=20, num_key_value_heads=4,
    vocab_size=103424, max_position_embeddings=131072, moe_num_experts=[64, 64], moe_intermediate_size=[1536, 512],
    moe_k=6, moe_num_shared_experts=2, freq_allocation=20,
)
#: and its vision encoder, as ``write_tiny_mmproj`` keywords
A3B_VISION: dict[str, int] = dict(hidden=1280, depth=32, heads=16, ff=5120)


def a3b_config(n_layers: int = 28) -> dict[str, Any]:
    """The config of ERNIE-4.5-VL-28B-A3B's language model with ``n_layers`` layers (layer 0 dense, the rest MoE).

    Every shape is the real model's (spec section 1); only the depth may be cut, for benchmarks
    that measure a few layers and extrapolate. The special tokens are :func:`tiny_vocab`'s.
    """
    if n_layers < 2:
        raise ValueError("n_layers must be at least 2 (layer 0 is dense, the MoE layers follow)")
    vocab = tiny_vocab()
    ids = {t.decode("utf-8"): i for i, t in enumerate(vocab.tokens)}
    cfg = tiny_config("ernie4_5-vl-moe", A3B_TEXT["vocab_size"], ids)
    cfg.update(A3B_TEXT, num_hidden_layers=n_layers, moe_layer_start_index=[1, 1],
               moe_layer_end_index=[n_layers - 1, n_layers - 1], pixel_hidden_size=A3B_VISION["hidden"])
    cfg["vision_config"] = dict(cfg["vision_config"], depth=A3B_VISION["depth"], embed_dim=A3B_VISION["hidden"],
                                hidden_size=A3B_TEXT["hidden_size"], num_heads=A3B_VISION["heads"], mlp_ratio=4)
    return cfg


def padded_vocab(vocab_size: int) -> Vocab:
    """:func:`tiny_vocab` padded with unused ``[PADn]`` tokens to ``vocab_size``, as ERNIE pads its vocabulary."""
    vocab = tiny_vocab()
    n = len(vocab.tokens)
    if vocab_size < n:
        raise ValueError(f"vocab_size must be at least {n}")
    vocab.tokens += [f"[PAD{i}]".encode() for i in range(n, vocab_size)]
    vocab.scores += [-10000.0] * (vocab_size - n)
    vocab.types += [int(TokenType.UNUSED)] * (vocab_size - n)
    return vocab


def write_random_gguf(
    path: str | os.PathLike[str], config: dict[str, Any], *, seed: int = 0, outtype: str = "f16", name: str = "random",
) -> Path:
    """Write a random-weight model of any ``config`` (e.g. :func:`a3b_config`) to ``path``, quickly.

    For multi-GB benchmark models: the weights are windows of one pool of normal draws
    (:class:`_PoolTensor`), written block by block, so a 28B-shaped layer takes seconds and
    memory stays small. The vocabulary is :func:`padded_vocab`; the file goes through the
    converter's own config parsing, tensor mapping and writer, like :func:`write_tiny_gguf`.
    """
    hf = parse_config(config)
    module = arch_module(hf)
    draw = _Draw(seed, pooled=True)
    specs = module.tensor_specs(hf, draw.source(_random_weights(config, draw)), outtype)
    return write_gguf(
        path, hf=hf, arch=module.gguf_arch(hf), outtype=outtype, specs=specs,
        vocab=padded_vocab(hf.text.vocab_size), name=name,
    )


def _random_vision_weights(v: VisionConfig, n_embd_text: int, draw: _Draw) -> dict[str, np.ndarray | _PoolTensor]:
    """Random ViT + resampler weights under Baidu's Hub names (``vision_model.*``, ``model.resampler_model.*``)."""
    h, ff = v.hidden_size, v.intermediate_size
    S = h * v.spatial_merge_size ** 2
    a: dict[str, np.ndarray | _PoolTensor] = {}

    def linear(name: str, n_out: int, n_in: int, bias: bool = True) -> None:
        a[name + ".weight"] = draw((n_out, n_in), 1.0 / math.sqrt(n_in))
        if bias:
            a[name + ".bias"] = draw((n_out,), 0.05)

    def norm(name: str, n: int, bias: bool = True) -> None:
        a[name + ".weight"] = draw((n,), 0.1, 1.0)
        if bias:
            a[name + ".bias"] = draw((n,), 0.05)

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
    pooled: bool = False,
    preprocessor: ernie4_5_vl_vision.Preprocessor | None = None,
) -> Path:
    """Write a tiny random ERNIE 4.5 VL mmproj (vision tower + resampler) to ``path``; returns the path.

    ``n_embd_text`` is the hidden size of the language model it feeds (64 for
    ``write_tiny_gguf("ernie4_5-vl-moe")``). Keys and tensors are exactly those of a converted
    checkpoint (:mod:`.ernie4_5_vl_vision`); preprocessing keys have the reference defaults.
    ``pooled`` makes the weights as :func:`write_random_gguf` does (for the full-size encoder,
    ``**A3B_VISION``, in seconds). ``preprocessor`` replaces the reference's preprocessing
    defaults (e.g. other image or video pixel limits).
    """
    if outtype not in ("f32", "f16", "bf16", "q8_0"):
        raise ConversionError(f"unknown output type {outtype!r}; choose one of f32, f16, bf16, q8_0.")
    vision = VisionConfig(
        depth=depth, hidden_size=hidden, intermediate_size=ff, n_heads=heads, patch_size=14, in_channels=3,
        spatial_merge_size=2, temporal_merge_size=2, hidden_act="quick_gelu", layer_norm_eps=1e-6,
    )
    ernie4_5_vl_vision.check_supported(vision, ernie4_5_vl_vision.TEXT_RMS_EPS)
    draw = _Draw(seed, pooled)
    specs = ernie4_5_vl_vision.tensor_specs(vision, n_embd_text, draw.source(_random_vision_weights(vision, n_embd_text, draw)), outtype)
    return write_mmproj(
        path, vision=vision, n_embd_text=n_embd_text, preprocessor=preprocessor or ernie4_5_vl_vision.Preprocessor(),
        outtype=outtype, specs=specs, name=f"tiny-mmproj-seed{seed}",
    )
