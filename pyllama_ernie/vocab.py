"""Vocab: a loaded model's tokenizer: text to token ids and back, special tokens, embedding rows.

It borrows the ``llama_vocab*`` of the model's :class:`~pyllama_ernie._lib.ModelHandle`
and checks the handle before each use, so a closed model raises
:class:`~pyllama_ernie.errors.ClosedError` instead of reaching freed memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ._lib import ModelHandle, ffi, lib
from .errors import TokenizeError
from .gguf_check import GGUFSummary

__all__ = ["Vocab", "piece_bytes"]


def piece_bytes(vocab: Any, token: int, buf: Any, special: bool = False) -> bytes:
    """The bytes of one (valid) token's text; ``vocab``: a ``llama_vocab*``; ``buf``: a scratch ``char[256]``."""
    n = lib.llama_token_to_piece(vocab, token, buf, 256, 0, special)
    if n < 0:
        big = ffi.new("char[]", -n)
        n = lib.llama_token_to_piece(vocab, token, big, -n, 0, special)
        return ffi.unpack(big, n)
    return ffi.unpack(buf, n)


class Vocab:
    """The tokenizer of one loaded model.

    Args:
        model: the handle of the loaded model.
        summary: what :func:`~pyllama_ernie.gguf_check.validate_gguf` read of its file
            (token embedding rows are read from there).
    """

    def __init__(self, model: ModelHandle, summary: GGUFSummary) -> None:
        self._model = model
        self._summary = summary
        #: the ``llama_vocab*`` (valid while the model is; for the decode loop, which holds the model)
        self.raw = lib.llama_model_get_vocab(model.ptr)
        self.n_vocab = int(lib.llama_vocab_n_tokens(self.raw))
        self._eog: list[int] | None = None

    def _ptr(self) -> Any:
        self._model.ptr  # raises ClosedError once the model is closing
        return self.raw

    # --- special tokens ---------------------------------------------------

    @property
    def bos(self) -> int:
        return int(lib.llama_vocab_bos(self._ptr()))

    @property
    def eos(self) -> int:
        return int(lib.llama_vocab_eos(self._ptr()))

    @property
    def add_bos(self) -> bool:
        """Whether :meth:`tokenize` with ``add_special=True`` puts BOS first."""
        return bool(lib.llama_vocab_get_add_bos(self._ptr()))

    @property
    def eog_tokens(self) -> list[int]:
        """The end-of-generation token ids (EOS, EOT, ...)."""
        if self._eog is None:
            vocab = self._ptr()
            self._eog = [t for t in range(self.n_vocab) if lib.llama_vocab_is_eog(vocab, t)]
        return self._eog

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends generation (EOS, EOT, ...)."""
        return bool(lib.llama_vocab_is_eog(self._ptr(), token))

    def special_id(self, text: str) -> int:
        """The id of the special token written ``text`` (TokenizeError if the vocabulary has none)."""
        ids = self.tokenize(text, add_special=False, parse_special=True)
        if len(ids) != 1:
            raise TokenizeError(f"the model's vocabulary has no {text} token: it is not an ERNIE-4.5-VL model",
                                llama_log="")
        return ids[0]

    def token_text(self, token: int) -> str:
        """The text of a special token such as BOS ("" for a missing one, id < 0)."""
        if token < 0:
            return ""
        return self.token_to_piece(token, special=True).decode("utf-8", "replace")

    # --- text <-> tokens --------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``.

        ``add_special`` adds BOS (and EOS) as the model's metadata asks;
        ``parse_special`` turns the text of special tokens into their ids.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be str, not {type(text).__name__}")
        vocab = self._ptr()
        data = text.encode("utf-8")
        if len(data) > 2**31 - 16:
            raise TokenizeError("text is too long to tokenize", llama_log="")
        cap = len(data) + 8
        buf = ffi.new("llama_token[]", cap)
        n = lib.llama_tokenize(vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            if n == -(2**31):
                raise TokenizeError("tokenization overflowed", llama_log="")
            cap = -n
            buf = ffi.new("llama_token[]", cap)
            n = lib.llama_tokenize(vocab, data, len(data), buf, cap, add_special, parse_special)
            if n < 0:
                raise TokenizeError("llama_tokenize failed", llama_log="")
        return list(ffi.unpack(buf, n))

    def detokenize(self, tokens: Sequence[int], *, special: bool = True) -> str:
        """The text of ``tokens``; ``special=False`` leaves out special tokens' text."""
        vocab = self._ptr()
        toks = self.check_tokens(tokens)
        arr = ffi.new("llama_token[]", toks)
        cap = max(16, 8 * len(toks))
        buf = ffi.new("char[]", cap)
        n = lib.llama_detokenize(vocab, arr, len(toks), buf, cap, False, special)
        if n < 0:
            cap = -n
            buf = ffi.new("char[]", cap)
            n = lib.llama_detokenize(vocab, arr, len(toks), buf, cap, False, special)
            if n < 0:
                raise TokenizeError("llama_detokenize failed", llama_log="")
        return ffi.unpack(buf, n).decode("utf-8", "replace")

    def token_to_piece(self, token: int, *, special: bool = True) -> bytes:
        """The bytes one token stands for (may be part of a UTF-8 character)."""
        vocab = self._ptr()
        self.check_tokens([token])
        return piece_bytes(vocab, token, ffi.new("char[]", 256), special)

    def check_tokens(self, tokens: Sequence[int]) -> list[int]:
        """``tokens`` as a list of ints; TokenizeError for an id outside the vocabulary."""
        toks = [int(t) for t in tokens]
        n_vocab = self.n_vocab
        for t in toks:
            if not 0 <= t < n_vocab:
                raise TokenizeError(f"token id {t} is outside the vocabulary (0..{n_vocab - 1})", llama_log="")
        return toks

    def token_embeddings(self, tokens: Sequence[int]) -> np.ndarray:
        """Rows of the token embedding matrix (float32 ``(len(tokens), n_embd)``), read from the GGUF."""
        toks = self.check_tokens(tokens)
        self._ptr()
        return self._summary.read_tensor("token_embd.weight", toks)
