"""The exception hierarchy, and the one place C results become exceptions.

Every exception carries ``llama_log``: the last warning or error line that
llama.cpp (or mtmd) logged before the failure, which usually says why.
"""

from __future__ import annotations

import threading
from typing import NoReturn

__all__ = [
    "ErnieError",
    "ModelLoadError",
    "InvalidModelFileError",
    "ContextError",
    "ClosedError",
    "BusyError",
    "DecodeError",
    "PromptTooLongError",
    "QueueFullError",
    "StateFileError",
    "TokenizeError",
    "QuantizeError",
    "ImageError",
    "EncodeError",
    "error",
    "raise_error",
]


class ErnieError(Exception):
    """Base class of every error raised by pyllama_ernie."""

    def __init__(self, message: str, *, llama_log: str | None = None) -> None:
        self.llama_log = llama_log if llama_log is not None else last_log_line()
        full = message
        if self.llama_log and self.llama_log not in message:
            full = f"{message} (llama.cpp: {self.llama_log})"
        super().__init__(full)
        self.message = message


class ModelLoadError(ErnieError, OSError):
    """The model (or projector) file could not be loaded."""


class InvalidModelFileError(ModelLoadError, ValueError):
    """The file is not a GGUF file llama.cpp can read; refused before it reached C."""


class ContextError(ErnieError):
    """A llama.cpp context could not be created or used."""


class _NotFromLlama:
    """Mixin: the error is the package's own, so it carries no llama.cpp log line by default."""

    def __init__(self, message: str, *, llama_log: str | None = "", **kw: object) -> None:
        super().__init__(message, llama_log=llama_log, **kw)  # type: ignore[call-arg]


class ClosedError(_NotFromLlama, ContextError, ValueError):
    """The object was closed; its C resources are gone."""


class BusyError(_NotFromLlama, ContextError):
    """The context is in use by an unfinished call (e.g. an open stream) in this thread."""


class DecodeError(ErnieError):
    """``llama_decode`` failed. ``code`` is its return value."""

    def __init__(self, message: str, *, code: int = 0, llama_log: str | None = None) -> None:
        super().__init__(message, llama_log=llama_log)
        self.code = code


class PromptTooLongError(_NotFromLlama, DecodeError, ValueError):
    """The input does not fit in the context window.

    ``n_prompt`` is the prompt's length in positions and ``n_ctx`` the window (None where
    not known)."""

    def __init__(self, message: str, *, n_prompt: int | None = None, n_ctx: int | None = None,
                 **kw: object) -> None:
        super().__init__(message, **kw)
        self.n_prompt = n_prompt
        self.n_ctx = n_ctx


class QueueFullError(_NotFromLlama, ContextError):
    """A model serving several sequences (``n_parallel``) has no room for another waiting
    request: every slot is busy and ``max_queue`` requests already wait. ``retry_after`` is
    a suggested wait in seconds."""

    def __init__(self, message: str, *, retry_after: float = 1.0, **kw: object) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class StateFileError(_NotFromLlama, ErnieError, ValueError):
    """A saved conversation state cannot be used: not such a file, damaged, from a newer
    version of the package, or saved from another model or with other context settings.

    ``reason`` says which, for an app that handles them differently (e.g. re-evaluating
    the conversation's text when the state belongs to another model): ``"foreign"`` (not
    a state file), ``"version"``, ``"damaged"``, ``"too_large"`` (over ``max_payload``),
    ``"model"`` or ``"context"``.
    """

    def __init__(self, message: str, *, reason: str = "damaged", **kw: object) -> None:
        super().__init__(message, **kw)
        self.reason = reason


class TokenizeError(ErnieError, ValueError):
    """Text could not be tokenized or tokens could not be turned into text."""


class QuantizeError(ErnieError):
    """``llama_model_quantize`` failed."""


class ImageError(ErnieError, ValueError):
    """An image (or video frame) could not be read, or is not one the model can take."""

    def __init__(self, message: str, *, llama_log: str | None = "") -> None:
        super().__init__(message, llama_log=llama_log)


class EncodeError(ErnieError):
    """The vision encoder (mmproj) failed on an image."""


# --- what llama.cpp logged about a failure, fed by the log callback in _lib ---
#
# llama.cpp logs the cause first ("error loading model hyperparameters: key not
# found ...") and a summary last ("failed to load model"), so the first error
# since the call began is the one worth showing; without errors, the last warning.

_last = threading.local()
_last_global: list = [None]


def note_log_line(line: str, is_error: bool = False) -> None:
    """Remember a warning/error line logged by llama.cpp (called by the log callback)."""
    if is_error and getattr(_last, "first_error", None) is None:
        _last.first_error = line
    _last.line = line
    _last_global[0] = line


def last_log_line() -> str | None:
    """The first error llama.cpp logged in this thread since the call began, else its last warning."""
    return getattr(_last, "first_error", None) or getattr(_last, "line", None) or _last_global[0]


def clear_log_line() -> None:
    """Forget what was logged, so an error reports only what its own call logged."""
    _last.line = None
    _last.first_error = None
    _last_global[0] = None


_DECODE_MEANING = {
    1: "no room in the KV cache for the batch (the context is full)",
    2: "aborted",
    -1: "invalid input batch",
}


def error(kind: type, what: str, code: int | None = None) -> ErnieError:
    """The ``kind`` exception for a failed C call ``what`` that returned ``code`` (for a caller
    that hands it on instead of raising it, such as the batching engine's thread)."""
    if kind is DecodeError or (isinstance(kind, type) and issubclass(kind, DecodeError)):
        meaning = _DECODE_MEANING.get(code if code is not None else 0, "fatal error")
        return kind(f"{what} failed with code {code}: {meaning}", code=code or 0)
    suffix = f" (code {code})" if code is not None else ""
    return kind(f"{what} failed{suffix}")


def raise_error(kind: type, what: str, code: int | None = None) -> NoReturn:
    """Raise ``kind`` for a failed C call ``what`` that returned ``code``."""
    raise error(kind, what, code)
