"""A checkpoint's tokenizer -> llama.cpp's SentencePiece-style ("llama") vocabulary.

ERNIE 4.5 ships a SentencePiece BPE model (``tokenizer.model``, with byte fallback)
plus ``tokenizer_config.json`` (special tokens, chat template); newer uploads add a
``tokenizer.json``. llama.cpp runs such vocabularies with its SPM tokenizer, which
needs, per token id: the piece text, a score (higher merges first) and a type.

* ``tokenizer.model`` present: the vocabulary is built exactly as llama.cpp's own
  converter does (``_create_vocab_sentencepiece`` + ERNIE's ``add_prefix_space``),
  with a small protobuf reader here instead of the ``sentencepiece`` package.
* only ``tokenizer.json`` (a BPE model with byte fallback, as transformers' Llama
  converter writes it): the pieces come from its vocab, scores from the merge ranks
  (merge k gives its result the score -k), types from added tokens / byte pieces.

Special token ids, add-BOS/EOS flags and the chat template come from gguf's
``SpecialVocab`` (tokenizer_config.json, tokenizer.json, chat_template.jinja, config.json).
In addition ``<|end_of_sentence|>``, which ends every assistant turn of ERNIE's chat
template, becomes ``tokenizer.ggml.eot_token_id`` so llama.cpp stops generating there.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from .errors import ConversionError

__all__ = ["Vocab", "load_vocab", "parse_sentencepiece_model", "SentencePiece", "TokenType"]

logger = logging.getLogger(__name__)

TokenType = gguf.TokenType  # NORMAL=1 UNKNOWN=2 CONTROL=3 USER_DEFINED=4 UNUSED=5 BYTE=6


@dataclass
class Vocab:
    """What goes into the tokenizer.ggml.* keys."""

    tokens: list[bytes]
    scores: list[float]
    types: list[int]
    model: str = "llama"
    pre: str = "default"
    add_space_prefix: bool | None = None
    special_ids: dict[str, int] = field(default_factory=dict)  # "bos" -> id, ... (tokenizer.ggml.bos_token_id)
    add_special: dict[str, bool] = field(default_factory=dict)  # "bos" -> bool (tokenizer.ggml.add_bos_token)
    chat_template: str | list[dict[str, str]] | None = None
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def add_to_gguf(self, gw: gguf.GGUFWriter) -> None:
        gw.add_tokenizer_model(self.model)
        gw.add_tokenizer_pre(self.pre)
        gw.add_token_list(self.tokens)
        gw.add_token_scores(self.scores)
        gw.add_token_types(self.types)
        # as gguf.SpecialVocab.add_to_gguf does it
        for typ, tid in self.special_ids.items():
            getattr(gw, f"add_{typ}_token_id")(tid)
        for typ, value in self.add_special.items():
            getattr(gw, f"add_add_{typ}_token")(value)
        if self.chat_template is not None:
            gw.add_chat_template(self.chat_template)
        if self.add_space_prefix is not None:
            gw.add_add_space_prefix(self.add_space_prefix)


# -- a minimal protobuf reader for sentencepiece's ModelProto ----------------------------------

@dataclass
class SentencePiece:
    piece: str
    score: float
    type: int  # sentencepiece's enum: NORMAL=1 UNKNOWN=2 CONTROL=3 USER_DEFINED=4 UNUSED=5 BYTE=6


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of a serialized protobuf message."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        num, wire = key >> 3, key & 7
        if num == 0:
            raise ValueError("field number 0")
        if wire == 0:
            val, pos = _varint(buf, pos)
        elif wire == 1:
            if pos + 8 > len(buf):
                raise ValueError("truncated fixed64")
            val, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > len(buf):
                raise ValueError("truncated length-delimited field")
            val, pos = buf[pos : pos + n], pos + n
        elif wire == 5:
            if pos + 4 > len(buf):
                raise ValueError("truncated fixed32")
            val, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield num, wire, val


def parse_sentencepiece_model(data: bytes) -> tuple[list[SentencePiece], dict[str, Any], dict[str, Any]]:
    """Pieces, trainer spec and normalizer spec of a serialized sentencepiece ``ModelProto``.

    Only the fields a converter needs are decoded (see sentencepiece_model.proto):
    ModelProto.pieces = 1, trainer_spec = 2, normalizer_spec = 3;
    SentencePiece.piece = 1, score = 2, type = 3;
    TrainerSpec.model_type = 3, byte_fallback = 35; NormalizerSpec.name = 1, add_dummy_prefix = 3,
    remove_extra_whitespaces = 4. Raises ValueError on malformed input.
    """
    pieces: list[SentencePiece] = []
    trainer: dict[str, Any] = {}
    normalizer: dict[str, Any] = {}
    for num, wire, val in _fields(data):
        if num == 1 and wire == 2:
            piece, score, ptype = None, 0.0, 1
            for n2, w2, v2 in _fields(val):
                if n2 == 1 and w2 == 2:
                    piece = v2.decode("utf-8")
                elif n2 == 2 and w2 == 5:
                    (score,) = struct.unpack("<f", v2)
                elif n2 == 3 and w2 == 0:
                    ptype = v2
            if piece is None:
                raise ValueError(f"piece {len(pieces)} has no text")
            if not 1 <= ptype <= 6:
                raise ValueError(f"piece {len(pieces)} has unknown type {ptype}")
            pieces.append(SentencePiece(piece, score, ptype))
        elif num == 2 and wire == 2:
            for n2, w2, v2 in _fields(val):
                if n2 == 3 and w2 == 0:
                    trainer["model_type"] = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}.get(v2, v2)
                elif n2 == 35 and w2 == 0:
                    trainer["byte_fallback"] = bool(v2)
        elif num == 3 and wire == 2:
            for n2, w2, v2 in _fields(val):
                if n2 == 1 and w2 == 2:
                    normalizer["name"] = v2.decode("utf-8", "replace")
                elif n2 == 3 and w2 == 0:
                    normalizer["add_dummy_prefix"] = bool(v2)
                elif n2 == 4 and w2 == 0:
                    normalizer["remove_extra_whitespaces"] = bool(v2)
    if not pieces:
        raise ValueError("no pieces")
    return pieces, trainer, normalizer


# -- helpers -----------------------------------------------------------------------------------

def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"cannot read {path}: {e}") from e


def _does_token_look_special(text: str) -> bool:
    # llama.cpp's TextModel.does_token_look_special
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


_SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "mask")
EOT_TOKEN = "<|end_of_sentence|>"  # written as tokenizer.ggml.eot_token_id when the vocabulary has it
_BYTE_PIECE = re.compile(r"^<0x[0-9A-F]{2}>$")


# -- building the vocabulary -------------------------------------------------------------------

def _from_sentencepiece(
    hf_dir: Path, vocab_size: int, notes: list[str]
) -> tuple[list[bytes], list[float], list[int], dict[str, Any]]:
    path = hf_dir / "tokenizer.model"
    try:
        pieces, trainer, normalizer = parse_sentencepiece_model(path.read_bytes())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path} is not a readable SentencePiece model ({e}).") from e
    if trainer.get("model_type") not in (None, "bpe"):
        notes.append(
            f"tokenizer.model is a {trainer['model_type']} model; llama.cpp tokenizes it with its BPE-style SPM "
            "tokenizer, which may split some words differently."
        )

    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [int(TokenType.UNUSED)] * vocab_size
    for i, p in enumerate(pieces):
        if i >= vocab_size:
            notes.append(f"tokenizer.model has {len(pieces)} pieces but vocab_size is {vocab_size}; ids from {i} dropped.")
            break
        t = TokenType.NORMAL  # USER_DEFINED pieces too, as llama.cpp's converter does (see added_tokens_decoder)
        if p.type == 2:
            t = TokenType.UNKNOWN
        elif p.type == 3:
            t = TokenType.CONTROL
        elif p.type == 5:
            t = TokenType.UNUSED
        elif p.type == 6:
            t = TokenType.BYTE
        tokens[i], scores[i], types[i] = p.piece.encode("utf-8"), p.score, int(t)

    added = hf_dir / "added_tokens.json"
    if added.is_file():
        data = _load_json(added)
        if not isinstance(data, dict):
            raise ConversionError(f"{added} is not a JSON object.")
        for text, tid in data.items():
            if not isinstance(tid, int) or not 0 <= tid:
                raise ConversionError(f"{added}: bad id {tid!r} for {text!r}.")
            if tid >= vocab_size:
                notes.append(f"added token {text!r} (id {tid}) is beyond vocab_size {vocab_size}; ignored.")
                continue
            tokens[tid], scores[tid], types[tid] = text.encode("utf-8"), -1000.0, int(TokenType.USER_DEFINED)

    _apply_added_tokens_decoder(hf_dir, vocab_size, tokens, scores, types, notes)
    return tokens, scores, types, normalizer


def _apply_added_tokens_decoder(
    hf_dir: Path, vocab_size: int, tokens: list[bytes], scores: list[float], types: list[int], notes: list[str]
) -> None:
    cfg_path = hf_dir / "tokenizer_config.json"
    if not cfg_path.is_file():
        return
    cfg = _load_json(cfg_path)
    decoder = cfg.get("added_tokens_decoder", {}) if isinstance(cfg, dict) else {}
    if not isinstance(decoder, dict):
        raise ConversionError(f"{cfg_path}: added_tokens_decoder is not a JSON object.")
    for key, data in decoder.items():
        try:
            tid = int(key)
            text = data["content"]
            if not isinstance(text, str) or tid < 0:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise ConversionError(f"{cfg_path}: bad added_tokens_decoder entry {key!r}.") from None
        if tid >= vocab_size:
            notes.append(f"added token {text!r} (id {tid}) is beyond vocab_size {vocab_size}; ignored.")
            continue
        if data.get("special") or _does_token_look_special(text):
            types[tid] = int(TokenType.CONTROL)
        else:
            text = text.replace("\u2581", " ")  # user-defined tokens are stored pre-normalised
            types[tid] = int(TokenType.USER_DEFINED)
        scores[tid] = -1000.0
        tokens[tid] = text.encode("utf-8")


def _from_tokenizer_json(hf_dir: Path, vocab_size: int, notes: list[str]) -> tuple[list[bytes], list[float], list[int], bool]:
    path = hf_dir / "tokenizer.json"
    data = _load_json(path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        kind = model.get("type") if isinstance(model, dict) else None
        raise ConversionError(
            f"{path}: a {kind or 'unknown'} tokenizer without tokenizer.model; this converter needs a "
            "SentencePiece model (tokenizer.model) or a BPE tokenizer.json with byte fallback."
        )
    if not model.get("byte_fallback"):
        raise ConversionError(
            f"{path}: a byte-level BPE tokenizer (no byte_fallback); ERNIE 4.5 uses a SentencePiece-style "
            "vocabulary and this converter does not handle other kinds."
        )
    vocab: dict[str, int] = model["vocab"]
    merges = model.get("merges") or []
    unk = model.get("unk_token")

    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [int(TokenType.UNUSED)] * vocab_size

    rank: dict[str, int] = {}
    for k, m in enumerate(merges):
        if isinstance(m, str):
            a, _, b = m.partition(" ")
        elif isinstance(m, list) and len(m) == 2:
            a, b = m
        else:
            raise ConversionError(f"{path}: unreadable merge entry {m!r}.")
        rank.setdefault(a + b, k)
    n_merges = len(merges)

    for text, tid in vocab.items():
        if not isinstance(tid, int) or tid < 0:
            raise ConversionError(f"{path}: bad id {tid!r} for {text!r}.")
        if tid >= vocab_size:
            notes.append(f"tokenizer.json token {text!r} (id {tid}) is beyond vocab_size {vocab_size}; ignored.")
            continue
        if text == unk:
            t, s = TokenType.UNKNOWN, 0.0
        elif _BYTE_PIECE.match(text):
            t, s = TokenType.BYTE, 0.0
        elif text in rank:
            t, s = TokenType.NORMAL, -float(rank[text])
        else:
            t, s = TokenType.NORMAL, -float(n_merges + tid)
        tokens[tid], scores[tid], types[tid] = text.encode("utf-8"), s, int(t)

    for entry in data.get("added_tokens") or []:
        try:
            tid, text = entry["id"], entry["content"]
        except (KeyError, TypeError):
            raise ConversionError(f"{path}: bad added_tokens entry {entry!r}.") from None
        if not isinstance(tid, int) or tid >= vocab_size or tid < 0:
            notes.append(f"added token {text!r} (id {tid}) is outside the vocabulary; ignored.")
            continue
        if entry.get("special") or _does_token_look_special(text):
            t = TokenType.UNKNOWN if text == unk else TokenType.CONTROL
        else:
            text = text.replace("\u2581", " ")
            t = TokenType.USER_DEFINED
        tokens[tid], scores[tid], types[tid] = text.encode("utf-8"), 0.0, int(t)

    _apply_added_tokens_decoder(hf_dir, vocab_size, tokens, scores, types, notes)

    # leading space: transformers' legacy Llama normaliser Prepend("▁") or a Metaspace pre-tokenizer
    prefix = False
    norm = data.get("normalizer") or {}
    for n in norm.get("normalizers", [norm]) if isinstance(norm, dict) else []:
        if isinstance(n, dict) and n.get("type") == "Prepend" and n.get("prepend") == "\u2581":
            prefix = True
    pre = data.get("pre_tokenizer") or {}
    for p in pre.get("pretokenizers", [pre]) if isinstance(pre, dict) else []:
        if isinstance(p, dict) and p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never":
            prefix = True
    return tokens, scores, types, prefix


def load_vocab(hf_dir: str | Path, vocab_size: int) -> Vocab:
    """The GGUF vocabulary of the checkpoint in ``hf_dir`` (``vocab_size`` = the model's embedding rows)."""
    hf_dir = Path(hf_dir)
    notes: list[str] = []
    add_space_prefix: bool | None = None
    if (hf_dir / "tokenizer.model").is_file():
        tokens, scores, types, normalizer = _from_sentencepiece(hf_dir, vocab_size, notes)
        source = "tokenizer.model"
        # llama.cpp prepends a space to SPM text unless told otherwise; a model trained without a
        # dummy prefix (add_dummy_prefix=false, proto default true) must say so
        if normalizer.get("add_dummy_prefix", True) is False:
            add_space_prefix = False
    elif (hf_dir / "tokenizer.json").is_file():
        tokens, scores, types, add_space_prefix = _from_tokenizer_json(hf_dir, vocab_size, notes)
        source = "tokenizer.json"
    else:
        raise ConversionError(
            f"no tokenizer in {hf_dir}: expected tokenizer.model (SentencePiece) or tokenizer.json."
        )

    # as llama.cpp's ERNIE converter: tokenizer_config.json's add_prefix_space decides when present
    cfg_path = hf_dir / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = _load_json(cfg_path)
        if isinstance(cfg, dict) and isinstance(cfg.get("add_prefix_space"), bool):
            add_space_prefix = cfg["add_prefix_space"]

    # llama.cpp aborts on a vocabulary with a repeated token (GGML_ASSERT in llama-vocab.cpp)
    seen: dict[bytes, int] = {}
    for i, t in enumerate(tokens):
        if t in seen:
            raise ConversionError(
                f"the tokenizer has token {t.decode('utf-8', 'replace')!r} twice (ids {seen[t]} and {i}); "
                "llama.cpp cannot load such a vocabulary."
            )
        seen[t] = i
        if not t:
            raise ConversionError(f"the tokenizer has an empty token at id {i}.")

    try:
        # no "cls": GGUF has no key for it (gguf's SpecialVocab would only warn and skip it)
        special = gguf.SpecialVocab(hf_dir, n_vocab=len(tokens), special_token_types=_SPECIAL_TYPES)
    except (ValueError, json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise ConversionError(f"cannot read the special tokens of {hf_dir}: {e}") from e

    # keep only what this gguf can write (SpecialVocab may add eot/eom from a TemplateProcessing)
    special_ids = {t: i for t, i in special.special_token_ids.items() if hasattr(gguf.GGUFWriter, f"add_{t}_token_id")}
    # an assistant turn ends with <|end_of_sentence|> (the chat template's sep_token); llama.cpp stops
    # generating only at its end-of-generation tokens, so name it as the end-of-turn token
    if "eot" not in special_ids and EOT_TOKEN.encode() in seen:
        special_ids["eot"] = seen[EOT_TOKEN.encode()]
    add_special = {t: v for t, v in special.add_special_token.items() if hasattr(gguf.GGUFWriter, f"add_add_{t}_token")}

    for note in notes:
        logger.warning("%s", note)
    return Vocab(
        tokens, scores, types,
        add_space_prefix=add_space_prefix,
        special_ids=special_ids,
        add_special=add_special,
        chat_template=special.chat_template,
        source=source,
        notes=notes,
    )
