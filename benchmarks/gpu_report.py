"""Summarise a benchmarks/gpu_check.sh output folder as Markdown.

    python benchmarks/gpu_report.py OUT_DIR > OUT_DIR/report.md

Reads ``bench.jsonl`` (``python -m pyllama_ernie bench --json`` runs, each with a ``label``) and
``llama-bench.jsonl`` (llama-bench ``-o jsonl``), pairs each of our runs with llama-bench's on the
same file and expert placement, and prints the ratios. For the 28B-A3B-shaped models at two depths
it takes the difference as the cost of one MoE layer and extrapolates time per token, prompt time
and GPU memory to the real 28 layers (layer 0 dense + 27 MoE).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

REAL_LAYERS = 28


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def _lb_speed(lb: list[dict[str, Any]], model: str, cpu_moe: bool, kind: str) -> float | None:
    for r in lb:
        if Path(r.get("model_filename", "")).name != Path(model).name:
            continue
        if bool(r.get("n_cpu_moe", 0)) != cpu_moe:
            continue
        if kind == "pp" and r.get("n_prompt") and not r.get("n_gen"):
            return float(r["avg_ts"])
        if kind == "tg" and r.get("n_gen") and not r.get("n_prompt"):
            return float(r["avg_ts"])
    return None


def _f(x: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if x is None else fmt.format(x)


def report(out: Path) -> str:
    ours = _jsonl(out / "bench.jsonl")
    lb = _jsonl(out / "llama-bench.jsonl")
    lines: list[str] = []
    gpus = next((r["machine"].get("gpus") for r in ours if r.get("machine", {}).get("gpus")), None)
    if ours:
        m = ours[0]["machine"]
        lines += [f"Device: {', '.join(gpus or ['?'])}; CPU: {m.get('cpu', '?')} ({m.get('cpus')} CPUs); "
                  f"build: {m.get('build', '?')}; llama.cpp {m.get('llama_cpp_commit', '?')}; "
                  f"{m.get('threads')} CPU threads, {ours[0]['repetitions']} repetitions (medians).", ""]
    lines += [
        "| run | ours pp512 | llama-bench pp512 | ratio | ours tg128 | llama-bench tg128 | ratio | GPU MiB | "
        "image 448 ms | image 896 ms | TTFT ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ours:
        cpu_moe = r["label"].endswith("-cpu-moe")
        pp, tg = r["pp"]["median"], r["tg"]["median"]
        lpp, ltg = _lb_speed(lb, r["model"], cpu_moe, "pp"), _lb_speed(lb, r["model"], cpu_moe, "tg")
        img = {k: v["median"] for k, v in (r.get("image_ms") or {}).items()}
        i448 = next((v for k, v in img.items() if "448" in k), None)
        i896 = next((v for k, v in img.items() if "896" in k), None)
        ttft = (r.get("ttft_ms") or {}).get("median")
        lines.append(
            f"| {r['label']} | {pp:.0f} | {_f(lpp)} | {_f(lpp and pp / lpp, '{:.2f}')} | {tg:.1f} | {_f(ltg, '{:.1f}')} | "
            f"{_f(ltg and tg / ltg, '{:.2f}')} | {_f(r.get('gpu_memory_mb'))} | {_f(i448)} | {_f(i896)} | {_f(ttft)} |")

    # 28B-A3B extrapolation from two depths
    a3b: dict[tuple[bool, int], dict[str, Any]] = {}
    for r in ours:
        m = re.match(r"a3b-L(\d+)-.*?(-cpu-moe)?$", r["label"])
        if m:
            a3b[(bool(m.group(2)), int(m.group(1)))] = r
    for cpu_moe in (False, True):
        depths = sorted(n for (c, n) in a3b if c == cpu_moe)
        if len(depths) < 2:
            continue
        la, lb_ = depths[0], depths[-1]
        ra, rb = a3b[(cpu_moe, la)], a3b[(cpu_moe, lb_)]
        n = lb_ - la
        tg_a, tg_b = 1e3 / ra["tg"]["median"], 1e3 / rb["tg"]["median"]
        pp_a, pp_b = 512e3 / ra["pp"]["median"], 512e3 / rb["pp"]["median"]
        per_tg, per_pp = (tg_b - tg_a) / n, (pp_b - pp_a) / n
        tg28, pp28 = tg_a + (REAL_LAYERS - la) * per_tg, pp_a + (REAL_LAYERS - la) * per_pp
        mem_a, mem_b = ra.get("gpu_memory_mb"), rb.get("gpu_memory_mb")
        per_mem = (mem_b - mem_a) / n if mem_a is not None and mem_b is not None else None
        mem28 = mem_a + (REAL_LAYERS - la) * per_mem if per_mem is not None else None
        per_file = (rb["file_bytes"] - ra["file_bytes"]) / n
        file28 = ra["file_bytes"] + (REAL_LAYERS - la) * per_file
        where = "experts in CPU memory (--cpu-moe)" if cpu_moe else "all on the GPU"
        lines += [
            "",
            f"28B-A3B shapes, Q4_K_M, {where}: layers {la} and {lb_} measured; one MoE layer costs "
            f"{per_tg:.3f} ms per generated token, {per_pp:.2f} ms per 512-token prompt"
            + (f", {per_mem:.0f} MiB of GPU memory" if per_mem is not None else "")
            + f" ({per_file / 2**20:.0f} MiB of file).",
            f"Extrapolated to {REAL_LAYERS} layers: tg {1e3 / tg28:.1f} tok/s, pp512 {512e3 / pp28:.0f} tok/s"
            + (f", GPU memory {mem28 / 1024:.1f} GiB" if mem28 is not None else "")
            + f", file {file28 / 2**30:.1f} GiB.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    sys.stdout.write(report(Path(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
