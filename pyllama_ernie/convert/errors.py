"""The converter's one exception type (kept apart so every module can raise it)."""

from __future__ import annotations

__all__ = ["ConversionError"]


class ConversionError(Exception):
    """A checkpoint could not be converted.

    The message says what is wrong and, where it can, what to do about it. When
    ``convert`` raises it, no output file (and no temporary file) is left behind.
    """
