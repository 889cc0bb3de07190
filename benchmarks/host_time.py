"""Where the time between two generated tokens goes: our loop against bare llama.cpp calls.

    python benchmarks/host_time.py MODEL.gguf [-t 2] [-n 128] [-r 5]

Four ways of generating ``n`` tokens on one context, interleaved, ``r`` times each:

- ``decode-only``: ``llama_decode`` of one token after another, never reading the logits
  (what llama-bench's tg test does);
- ``raw``: ``llama_decode``, ``llama_get_logits_ith`` and a numpy argmax per token, the
  least a Python greedy loop can do;
- ``ours``: the loop behind ``Model.generate`` (``Context.generate_tokens`` with
  ``stream=False``: greedy argmax, detokenization, stop handling, cancellation checks);
- ``ours-stream``: the same loop streaming (``Model.stream``): it also hands each piece over
  through a ``yield``.

For each: wall time per token and, where llama.cpp's decode timer can tell it
(``llama_perf_context``: from after the batch checks to the logits being ready), the
timer's share; ``host`` = wall - timer. ``ours - raw`` is what our Python adds per token,
``raw - decode-only`` what reading the logits and the argmax cost. Medians, min..max.
Compare figures only within one run: these machines are noisy.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List, Tuple

import numpy as np


def measure(model_path: str, threads: int | None = None, n: int = 128, repetitions: int = 5) -> Dict[str, Dict[str, List[float]]]:
    """``{variant: {"wall": [us per token, ...], "timer": [...]}}`` for decode-only, raw, ours, ours-stream."""
    from pyllama_ernie import Model
    from pyllama_ernie._lib import ffi, lib
    from pyllama_ernie.context import SamplingParams

    with Model(model_path, n_ctx=max(512, n + 16), n_threads=threads) as model:
        ctx = model.ctx
        c = ctx._ptr
        b = ctx._batch
        n_vocab = model.n_vocab
        start = [model.bos_token if model.bos_token >= 0 else 0, 100]

        def fresh() -> None:
            ctx.reset()
            for i, t in enumerate(start):  # the same two-token prompt for every variant
                b.token[0], b.pos[0], b.logits[0], b.n_tokens = t, i, 1, 1
                if lib.llama_decode(c, b) != 0:
                    raise RuntimeError("llama_decode failed")
            lib.llama_synchronize(c)
            lib.llama_perf_context_reset(c)

        def decode_only() -> Tuple[float, float]:
            fresh()
            t0 = time.perf_counter()
            for i in range(n):
                b.token[0], b.pos[0], b.logits[0], b.n_tokens = 100 + i, len(start) + i, 1, 1
                lib.llama_decode(c, b)
            lib.llama_synchronize(c)
            return time.perf_counter() - t0, float("nan")  # one sync: the timer cannot split it

        def raw() -> Tuple[float, float]:
            fresh()
            pos = len(start)
            t0 = time.perf_counter()
            for _ in range(n):
                row = np.frombuffer(ffi.buffer(lib.llama_get_logits_ith(c, -1), n_vocab * 4), dtype=np.float32)
                b.token[0], b.pos[0], b.logits[0], b.n_tokens = int(row.argmax()), pos, 1, 1
                lib.llama_decode(c, b)
                pos += 1
            lib.llama_synchronize(c)
            wall = time.perf_counter() - t0
            return wall, lib.llama_perf_context(c).t_eval_ms / 1e3

        def ours(stream: bool) -> Tuple[float, float]:
            fresh()
            ctx.reset()  # generate_tokens evaluates the prompt itself
            gen = ctx.generate_tokens(start, max_tokens=n, sampling=SamplingParams(temperature=0), ignore_eos=True,
                                      stream=stream)
            done = None
            for piece in gen:
                done = piece
            lib.llama_synchronize(c)
            t_eval = lib.llama_perf_context(c).t_eval_ms / 1e3
            return done.timings.generation_ms / 1e3, t_eval

        variants: Dict[str, Callable[[], Tuple[float, float]]] = {
            "decode-only": decode_only, "raw": raw, "ours": lambda: ours(False), "ours-stream": lambda: ours(True)}
        for fn in variants.values():  # warm-up
            fn()
        res: Dict[str, Dict[str, List[float]]] = {k: {"wall": [], "timer": []} for k in variants}
        for _ in range(repetitions):
            for name, fn in variants.items():
                wall, timer = fn()
                res[name]["wall"].append(wall / n * 1e6)
                res[name]["timer"].append(timer / n * 1e6)
    return res


def summary(res: Dict[str, Dict[str, List[float]]]) -> Dict[str, float]:
    """Medians: each variant's wall and host us per token, and the differences between variants."""
    med = {k: statistics.median(v["wall"]) for k, v in res.items()}
    out = {f"{k}_wall_us": w for k, w in med.items()}
    for k in ("raw", "ours", "ours-stream"):
        out[f"{k}_host_us"] = statistics.median(w - t for w, t in zip(res[k]["wall"], res[k]["timer"]))
    out["ours_minus_raw_us"] = med["ours"] - med["raw"]
    out["raw_minus_decode_only_us"] = med["raw"] - med["decode-only"]
    out["ours_vs_decode_only"] = med["decode-only"] / med["ours"]
    return out


def format(res: Dict[str, Dict[str, List[float]]]) -> str:
    """The table and the differences, as text."""
    def stat(v: List[float]) -> str:
        if any(x != x for x in v):
            return "-"
        return f"{statistics.median(v):7.1f} ({min(v):.1f}..{max(v):.1f})"

    lines = [f"{'':12s} {'wall':>24s} {'decode timer':>24s} {'host = wall - timer':>24s}"]
    for name, r in res.items():
        host = [w - t for w, t in zip(r["wall"], r["timer"])]
        lines.append(f"{name:12s} {stat(r['wall']):>24s} {stat(r['timer']):>24s} {stat(host):>24s}")
    s = summary(res)
    lines += [f"ours - raw          {s['ours_minus_raw_us']:7.1f} us  (our Python loop beyond the bare calls)",
              f"raw - decode-only   {s['raw_minus_decode_only_us']:7.1f} us  (reading the logits, argmax)",
              f"ours / decode-only  {s['ours_vs_decode_only']:.3f}  (tokens/s ratio)"]
    return "\n".join(lines)


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("-n", "--tokens", type=int, default=128)
    ap.add_argument("-r", "--repetitions", type=int, default=5)
    args = ap.parse_args(argv)
    res = measure(args.model, args.threads, args.tokens, args.repetitions)
    print(f"{args.model}: {args.tokens} tokens, {args.repetitions} repetitions, us per token (median (min..max))")
    print(format(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
