"""Write random-weight models with ERNIE-4.5-VL-28B-A3B's real shapes, cut to a few layers.

    python benchmarks/make_a3b.py [--layers 2,4] [--types Q4_K_M] [--out DIR] [-t THREADS]

Writes, under ``--out`` (default ``benchmarks/models``):

* ``ernie-vl-a3b-L{n}-{TYPE}.gguf`` for each layer count ``n`` (layer 0 dense, layers 1..n-1 MoE
  with 64 text experts of width 1536 and 64 vision experts of width 512, top-6, 2 shared experts;
  hidden 2560, 20 heads, 4 KV heads, vocabulary 103424, tied embeddings): every tensor has the
  real model's shape, only the depth is cut. The benchmark measures two depths and takes the
  difference as the cost of one MoE layer, then extrapolates to 28 layers.
* ``mmproj-ernie-vl-a3b-F16.gguf``: the full vision encoder (32 blocks of width 1280, 16 heads,
  MLP 5120) and resampler.

No torch: the weights come from ``pyllama_ernie.convert.synthetic.write_random_gguf`` (windows
of one pool of normal draws, written block by block; seconds per layer). F16 is written first and
quantized with llama.cpp's quantizer (``pyllama_ernie.quantize``); the F16 file is removed unless
F16 is among ``--types``. About 2.1 GB of F16 per MoE layer, 0.6 GB at Q4_K_M.
Importable: ``make_a3b(out_dir, layers, types, threads) -> {"L2": {"Q4_K_M": path}, ..., "mmproj": path}``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["make_a3b", "main"]

TYPES = ("F16", "Q8_0", "Q4_K_M")


def make_a3b(out_dir: str | os.PathLike[str] = ROOT / "benchmarks" / "models", layers: Any = (2, 4),
             types: Any = ("Q4_K_M",), threads: int = 0, force: bool = False,
             verbose: bool = False) -> dict[str, Any]:
    """Write the A3B-shaped models and the full-size mmproj into ``out_dir``; returns their paths."""
    from pyllama_ernie.convert import synthetic
    from pyllama_ernie.quantize import quantize

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    qtypes = [t.strip().upper() for t in (types.split(",") if isinstance(types, str) else types)]
    for q in qtypes:
        if q not in TYPES:
            raise ValueError(f"unknown type {q!r}; choose from {', '.join(TYPES)}")
    counts = [int(n) for n in (layers.split(",") if isinstance(layers, str) else layers)]

    def log(msg: str) -> None:
        if verbose:
            print(msg, flush=True)

    result: dict[str, Any] = {}
    for n in counts:
        f16 = out / f"ernie-vl-a3b-L{n}-F16.gguf"
        paths: dict[str, Path] = {}
        todo = [q for q in qtypes if force or not (out / f"ernie-vl-a3b-L{n}-{q}.gguf").exists()]
        if todo and (force or not f16.exists()):
            t0 = time.perf_counter()
            synthetic.write_random_gguf(f16, synthetic.a3b_config(n), outtype="f16", name=f"ernie-vl-a3b-L{n}")
            log(f"wrote {f16} ({f16.stat().st_size / 2**30:.1f} GiB) in {time.perf_counter() - t0:.1f} s")
        for q in qtypes:
            dst = out / f"ernie-vl-a3b-L{n}-{q}.gguf"
            if q != "F16" and q in todo:
                t0 = time.perf_counter()
                quantize(f16, dst, q, n_threads=threads)
                log(f"quantized {dst} ({dst.stat().st_size / 2**30:.1f} GiB) in {time.perf_counter() - t0:.1f} s")
            paths[q] = dst
        if "F16" not in qtypes and f16.exists():
            f16.unlink()
        result[f"L{n}"] = paths
    mm = out / "mmproj-ernie-vl-a3b-F16.gguf"
    if force or not mm.exists():
        t0 = time.perf_counter()
        synthetic.write_tiny_mmproj(mm, n_embd_text=synthetic.A3B_TEXT["hidden_size"], outtype="f16", pooled=True,
                                    **synthetic.A3B_VISION)
        log(f"wrote {mm} ({mm.stat().st_size / 2**30:.1f} GiB) in {time.perf_counter() - t0:.1f} s")
    result["mmproj"] = mm
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "models", help="output folder")
    ap.add_argument("--layers", default="2,4", help="comma-separated layer counts (at least 2 each)")
    ap.add_argument("--types", default="Q4_K_M", help=f"comma-separated, of {', '.join(TYPES)}")
    ap.add_argument("--force", action="store_true", help="rewrite files that exist")
    ap.add_argument("-t", "--threads", type=int, default=0, help="quantizer threads (0: all cores)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        res = make_a3b(args.out, args.layers, args.types, args.threads, args.force, verbose=True)
    except ValueError as e:
        ap.error(str(e))
    print(f"done in {time.perf_counter() - t0:.1f} s")
    for key, val in res.items():
        for q, p in (val.items() if isinstance(val, dict) else [("F16", val)]):
            print(f"{key:7s} {q:7s} {p.stat().st_size / 2**30:6.2f} GiB  {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
