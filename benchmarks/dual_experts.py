"""Dual experts in one process: an ernie4_5-vl-moe file in text mode against the same text shapes as ernie4_5-moe.

    python benchmarks/dual_experts.py VL.gguf MOE.gguf [-t 2] [--pairs 6] [-p 512] [-n 128]

Both models stay loaded; each pair runs prompt processing (``-p`` random tokens) and then
generation (``-n`` tokens, greedy) on the VL file and on the MoE file, back to back, after
one warm-up pair. The ratio VL/MoE is taken per pair, so slow phases of a shared machine
hit both sides of a ratio alike; ``run_all.py``'s table compares separate processes.

Mapped weights (the default) are read from the page cache as it holds the file: a file that
was just written or quantized may decode several percent slower than after a fresh read
(measured here: VL/MoE 0.885 at Q8_0 before ``echo 1 > /proc/sys/vm/drop_caches``, 1.006
after). Compare files that were read the same way.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Dict, List, Optional

import numpy as np


def measure(vl_path: str, moe_path: str, threads: Optional[int] = None, pairs: int = 6,
            n_prompt: int = 512, n_gen: int = 128) -> Dict[str, Dict[str, List[float]]]:
    """``{"vl": {"pp": [...], "tg": [...]}, "moe": {...}}`` in tok/s, one value per pair, in pair order."""
    from pyllama_ernie import Model

    rng = np.random.default_rng(0)
    res: Dict[str, Dict[str, List[float]]] = {k: {"pp": [], "tg": []} for k in ("vl", "moe")}
    with Model(vl_path, n_ctx=n_prompt + n_gen + 16, n_batch=n_prompt, n_ubatch=min(n_prompt, 512),
               n_threads=threads) as vl, \
         Model(moe_path, n_ctx=n_prompt + n_gen + 16, n_batch=n_prompt, n_ubatch=min(n_prompt, 512),
               n_threads=threads) as moe:
        models = {"vl": vl, "moe": moe}
        if vl.n_vocab != moe.n_vocab:
            raise ValueError(f"the files have different vocabularies ({vl.n_vocab} and {moe.n_vocab})")
        for pair in range(pairs + 1):  # pair 0 warms up
            prompt = [int(t) for t in rng.integers(3, vl.n_vocab, n_prompt)]
            for name, m in models.items():
                m.ctx.reset()
                pp = m.generate(prompt, max_tokens=0, temperature=0).timings.prompt_tokens_per_second
                m.ctx.reset()
                tg = m.generate(prompt[:2], max_tokens=n_gen, temperature=0, ignore_eos=True).timings.tokens_per_second
                if pair:
                    res[name]["pp"].append(pp)
                    res[name]["tg"].append(tg)
    return res


def summary(res: Dict[str, Dict[str, List[float]]]) -> Dict[str, Dict[str, float]]:
    """Per test: the medians of both files and the median, min and max of the per-pair VL/MoE ratios."""
    out: Dict[str, Dict[str, float]] = {}
    for key in ("pp", "tg"):
        ratios = [a / b for a, b in zip(res["vl"][key], res["moe"][key])]
        out[key] = {"vl": statistics.median(res["vl"][key]), "moe": statistics.median(res["moe"][key]),
                    "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
    return out


def format(res: Dict[str, Dict[str, List[float]]]) -> str:
    lines = ["| test | VL tok/s | MoE tok/s | VL/MoE per pair (min..max) |", "|---|---|---|---|"]
    for key, s in summary(res).items():
        lines.append(f"| {key} | {s['vl']:.1f} | {s['moe']:.1f} | {s['ratio']:.3f} "
                     f"({s['ratio_min']:.3f}..{s['ratio_max']:.3f}) |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("vl")
    ap.add_argument("moe")
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    a = ap.parse_args(argv)
    print(format(measure(a.vl, a.moe, a.threads, a.pairs, a.n_prompt, a.n_gen)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
