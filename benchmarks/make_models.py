"""Write the benchmark models: random-weight ERNIE-4.5-VL and ERNIE-4.5 MoE checkpoints and their GGUFs.

    python benchmarks/make_models.py [--out DIR] [--types F16,Q8_0,Q4_K_M] [--tiny] [--force]

For each of the two models it writes, under ``--out`` (default ``benchmarks/models``):

* ``ernie-vl-bench/``: a transformers ``ernie4_5_vl_moe`` checkpoint (``save_pretrained``,
  bfloat16, with the tokenizer files), ``ernie-vl-bench-F16.gguf`` (converted by
  ``pyllama_ernie.convert``), ``mmproj-ernie-vl-bench-F16.gguf`` (its vision tower and
  resampler; ``-Q8_0.gguf`` too when Q8_0 is among the types) and ``ernie-vl-bench-Q8_0.gguf`` /
  ``-Q4_K_M.gguf`` (``pyllama_ernie.quantize``);
* ``ernie-moe-bench/``: the same text shapes as a text-only ``ernie4_5_moe`` checkpoint, and
  ``ernie-moe-bench-F16.gguf`` / ``-Q8_0.gguf`` / ``-Q4_K_M.gguf``.

The "bench" shape (``BENCH``): hidden 1280, 10 heads of 128 (2 KV heads), 8 layers with layer 0
dense (FFN 3584), then MoE layers of 32 text experts of width 512 (and, in the VL model, 32 vision
experts of width 256), top-6, 2 shared experts (width 2 x 512), vocabulary 32000, tied embeddings;
the VL model's vision encoder: depth 8, width 640, 10 heads, MLP 2560 (14 px patches, 2x2 merge).
That is about 0.78 B parameters for the VL language model and 0.55 B for the MoE one.
``--tiny`` (``TINY``) writes the same structure at a tiny shape (seconds, for tests).

Weights are random (transformers' own initialisation: normal, std 0.02; norms 1), seeded, so the
files are reproducible; the models speak gibberish but their logits are finite and the VL model
encodes images. The tokenizer is the tests' SentencePiece BPE model (tests/reference_models.py,
``build_tokenizer``) with ERNIE's special tokens; the embedding is padded to the vocabulary size
(the converter names the extra ids ``[PADn]``), as ERNIE pads 103424. The VL checkpoint carries
``pyllama_ernie.convert.synthetic.VL_CHAT_TEMPLATE`` (images in user turns), the MoE one ERNIE 4.5's
text chat template.

Existing outputs are kept unless ``--force``. F16 is always written (it is what the quantized files
and the mmproj come from). Needs torch, transformers, sentencepiece and tokenizers, and the built
package (for quantizing). Importable: ``make_models(out_dir, types=..., tiny=False) -> dict``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

from reference_models import (
    TOKENIZER_FILES,
    VL_TOKEN_KEYS,
    build_tokenizer,
    model_vocab_size,
)

__all__ = ["BENCH", "TINY", "TYPES", "main", "make_models"]

#: the GGUF types this script writes (F16 is always written: the others are quantized from it)
TYPES = ("F16", "Q8_0", "Q4_K_M")

# "text": kwargs shared by the VL text config and the MoE config; "vision": the VL vision config;
# "moe_ff": [text expert width, vision expert width]; "vocab": the model's vocab_size (None: the
# tokenizer's pieces padded to a multiple of 64); "tok_vocab": the tokenizer's training target;
# "mrope": the VL model's rope split [h, w, t] in rotary pairs (head_dim / 2 in all).
BENCH: dict[str, Any] = {
    "text": {"hidden_size": 1280, "intermediate_size": 3584, "num_hidden_layers": 8, "num_attention_heads": 10,
             "num_key_value_heads": 2, "moe_num_experts": 32, "moe_k": 6, "moe_num_shared_experts": 2},
    "moe_ff": [512, 256],
    "vision": {"depth": 8, "hidden_size": 640, "intermediate_size": 2560, "num_heads": 10},
    "vocab": 32000,
    "tok_vocab": 4000,  # the corpus gives about 3900 pieces whatever the target; the rest is padding
    "mrope": [22, 22, 20],  # ERNIE-4.5-VL-28B-A3B's split for head_dim 128
    "max_pos": 32768,
}
# widths of 256 so that the Q4_K_M file has k-quant tensors (k-quants need rows of 256)
TINY: dict[str, Any] = {
    "text": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 3, "num_attention_heads": 4,
             "num_key_value_heads": 2, "moe_num_experts": 4, "moe_k": 2, "moe_num_shared_experts": 2},
    "moe_ff": [256, 128],
    "vision": {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2},
    "vocab": None,
    "tok_vocab": 800,
    "mrope": [11, 11, 10],
    "max_pos": 4096,
}

SEED = 1234
ROPE_THETA = 500000.0


def _names(tiny: bool) -> dict[str, str]:
    tag = "tiny" if tiny else "bench"
    return {"vl": f"ernie-vl-{tag}", "moe": f"ernie-moe-{tag}"}


def _parse_types(types: Any) -> list[str]:
    if isinstance(types, str):
        types = [t for t in types.split(",") if t.strip()]
    out = []
    for t in types:
        key = str(t).strip().upper()
        if key not in TYPES:
            raise ValueError(f"unknown type {t!r}; choose from {', '.join(TYPES)}")
        if key not in out:
            out.append(key)
    if "F16" not in out:
        out.insert(0, "F16")
    return out


def _hf_done(d: Path) -> bool:
    return (d / "config.json").is_file() and any(d.glob("*.safetensors"))


def _save(model: Any, out_dir: Path, tokenizer_dir: Path, chat_template: str | None) -> None:
    """save_pretrained (bfloat16) + tokenizer files into ``out_dir``, via a temporary folder."""
    import torch

    part = out_dir.with_name(out_dir.name + ".part")
    if part.exists():
        shutil.rmtree(part)
    model.to(torch.bfloat16).eval().save_pretrained(part)
    for f in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / f, part / f)
    if chat_template is not None:
        cfg_path = part / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg["chat_template"] = chat_template
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(part, out_dir)


def _text_kwargs(shape: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    return dict(shape["text"], vocab_size=vocab_size, max_position_embeddings=shape["max_pos"],
                tie_word_embeddings=True)


def build_vl(shape: dict[str, Any], out_dir: Path, tok: dict[str, Any], vocab_size: int, seed: int = SEED) -> Path:
    """A random ``Ernie4_5_VLMoeForConditionalGeneration`` of ``shape``, saved into ``out_dir``."""
    import torch
    from transformers import (
        Ernie4_5_VLMoeConfig,
        Ernie4_5_VLMoeForConditionalGeneration,
    )

    from pyllama_ernie.convert.synthetic import VL_CHAT_TEMPLATE

    text = dict(
        _text_kwargs(shape, vocab_size), moe_intermediate_size=list(shape["moe_ff"]),
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA, "mrope_section": list(shape["mrope"])},
    )
    config = Ernie4_5_VLMoeConfig(
        text_config=text, vision_config=dict(shape["vision"]), tie_word_embeddings=True,
        **{key: tok["special_ids"][t] for key, t in VL_TOKEN_KEYS.items()},
    )
    torch.manual_seed(seed)
    model = Ernie4_5_VLMoeForConditionalGeneration(config)
    _save(model, out_dir, tok["dir"], VL_CHAT_TEMPLATE)
    return out_dir


def build_moe(shape: dict[str, Any], out_dir: Path, tok: dict[str, Any], vocab_size: int, seed: int = SEED) -> Path:
    """A random text-only ``Ernie4_5_MoeForCausalLM`` with ``shape``'s text shapes, saved into ``out_dir``."""
    import torch
    from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

    config = Ernie4_5_MoeConfig(
        **_text_kwargs(shape, vocab_size), moe_intermediate_size=shape["moe_ff"][0],
        moe_layer_start_index=1, moe_layer_end_index=-1, moe_layer_interval=1,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
    )
    torch.manual_seed(seed + 1)
    model = Ernie4_5_MoeForCausalLM(config)
    _save(model, out_dir, tok["dir"], None)
    return out_dir


def _size(p: Path) -> int:
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size


def _fmt_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def make_models(out_dir: str | os.PathLike[str] = ROOT / "benchmarks" / "models", types: Any = TYPES,
                tiny: bool = False, force: bool = False, threads: int = 2,
                verbose: bool = False, kinds: Any = ("vl", "moe")) -> dict[str, dict[str, Path]]:
    """Write the benchmark models into ``out_dir``; returns their paths.

    ``{"vl": {"hf": dir, "F16": gguf, "Q8_0": gguf, "Q4_K_M": gguf, "mmproj": gguf},
    "moe": {"hf": dir, "F16": ..., "Q8_0": ..., "Q4_K_M": ...}}`` (the quantized types asked for
    in ``types``, a list or a comma-separated string; F16 always). Files already there are kept
    unless ``force``. ``threads``: torch's and the quantizer's threads. ``kinds``: which of
    ``"vl"`` and ``"moe"`` to write (a list or a comma-separated string).
    """
    import torch

    from pyllama_ernie.convert import convert_checkpoint, convert_mmproj
    from pyllama_ernie.quantize import quantize

    qtypes = _parse_types(types)
    todo = [k.strip() for k in (kinds.split(",") if isinstance(kinds, str) else kinds)]
    if not todo or set(todo) - {"vl", "moe"}:
        raise ValueError(f"kinds must be among vl, moe; got {kinds!r}")
    shape = TINY if tiny else BENCH
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, threads))
    names = _names(tiny)
    result: dict[str, dict[str, Path]] = {}

    def log(msg: str) -> None:
        if verbose:
            print(msg, flush=True)

    tok: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="ernie-bench-tok-") as tmp:
        for kind in [k for k in ("vl", "moe") if k in todo]:
            name = names[kind]
            hf = out / name
            paths: dict[str, Path] = {"hf": hf}
            f16 = out / f"{name}-F16.gguf"
            mm = out / f"mmproj-{name}-F16.gguf"
            ggufs = {q: out / f"{name}-{q}.gguf" for q in qtypes}
            rebuilt = False
            if force or not _hf_done(hf):
                if tok is None:
                    tok = dict(build_tokenizer(Path(tmp), vocab_size=shape["tok_vocab"]), dir=Path(tmp))
                vocab = shape["vocab"] or model_vocab_size(tok["n_pieces"])
                t0 = time.perf_counter()
                (build_vl if kind == "vl" else build_moe)(shape, hf, tok, vocab)
                log(f"built {hf} in {time.perf_counter() - t0:.1f} s")
                rebuilt = True
            need_f16 = force or rebuilt or not f16.exists()
            need_mm = kind == "vl" and (force or rebuilt or not mm.exists())
            t0 = time.perf_counter()
            if need_f16:
                convert_checkpoint(hf, f16, "f16", mmproj_path=mm if need_mm else False)
                log(f"converted {f16}{' and ' + str(mm) if need_mm else ''} in {time.perf_counter() - t0:.1f} s")
            elif need_mm:
                convert_mmproj(hf, mm, "f16")
                log(f"converted {mm} in {time.perf_counter() - t0:.1f} s")
            paths["F16"] = f16
            for q in qtypes:
                if q == "F16":
                    continue
                if force or need_f16 or not ggufs[q].exists():
                    t0 = time.perf_counter()
                    quantize(f16, ggufs[q], q, n_threads=threads)
                    log(f"quantized {ggufs[q]} in {time.perf_counter() - t0:.1f} s")
                paths[q] = ggufs[q]
            if kind == "vl":
                paths["mmproj"] = mm
                if "Q8_0" in qtypes:
                    # the projector at Q8_0 too: the image encode "at Q8_0" that the VL Q8_0 row reports
                    mm8 = out / f"mmproj-{name}-Q8_0.gguf"
                    if force or rebuilt or not mm8.exists():
                        t0 = time.perf_counter()
                        convert_mmproj(hf, mm8, "q8_0")
                        log(f"converted {mm8} in {time.perf_counter() - t0:.1f} s")
                    paths["mmproj_Q8_0"] = mm8
            result[kind] = paths
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "models", help="output folder")
    ap.add_argument("--types", default=",".join(TYPES), help=f"comma-separated, of {', '.join(TYPES)} (F16 always)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (for tests)")
    ap.add_argument("--force", action="store_true", help="rewrite files that exist")
    ap.add_argument("--kinds", default="vl,moe", help="which models: vl, moe or both (comma-separated)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args(argv)
    try:
        types = _parse_types(args.types)
    except ValueError as e:
        ap.error(str(e))
    t0 = time.perf_counter()
    try:
        res = make_models(args.out, types, tiny=args.tiny, force=args.force, threads=args.threads, verbose=True,
                          kinds=args.kinds)
    except ValueError as e:
        ap.error(str(e))
    print(f"done in {time.perf_counter() - t0:.1f} s")
    for kind, paths in res.items():
        for key, p in paths.items():
            print(f"{kind:4s} {key:7s} {_fmt_size(_size(p)):>10s}  {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
