"""Quantize GGUF files with llama.cpp's quantizer."""

from __future__ import annotations

import os
from pathlib import Path

from . import _lib, errors
from ._lib import lib
from .errors import QuantizeError
from .gguf_check import check_gguf_file

__all__ = ["quantize", "QUANT_TYPES"]

#: target type name -> llama_ftype
QUANT_TYPES = {
    "F32": lib.LLAMA_FTYPE_ALL_F32,
    "F16": lib.LLAMA_FTYPE_MOSTLY_F16,
    "BF16": lib.LLAMA_FTYPE_MOSTLY_BF16,
    "Q8_0": lib.LLAMA_FTYPE_MOSTLY_Q8_0,
    "Q6_K": lib.LLAMA_FTYPE_MOSTLY_Q6_K,
    "Q5_K_M": lib.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "Q4_K_M": lib.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "Q4_0": lib.LLAMA_FTYPE_MOSTLY_Q4_0,
}


def quantize(src: str | os.PathLike[str], dst: str | os.PathLike[str], qtype: str,
             *, n_threads: int = 0) -> Path:
    """Write ``dst``, a copy of GGUF ``src`` quantized to ``qtype`` (e.g. ``"Q4_K_M"``).

    Norms, biases and MoE router weights stay F32, as llama.cpp's quantizer keeps them.
    A failure leaves no ``dst`` behind.
    """
    key = qtype.upper()
    if key not in QUANT_TYPES:
        raise ValueError(f"unknown quantization type {qtype!r}; choose one of {', '.join(QUANT_TYPES)}")
    src_p = check_gguf_file(src)
    dst_p = Path(os.fspath(dst)).expanduser()
    if dst_p.resolve() == src_p.resolve():
        raise ValueError("the output file must differ from the input file")
    tmp = dst_p.with_name(dst_p.name + ".part")
    _lib.ensure_init()
    params = lib.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[key]
    params.nthread = n_threads
    errors.clear_log_line()
    try:
        rc = lib.llama_model_quantize(str(src_p).encode(), str(tmp).encode(), _lib.ffi.addressof(params))
        if rc != 0:
            errors.raise_error(QuantizeError, f"quantizing {src_p} to {key}", rc)
        os.replace(tmp, dst_p)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dst_p
