"""Distinct experts per decode step against the number of sequences in the batch, measured in llama.cpp.

    python benchmarks/moe_routing.py [MODEL.gguf] [--seqs 1,2,4,8] [--steps 32] [--prompt 64] [-t 2] [--json F]

What it measures. Batched decoding reads each routed expert's weights once per step for
all the tokens that chose it, so what a batch of n sequences saves depends on how many
DISTINCT experts the n tokens of a step choose. This script runs the real model: n sequences,
each with its own prompt (``--prompt`` random ordinary tokens, seeded, different per sequence),
are evaluated, then decoded greedily together for ``--steps`` steps, one token per sequence per
``llama_decode`` call (as llama-server and llama-batched-bench do). An evaluation callback
(``cb_eval``, the mechanism behind ``Model.context(observe_nodes=...)``, here one that reads
the tensor's data) reads the ``ffn_moe_topk-<layer>`` tensor of every MoE layer, i.e. the expert
ids llama.cpp's router actually selected for each token of the step, and counts the distinct
ids per layer and step. Reported per n: the mean (and min..max) of distinct experts per MoE
layer per step over all layers and decode steps; the same for independent, uniformly random
top-k choices (``E * (1 - (1 - k/E)^n)``, the expectation), as a yardstick; and what that
means for the bytes of weights a step reads (all non-expert tensors once, plus the distinct
experts' tensors of each layer; sizes from the GGUF file), as the memory-bound ceiling of the
batching gain: ``n * bytes(1) / bytes(n)``. Prompt steps are not counted.

With the bench models' random weights the router has nothing to specialise on, so its choices
are close to the uniform yardstick; a trained model's routing is more concentrated (fewer
distinct experts, larger batching gains). The reading is of llama.cpp's own routing on real
decode steps, not a re-implementation of the router.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE / "models" / "ernie-moe-bench-Q8_0.gguf"

# struct ggml_tensor (ggml/include/ggml.h, x86-64): the fields the package's cdef leaves out
_OFF_TYPE, _OFF_NE, _OFF_NB, _OFF_DATA = 0, 16, 48, 248
_GGML_TYPE_I32 = 26
_TOPK = re.compile(rb"^ffn_moe_topk-(\d+)$")


def uniform_expectation(n_expert: int, k: int, n: int) -> float:
    """E[distinct experts] when n tokens each pick k of n_expert uniformly at random, independently."""
    return n_expert * (1.0 - (1.0 - k / n_expert) ** n)


def weight_bytes(path: Path) -> dict[str, Any]:
    """Bytes of the GGUF's tensors: non-expert total, and per MoE layer the bytes of one routed expert."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    per_expert: dict[int, int] = {}
    n_expert: dict[int, int] = {}
    other = 0
    for t in r.tensors:
        m = re.match(r"blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$", t.name)
        if m:
            il = int(m.group(1))
            ne = int(t.shape[-1])  # gguf-py shapes are ggml's order: experts last
            per_expert[il] = per_expert.get(il, 0) + int(t.n_bytes) // ne
            n_expert[il] = ne
        else:
            other += int(t.n_bytes)
    return {"other": other, "per_expert": per_expert, "n_expert": n_expert}


def normal_ids(path: Path) -> list[int]:
    from serve_bench import normal_token_ids

    return normal_token_ids(path)


def measure(model_path: Path, seqs: list[int], steps: int, prompt: int, threads: int, seed: int) -> dict[str, Any]:
    from pyllama_ernie import Model
    from pyllama_ernie._cffi import ffi, lib

    # the package's cdef names only some fields of ggml_tensor: check that the offsets above agree with it
    assert ffi.offsetof("struct ggml_tensor", "buffer") == 8, "unexpected struct ggml_tensor layout"
    assert ffi.offsetof("struct ggml_tensor", "flags") == 148, "unexpected struct ggml_tensor layout"
    assert ffi.offsetof("struct ggml_tensor", "name") == 256, "unexpected struct ggml_tensor layout"

    pool = normal_ids(model_path)
    n_max = max(seqs)
    state: dict[str, Any] = {"record": False, "step": None, "bad": None}

    def on_node(t: Any, ask: bool, _ud: Any) -> bool:
        name = ffi.string(t.name)
        mt = _TOPK.match(name)
        if mt is None:
            return False if ask else True  # not interested; (a node asked for by others: go on)
        if ask:
            return True  # give me this node's data once it is computed
        if state["record"]:
            base = ffi.cast("char *", t)
            if ffi.cast("int32_t *", base + _OFF_TYPE)[0] != _GGML_TYPE_I32:
                state["bad"] = "ffn_moe_topk is not I32"
                return True
            ne = np.frombuffer(ffi.buffer(base + _OFF_NE, 32), dtype=np.int64)
            nb = np.frombuffer(ffi.buffer(base + _OFF_NB, 32), dtype=np.uint64)
            data = ffi.cast("char **", base + _OFF_DATA)[0]
            k, n_tok = int(ne[0]), int(ne[1])
            ids = set()
            for j in range(n_tok):
                row = np.frombuffer(ffi.buffer(data + j * int(nb[1]), k * 4), dtype=np.int32)
                ids.update(int(x) for x in row)
                state["per_token_k"] = k
            layer = int(mt.group(1))
            # a step's tokens can come in several ubatches: the union is what the step read
            state["step"].setdefault(layer, set()).update(ids)
        return True

    cb = ffi.callback("bool(struct ggml_tensor *, bool, void *)", on_node)
    model = Model(model_path, n_ctx=256, n_threads=threads)
    n_expert = int(model.metadata.get(f"{model.metadata.get('general.architecture')}.expert_count", 0)) \
        if hasattr(model, "metadata") else 0
    per_seq = prompt + steps + 8
    p = lib.llama_context_default_params()
    p.n_ctx = n_max * ((per_seq + 255) // 256 * 256)
    p.n_batch = p.n_ubatch = max(512, prompt)
    p.n_seq_max = n_max
    p.n_threads = p.n_threads_batch = threads
    p.cb_eval = cb
    p.cb_eval_user_data = ffi.NULL
    p.no_perf = True
    ctx = lib.llama_init_from_model(model._handle(), p)
    if ctx == ffi.NULL:
        raise SystemExit("error: llama_init_from_model failed")
    n_vocab = model.n_vocab
    batch = lib.llama_batch_init(max(p.n_batch, n_max), 0, n_max)
    mem = lib.llama_get_memory(ctx)

    def decode(items: list[tuple[int, int, int, bool]]) -> None:
        """items: (token, pos, seq, want_logits)."""
        batch.n_tokens = len(items)
        for i, (tok, pos, s, want) in enumerate(items):
            batch.token[i] = tok
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = s
            batch.logits[i] = 1 if want else 0
        rc = lib.llama_decode(ctx, batch)
        if rc != 0:
            raise SystemExit(f"error: llama_decode returned {rc}")

    def argmax(i: int) -> int:
        ptr = lib.llama_get_logits_ith(ctx, i)
        return int(np.frombuffer(ffi.buffer(ptr, n_vocab * 4), dtype=np.float32).argmax())

    out: dict[str, Any] = {"per_n": {}}
    try:
        for n in seqs:
            lib.llama_memory_clear(mem, True)
            state["record"] = False
            nxt = []
            for s in range(n):
                rng = random.Random(seed * 1000 + n * 100 + s)
                toks = [rng.choice(pool) for _ in range(prompt)]
                state["step"] = {}
                decode([(tk, i, s, i == prompt - 1) for i, tk in enumerate(toks)])
                nxt.append(argmax(prompt - 1))
            counts: list[int] = []
            per_layer: dict[int, list[int]] = {}
            t0 = time.perf_counter()
            for st in range(steps):
                state["record"] = True
                state["step"] = {}
                decode([(nxt[s], prompt + st, s, True) for s in range(n)])
                state["record"] = False
                if state["bad"]:
                    raise SystemExit(f"error: {state['bad']}")
                for layer, ids in state["step"].items():
                    counts.append(len(ids))
                    per_layer.setdefault(layer, []).append(len(ids))
                nxt = [argmax(s) for s in range(n)]
            dt = time.perf_counter() - t0
            if not counts:
                raise SystemExit("error: no ffn_moe_topk node seen: is this an MoE model?")
            out["per_n"][n] = {
                "mean": statistics.fmean(counts), "min": min(counts), "max": max(counts),
                "per_layer_mean": {il: statistics.fmean(v) for il, v in sorted(per_layer.items())},
                "steps": steps, "layers": len(per_layer), "seconds": dt,
            }
        out["k"] = state.get("per_token_k")
    finally:
        lib.llama_batch_free(batch)
        lib.llama_free(ctx)
        model.close()
    out["n_expert_from_metadata"] = n_expert or None
    return out


def report(model_path: Path, res: dict[str, Any], wb: dict[str, Any]) -> str:
    k = res["k"]
    layers = sorted(wb["per_expert"])
    n_exp = wb["n_expert"][layers[0]] if layers else res.get("n_expert_from_metadata")
    per_n = res["per_n"]
    L = [f"model {model_path.name}: {len(layers)} MoE layers, {n_exp} experts, top-{k}; "
         f"non-expert weights {wb['other'] / 1e6:.1f} MB, one expert of one layer "
         f"{statistics.fmean(wb['per_expert'].values()) / 1e6:.3f} MB", "",
         "| sequences n | distinct experts per layer per step (measured, mean, min..max) | uniform random top-k | "
         "measured / (n*k) | MB of weights per step (from measured) | memory-bound batching ceiling n*bytes(1)/bytes(n) |",
         "|---|---|---|---|---|---|"]

    def step_bytes(n: int) -> float:
        return wb["other"] + sum(per_n[n]["per_layer_mean"].get(il, 0) * wb["per_expert"][il] for il in layers)

    b1 = step_bytes(min(per_n)) if per_n else None
    n1 = min(per_n)
    for n, v in per_n.items():
        ceiling = n / n1 * b1 / step_bytes(n) if b1 else float("nan")
        L.append(f"| {n} | {v['mean']:.2f} ({v['min']}..{v['max']}) | {uniform_expectation(n_exp, k, n):.2f} | "
                 f"{v['mean'] / (n * k):.3f} | {step_bytes(n) / 1e6:.1f} | {ceiling:.2f} |")
    L += ["", "measured: llama.cpp's ffn_moe_topk of each MoE layer on real greedy decode steps of n sequences "
          f"(different random prompts); {next(iter(per_n.values()))['steps']} steps per n. Ceiling: if a step's time "
          "were the time to read its weights, tokens/s at n over tokens/s at 1."]
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, nargs="?", default=DEFAULT_MODEL)
    ap.add_argument("--seqs", default="1,2,4,8")
    ap.add_argument("--steps", type=int, default=32, help="decode steps counted per n")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per sequence")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    seqs = [int(x) for x in args.seqs.split(",") if x.strip()]
    res = measure(args.model, seqs, args.steps, args.prompt, args.threads, args.seed)
    wb = weight_bytes(args.model)
    text = report(args.model, res, wb)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "result": res, "weights": wb,
                                         "report": text}, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
