"""Run every benchmark and write benchmarks/RESULTS.md: one command reproduces the figures.

    python benchmarks/run_all.py [-t 2] [-r 3] [--rounds 2] [--types F16,Q8_0,Q4_K_M]
                                 [--out benchmarks/RESULTS.md] [--skip-transformers]

Steps (each skipped when its output exists):
1. ``benchmarks/make_models.py``: the bench-shape ERNIE-4.5-VL and ERNIE-4.5 MoE models
   (random weights) in every type, plus the VL model's mmproj (F16, and Q8_0 for the Q8_0 row);
2. ``benchmarks/build_tools.py``: ``llama-bench`` and ``llama-completion`` built from the
   patched tree the package uses and from the unpatched upstream tree, with the wheel's
   ggml options.

Then, in rounds (each tool once per round, in a fixed order, so that drift on a shared
machine hits every tool alike), per type:
- ``python -m pyllama_ernie bench`` on the VL file (with the mmproj: image encode, time
  to first token) and on the MoE file;
- ``llama-bench -p 512 -n 128`` (patched) on both files, and the unpatched ``llama-bench``
  on the MoE file (upstream cannot load the VL architecture);
- ``llama-completion`` (patched) generating 128 tokens from the VL file;
and once, transformers (bfloat16 and float32) on the VL checkpoint with the same threads.

Every comparison is a ratio of figures measured in this one run. The raw results go to
``benchmarks/results.json`` beside the report.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

TYPES = ("F16", "Q8_0", "Q4_K_M")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def med(xs: List[float]) -> Dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


# --- the tools ----------------------------------------------------------------

def ours(model: Path, threads: int, reps: int, mmproj: Optional[Path] = None) -> Dict[str, Any]:
    cmd = [sys.executable, "-m", "pyllama_ernie", "bench", str(model), "-t", str(threads), "-r", str(reps),
           "--json", "-q"]
    if mmproj is not None:
        cmd += ["--mmproj", str(mmproj)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def llama_bench(binary: Path, model: Path, threads: int, reps: int) -> Dict[str, Any]:
    """llama-bench's own samples (tokens/s) for pp512 and tg128, with its defaults otherwise."""
    cmd = [str(binary), "-m", str(model), "-p", "512", "-n", "128", "-t", str(threads), "-r", str(reps),
           "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    res: Dict[str, Any] = {"cmd": " ".join(cmd[:1] + [Path(c).name if c == str(model) else c for c in cmd[1:]])}
    for row in json.loads(out.stdout):
        key = "pp" if row["n_prompt"] and not row["n_gen"] else "tg"
        res[key] = [float(x) for x in row["samples_ts"]]
        res["flash_attn"] = row.get("flash_attn")
    return res


_EVAL = re.compile(r"perf_print:\s+eval time =\s*([\d.]+) ms /\s*(\d+) runs")
_COMPUTE = re.compile(r"(\w+) compute buffer size =\s*([\d.]+) MiB")


def llama_completion(binary: Path, model: Path, threads: int) -> Dict[str, Any]:
    """One greedy 128-token generation: llama-completion's own eval rate, and its compute buffers."""
    cmd = [str(binary), "-m", str(model), "-p", "Hello", "-n", "128", "-t", str(threads), "--temp", "0",
           "--ignore-eos", "-no-cnv", "--no-warmup", "-lv", "4"]  # 4: llama.cpp's INFO lines (compute buffers)
    out = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=True)
    log_text = out.stderr
    gen = _EVAL.findall(log_text)  # "prompt eval time" does not match: generation only
    if not gen:
        raise RuntimeError(f"no eval time in llama-completion's output:\n{log_text[-2000:]}")
    ms, n = float(gen[-1][0]), int(gen[-1][1])
    buffers = {dev: float(mib) for dev, mib in _COMPUTE.findall(log_text)}
    return {"tg": n / (ms / 1e3), "n": n, "compute_buffers_mib": buffers}


# --- report ---------------------------------------------------------------------

def _f(x: Optional[float], nd: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def _machine() -> Dict[str, Any]:
    info: Dict[str, Any] = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                            "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        txt = Path("/proc/cpuinfo").read_text()
        info["cpu"] = re.search(r"model name\s*:\s*(.*)", txt).group(1)
        flags = re.search(r"flags\s*:\s*(.*)", txt).group(1).split()
        info["simd"] = " ".join(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")))
        mem = re.search(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text()).group(1)
        info["memory_gib"] = round(int(mem) / (1 << 20), 1)
    except (OSError, AttributeError):
        info["cpu"] = platform.processor()
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True).stdout.strip()
    except OSError:
        pass
    return info


def write_report(R: Dict[str, Any], path: Path) -> str:
    m = R["machine"]
    t = R["threads"]
    L: List[str] = []
    L += ["# Benchmark results", "",
          f"Machine: {m.get('cpu')}, {m.get('cpus')} CPUs, {m.get('memory_gib')} GiB; SIMD flags: {m.get('simd')}; "
          f"{m.get('platform')}.",
          f"Run {m.get('date')} at commit {m.get('commit')}, {t} threads, {R['rounds']} rounds x "
          f"{R['reps']} repetitions per tool and file.",
          "", "Reproduce: `python benchmarks/run_all.py` (see its docstring; about 25 minutes on 2 cores).",
          "Figures are medians over all repetitions (min..max in results.json); every ratio compares figures "
          "from this one run.", ""]

    L += ["## Speed (tokens/s)", "",
          "| model | type | ours pp512 | llama-bench pp512 | ratio | ours tg128 | llama-bench tg128 | ratio "
          "| llama-completion tg | ours / completion | host us/token |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for q, row in R["types"].items():
        for kind in ("vl", "moe"):
            k = row[kind]
            comp = k.get("completion_tg")
            L.append(f"| {kind} | {q} | {_f(k['ours_pp'])} | {_f(k['lb_pp'])} | {_f(k['ours_pp'] / k['lb_pp'], 3)} "
                     f"| {_f(k['ours_tg'])} | {_f(k['lb_tg'])} | {_f(k['ours_tg'] / k['lb_tg'], 3)} "
                     f"| {_f(comp)} | {_f(k['ours_tg'] / comp, 3) if comp else 'n/a'} | {_f(k['host_us'])} |")
    L += ["", "ours = `python -m pyllama_ernie bench` (the package's own generation loop: greedy sampling, "
          "detokenization, stop handling); llama-bench and llama-completion built from the same patched "
          "tree and ggml options as the wheel (`benchmarks/build_tools.py`). host us/token = generation wall "
          "time minus llama.cpp's decode timer, per token.", ""]

    if R.get("host"):
        L += ["## Where the host time goes (VL file, `benchmarks/host_time.py`)", "",
              "| type | ours wall us/token | bare loop wall | decode-only wall | ours - bare loop | bare loop - decode-only "
              "| ours host us | bare loop host us | tok/s ours / decode-only |", "|---|---|---|---|---|---|---|---|---|"]
        for q, h in R["host"].items():
            L.append(f"| {q} | {_f(h['ours_wall_us'])} | {_f(h['raw_wall_us'])} | {_f(h['decode-only_wall_us'])} "
                     f"| {_f(h['ours_minus_raw_us'])} | {_f(h['raw_minus_decode_only_us'])} | {_f(h['ours_host_us'])} "
                     f"| {_f(h['raw_host_us'])} | {_f(h['ours_vs_decode_only'], 3)} |")
        L += ["", "bare loop = `llama_decode` + `llama_get_logits_ith` + numpy argmax per token from Python; "
              "decode-only = `llama_decode` back to back without reading logits (llama-bench's tg loop); "
              "host = wall minus llama.cpp's decode timer. Interleaved in one process, same context.", ""]

    L += ["## Dual experts: ernie4_5-vl-moe text mode vs the same text shapes as ernie4_5-moe", "",
          "| type | ours pp VL/MoE | ours tg VL/MoE | llama-bench pp VL/MoE | llama-bench tg VL/MoE |",
          "|---|---|---|---|---|"]
    for q, row in R["types"].items():
        v, e = row["vl"], row["moe"]
        L.append(f"| {q} | {_f(v['ours_pp'] / e['ours_pp'], 3)} | {_f(v['ours_tg'] / e['ours_tg'], 3)} "
                 f"| {_f(v['lb_pp'] / e['lb_pp'], 3)} | {_f(v['lb_tg'] / e['lb_tg'], 3)} |")
    cb = R.get("compute_buffers", {})
    if cb:
        L += ["", "Compute buffers (llama-completion's log, n_ctx 4096 default, MiB): "
              + "; ".join(f"{k}: {v}" for k, v in cb.items()), ""]

    L += ["## build_moe_ffn: patched vs unpatched llama.cpp (llama-bench, ernie4_5-moe file)", "",
          "| type | patched pp512 | unpatched pp512 | ratio | patched tg128 | unpatched tg128 | ratio "
          "| noise pp (round-to-round) | noise tg |", "|---|---|---|---|---|---|---|---|---|"]
    for q, row in R["types"].items():
        u = row["unpatched"]
        L.append(f"| {q} | {_f(u['p_pp'])} | {_f(u['u_pp'])} | {_f(u['p_pp'] / u['u_pp'], 3)} | {_f(u['p_tg'])} "
                 f"| {_f(u['u_tg'])} | {_f(u['p_tg'] / u['u_tg'], 3)} | {_f(u['noise_pp'] * 100)}% "
                 f"| {_f(u['noise_tg'] * 100)}% |")
    L += ["", "noise = the largest relative spread between rounds of the same binary on the same file.", ""]

    tf = R.get("transformers")
    if tf:
        L += ["## Against transformers (same threads)", "",
              "| | pp512 tok/s | tg128 tok/s | image 448x448 ms | image 896x896 ms |", "|---|---|---|---|---|"]
        for dt, d in tf.items():
            L.append(f"| transformers {dt} | {_f(d.get('pp512_tok_s'))} | {_f(d.get('tg128_tok_s'))} "
                     f"| {_f(d.get('image_448_ms'))} | {_f(d.get('image_896_ms'))} |")
        for q, row in R["types"].items():
            v = row["vl"]
            L.append(f"| ours {q} | {_f(v['ours_pp'])} | {_f(v['ours_tg'])} | {_f(v.get('image_448'))} "
                     f"| {_f(v.get('image_896'))} |")
        bf = tf.get("bfloat16")
        q8 = R["types"].get("Q8_0", {}).get("vl")
        f16 = R["types"].get("F16", {}).get("vl", {})
        if bf and q8:
            images = ""
            if q8.get("image_448"):
                images = (f", image encode (448x448) {bf['image_448_ms'] / q8['image_448']:.2f}x with the "
                          f"{q8.get('mmproj_type', 'F16')} mmproj")
                if f16.get("image_448") and q8.get("mmproj_type") != "F16":
                    images += f" ({bf['image_448_ms'] / f16['image_448']:.2f}x with the F16 mmproj, F16 row)"
            L += ["", f"At Q8_0 against transformers bfloat16: generation {q8['ours_tg'] / bf['tg128_tok_s']:.2f}x, "
                  f"prompt processing {q8['ours_pp'] / bf['pp512_tok_s']:.2f}x{images}."]
        L.append("")

    L += ["## Against the memory bus (generation)", "",
          "| model | type | weight MB read per token | ours tg128 | GB/s used | read bandwidth GB/s (same run) "
          "| share | llama-bench share |", "|---|---|---|---|---|---|---|---|"]
    for q, row in R["types"].items():
        for kind in ("vl", "moe"):
            k = row[kind]
            used = k["bytes_per_token"] * k["ours_tg"] / 1e9
            L.append(f"| {kind} | {q} | {k['bytes_per_token'] / 1e6:.0f} | {_f(k['ours_tg'])} | {used:.1f} "
                     f"| {_f(k['bandwidth'])} | {used / k['bandwidth'] * 100:.0f}% "
                     f"| {k['bytes_per_token'] * k['lb_tg'] / 1e9 / k['bandwidth'] * 100:.0f}% |")
    L += ["", "Bytes per token: every weight a text token reads (routed experts at top-k/n, one embedding row "
          "unless tied, no vision experts); bandwidth: `pyllama_ernie.bench.BandwidthProbe` with the same "
          "threads, probed before each generation repetition.", ""]

    L += ["## Images and memory (ours)", "", "| type | mmproj | image 448x448 ms | image 896x896 ms "
          "| TTFT image+question ms | peak RSS MiB (VL + mmproj) | peak RSS MiB (MoE) |",
          "|---|---|---|---|---|---|---|"]
    for q, row in R["types"].items():
        v, e = row["vl"], row["moe"]
        L.append(f"| {q} | {v.get('mmproj_type', 'F16')} | {_f(v.get('image_448'))} | {_f(v.get('image_896'))} "
                 f"| {_f(v.get('ttft'))} | {_f(v.get('rss'), 0)} | {_f(e.get('rss'), 0)} |")
    L.append("")
    extra = R.get("notes")
    if extra:
        L += ["## Notes", "", extra, ""]
    text = "\n".join(L)
    path.write_text(text)
    return text


# --- the run ----------------------------------------------------------------------

def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-r", "--repetitions", type=int, default=3, help="per tool, file and round (default 3)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--models", type=Path, default=HERE / "models")
    ap.add_argument("--tools", type=Path, default=ROOT / "build" / "bench-tools")
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--notes", type=Path, default=None, help="a Markdown file appended to the report")
    args = ap.parse_args(argv)
    types = [t.strip().upper() for t in args.types.split(",") if t.strip()]

    from build_tools import build_tools
    from host_time import measure as measure_host
    from host_time import summary as summary_host
    from make_models import make_models

    log("models")
    models = make_models(args.models, types=types)
    log("tools")
    tools = build_tools(args.tools)
    lb_p, lb_u = tools["patched"]["llama-bench"], tools["unpatched"]["llama-bench"]
    comp = tools["patched"]["llama-completion"]
    th, reps = args.threads, args.repetitions
    vl, moe = models["vl"], models["moe"]
    # each VL file encodes images with the projector at its own type where there is one (Q8_0), else F16
    mmproj = {q: Path(vl.get(f"mmproj_{q}", vl["mmproj"])) for q in types}
    mmproj_type = {q: q if f"mmproj_{q}" in vl else "F16" for q in types}

    raw: Dict[str, Any] = {q: {"ours_vl": [], "ours_moe": [], "lb_vl": [], "lb_moe": [], "lbu_moe": [],
                               "comp_vl": [], "comp_moe": []} for q in types}
    for rnd in range(args.rounds):
        for q in types:
            log(f"round {rnd + 1}/{args.rounds} {q}: ours VL")
            raw[q]["ours_vl"].append(ours(Path(vl[q]), th, reps, mmproj[q]))
            log(f"round {rnd + 1}/{args.rounds} {q}: llama-bench VL")
            raw[q]["lb_vl"].append(llama_bench(lb_p, Path(vl[q]), th, reps))
            log(f"round {rnd + 1}/{args.rounds} {q}: llama-completion VL")
            raw[q]["comp_vl"].append(llama_completion(comp, Path(vl[q]), th))
            log(f"round {rnd + 1}/{args.rounds} {q}: ours MoE")
            raw[q]["ours_moe"].append(ours(Path(moe[q]), th, reps))
            log(f"round {rnd + 1}/{args.rounds} {q}: llama-bench MoE (patched, unpatched)")
            raw[q]["lb_moe"].append(llama_bench(lb_p, Path(moe[q]), th, reps))
            raw[q]["lbu_moe"].append(llama_bench(lb_u, Path(moe[q]), th, reps))
            raw[q]["comp_moe"].append(llama_completion(comp, Path(moe[q]), th))

    host: Dict[str, Any] = {}
    for q in types:
        log(f"host time per token {q}: ours, a bare decode+argmax loop, decode only")
        host[q] = summary_host(measure_host(str(vl[q]), th, 128, 2 * reps))

    tf = None
    if not args.skip_transformers:
        from vs_transformers import measure

        tf = {}
        for dt in ("bfloat16", "float32"):
            log(f"transformers {dt}")
            tf[dt] = _flatten_tf(measure(vl["hf"], dt, th, reps))

    R: Dict[str, Any] = {"machine": _machine(), "threads": th, "reps": reps, "rounds": args.rounds,
                         "types": {}, "transformers": tf, "raw": raw, "host": host}
    for q in types:
        r = raw[q]
        row: Dict[str, Any] = {}
        for kind in ("vl", "moe"):
            runs = r[f"ours_{kind}"]
            k = {
                "ours_pp": statistics.median(v for x in runs for v in x["pp"]["values"]),
                "ours_tg": statistics.median(v for x in runs for v in x["tg"]["values"]),
                "host_us": statistics.median(v for x in runs for v in x["host_us_per_token"]["values"]),
                "bandwidth": statistics.median(v for x in runs for v in x["bandwidth_gbs"]["values"]),
                "bytes_per_token": runs[0]["weight_bytes_per_token"],
                "rss": max(x["peak_rss_mb"] or 0 for x in runs),
                "lb_pp": statistics.median(v for x in r[f"lb_{kind}"] for v in x["pp"]),
                "lb_tg": statistics.median(v for x in r[f"lb_{kind}"] for v in x["tg"]),
                "completion_tg": statistics.median(x["tg"] for x in r[f"comp_{kind}"]),
            }
            if runs[0].get("image_ms"):
                ims = list(runs[0]["image_ms"])
                k["image_448"] = statistics.median(v for x in runs for v in x["image_ms"][ims[0]]["values"])
                if len(ims) > 1:
                    k["image_896"] = statistics.median(v for x in runs for v in x["image_ms"][ims[1]]["values"])
                k["ttft"] = statistics.median(v for x in runs for v in x["ttft_ms"]["values"])
                k["mmproj_type"] = mmproj_type[q]
            row[kind] = k
        p_pp = [statistics.median(x["pp"]) for x in r["lb_moe"]]
        p_tg = [statistics.median(x["tg"]) for x in r["lb_moe"]]
        u_pp = [statistics.median(x["pp"]) for x in r["lbu_moe"]]
        u_tg = [statistics.median(x["tg"]) for x in r["lbu_moe"]]
        spread = lambda xs: (max(xs) - min(xs)) / statistics.median(xs)  # noqa: E731
        row["unpatched"] = {"p_pp": statistics.median(v for x in r["lb_moe"] for v in x["pp"]),
                            "p_tg": statistics.median(v for x in r["lb_moe"] for v in x["tg"]),
                            "u_pp": statistics.median(v for x in r["lbu_moe"] for v in x["pp"]),
                            "u_tg": statistics.median(v for x in r["lbu_moe"] for v in x["tg"]),
                            "noise_pp": max(spread(p_pp), spread(u_pp)), "noise_tg": max(spread(p_tg), spread(u_tg))}
        R["types"][q] = row
    cb = {}
    for kind in ("vl", "moe"):
        x = raw[types[0]][f"comp_{kind}"][0]["compute_buffers_mib"]
        cb[f"{kind} {types[0]}"] = ", ".join(f"{dev} {mib:.2f}" for dev, mib in x.items())
    R["compute_buffers"] = cb
    if args.notes and args.notes.exists():
        R["notes"] = args.notes.read_text().strip()
    (args.out.parent / "results.json").write_text(json.dumps(R, indent=1, default=str))
    print(write_report(R, args.out))
    return 0


def _flatten_tf(d: Dict[str, Any]) -> Dict[str, Optional[float]]:
    """vs_transformers.measure's figures as medians."""
    out: Dict[str, Optional[float]] = {}
    for k, v in d.items():
        if isinstance(v, dict) and "median" in v:
            out[k] = float(v["median"])
        elif isinstance(v, (int, float)):
            out[k] = float(v)
    return out


if __name__ == "__main__":
    sys.exit(main())
