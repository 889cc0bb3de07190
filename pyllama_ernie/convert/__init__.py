"""Hugging Face checkpoint -> GGUF, without torch.

    from pyllama_ernie.convert import convert
    convert("ERNIE-4.5-0.3B-PT", "ernie-0.3b-f16.gguf", outtype="f16")
    # a VL checkpoint: also writes the vision encoder to mmproj-ernie-vl-f16.gguf beside it
    convert("ERNIE-4.5-VL-28B-A3B-PT", "ernie-vl-f16.gguf", outtype="f16")

Supported: ``Ernie4_5ForCausalLM`` (llama.cpp ``ernie4_5``),
``Ernie4_5_MoeForCausalLM`` (``ernie4_5-moe``) and the language model of
``Ernie4_5_VLMoeForConditionalGeneration`` (``ernie4_5-vl-moe``, read by our patched
llama.cpp; HF-native or Baidu's original config.json), from safetensors weights and
a SentencePiece ``tokenizer.model`` (or a BPE ``tokenizer.json`` with byte fallback);
output types f32, f16, bf16 and q8_0. The architecture is taken from config.json.

For a VL checkpoint, :func:`convert` also writes the vision tower and resampler as a
llama.cpp "clip" mmproj file (projector ``ernie4_5vl``, read by our patched mtmd; see
:mod:`.ernie4_5_vl_vision`), by default beside the model as ``mmproj-<model file name>``;
``mmproj_path`` chooses another path and ``mmproj_path=False`` skips it.
:func:`convert_mmproj` writes the mmproj alone.

The text models' output loads in an unpatched llama.cpp (same keys, tensor names,
shapes and types as llama.cpp's ``convert_hf_to_gguf.py``, with the shared-expert
width fixed, plus ``tokenizer.ggml.eot_token_id`` = ``<|end_of_sentence|>`` so that
generation stops at the end of an assistant turn).
Tensors are streamed, so memory stays at about one block of rows. Any failure
raises :class:`ConversionError` and leaves no output file (neither the model nor the mmproj).

This package imports only numpy, gguf and the standard library.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Union

import gguf

from . import ernie4_5, ernie4_5_vl, ernie4_5_vl_vision
from .errors import ConversionError
from .hfconfig import HFConfig, VisionConfig, load_config, load_vision_config
from .safetensors_reader import Checkpoint
from .tokenizer import Vocab, load_vocab
from .writer import OUTTYPES, GGUFOutput, ProgressFn, TensorSpec, remove_partial

__all__ = ["OUTTYPES", "ConversionError", "arch_module", "convert", "convert_checkpoint", "convert_mmproj",
           "default_mmproj_path", "write_gguf", "write_mmproj"]

logger = logging.getLogger(__name__)

# llama.cpp architecture -> the module that writes it (gguf_arch, add_hparams, tensor_specs)
_ARCH_MODULES = {ernie4_5.ARCH_DENSE: ernie4_5, ernie4_5.ARCH_MOE: ernie4_5, ernie4_5_vl.ARCH_VL: ernie4_5_vl}


def arch_module(hf: HFConfig):
    """The converter module for a loaded config (dispatch on config.json's architecture)."""
    if hf.architecture in ernie4_5_vl.ARCHITECTURES:
        return ernie4_5_vl
    return ernie4_5


def _add_general(out: GGUFOutput, gguf_type: str, metadata_dir: Path | None, name: str | None) -> None:
    """general.*: as llama.cpp's converter does (model card, config.json and the folder's name)."""
    w = out.gguf
    total, shared, expert, expert_count = out.parameter_count()
    try:
        meta = gguf.Metadata.load(None, metadata_dir, None, total)
    except Exception as e:  # noqa: BLE001 - a malformed model card must not stop a conversion
        logger.warning("ignoring the model card's metadata: %s", e)
        meta = gguf.Metadata()
    if meta.name is None:
        meta.name = name or (metadata_dir.name if metadata_dir is not None else out.path.stem)
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, expert_count)
    w.add_type(gguf_type)
    meta.set_gguf_meta_model(w)


def write_gguf(
    out_path: str | os.PathLike[str],
    *,
    hf: HFConfig,
    arch: str,
    outtype: str,
    specs: list[TensorSpec],
    vocab: Vocab,
    metadata_dir: Path | None = None,
    name: str | None = None,
    progress: ProgressFn | None = None,
) -> Path:
    """Write one model file: general.* metadata, hyperparameters, vocabulary, tensors.

    Shared by :func:`convert` and the synthetic test models, so both produce the
    same keys in the same way.
    """
    out = GGUFOutput(out_path, arch)
    for spec in specs:
        out.add_tensor(spec)
    w = out.gguf
    _add_general(out, gguf.GGUFType.MODEL, metadata_dir, name)
    _ARCH_MODULES[arch].add_hparams(w, hf.text, arch)
    w.add_file_type(OUTTYPES[outtype][1])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab.add_to_gguf(w)
    return out.write(progress)


def write_mmproj(
    out_path: str | os.PathLike[str],
    *,
    vision: VisionConfig,
    n_embd_text: int,
    preprocessor: ernie4_5_vl_vision.Preprocessor,
    outtype: str,
    specs: list[TensorSpec],
    metadata_dir: Path | None = None,
    name: str | None = None,
    progress: ProgressFn | None = None,
) -> Path:
    """Write one ERNIE 4.5 VL mmproj file ("clip"): general.* metadata, clip.* keys, tensors.

    Shared by :func:`convert_mmproj`, :func:`convert` and the synthetic test mmproj.
    """
    out = GGUFOutput(out_path, ernie4_5_vl_vision.ARCH_CLIP)
    for spec in specs:
        out.add_tensor(spec)
    w = out.gguf
    _add_general(out, gguf.GGUFType.MMPROJ, metadata_dir, name)
    ernie4_5_vl_vision.add_hparams(w, vision, n_embd_text, preprocessor)
    w.add_file_type(OUTTYPES[outtype][1])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return out.write(progress)


def default_mmproj_path(model_path: str | os.PathLike[str]) -> Path:
    """Where :func:`convert` puts a VL model's mmproj: ``mmproj-<name>`` beside ``model_path``."""
    p = Path(model_path)
    return p.with_name("mmproj-" + p.name)


def _check_args(hf_dir: str | os.PathLike[str], outtype: str) -> tuple[Path, str]:
    outtype = str(outtype).lower()
    if outtype not in OUTTYPES:
        raise ConversionError(f"unknown output type {outtype!r}; choose one of {', '.join(OUTTYPES)}.")
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise ConversionError(f"{hf_dir} is not a folder (give the folder of a Hugging Face checkpoint).")
    return hf_dir, outtype


class _MmprojPlan:
    """An mmproj checked and ready to write (config, preprocessing and every tensor validated)."""

    def __init__(self, hf: HFConfig, hf_dir: Path, ckpt: Checkpoint, outtype: str):
        self.vision = load_vision_config(hf)
        ernie4_5_vl_vision.check_supported(self.vision, hf.text.rms_norm_eps)
        self.preprocessor = ernie4_5_vl_vision.load_preprocessor(hf_dir)
        self.specs = ernie4_5_vl_vision.tensor_specs(self.vision, hf.text, ckpt, outtype)
        self.n_embd_text = hf.text.hidden_size
        self.hf_dir, self.outtype = hf_dir, outtype

    def write(self, out_path: str | os.PathLike[str], progress: ProgressFn | None) -> Path:
        return write_mmproj(
            out_path, vision=self.vision, n_embd_text=self.n_embd_text, preprocessor=self.preprocessor,
            outtype=self.outtype, specs=self.specs, metadata_dir=self.hf_dir, progress=progress,
        )


def convert_mmproj(
    hf_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    outtype: str = "f16",
    progress: ProgressFn | None = None,
) -> Path:
    """Write only the mmproj (vision tower + resampler) of the ERNIE 4.5 VL checkpoint in ``hf_dir``.

    ``outtype`` and ``progress`` as for :func:`convert`. The image preprocessing keys come from
    ``preprocessor_config.json`` (or ``processor_config.json``) when the checkpoint has one,
    else the reference processor's defaults. Raises ConversionError, with no file left at
    ``out_path``, for a text-only checkpoint or anything missing, damaged or unsupported.
    """
    hf_dir, outtype = _check_args(hf_dir, outtype)
    hf = load_config(hf_dir)
    with Checkpoint(hf_dir) as ckpt:
        return _MmprojPlan(hf, hf_dir, ckpt, outtype).write(out_path, progress)


#: convert()'s mmproj_path: a path, None (beside the model) or False (no mmproj)
MmprojPath = Union[str, "os.PathLike[str]", None, bool]


def convert_checkpoint(
    hf_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    outtype: str = "f16",
    progress: ProgressFn | None = None,
    mmproj_path: MmprojPath = None,
) -> tuple[Path, Path | None]:
    """:func:`convert`, returning ``(model path, mmproj path or None when none was written)``."""
    hf_dir, outtype = _check_args(hf_dir, outtype)
    if mmproj_path is True:
        raise ConversionError("mmproj_path should be a path, None (beside the model) or False (none), not True.")
    hf = load_config(hf_dir)
    module = arch_module(hf)
    arch = module.gguf_arch(hf)
    is_vl = module is ernie4_5_vl
    if not is_vl and mmproj_path not in (None, False):
        raise ConversionError(
            f"{hf_dir} holds a text-only model ({hf.architecture}): it has no vision tower, so there is "
            f"no mmproj to write at {mmproj_path}."
        )
    mm_out: Path | None = None
    if is_vl and mmproj_path is not False:
        mm_out = default_mmproj_path(out_path) if mmproj_path is None else Path(mmproj_path)  # type: ignore[arg-type]
        if _same_path(mm_out, Path(out_path)):
            raise ConversionError(f"the model and the mmproj cannot both be written to {out_path}.")
    with Checkpoint(hf_dir) as ckpt:
        specs = module.tensor_specs(hf, ckpt, outtype)
        vocab = load_vocab(hf_dir, hf.text.vocab_size)
        plan = None
        if mm_out is not None:
            if not ernie4_5_vl_vision.has_vision_tensors(ckpt.names()):
                raise ConversionError(
                    f"{hf_dir} is an ERNIE 4.5 VL checkpoint without vision weights (no vision_model.* or "
                    "resampler_model.* tensors); convert only the language model with mmproj_path=False "
                    "(--no-mmproj)."
                )
            plan = _MmprojPlan(hf, hf_dir, ckpt, outtype)  # everything checked before anything is written
        model = write_gguf(
            out_path,
            hf=hf,
            arch=arch,
            outtype=outtype,
            specs=specs,
            vocab=vocab,
            metadata_dir=hf_dir,
            progress=progress,
        )
        if plan is None:
            return model, None
        try:
            assert mm_out is not None
            return model, plan.write(mm_out, progress)
        except BaseException:
            remove_partial(model)  # all or nothing: no model without its mmproj
            raise


def convert(
    hf_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    outtype: str = "f16",
    progress: ProgressFn | None = None,
    mmproj_path: MmprojPath = None,
) -> Path:
    """Convert the checkpoint in ``hf_dir`` to a GGUF file at ``out_path``; returns its path.

    ``outtype`` is one of ``f32``, ``f16``, ``bf16``, ``q8_0`` (norms, routers and
    biases stay F32 in every case). ``progress``, if given, is called as
    ``progress(done_tensors, total_tensors, tensor_name)`` after each tensor (for a VL
    checkpoint: first over the model's tensors, then over the mmproj's, whose names
    start with ``v.`` or ``mm.``).

    For an ERNIE 4.5 VL checkpoint the vision encoder is written too, as an mmproj file
    (see :func:`convert_mmproj`): at ``mmproj_path`` if given, else beside the model as
    ``mmproj-<model file name>`` (``out/model-f16.gguf`` -> ``out/mmproj-model-f16.gguf``);
    ``mmproj_path=False`` writes the language model only. A text checkpoint with an
    ``mmproj_path`` is an error. Use :func:`convert_checkpoint` to get both paths back.

    Raises ConversionError (with no file left at ``out_path`` or at the mmproj's path)
    when anything is missing, damaged or unsupported, or the disk is full.
    """
    return convert_checkpoint(hf_dir, out_path, outtype, progress, mmproj_path)[0]


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return a == b

