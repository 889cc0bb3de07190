"""A summary of a GGUF file's metadata, read without loading the model."""

from __future__ import annotations

import collections
import os
from typing import Any

from .gguf_check import validate_gguf

__all__ = ["gguf_summary"]


def _plain(v: Any) -> Any:
    """A metadata value as plain Python (numeric arrays as lists)."""
    return v.tolist() if hasattr(v, "tolist") else v


def gguf_summary(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Architecture, sizes, tensor types and chat-template presence of a GGUF file."""
    s = validate_gguf(path, role="auto")
    arch = s.get("general.architecture") or "unknown"
    types = collections.Counter(t.type_name for t in s.tensors.values())
    out: dict[str, Any] = {
        "file": str(s.path),
        "file_size": s.file_size,
        "architecture": arch,
        "name": s.get("general.name"),
        "file_type": _plain(s.get("general.file_type")),
        "parameters": s.parameters,
        "tensor_types": dict(types.most_common()),
        "tensors": len(s.tensors),
    }
    for key in ("context_length", "embedding_length", "block_count", "attention.head_count",
                "attention.head_count_kv", "feed_forward_length", "expert_count", "expert_used_count",
                "expert_feed_forward_length", "expert_shared_count", "rope.freq_base"):
        val = s.get(f"{arch}.{key}")
        if val is not None:
            out[key] = _plain(val)
    tokens = s.get("tokenizer.ggml.tokens")
    out["vocab_size"] = len(tokens) if tokens is not None else 0
    out["tokenizer"] = s.get("tokenizer.ggml.model")
    out["has_chat_template"] = "tokenizer.chat_template" in s.metadata
    return out
