"""Tiny random-weight ERNIE 4.5 checkpoints (text and VL), built with transformers, for tests.

Everything here is deterministic (fixed seeds) and takes well under a second per
model once torch and transformers are imported. Used by ``conftest.py``; import
torch/transformers lazily so that importing this module is cheap.

The tokenizer is a real SentencePiece BPE model (byte fallback, like ERNIE 4.5's
``tokenizer.model``) trained here on a small English/Chinese/emoji corpus, with
ERNIE's special tokens appended at the end of the piece list (as in the real
vocabulary, where they sit above id 100000), plus a ``tokenizer.json`` built the
way transformers' Llama converter builds ERNIE's (legacy normaliser that only
replaces spaces by "▁", no prefix space, byte fallback) and a
``tokenizer_config.json`` with ERNIE's special tokens and chat template.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import struct
from pathlib import Path
from typing import Any

# -- the models ------------------------------------------------------------------------------

# name -> description. "config": kwargs for the transformers config class;
# "dtype": how the weights are stored; "shard": max_shard_size for save_pretrained (None: one file).
TINY_MODELS: dict[str, dict[str, Any]] = {
    # dense, head_dim 64, GQA 2:1, tied embeddings
    "dense_a": dict(
        kind="dense",
        dtype="float32",
        config=dict(
            hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=64, tie_word_embeddings=True,
        ),
    ),
    # dense, head_dim 32 with heads*head_dim != hidden (like ERNIE-4.5-0.3B), untied, stored as bf16
    "dense_b": dict(
        kind="dense",
        dtype="bfloat16",
        config=dict(
            hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, tie_word_embeddings=False,
        ),
    ),
    # MoE: dense layer 0, then MoE; 4 experts top-2, 1 shared expert; shapes where llama.cpp's own
    # converter is right (intermediate_size // kv_heads == moe_intermediate_size * shared) and q8_0 works
    "moe_a": dict(
        kind="moe",
        dtype="float32",
        config=dict(
            hidden_size=64, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, moe_intermediate_size=32, moe_num_experts=4, moe_k=2,
            moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_interval=1,
            tie_word_embeddings=True,
        ),
    ),
    # MoE with odd sizes: expert width 40, 2 shared experts (shared FFN 80 != 72 // 2), 6 experts top-2,
    # untied, saved in shards (index.json). llama.cpp's own converter writes a wrong shared width here.
    "moe_odd": dict(
        kind="moe",
        dtype="float32",
        shard="40KB",
        config=dict(
            hidden_size=64, intermediate_size=72, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, moe_intermediate_size=40, moe_num_experts=6, moe_k=2,
            moe_num_shared_experts=2, moe_layer_start_index=1, moe_layer_interval=1,
            tie_word_embeddings=False,
        ),
    ),
    # the released text models' head size (128) on the dense architecture, heads*head_dim != hidden
    "dense_h128": dict(
        kind="dense",
        dtype="float32",
        config=dict(
            hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=128, tie_word_embeddings=True,
        ),
    ),
    # ERNIE-4.5-21B-A3B's routing (64 experts, top-6, 2 shared) and head size 128, tiny otherwise
    "moe_64x6": dict(
        kind="moe",
        dtype="float32",
        config=dict(
            hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2,
            num_key_value_heads=1, head_dim=128, moe_intermediate_size=16, moe_num_experts=64, moe_k=6,
            moe_num_shared_experts=2, moe_layer_start_index=1, moe_layer_interval=1,
            tie_word_embeddings=True,
        ),
    ),
    # MoE every 2nd layer after a dense lead layer (MoE layers 1 and 3, dense 0 and 2):
    # upstream llama.cpp's ernie4_5-moe cannot load this; ours can (patch 0016)
    "moe_step2": dict(
        kind="moe",
        dtype="float32",
        config=dict(
            hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, moe_intermediate_size=32, moe_num_experts=4, moe_k=2,
            moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_interval=2,
            tie_word_embeddings=True,
        ),
    ),
}

#: every MoE layer layout transformers accepts on a 6-layer model: (start, end, interval)
MOE_LAYOUTS = [(s, e, k) for s in (0, 1, 2) for e in (3, 5) for k in (1, 2, 3)
               if any((i + 1) % k == 0 for i in range(s, e + 1))]
for _s, _e, _k in MOE_LAYOUTS:
    TINY_MODELS[f"moe_layout_{_s}_{_e}_{_k}"] = dict(
        kind="moe",
        dtype="float32",
        config=dict(
            hidden_size=64, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, moe_intermediate_size=32, moe_num_experts=4, moe_k=2,
            moe_num_shared_experts=1, moe_layer_start_index=_s, moe_layer_end_index=_e, moe_layer_interval=_k,
            tie_word_embeddings=True,
        ),
    )
del _s, _e, _k

INIT_STD = 0.1  # larger than transformers' 0.02, so logits are not all ~0


# -- the tokenizer ---------------------------------------------------------------------------

# Appended after the trained pieces. (text, sentencepiece type: 3 CONTROL, 4 USER_DEFINED, special?)
ERNIE_SPECIAL_PIECES: list[tuple[str, int, bool]] = [
    ("<|begin_of_sentence|>", 3, True),
    ("<|end_of_sentence|>", 3, True),
    ("<mask:0>", 3, True),
    ("<mask:1>", 3, True),
    ("<mask:4>", 3, True),
    ("<mask:5>", 3, True),
    ("<mask:6>", 3, True),
    ("<mask:7>", 3, True),
    ("<|IMAGE_PLACEHOLDER|>", 3, True),
    ("<|AUDIO_PLACEHOLDER|>", 3, True),
    ("<|LOC_0|>", 3, True),
    ("<|LOC_1|>", 3, True),
    ("<|LOC_BEGIN|>", 3, True),
    ("<|LOC_END|>", 3, True),
    ("<|LOC_SEP|>", 3, True),
    ("<|CROP_COL_SEP|>", 3, True),
    ("<|CROP_ROW_SEP|>", 3, True),
    ("<|IMAGE_SEP|>", 3, True),
    ("<|IMAGE_START|>", 3, True),
    ("<|IMAGE_END|>", 3, True),
    ("<|VIDEO_START|>", 3, True),
    ("<|VIDEO_END|>", 3, True),
    ("<|video_pad|>", 3, True),
    ("<think>", 4, False),
    ("</think>", 4, False),
    ("<|VIDEO_PLACEHOLDER|>", 3, True),  # ERNIE-4.5-VL's video token (appended: earlier ids stay)
]

# ERNIE 4.5's chat template (tokenizer_config.json of the -PT text models)
ERNIE_CHAT_TEMPLATE = (
    "{%- if not add_generation_prompt is defined -%}\n"
    "    {%- set add_generation_prompt = true -%}\n"
    "{%- endif -%}\n"
    "{%- if not cls_token is defined -%}\n"
    '    {%- set cls_token = "<|begin_of_sentence|>" -%}\n'
    "{%- endif -%}\n"
    "{%- if not sep_token is defined -%}\n"
    '    {%- set sep_token = "<|end_of_sentence|>" -%}\n'
    "{%- endif -%}\n"
    "{{- cls_token -}}\n"
    "{%- for message in messages -%}\n"
    '    {%- if message["role"] == "user" -%}\n'
    '        {{- "User: " + message["content"] + "\\n" -}}\n'
    '    {%- elif message["role"] == "assistant" -%}\n'
    '        {{- "Assistant: " + message["content"] + sep_token -}}\n'
    '    {%- elif message["role"] == "system" -%}\n'
    '        {{- message["content"] + "\\n" -}}\n'
    "    {%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    '    {{- "Assistant: " -}}\n'
    "{%- endif -%}"
)

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# texts the tokenizer tests run through both tokenizers
SAMPLE_TEXTS = [
    "Hello world",
    "the quick brown fox jumps over the lazy dog.",
    " leading space and  two  spaces   three",
    "trailing space ",
    "\n\nnew\nlines\n",
    "tabs\tand\ttabs",
    "你好世界，我们测试中文模型。",
    "mixed 中文 and English 123456 数字",
    "emoji 🚀🦙 and ❤️ 👍🏽",
    "unseen chars: Ωß∂ ñ ü ä こんにちは",
    "<|begin_of_sentence|>User: hi\nAssistant: hello<|end_of_sentence|>",
    "<think>\nreasoning here\n</think>\n\nanswer",
    "Picture 1:<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_PLACEHOLDER|><|IMAGE_END|> describe",
    "<s>raw bos</s> and <unk>",
    "code: def f(x):\n    return x * 2  # comment",
    "",
    " ",
]


def _corpus(n_lines: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    en = (
        "the quick brown fox jumps over the lazy dog hello world model token language python code data "
        "test ernie baidu assistant user system answer question think reason image video picture "
        "describe return def comment space new line"
    ).split()
    zh = ["你好", "世界", "我们", "模型", "语言", "中文", "测试", "百度", "文心", "今天", "天气", "很好",
          "学习", "人工智能", "问题", "回答", "数字"]
    emo = ["😀", "🚀", "👍", "🎉", "❤️", "🦙"]
    lines = []
    for _ in range(n_lines):
        parts = []
        for _ in range(rng.randint(3, 12)):
            r = rng.random()
            if r < 0.6:
                w = rng.choice(en)
                if rng.random() < 0.1:
                    w = w.capitalize()
                parts.append(w + (rng.choice([",", ".", "!", "?", ":", ""]) if rng.random() < 0.2 else ""))
            elif r < 0.85:
                parts.append("".join(rng.choice(zh) for _ in range(rng.randint(1, 3))))
            elif r < 0.93:
                parts.append(str(rng.randint(0, 99999)))
            else:
                parts.append(rng.choice(emo))
        sep = rng.choice([" ", " ", " ", "  ", "\n", "\t"])
        lines.append(sep.join(parts))
    return lines


def _pb_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _pb_piece(text: str, score: float, ptype: int) -> bytes:
    """A serialized ModelProto.pieces entry (field 1 of ModelProto)."""
    raw = text.encode("utf-8")
    msg = b"\x0a" + _pb_varint(len(raw)) + raw + b"\x15" + struct.pack("<f", score) + b"\x18" + _pb_varint(ptype)
    return b"\x0a" + _pb_varint(len(msg)) + msg


def build_tokenizer(out_dir: Path, vocab_size: int = 800) -> dict[str, Any]:
    """Train and write ERNIE-style tokenizer files into ``out_dir``; returns facts about it."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers.tokenization_utils_base import generate_merges

    out_dir.mkdir(parents=True, exist_ok=True)
    bio = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_writer=bio,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=0.9995,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    proto = bio.getvalue() + b"".join(_pb_piece(t, 0.0, ty) for t, ty, _ in ERNIE_SPECIAL_PIECES)
    (out_dir / "tokenizer.model").write_bytes(proto)

    sp = spm.SentencePieceProcessor(model_proto=proto)
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    special_ids = {t: pieces.index(t) for t, _, _ in ERNIE_SPECIAL_PIECES}
    assert all(special_ids[t] >= n - len(ERNIE_SPECIAL_PIECES) for t in special_ids)

    # tokenizer.json as transformers' LlamaConverter makes it for ERNIE (legacy=True, add_prefix_space=False)
    vocab = {p: i for i, p in enumerate(pieces)}
    normal = {p: i for p, i in vocab.items() if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))
              and p not in special_ids}
    merges = generate_merges(normal)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(" ", "\u2581")])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = ["<unk>", "<s>", "</s>"] + [t for t, _, special in ERNIE_SPECIAL_PIECES if special]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, _, special in ERNIE_SPECIAL_PIECES if not special])
    tok.save(str(out_dir / "tokenizer.json"))

    added_decoder = {}
    for t in ["<unk>", "<s>", "</s>"] + [t for t, _, _ in ERNIE_SPECIAL_PIECES]:
        tid = vocab[t]
        special = t in specials
        added_decoder[str(tid)] = {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": special,
        }
    tokenizer_config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "legacy": True,
        "added_tokens_decoder": added_decoder,
        "additional_special_tokens": [
            t for t, _, special in ERNIE_SPECIAL_PIECES
            if special and t not in ("<|begin_of_sentence|>", "<|end_of_sentence|>", "<mask:1>")
        ],
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
        "cls_token": "<|begin_of_sentence|>",
        "sep_token": "<|end_of_sentence|>",
        "mask_token": "<mask:1>",
        "chat_template": ERNIE_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "model_max_length": 131072,
        "padding_side": "left",
        "tokenizer_class": "LlamaTokenizer",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False), encoding="utf-8")
    special_map = {k: tokenizer_config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token", "cls_token", "sep_token", "mask_token")}
    special_map["additional_special_tokens"] = tokenizer_config["additional_special_tokens"]
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, ensure_ascii=False), encoding="utf-8")
    return {"n_pieces": n, "special_ids": special_ids}


# -- building a model ------------------------------------------------------------------------

def model_vocab_size(n_pieces: int) -> int:
    """The model's vocab_size: the tokenizer's pieces padded up to a multiple of 64 (as ERNIE pads 103424)."""
    return (n_pieces + 64) // 64 * 64


def build_model(name: str, out_dir: Path, tokenizer_dir: Path, n_pieces: int, seed: int = 0) -> Path:
    """Create, initialise and save TINY_MODELS[name] (with the tokenizer files) into ``out_dir``."""
    import torch
    from transformers import Ernie4_5Config, Ernie4_5ForCausalLM, Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

    spec = TINY_MODELS[name]
    kw = dict(spec["config"], vocab_size=model_vocab_size(n_pieces), max_position_embeddings=4096)
    if spec["kind"] == "dense":
        config = Ernie4_5Config(**kw)
        cls = Ernie4_5ForCausalLM
    else:
        config = Ernie4_5_MoeConfig(**kw)
        cls = Ernie4_5_MoeForCausalLM
    torch.manual_seed(seed)
    model = cls(config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("layernorm.weight") or pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "e_score_correction_bias" in pname:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(INIT_STD * torch.randn(p.shape, generator=gen))
        # the bias is a buffer-like parameter in some versions; cover buffers too
        for bname, b in model.named_buffers():
            if "e_score_correction_bias" in bname:
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
    if spec["dtype"] == "bfloat16":
        model = model.to(torch.bfloat16)
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_kw: dict[str, Any] = {}
    if spec.get("shard"):
        save_kw["max_shard_size"] = spec["shard"]
    model.save_pretrained(out_dir, **save_kw)
    for f in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / f, out_dir / f)
    return out_dir


# -- ERNIE 4.5 VL (Ernie4_5_VLMoeForConditionalGeneration) ----------------------------------------

# name -> description. "text"/"vision": kwargs of the text/vision sub-configs (the text config's
# rope_parameters get rope_theta 500000 and "mrope" as mrope_section [h, w, t]); "tie": the
# top-level tie_word_embeddings; "dtype"/"shard" as for TINY_MODELS. transformers' VL model has
# one moe_num_experts for both pools, so the pools differ in expert width only.
# "baidu_of": the same weights with Baidu's original (remote-code) config.json, in a folder of
# the same name under another parent (so both GGUFs are byte-identical, general.name included).
VL_MODELS: dict[str, dict[str, Any]] = {
    # head_dim 128 with the 28B's rope split [22, 22, 20]; GQA 2:1; layer 0 dense; tied
    "vl_a": dict(
        dtype="float32", tie=True, mrope=[22, 22, 20],
        text=dict(hidden_size=256, intermediate_size=192, num_hidden_layers=3, num_attention_heads=2,
                  num_key_value_heads=1, moe_intermediate_size=[64, 32], moe_num_experts=4, moe_k=2,
                  moe_num_shared_experts=1),
        vision=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2),
    ),
    # head_dim 64, rope split scaled to [11, 11, 10]; 4 heads, 2 KV heads; untied; stored as bf16
    "vl_b": dict(
        dtype="bfloat16", tie=False, mrope=[11, 11, 10],
        text=dict(hidden_size=256, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, moe_intermediate_size=[64, 32], moe_num_experts=4, moe_k=2,
                  moe_num_shared_experts=1),
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2),
    ),
    # head_dim 32, split [6, 6, 4]; MoE layers 3 and 5 of 6 (dense lead 3, step 2); vision experts
    # wider than text ones (48 text, 80 vision); 6 experts top-3; 2 shared experts; sharded files
    "vl_c": dict(
        dtype="float32", tie=True, mrope=[6, 6, 4], shard="1MB",
        text=dict(hidden_size=128, intermediate_size=160, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2, moe_intermediate_size=[48, 80], moe_num_experts=6, moe_k=3,
                  moe_num_shared_experts=2,
                  mlp_layer_types=["dense", "dense", "dense", "sparse", "dense", "sparse"]),
        vision=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2),
    ),
    # vl_c as Baidu publishes checkpoints: flat config.json (start [2, 2], end [6, 5], interval 2,
    # freq_allocation 4), vision tower at the top level (vision_model.*), a stored lm_head although tied
    "vl_baidu": dict(baidu_of="vl_c"),
    # vl_a trained for a few hundred steps to memorise TRAIN_TEXTS: a random model's next-token
    # distributions are nearly flat, so any rounding flips its top-1; a trained model's are not
    "vl_trained": dict(train_of="vl_a", steps=300),
    # the 28B model's vision head size (1280 / 16 = 80), with 2 heads of 80; tiny otherwise
    "vl_h80": dict(
        dtype="float32", tie=True, mrope=[22, 22, 20],
        text=dict(hidden_size=256, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, moe_intermediate_size=[64, 32], moe_num_experts=4, moe_k=2,
                  moe_num_shared_experts=1),
        vision=dict(depth=1, hidden_size=160, intermediate_size=64, num_heads=2),
    ),
    # the real rope (head_dim 128, [22, 22, 20], theta 500000) at long context: only the last
    # layer is MoE, so routing near-ties cannot spread an error through later layers
    "vl_long": dict(
        dtype="float32", tie=True, mrope=[22, 22, 20], max_positions=16384,
        text=dict(hidden_size=256, intermediate_size=192, num_hidden_layers=3, num_attention_heads=2,
                  num_key_value_heads=1, moe_intermediate_size=[64, 32], moe_num_experts=4, moe_k=2,
                  moe_num_shared_experts=1, mlp_layer_types=["dense", "dense", "sparse"]),
        vision=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2),
    ),
}

#: what vl_trained memorises (and what the quantization test scores)
TRAIN_TEXTS = [line for line in _corpus(400, seed=7) if len(line) > 40][:48]

# special tokens -> the VL config's token-id keys
VL_TOKEN_KEYS = {
    "image_token_id": "<|IMAGE_PLACEHOLDER|>", "image_start_token_id": "<|IMAGE_START|>",
    "image_end_token_id": "<|IMAGE_END|>", "video_token_id": "<|VIDEO_PLACEHOLDER|>",
    "video_start_token_id": "<|VIDEO_START|>", "video_end_token_id": "<|VIDEO_END|>",
}


def vl_text_config(name: str, n_pieces: int) -> dict[str, Any]:
    """The text_config kwargs of VL_MODELS[name] (an HF-native model)."""
    spec = VL_MODELS[name]
    return dict(
        spec["text"], vocab_size=model_vocab_size(n_pieces), max_position_embeddings=spec.get("max_positions", 4096),
        tie_word_embeddings=spec["tie"],
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0, "mrope_section": list(spec["mrope"])},
    )


def _init_vl_weights(model: Any, seed: int) -> None:
    import re

    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    norm = re.compile(r"(norm|norm1|norm2|\.ln)\.weight$")
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if norm.search(pname):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "e_score_correction_bias" in pname:  # both pools' rows
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(INIT_STD * torch.randn(p.shape, generator=gen))


def _train_text(model: Any, tokenizer_dir: Path, steps: int, seed: int) -> None:
    """Fit the language model to TRAIN_TEXTS (full batch, text only) so its predictions are confident."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    seqs = [tok(t)["input_ids"][:16] for t in TRAIN_TEXTS]
    batch = torch.tensor([s for s in seqs if len(s) == 16])
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def build_vl_model(name: str, out_dir: Path, tokenizer_dir: Path, n_pieces: int, special_ids: dict[str, int],
                   seed: int = 0) -> Path:
    """Create, initialise and save VL_MODELS[name] (HF-native, with the tokenizer files) into ``out_dir``."""
    import torch
    from transformers import Ernie4_5_VLMoeConfig, Ernie4_5_VLMoeForConditionalGeneration

    steps = VL_MODELS[name].get("steps", 0)
    if "train_of" in VL_MODELS[name]:
        name = VL_MODELS[name]["train_of"]
    spec = VL_MODELS[name]
    config = Ernie4_5_VLMoeConfig(
        text_config=vl_text_config(name, n_pieces),
        vision_config=dict(spec["vision"]),
        tie_word_embeddings=spec["tie"],
        **{key: special_ids[tok] for key, tok in VL_TOKEN_KEYS.items()},
    )
    torch.manual_seed(seed)
    model = Ernie4_5_VLMoeForConditionalGeneration(config)
    _init_vl_weights(model, seed)
    if steps:
        _train_text(model, tokenizer_dir, steps, seed)
    if spec["dtype"] == "bfloat16":
        model = model.to(torch.bfloat16)
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_kw: dict[str, Any] = {}
    if spec.get("shard"):
        save_kw["max_shard_size"] = spec["shard"]
    model.save_pretrained(out_dir, **save_kw)
    for f in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / f, out_dir / f)
    return out_dir


def baidu_vl_config(hf_config: dict[str, Any]) -> dict[str, Any]:
    """Baidu's original (remote-code, ``ernie4_5_moe_vl``) config.json for an HF-native VL config.json."""
    t, v = hf_config["text_config"], hf_config["vision_config"]
    n = t["num_hidden_layers"]
    sparse = [i for i, kind in enumerate(t["mlp_layer_types"]) if kind == "sparse"]
    # start / interval / end reproducing mlp_layer_types; the end indices run past the last layer
    # for the text pool, as the 28B's [29, 28] does
    interval = sparse[1] - sparse[0] if len(sparse) > 1 else 1
    start = sparse[0] - (interval - 1 if interval > 1 else 0)
    assert [i for i in range(n) if (i + 1) % interval == 0 and i >= start] == sparse
    h, w, tt = t["rope_parameters"]["mrope_section"]
    cfg = {
        "architectures": ["Ernie4_5_VLMoeForConditionalGeneration"],
        "model_type": "ernie4_5_moe_vl",
        "hidden_size": t["hidden_size"],
        "intermediate_size": t["intermediate_size"],
        "num_hidden_layers": n,
        "num_attention_heads": t["num_attention_heads"],
        "num_key_value_heads": t["num_key_value_heads"],
        "max_position_embeddings": t["max_position_embeddings"],
        "rms_norm_eps": t["rms_norm_eps"],
        "rope_theta": t["rope_parameters"]["rope_theta"],
        "vocab_size": t["vocab_size"],
        "tie_word_embeddings": hf_config["tie_word_embeddings"],
        "use_bias": False,
        "use_cache": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "float32",
        "moe_num_experts": [t["moe_num_experts"], t["moe_num_experts"]],
        "moe_intermediate_size": list(t["moe_intermediate_size"]),
        "moe_k": t["moe_k"],
        "moe_layer_start_index": [start, start],
        "moe_layer_end_index": [n, n - 1],
        "moe_layer_interval": interval,
        "moe_num_shared_experts": t["moe_num_shared_experts"],
        "moe_gate": "topk",
        "moe_use_aux_free": True,
        "moe_multimodal_dispatch_use_allgather": "v2-alltoall-unpad",
        "rope_3d": True,
        "freq_allocation": tt,
        "im_patch_id": hf_config["image_token_id"],
        "pixel_hidden_size": v["hidden_size"],
        "spatial_conv_size": v["spatial_merge_size"],
        "temporal_conv_size": v["temporal_merge_size"],
        "use_temporal_conv": True,
        "vision_config": {
            "depth": v["depth"],
            "embed_dim": v["hidden_size"],
            "hidden_size": t["hidden_size"],  # not the ViT width in Baidu's config
            "hidden_act": "quick_gelu",
            "mlp_ratio": v["intermediate_size"] // v["hidden_size"],
            "num_heads": v["num_heads"],
            "in_channels": 3,
            "patch_size": v["patch_size"],
            "spatial_merge_size": v["spatial_merge_size"],
            "attn_implementation": "eager",
        },
    }
    assert h == w and h + w + tt == t["hidden_size"] // t["num_attention_heads"] // 2
    return cfg


def build_vl_baidu(src_dir: Path, out_dir: Path) -> Path:
    """The checkpoint in ``src_dir`` rewritten as Baidu publishes it (see VL_MODELS["vl_baidu"])."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    hf_config = json.loads((src_dir / "config.json").read_text())
    weights = {}
    for f in sorted(src_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                weights[k] = st.get_tensor(k)
    renamed = {}
    for k, v in weights.items():
        if k.startswith("model.vision_model."):  # transformers saves the ViT under model.; the Hub has it on top
            k = k[len("model."):]
        renamed[k] = v.contiguous()
    if hf_config["tie_word_embeddings"] and "lm_head.weight" not in renamed:
        renamed["lm_head.weight"] = renamed["model.embed_tokens.weight"].clone()
    save_file(renamed, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(baidu_vl_config(hf_config), indent=2))
    for f in src_dir.iterdir():
        if f.name != "config.json" and not f.name.startswith("model") and f.is_file():
            shutil.copy(f, out_dir / f.name)
    return out_dir
