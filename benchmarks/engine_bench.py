"""The batching engine's own figures (``Model(n_parallel=N)``), through the Python API:

* ``kv``: aggregate generation throughput at concurrency C with one KV buffer for all
  sequences (``kv_unified=True``, the default) and with one per sequence, in one run;
* ``itl``: the inter-token latency of a running stream while a long prompt arrives
  (p50 before it, p50 / p95 / max while it is read), for a few ``n_ubatch`` values;
* ``resume``: a long conversation with an image resumed from a saved state
  (``Model.load_state``) against evaluating it again.

    python benchmarks/engine_bench.py kv --model benchmarks/models/ernie-moe-bench-Q8_0.gguf
    python benchmarks/engine_bench.py itl --model benchmarks/models/ernie-moe-bench-Q8_0.gguf
    python benchmarks/engine_bench.py resume --model benchmarks/models/ernie-vl-bench-Q8_0.gguf \\
        --mmproj benchmarks/models/mmproj-ernie-vl-bench-Q8_0.gguf

Prints a markdown table with the CPU and the ggml CPU variant; ``--json`` writes the figures.
Models: ``python benchmarks/make_models.py``. Runs on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

import pyllama_ernie as pe
from pyllama_ernie import IMAGE_MARKER


def machine() -> str:
    """The CPU's name and the ggml CPU variant loaded."""
    name = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, ggml CPU variant {pe.system_info().get('cpu_variant')}"


def _prompt(m: pe.Model, n: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return [m.bos_token] + [int(t) for t in rng.integers(min(1000, m.n_vocab // 4), min(m.n_vocab, 30000), n - 1)]


def bench_kv(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Aggregate tokens/s with C clients; ``--mixed``: 2C requests of different prompt and answer
    lengths, so that requests join and leave at different steps (continuous batching)."""
    from concurrent.futures import ThreadPoolExecutor

    rows = []
    n_req = 2 * args.concurrency if args.mixed else args.concurrency
    for unified in args.unified:
        with pe.Model(args.model, n_ctx=args.ctx, n_parallel=args.concurrency, n_threads=args.threads,
                      kv_unified=unified) as m:
            jobs = [(_prompt(m, args.prompt * (2 + i % 4) // 4 if args.mixed else args.prompt, i),
                     args.gen * (2 + i % 3) // 3 if args.mixed else args.gen) for i in range(n_req)]
            m.generate(jobs[0][0], max_tokens=4, temperature=0, ignore_eos=True)  # warm-up

            def run(job: tuple[list[int], int]) -> pe.Completion:
                # every prompt is its own (different random tokens): no prefix-cache hits
                return m.generate(job[0], max_tokens=job[1], temperature=0, ignore_eos=True)

            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                done = list(pool.map(run, jobs))
            wall = time.perf_counter() - t0
        gen = sum(c.completion_tokens for c in done)
        # decode only (llama-batched-bench's S_TG): from the moment every request of the first wave
        # had its first token to the moment the wave ended (each request's times from its admission,
        # which is immediate for the first wave)
        wave = done[:args.concurrency]
        first = max(c.timings.prompt_ms for c in wave)
        end = max(c.timings.prompt_ms + c.timings.generation_ms for c in wave)
        in_window = sum(c.completion_tokens - 1 for c in wave)
        rows.append({"kv_unified": unified, "concurrency": args.concurrency, "requests": n_req,
                     "mixed": args.mixed, "generated": gen, "wall_s": round(wall, 3),
                     "tok_per_s": round(gen / wall, 1),
                     "decode_tok_per_s": round(in_window / max(end - first, 1e-3) * 1e3, 1)})
    return rows


def bench_itl(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for ubatch in args.ubatch:
        with pe.Model(args.model, n_ctx=args.ctx, n_parallel=2, n_threads=args.threads, n_batch=args.batch,
                      n_ubatch=ubatch) as m:
            long_prompt = _prompt(m, args.long, 7)
            stamps: list[float] = []
            started = threading.Event()

            def stream() -> None:
                for _ in m.stream(_prompt(m, 32, 1), max_tokens=args.ctx - 64,
                                  temperature=0, ignore_eos=True):
                    stamps.append(time.perf_counter())
                    if len(stamps) == 20:
                        started.set()
                    if len(stamps) > 20 and arrival[1] and time.perf_counter() > arrival[1] + 0.5:
                        break

            arrival = [0.0, 0.0]
            t = threading.Thread(target=stream)
            t.start()
            started.wait()
            arrival[0] = time.perf_counter()
            c = m.generate(long_prompt, max_tokens=1, temperature=0)
            arrival[1] = time.perf_counter()
            t.join()
        gaps = np.diff(stamps) * 1e3
        mids = np.array(stamps[1:])
        before = gaps[mids < arrival[0]]
        during = gaps[(mids >= arrival[0]) & (mids <= arrival[1])]
        rows.append({
            "n_ubatch": ubatch, "long_prompt": args.long, "prompt_s": round(arrival[1] - arrival[0], 2),
            "prompt_evaluated": c.prompt_tokens_evaluated,
            "itl_before_p50_ms": round(float(np.median(before)), 1),
            "itl_during_p50_ms": round(float(np.median(during)), 1) if len(during) else None,
            "itl_during_p95_ms": round(float(np.percentile(during, 95)), 1) if len(during) else None,
            "itl_during_max_ms": round(float(during.max()), 1) if len(during) else None,
            "tokens_during": int(len(during)),
        })
    return rows


def bench_resume(args: argparse.Namespace) -> list[dict[str, Any]]:
    image = np.random.default_rng(0).integers(0, 256, (args.image, args.image, 3), dtype=np.uint8)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "conversation.kv"
        with pe.Model(args.model, mmproj_path=args.mmproj, n_ctx=args.ctx, n_threads=args.threads) as m:
            # text of about --long positions with the image: measure the words' tokens, then trim
            n_image = m.generate(f"{IMAGE_MARKER}", images=[image], max_tokens=1, temperature=0).prompt_tokens
            n_words, budget = args.long, args.long - n_image - 8
            while len(m.tokenize(" " + " ".join(f"w{i}" for i in range(n_words)), add_special=False)) > budget:
                n_words = n_words * 95 // 100
            first = f"{IMAGE_MARKER} " + " ".join(f"w{i}" for i in range(n_words))
            m.media_cache_clear()
            m.ctx.reset()
            t0 = time.perf_counter()
            c = m.generate(first, images=[image], max_tokens=1, temperature=0)
            full_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            n_saved = m.save_state(saved)
            save_s = time.perf_counter() - t0
            size = saved.stat().st_size
        with pe.Model(args.model, mmproj_path=args.mmproj, n_ctx=args.ctx, n_threads=args.threads) as m:
            t0 = time.perf_counter()
            m.load_state(saved)
            load_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            r = m.generate(first + " and more", images=[image], max_tokens=1, temperature=0)
            next_s = time.perf_counter() - t0
        rows.append({"positions": c.prompt_tokens, "saved_positions": n_saved, "file_mb": round(size / 2**20, 1),
                     "reevaluate_s": round(full_s, 2), "save_s": round(save_s, 3), "load_s": round(load_s, 3),
                     "next_call_s": round(next_s, 2), "next_call_evaluated": r.prompt_tokens_evaluated,
                     "speedup": round(full_s / (load_s + next_s), 1)})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["kv", "itl", "resume"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--mmproj")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ctx", type=int, default=4608)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--long", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--ubatch", type=int, nargs="+", default=[512, 128])
    ap.add_argument("--unified", type=lambda v: v.lower() in ("1", "true", "yes"), nargs="+", default=[True, False],
                    help="kv: the kv_unified values to run, in order")
    ap.add_argument("--mixed", action="store_true", help="kv: 2C requests of different lengths")
    ap.add_argument("--image", type=int, default=448, help="image side in pixels (resume)")
    ap.add_argument("--json")
    args = ap.parse_args()
    pe.set_log_level("error")
    rows = {"kv": bench_kv, "itl": bench_itl, "resume": bench_resume}[args.what](args)
    print(f"{args.what} on {machine()}, threads {args.threads or 'default'}, {Path(args.model).name}")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
