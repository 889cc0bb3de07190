"""Hugging Face checkpoint -> GGUF, without torch.

    from pyllama_ernie.convert import convert
    convert("ERNIE-4.5-0.3B-PT", "ernie-0.3b-f16.gguf", outtype="f16")

Supported: ``Ernie4_5ForCausalLM`` (llama.cpp ``ernie4_5``),
``Ernie4_5_MoeForCausalLM`` (``ernie4_5-moe``) and the language model of
``Ernie4_5_VLMoeForConditionalGeneration`` (``ernie4_5-vl-moe``, read by our patched
llama.cpp; HF-native or Baidu's original config.json), from safetensors weights and
a SentencePiece ``tokenizer.model`` (or a BPE ``tokenizer.json`` with byte fallback);
output types f32, f16, bf16 and q8_0. The architecture is taken from config.json.

The text models' output loads in an unpatched llama.cpp (same keys, tensor names,
shapes and types as llama.cpp's ``convert_hf_to_gguf.py``, with the shared-expert
width fixed, plus ``tokenizer.ggml.eot_token_id`` = ``<|end_of_sentence|>`` so that
generation stops at the end of an assistant turn).
Tensors are streamed, so memory stays at about one block of rows. Any failure
raises :class:`ConversionError` and leaves no output file.

This package imports only numpy, gguf and the standard library.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import gguf

from . import ernie4_5, ernie4_5_vl
from .errors import ConversionError
from .hfconfig import HFConfig, load_config
from .safetensors_reader import Checkpoint
from .tokenizer import Vocab, load_vocab
from .writer import OUTTYPES, GGUFOutput, ProgressFn, TensorSpec

__all__ = ["convert", "ConversionError", "OUTTYPES", "write_gguf", "arch_module"]

logger = logging.getLogger(__name__)

# llama.cpp architecture -> the module that writes it (gguf_arch, add_hparams, tensor_specs)
_ARCH_MODULES = {ernie4_5.ARCH_DENSE: ernie4_5, ernie4_5.ARCH_MOE: ernie4_5, ernie4_5_vl.ARCH_VL: ernie4_5_vl}


def arch_module(hf: HFConfig):
    """The converter module for a loaded config (dispatch on config.json's architecture)."""
    if hf.architecture in ernie4_5_vl.ARCHITECTURES:
        return ernie4_5_vl
    return ernie4_5


def write_gguf(
    out_path: str | os.PathLike[str],
    *,
    hf: HFConfig,
    arch: str,
    outtype: str,
    specs: list[TensorSpec],
    vocab: Vocab,
    metadata_dir: Optional[Path] = None,
    name: Optional[str] = None,
    progress: Optional[ProgressFn] = None,
) -> Path:
    """Write one model file: general.* metadata, hyperparameters, vocabulary, tensors.

    Shared by :func:`convert` and the synthetic test models, so both produce the
    same keys in the same way.
    """
    out = GGUFOutput(out_path, arch)
    for spec in specs:
        out.add_tensor(spec)
    w = out.gguf

    # general.*: as llama.cpp's converter does (model card, config.json and the folder's name)
    total, shared, expert, expert_count = out.parameter_count()
    try:
        meta = gguf.Metadata.load(None, metadata_dir, None, total)
    except Exception as e:  # a malformed model card must not stop a conversion
        logger.warning("ignoring the model card's metadata: %s", e)
        meta = gguf.Metadata()
    if meta.name is None:
        meta.name = name or (metadata_dir.name if metadata_dir is not None else Path(out_path).stem)
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, expert_count)
    w.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(w)

    _ARCH_MODULES[arch].add_hparams(w, hf.text, arch)
    w.add_file_type(OUTTYPES[outtype][1])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab.add_to_gguf(w)
    return out.write(progress)


def convert(
    hf_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    outtype: str = "f16",
    progress: Optional[ProgressFn] = None,
) -> Path:
    """Convert the checkpoint in ``hf_dir`` to a GGUF file at ``out_path``; returns its path.

    ``outtype`` is one of ``f32``, ``f16``, ``bf16``, ``q8_0`` (norms, routers and
    biases stay F32 in every case). ``progress``, if given, is called as
    ``progress(done_tensors, total_tensors, tensor_name)`` after each tensor.
    Raises ConversionError (with no file left at ``out_path``) when anything is
    missing, damaged or unsupported, or the disk is full.
    """
    outtype = str(outtype).lower()
    if outtype not in OUTTYPES:
        raise ConversionError(f"unknown output type {outtype!r}; choose one of {', '.join(OUTTYPES)}.")
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise ConversionError(f"{hf_dir} is not a folder (give the folder of a Hugging Face checkpoint).")
    hf = load_config(hf_dir)
    module = arch_module(hf)
    arch = module.gguf_arch(hf)
    with Checkpoint(hf_dir) as ckpt:
        specs = module.tensor_specs(hf, ckpt, outtype)
        vocab = load_vocab(hf_dir, hf.text.vocab_size)
        return write_gguf(
            out_path,
            hf=hf,
            arch=arch,
            outtype=outtype,
            specs=specs,
            vocab=vocab,
            metadata_dir=hf_dir,
            progress=progress,
        )
