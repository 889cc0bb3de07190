"""The converter's one exception type (kept apart so every module can raise it)."""

from __future__ import annotations

from ..errors import ErnieError

__all__ = ["ConversionError"]


class ConversionError(ErnieError):
    """A checkpoint could not be converted.

    The message says what is wrong and, where it can, what to do about it. When
    ``convert`` raises it, no output file (and no temporary file) is left behind.
    Like every error of the package it is an :class:`~pyllama_ernie.ErnieError`.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, llama_log="")
