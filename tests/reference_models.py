"""Tiny random-weight ERNIE 4.5 checkpoints, built with transformers, for tests.

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
    # MoE every 2nd layer after a dense lead layer (MoE layers 1 and 3, dense 0 and 2):
    # llama.cpp's ernie4_5-moe cannot express this, so conversion must refuse it.
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
