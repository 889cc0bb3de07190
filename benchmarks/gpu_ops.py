"""Graph walk: which backend computes each node of our graphs, on a GPU build.

    python benchmarks/gpu_ops.py MODEL.gguf [--mmproj M.gguf] [--json OUT.json] [--inventory]

Runs, with every layer offloaded (``n_gpu_layers=-1``), a text prompt batch, a one-token decode
and an image-embedding batch (the ERNIE-4.5-VL vision-expert branch) through a context that
observes every graph node (``observe_nodes``: the scheduler's evaluation callback, which sees
each node with the buffer, i.e. the backend, that holds its result). Then encodes an image with
the projector on the GPU; mtmd walks that graph itself and warns of any op the GPU backend does
not support, which this script collects.

Prints, per op, how many nodes each backend computed, and the nodes left on the CPU. The one
expected CPU node is the token-embedding lookup (``inp_embd``: llama.cpp keeps ``token_embd``
in host memory by design); any other CPU node, or an mtmd warning, means an op of our graphs has
no implementation on the GPU backend, and the script exits with status 1. So does a run that
finds no GPU, unless ``--inventory`` asks only for the list of ops the language-model graphs use
(the same walk on the CPU: what a GPU backend must implement).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

EXPECTED_ON_CPU = {"inp_embd"}  # the token-embedding lookup: token_embd stays in host memory
NO_COMPUTE = {"NONE", "VIEW", "RESHAPE", "PERMUTE", "TRANSPOSE"}  # views: they live in their source's buffer


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def walk(model_path: str, mmproj: str | None = None, n_gpu_layers: int = -1,
         inventory: bool = False) -> dict[str, Any]:
    """Run the batches and return ``{"ops": {op: {backend: n}}, "on_cpu": [...], "mtmd_warnings": [...], "gpu": bool}``.

    Without a GPU: with ``inventory`` the walk runs on the CPU (the image encode is left out),
    otherwise SystemExit.
    """
    from pyllama_ernie import Embeddings, Model
    from pyllama_ernie._lib import logger
    from pyllama_ernie.bench import synthetic_image
    from pyllama_ernie.mrope import image_positions

    warnings = _Warnings()
    logger.addHandler(warnings)
    seen: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    kind = "prompt"

    def observe(name: str, op: str, srcs: tuple, computed: bool, buffer: str) -> None:
        if computed and op not in NO_COMPUTE:
            seen[kind].append((name, op, buffer))

    try:
        with Model(model_path, mmproj_path=mmproj, n_gpu_layers=n_gpu_layers, mmproj_gpu=True, n_ctx=1024) as m:
            gpu = m.offload.uses_gpu
            if not gpu and not inventory:
                raise SystemExit("this build found no GPU: nothing to check (--inventory lists the ops)")
            with m.context(observe_nodes=observe) as ctx:
                ctx.logits(list(range(10, 42)))
                kind = "decode"
                ctx.logits(list(range(10, 43)))  # the cached 32 are kept: one new token
                if m.metadata.get("general.architecture") == "ernie4_5-vl-moe":
                    kind = "embeddings"
                    ctx.reset()
                    rows = np.random.default_rng(0).standard_normal((6, m.n_embd)).astype(np.float32)
                    pos, nxt = image_positions(0, 2, 3)
                    ctx.logits([Embeddings(rows, pos, next_pos=nxt)])
            if mmproj and gpu:
                m.image_features(synthetic_image(448, 448))
    finally:
        logger.removeHandler(warnings)
    ops: dict[str, Counter] = defaultdict(Counter)
    on_cpu: list[dict[str, str]] = []
    for k, nodes in seen.items():
        for name, op, buffer in nodes:
            backend = "CPU" if buffer.upper().startswith("CPU") else buffer
            ops[op][backend] += 1
            if backend == "CPU":
                on_cpu.append({"batch": k, "node": name, "op": op, "expected": name in EXPECTED_ON_CPU})
    mtmd = [w for w in warnings.lines if "unsupported" in w.lower() or "not supported" in w.lower()]
    return {
        "ops": {op: dict(c) for op, c in sorted(ops.items())},
        "nodes": {k: len(v) for k, v in seen.items()},
        "on_cpu": on_cpu,
        "mtmd_warnings": mtmd,
        "gpu": gpu,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--mmproj")
    ap.add_argument("-ngl", "--n-gpu-layers", type=int, default=-1)
    ap.add_argument("--json", type=Path, help="also write the result here")
    ap.add_argument("--inventory", action="store_true", help="without a GPU: list the ops only (on the CPU)")
    args = ap.parse_args(argv)
    res = walk(args.model, args.mmproj, args.n_gpu_layers, inventory=args.inventory)
    backends = sorted({b for c in res["ops"].values() for b in c})
    print(f"nodes per batch: {res['nodes']}")
    print(f"{'op':24s}" + "".join(f"{b:>10s}" for b in backends))
    for op, c in res["ops"].items():
        print(f"{op:24s}" + "".join(f"{c.get(b, 0):10d}" for b in backends))
    bad = [n for n in res["on_cpu"] if not n["expected"]]
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    if not res["gpu"]:
        print("no GPU: the op inventory of the language-model graphs only, nothing was checked")
        return 0
    for n in res["on_cpu"]:
        print(f"on the CPU: {n['batch']:10s} {n['node']:24s} {n['op']}{'  (expected)' if n['expected'] else ''}")
    for w in res["mtmd_warnings"]:
        print(f"mtmd: {w}")
    ok = not bad and not res["mtmd_warnings"]
    print("every op of these graphs ran on the GPU" + (" (but the token-embedding lookup, by design)" if res["on_cpu"] else "")
          if ok else f"{len(bad)} nodes ran on the CPU, {len(res['mtmd_warnings'])} mtmd warnings")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
