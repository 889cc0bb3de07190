"""pyllama_ernie: Baidu's ERNIE 4.5 models from GGUF files, from Python.

Quick start::

    import pyllama_ernie as pe

    with pe.Model("model.gguf") as model:
        print(model.generate("Hello", max_tokens=32, temperature=0).text)
        for piece in model.stream("Tell me a story", max_tokens=64):
            print(piece, end="", flush=True)

The runtime names below load the compiled library on first use, so the
torch-free converter (``pyllama_ernie.convert``) imports without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

# public name -> module that defines it
_EXPORTS = {
    "Model": "model",
    "Context": "context",
    "Completion": "values",
    "Embeddings": "values",
    "Timings": "values",
    "SamplingParams": "values",
    "ContextParams": "values",
    "Features": "values",
    "Media": "values",
    "IMAGE_MARKER": "values",
    "VIDEO_MARKER": "values",
    "system_info": "system",
    "set_log_level": "_lib",
    "ErnieError": "errors",
    "ModelLoadError": "errors",
    "InvalidModelFileError": "errors",
    "ContextError": "errors",
    "ClosedError": "errors",
    "BusyError": "errors",
    "DecodeError": "errors",
    "PromptTooLongError": "errors",
    "QueueFullError": "errors",
    "StateFileError": "errors",
    "TokenizeError": "errors",
    "QuantizeError": "errors",
    "ImageError": "errors",
    "EncodeError": "errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pyllama_ernie' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # pragma: no cover
    from ._lib import set_log_level
    from .context import Context
    from .errors import (BusyError, ClosedError, ContextError, DecodeError, EncodeError, ErnieError, ImageError,
                         InvalidModelFileError, ModelLoadError, PromptTooLongError, QuantizeError, QueueFullError,
                         StateFileError, TokenizeError)
    from .model import Model
    from .system import system_info
    from .values import (IMAGE_MARKER, VIDEO_MARKER, Completion, ContextParams, Embeddings, Features, Media,
                         SamplingParams, Timings)
