"""The long-context error of ERNIE-4.5-VL's rope path, past what the test suite runs.

    python benchmarks/long_context.py 32768 [--work DIR]

Builds the tests' ``vl_long`` model (the released rope: head dim 128, M-RoPE [22, 22, 20],
theta 500000; only the last layer MoE), converts it, and prints per block of 512 positions the
99th percentile of the per-position logit error of ours and of transformers float32, both
against transformers with float64 rope angles (tests/parity/test_long_context.py asserts the
same at 4096 and 8192). Needs the test extras (torch, transformers). 32768 positions took about
2.5 minutes on 2 cores (Intel Xeon, zen4 variant).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", type=int, help="positions")
    ap.add_argument("--work", type=Path, default=Path("/tmp/pyllama_ernie_long_context"))
    args = ap.parse_args()
    sys.path[:0] = [str(TESTS), str(TESTS / "parity")]
    import torch
    from reference_models import _corpus, build_tokenizer, build_vl_model
    from test_long_context import _with_exact_angles, block_errors
    from test_media import _ref_logits
    from transformers import AutoTokenizer, Ernie4_5_VLMoeForConditionalGeneration

    from pyllama_ernie import Model
    from pyllama_ernie.convert import convert

    torch.set_num_threads(2)
    tok_info = build_tokenizer(args.work / "tok")
    hf = build_vl_model("vl_long", args.work / "vl_long", args.work / "tok", tok_info["n_pieces"],
                        tok_info["special_ids"])
    gguf = args.work / "vl_long.gguf"
    if not gguf.exists():
        convert(hf, gguf, "f32", mmproj_path=False)
    tok = AutoTokenizer.from_pretrained(hf)
    ref = Ernie4_5_VLMoeForConditionalGeneration.from_pretrained(hf, dtype=torch.float32).eval()
    ids = tok(" ".join(_corpus(4 * args.n, seed=3)))["input_ids"][:args.n]
    z = torch.zeros((1, len(ids)), dtype=torch.long)
    kw = dict(mm_token_type_ids=z, moe_mm_token_type_ids=z)
    t0 = time.time()
    want = _ref_logits(_with_exact_angles(copy.deepcopy(ref)), ids, kw)
    own = _ref_logits(ref, ids, kw)
    with Model(gguf, n_ctx=len(ids), n_batch=512, kv_cache_type="f32", flash_attn=False) as m:
        got = m.logits(ids)
    ours, theirs = block_errors(got, want), block_errors(own, want)
    print(f"{len(ids)} positions ({time.time() - t0:.0f} s); per block of 512 positions:")
    print("first position  ours     transformers float32")
    for i in range(0, len(ours), max(1, len(ours) // 16)):
        print(f"{i * 512:>14d}  {ours[i]:.1e}  {theirs[i]:.1e}")
    print(f"{'last':>14s}  {ours[-1]:.1e}  {theirs[-1]:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
