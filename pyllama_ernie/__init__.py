"""pyllama_ernie: Baidu's ERNIE 4.5 models from GGUF files, from Python.

Quick start::

    import pyllama_ernie as pe

    with pe.Model("model.gguf") as model:
        print(model.generate("Hello", max_tokens=32, temperature=0).text)
        for piece in model.stream("Tell me a story", max_tokens=64):
            print(piece, end="", flush=True)
"""

from __future__ import annotations

__version__ = "0.1.0"

from ._lib import set_log_level
from .context import Completion, Context, SamplingParams, Timings
from .errors import (
    BusyError,
    ClosedError,
    ContextError,
    DecodeError,
    ErnieError,
    InvalidModelFileError,
    ModelLoadError,
    PromptTooLongError,
    QuantizeError,
    TokenizeError,
)
from .model import Model
from .system import system_info

__all__ = [
    "__version__",
    "Model",
    "Context",
    "Completion",
    "Timings",
    "SamplingParams",
    "system_info",
    "set_log_level",
    "ErnieError",
    "ModelLoadError",
    "InvalidModelFileError",
    "ContextError",
    "ClosedError",
    "BusyError",
    "DecodeError",
    "PromptTooLongError",
    "TokenizeError",
    "QuantizeError",
]
