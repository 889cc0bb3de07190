"""benchmarks/gpu_report.py: pairing our runs with llama-bench's, and the 28B-A3B extrapolation (no GPU needed)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
_spec = importlib.util.spec_from_file_location("bench_gpu_report", BENCH / "gpu_report.py")
assert _spec is not None and _spec.loader is not None
gpu_report = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = gpu_report
_spec.loader.exec_module(gpu_report)


def _ours(label, model, pp, tg, mem, file_bytes, images=None):
    stat = lambda v: {"median": v, "min": v, "max": v}  # noqa: E731
    return {"label": label, "model": model, "pp": stat(pp), "tg": stat(tg), "gpu_memory_mb": mem,
            "file_bytes": file_bytes, "repetitions": 3, "image_ms": {k: stat(v) for k, v in (images or {}).items()},
            "ttft_ms": None, "machine": {"gpus": ["NVIDIA H200"], "cpu": "x", "cpus": 16, "threads": 16}}


def _lb(model, ncmoe, pp, tg):
    return [{"model_filename": f"/elsewhere/{model}", "n_cpu_moe": ncmoe, "n_prompt": 512, "n_gen": 0, "avg_ts": pp},
            {"model_filename": f"/elsewhere/{model}", "n_cpu_moe": ncmoe, "n_prompt": 0, "n_gen": 128, "avg_ts": tg}]


def test_report_pairs_runs_and_extrapolates(tmp_path):
    # 2 layers: 2.0 ms/token and 256 ms per prompt; 4 layers: 3.0 and 512: one MoE layer = 0.5 ms, 128 ms
    runs = [
        _ours("a3b-L2-Q4_K_M", "m/a3b-L2.gguf", 2000.0, 500.0, 1000.0, 1 << 30, {"448x448": 40.0, "896x896": 90.0}),
        _ours("a3b-L4-Q4_K_M", "m/a3b-L4.gguf", 1000.0, 1e3 / 3.0, 1600.0, 3 << 30),
        _ours("a3b-L2-Q4_K_M-cpu-moe", "m/a3b-L2.gguf", 500.0, 100.0, 300.0, 1 << 30),
    ]
    (tmp_path / "bench.jsonl").write_text("\n".join(json.dumps(r) for r in runs) + "\n")
    lb = _lb("a3b-L2.gguf", 0, 2500.0, 400.0) + _lb("a3b-L2.gguf", 99, 400.0, 200.0)
    (tmp_path / "llama-bench.jsonl").write_text("\n".join(json.dumps(r) for r in lb) + "\nnot json\n")
    text = gpu_report.report(tmp_path)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| a3b")}
    assert rows["a3b-L2-Q4_K_M"][:6] == ["2000", "2500", "0.80", "500.0", "400.0", "1.25"]
    assert rows["a3b-L2-Q4_K_M"][7:9] == ["40", "90"]
    assert rows["a3b-L2-Q4_K_M-cpu-moe"][1:3] == ["400", "1.25"]  # paired with llama-bench's -ncmoe run
    assert rows["a3b-L4-Q4_K_M"][1] == "-"  # no llama-bench run of that file
    assert "NVIDIA H200" in text
    # 28 layers = 2 measured + 26 x 0.5 ms = 15 ms/token; 256 + 26 x 128 ms per prompt; 1000 + 26 x 300 MiB
    m = re.search(r"all on the GPU: layers 2 and 4 measured; one MoE layer costs ([\d.]+) ms per generated "
                  r"token, ([\d.]+) ms per 512-token prompt, (\d+) MiB", text)
    assert m and float(m.group(1)) == 0.5 and float(m.group(2)) == 128.0 and m.group(3) == "300"
    assert f"tg {1e3 / 15:.1f} tok/s, pp512 {512e3 / (256 + 26 * 128):.0f} tok/s, GPU memory {8800 / 1024:.1f} GiB" in text
    assert "file 27.0 GiB" in text  # 1 GiB + 26 x 1 GiB
    assert "--cpu-moe), " not in text  # one depth only with --cpu-moe: no extrapolation
