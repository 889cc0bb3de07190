"""A summary of a GGUF file's metadata, read without loading the model."""

from __future__ import annotations

import collections
import os
from typing import Any, Dict, Union

from .errors import InvalidModelFileError
from .model import check_gguf_file

__all__ = ["gguf_summary"]


def _field(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        return f.contents()
    except Exception:  # pragma: no cover - depends on the gguf package version
        return None


def gguf_summary(path: Union[str, "os.PathLike[str]"]) -> Dict[str, Any]:
    """Architecture, sizes, tensor types and chat-template presence of a GGUF file."""
    import gguf

    p = check_gguf_file(path)
    try:
        reader = gguf.GGUFReader(str(p))
    except Exception as e:
        raise InvalidModelFileError(f"{p}: cannot read GGUF metadata: {e}", llama_log="") from e
    arch = _field(reader, "general.architecture") or "unknown"
    types = collections.Counter(t.tensor_type.name for t in reader.tensors)
    n_params = sum(int(t.n_elements) for t in reader.tensors)
    out: Dict[str, Any] = {
        "file": str(p),
        "file_size": p.stat().st_size,
        "architecture": arch,
        "name": _field(reader, "general.name"),
        "file_type": _field(reader, "general.file_type"),
        "parameters": n_params,
        "tensor_types": dict(types.most_common()),
        "tensors": len(reader.tensors),
    }
    for key in ("context_length", "embedding_length", "block_count", "attention.head_count",
                "attention.head_count_kv", "feed_forward_length", "expert_count", "expert_used_count",
                "expert_feed_forward_length", "expert_shared_count", "rope.freq_base"):
        val = _field(reader, f"{arch}.{key}")
        if val is not None:
            out[key] = val
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    out["vocab_size"] = len(tokens.data) if tokens is not None else 0
    out["tokenizer"] = _field(reader, "tokenizer.ggml.model")
    out["has_chat_template"] = "tokenizer.chat_template" in reader.fields
    return out
