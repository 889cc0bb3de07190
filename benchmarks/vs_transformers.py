"""The reference implementation's speed on CPU: transformers running an ERNIE 4.5 checkpoint.

    python benchmarks/vs_transformers.py HF_DIR [--threads 2] [--dtype bfloat16 --dtype float32]
                                         [-r 3] [--json] [--prompt-tokens 512] [--gen-tokens 128]
                                         [--image-sizes 448,896]

For each dtype (default: bfloat16 and float32) it loads the checkpoint in ``HF_DIR`` (an
``ernie4_5_moe`` / ``ernie4_5`` causal LM or an ``ernie4_5_vl_moe`` model, e.g. one written by
``benchmarks/make_models.py``) with ``torch.set_num_threads(threads)`` and measures, under
``torch.inference_mode``:

* ``pp512_tok_s``: prefill, one forward pass over a 512-token prompt (``use_cache=True``, logits
  of the last position only, as ``generate`` and llama.cpp compute them), tokens / second;
* ``tg128_tok_s``: decode, 128 greedy tokens one per step with the KV cache, after a 1-token
  prompt (as llama-bench's tg128 starts from an empty context); only the 128 steps are timed;
* VL models only, ``image_448_ms`` and ``image_896_ms``: encoding one 448x448 / 896x896 image,
  i.e. ``get_image_features`` (the vision tower + the resampler) on the image's 14x14 patches
  (1024 / 4096 patches, 256 / 1024 image tokens), laid out as the image processor lays them out.

Every figure is the median (and min..max) of ``-r`` repetitions after one warm-up run. Prints a
table; with ``--json``, only a JSON object ``{dtype: {key: median, ...}}`` on stdout (the table
goes to stderr). Importable: ``measure(hf_dir, dtype, threads, reps) -> dict`` (medians, plus
``<key>_all`` with every repetition). Compare with llama.cpp figures taken on the same machine
with the same threads; these machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main", "measure", "patches"]

PROMPT_TOKENS = 512
GEN_TOKENS = 128
IMAGE_SIZES = (448, 896)
KEYS = ("pp512_tok_s", "tg128_tok_s", "image_448_ms", "image_896_ms")

# the image processor's defaults (Ernie4_5_VLMoeImageProcessor): CLIP mean/std, 14 px patches, 2x2 merge
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
PATCH = 14
MERGE = 2


def patches(image: Any, patch_size: int = PATCH, merge_size: int = MERGE) -> tuple[Any, Any]:
    """``(pixel_values, image_grid_thw)`` of an HxWx3 uint8 array whose sides are multiples of 28.

    As the image processor's ``patchify``: rescale to [0, 1], normalise with the CLIP mean/std,
    then one row of ``3 * 14 * 14`` values (channel-major) per patch, patches ordered by 2x2 merge
    window (row-major over windows, row-major inside each), with temporal_patch_size 1.
    """
    import numpy as np
    import torch

    h, w, _ = image.shape
    f = patch_size * merge_size
    if h % f or w % f:
        raise ValueError(f"image sides must be multiples of {f}, got {w}x{h}")
    x = (image.astype(np.float32) / 255.0 - np.asarray(IMAGE_MEAN, np.float32)) / np.asarray(IMAGE_STD, np.float32)
    x = x.transpose(2, 0, 1)  # C, H, W
    gh, gw = h // patch_size, w // patch_size
    x = x.reshape(3, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # gh/m, gw/m, m, m, C, p, p
    flat = np.ascontiguousarray(x.reshape(gh * gw, 3 * patch_size * patch_size))
    return torch.from_numpy(flat), torch.tensor([[1, gh, gw]], dtype=torch.long)


def _summary(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def _load(hf_dir: Path, dtype: Any, experts: str | None = None) -> tuple[Any, bool]:
    import transformers

    cfg = json.loads((hf_dir / "config.json").read_text())
    is_vl = "vision_config" in cfg and cfg.get("model_type") == "ernie4_5_vl_moe"
    if is_vl:
        cls = transformers.Ernie4_5_VLMoeForConditionalGeneration
    else:
        cls = transformers.AutoModelForCausalLM
    kw: dict[str, Any] = {"dtype": dtype}
    if experts:
        kw["experts_implementation"] = experts
    model = cls.from_pretrained(str(hf_dir), **kw)
    return model.eval(), is_vl


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _forward(model: Any, ids: Any, cache: Any = None) -> Any:
    kw: dict[str, Any] = {"input_ids": ids, "use_cache": True, "logits_to_keep": 1}
    if cache is not None:
        kw["cache"] = cache
    return model(**kw)


def measure(hf_dir: str | Path, dtype: str = "bfloat16", threads: int = 2, reps: int = 3, *,
            prompt_tokens: int = PROMPT_TOKENS, gen_tokens: int = GEN_TOKENS,
            image_sizes: tuple[int, ...] = IMAGE_SIZES, experts: str | None = None, seed: int = 0,
            progress: Any = None) -> dict[str, Any]:
    """Measure the checkpoint in ``hf_dir`` in ``dtype`` ("bfloat16" / "float32") with ``threads`` threads.

    Returns ``{"pp512_tok_s", "tg128_tok_s"[, "image_448_ms", "image_896_ms"]}`` (medians over
    ``reps`` runs after a warm-up; the key names follow ``prompt_tokens`` / ``gen_tokens`` /
    ``image_sizes``), each also as ``<key>_all`` (the list of runs), plus ``"info"``. ``experts``: the
    MoE experts' implementation (transformers' ``experts_implementation``: "eager", "grouped_mm";
    None: transformers' default; "batched_mm" gathers each token's expert weights and runs out of
    memory on a 512-token prefill of the bench model).
    """
    import numpy as np
    import torch

    torch.set_num_threads(max(1, int(threads)))
    torch_dtype = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
                   "f32": torch.float32, "float16": torch.float16, "f16": torch.float16}[dtype]
    hf_dir = Path(hf_dir)
    t0 = time.perf_counter()
    model, is_vl = _load(hf_dir, torch_dtype, experts)
    load_s = time.perf_counter() - t0
    cfg = model.config.text_config if is_vl else model.config
    # ordinary text ids: past the byte pieces, below the special tokens, inside the vocabulary
    hi = min(cfg.vocab_size, 800)
    rng = np.random.default_rng(seed)
    prompt = torch.from_numpy(rng.integers(259 if hi > 300 else 3, hi, size=(1, prompt_tokens))).long()
    first = prompt[:, :1]

    def log(msg: str) -> None:
        if progress is not None:
            progress(msg)

    def prefill() -> float:
        t = time.perf_counter()
        out = _forward(model, prompt)
        dt = time.perf_counter() - t
        if not torch.isfinite(out.logits).all():
            raise RuntimeError("the prefill's logits are not finite")
        return prompt_tokens / dt

    def decode() -> float:
        out = _forward(model, first)
        cache = _cache_of(out)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        t = time.perf_counter()
        for _ in range(gen_tokens):
            out = _forward(model, tok, cache)
            cache = _cache_of(out)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
        dt = time.perf_counter() - t
        return gen_tokens / dt

    images = {}
    if is_vl:
        for size in image_sizes:
            img = np.random.default_rng(seed + size).integers(0, 256, (size, size, 3), dtype=np.uint8)
            pv, thw = patches(img)
            images[size] = (pv.to(torch_dtype), thw)

    def encode(size: int) -> float:
        pv, thw = images[size]
        t = time.perf_counter()
        out = model.get_image_features(pixel_values=pv, image_grid_thw=thw)
        dt = time.perf_counter() - t
        feats = torch.cat(list(out.pooler_output))
        want = int(thw.prod()) // MERGE ** 2
        if feats.shape[0] != want or not torch.isfinite(feats).all():
            raise RuntimeError(f"image features: got {tuple(feats.shape)}, want {want} finite rows")
        return dt * 1e3

    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    runs: dict[str, list[float]] = {}
    tasks: list[tuple[str, Any]] = [(f"pp{prompt_tokens}_tok_s", prefill), (f"tg{gen_tokens}_tok_s", decode)]
    for size in images:
        tasks.append((f"image_{size}_ms", lambda s=size: encode(s)))
    with torch.inference_mode():
        for key, fn in tasks:
            log(f"{dtype}: {key} warm-up")
            fn()
            runs[key] = []
            for r in range(reps):
                runs[key].append(fn())
                log(f"{dtype}: {key} run {r + 1}/{reps}: {runs[key][-1]:.2f}")
    result: dict[str, Any] = {}
    for key, xs in runs.items():
        result[key] = statistics.median(xs)
        result[key + "_all"] = xs
    result["info"] = {
        "dtype": dtype, "threads": torch.get_num_threads(), "reps": reps, "load_s": load_s,
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "experts_implementation": getattr(cfg, "_experts_implementation", None),
        "vl": is_vl,
        # the 1-minute load average before and after: other work on the machine skews every figure
        "loadavg": [load_before, os.getloadavg()[0] if hasattr(os, "getloadavg") else None],
    }
    return result


def _table(results: dict[str, dict[str, Any]]) -> str:
    lines = []
    info = next(iter(results.values()))["info"]
    lines.append(f"transformers {info['transformers']}, torch {info['torch']}, {info['threads']} threads, "
                 f"attention {info['attn_implementation']}, experts {info['experts_implementation']}, "
                 f"{info['reps']} runs after a warm-up: median (min .. max)")
    for dtype, res in results.items():
        la = res["info"]["loadavg"]
        la_txt = f", load average {la[0]:.1f} -> {la[1]:.1f}" if None not in la else ""
        lines.append(f"{dtype} (loaded in {res['info']['load_s']:.1f} s{la_txt})")
        for key in [k for k in res if not k.endswith("_all") and k != "info"]:
            s = _summary(res[key + "_all"])
            unit = "tok/s" if key.endswith("tok_s") else "ms"
            lines.append(f"  {key:14s} {s['median']:10.2f} {unit:5s} ({s['min']:.2f} .. {s['max']:.2f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("hf_dir", type=Path)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--dtype", action="append", choices=["bfloat16", "float32", "float16"],
                    help="repeat for several (default: bfloat16 and float32)")
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print only a JSON object on stdout")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    # not batched_mm: it gathers every token's expert weights (a 512-token prefill of the bench
    # model needs over 24 GB)
    ap.add_argument("--experts", choices=["eager", "grouped_mm"], default=None,
                    help="transformers' experts_implementation (default: transformers' choice, grouped_mm)")
    ap.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS, help="prefill length (key ppN_tok_s)")
    ap.add_argument("--gen-tokens", type=int, default=GEN_TOKENS, help="decode steps (key tgN_tok_s)")
    ap.add_argument("--image-sizes", default=",".join(map(str, IMAGE_SIZES)),
                    help="square image sides, multiples of 28, comma-separated; empty for none (key image_N_ms)")
    args = ap.parse_args(argv)
    if not (args.hf_dir / "config.json").is_file():
        ap.error(f"{args.hf_dir} has no config.json")
    dtypes = args.dtype or ["bfloat16", "float32"]
    try:
        sizes = tuple(int(x) for x in args.image_sizes.split(",") if x.strip())
    except ValueError:
        ap.error(f"--image-sizes: not a list of integers: {args.image_sizes!r}")
    if any(n <= 0 or n % (PATCH * MERGE) for n in sizes):
        ap.error(f"--image-sizes: each side must be a positive multiple of {PATCH * MERGE}")
    if args.prompt_tokens < 1 or args.gen_tokens < 1 or args.repetitions < 1:
        ap.error("--prompt-tokens, --gen-tokens and -r must be at least 1")
    report = sys.stderr if args.json else sys.stdout

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    results = {}
    for dtype in dtypes:
        results[dtype] = measure(args.hf_dir, dtype, args.threads, args.repetitions,
                                 prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens, image_sizes=sizes,
                                 experts=args.experts,
                                 progress=None if args.quiet else progress)
    print(_table(results), file=report, flush=True)
    if args.json:
        out = {d: {k: v for k, v in r.items() if not k.endswith("_all") and k != "info"} for d, r in results.items()}
        bad = [k for r in out.values() for k, v in r.items() if not (v > 0 and math.isfinite(v))]
        if bad:
            print(f"warning: non-positive or non-finite figures: {bad}", file=sys.stderr)
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
