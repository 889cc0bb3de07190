"""pyllama_ernie.bench and the ``bench`` CLI: the figures are computed from the right things.

Speeds are never asserted (these machines are noisy); what is asserted is what
the numbers are made of: repetitions, the bytes a token reads, the bandwidth
probe's kernel, the CLI's JSON.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pyllama_ernie
from pyllama_ernie import bench
from pyllama_ernie._lib import ffi, lib
from pyllama_ernie.gguf_check import validate_gguf

# `python -m` runs in the folder holding the imported package (not the repository root, whose
# source tree would shadow the installed copy)
PKG_PARENT = Path(pyllama_ernie.__file__).resolve().parent.parent


def test_stat_of_values():
    st = bench.Stat.of([3.0, 1.0, 2.0, 10.0])
    assert (st.median, st.min, st.max) == (2.5, 1.0, 10.0)
    assert st.values == [3.0, 1.0, 2.0, 10.0]
    with pytest.raises(ValueError):
        bench.Stat.of([])


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000, 4099])
def test_read_sum_kernel_sums_every_word(n):
    a = np.random.default_rng(n).integers(0, 1 << 40, size=max(n, 1), dtype=np.uint64)[:n]
    p = ffi.cast("uint64_t *", ffi.from_buffer(a)) if n else ffi.NULL
    assert lib.pyllama_ernie_read_sum(p, n) == int(a.sum(dtype=np.uint64))


def test_bandwidth_probe_reports_positive_rate():
    probe = bench.BandwidthProbe(size_mb=8)
    rates = [probe.measure(n, passes=2) for n in (1, 2)]
    assert all(math.isfinite(r) and r > 0 for r in rates)
    probe.buffer[5] = 2  # the probe checks what it read
    with pytest.raises(RuntimeError):
        probe.measure(1, passes=1)
    with pytest.raises(ValueError):
        probe.measure(0)


def _expected_bytes(path):
    """Independent count: full tensors, minus what a text token does not read."""
    s = validate_gguf(path)
    arch = s.architecture
    n_exp = int(s.get(f"{arch}.expert_count", 0) or 0)
    n_used = int(np.max(s.get(f"{arch}.expert_used_count", 0) or 0))
    total = sum(t.nbytes for t in s.tensors.values())
    skip = 0
    for name, t in s.tensors.items():
        base = name.split(".")[-2] if name.startswith("blk.") else name
        if base.endswith("_vl"):
            skip += t.nbytes
        elif base in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            skip += t.nbytes - t.nbytes * n_used // n_exp
    emb = s.tensors["token_embd.weight"]
    if "output.weight" in s.tensors:
        skip += emb.nbytes - emb.nbytes // emb.shape[1]
    return total - skip, total, s


@pytest.mark.parametrize("arch", ["ernie4_5", "ernie4_5-moe", "ernie4_5-vl-moe"])
def test_active_weight_bytes(tiny_gguf, arch):
    path = tiny_gguf(arch)
    got = bench.active_weight_bytes(path)
    want, total, s = _expected_bytes(path)
    assert got["total"] == total
    assert got["per_token"] == want
    assert got["per_token"] == got["dense"] + got["experts"] + got["embedding"]
    if arch != "ernie4_5":
        assert 0 < got["experts"] < sum(t.nbytes for n, t in s.tensors.items() if "_exps." in n)
    if arch == "ernie4_5-vl-moe":
        assert any(n.endswith("_exps_vl.weight") for n in s.tensors)


def test_synthetic_image_shape_and_determinism():
    a = bench.synthetic_image(64, 32, seed=3)
    assert a.shape == (32, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, bench.synthetic_image(64, 32, seed=3))
    assert not np.array_equal(a, bench.synthetic_image(64, 32, seed=4))
    assert a.std() > 30  # a picture, not a flat colour


def test_run_bench_text_model(tiny_gguf):
    res = bench.run_bench(tiny_gguf("ernie4_5-moe"), n_threads=1, repetitions=2, n_prompt=64, n_gen=16)
    for st in (res.pp, res.tg, res.host_us_per_token, res.bandwidth_gbs):
        assert len(st.values) == 2 and st.min <= st.median <= st.max
    assert res.pp.min > 0 and res.tg.min > 0 and res.bandwidth_gbs.min > 0
    # host time is what the decode timer did not see: positive, and far below a token's time
    assert 0 < res.host_us_per_token.median < 1e6 / res.tg.median
    assert res.weight_bytes_per_token == bench.active_weight_bytes(res.model)["per_token"]
    assert res.bus_fraction == pytest.approx(res.weight_bytes_per_token * res.tg.median
                                             / (res.bandwidth_gbs.median * 1e9))
    assert res.image_ms == {} and res.ttft_ms is None
    assert res.peak_rss_mb is None or res.peak_rss_mb > 10
    text = res.format()
    assert "pp64" in text and "tg16" in text and "bus use" in text


def test_run_bench_vision(tiny_gguf, tmp_path):
    from pyllama_ernie.convert import synthetic

    mmproj = synthetic.write_tiny_mmproj(tmp_path / "mmproj.gguf", n_embd_text=64)
    images = [bench.synthetic_image(56, 56), bench.synthetic_image(112, 84)]
    res = bench.run_bench(tiny_gguf("ernie4_5-vl-moe"), mmproj_path=mmproj, images=images, n_threads=1,
                          repetitions=2, n_prompt=32, n_gen=4)
    assert list(res.image_ms) == ["56x56", "112x84"]
    assert all(len(st.values) == 2 and st.min > 0 for st in res.image_ms.values())
    assert res.ttft_ms is not None and res.ttft_ms.min > 0
    with pytest.raises(ValueError, match="projector"):
        bench.run_bench(tiny_gguf("ernie4_5-vl-moe"), images=images, repetitions=1)


def test_cli_bench_json(tiny_gguf):
    out = subprocess.run([sys.executable, "-m", "pyllama_ernie", "bench", str(tiny_gguf("ernie4_5-moe")),
                          "-r", "1", "-p", "32", "-n", "8", "-t", "1", "--json", "-q"],
                         capture_output=True, text=True, timeout=300, cwd=PKG_PARENT)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["n_prompt"] == 32 and d["n_gen"] == 8 and d["repetitions"] == 1
    assert d["tg"]["median"] > 0 and d["bandwidth_gbs"]["median"] > 0 and 0 < d["bus_fraction"]
    assert d["machine"]["threads"] == 1


def test_cli_bench_image_needs_mmproj(tiny_gguf, tmp_path):
    out = subprocess.run([sys.executable, "-m", "pyllama_ernie", "bench", str(tiny_gguf("ernie4_5-moe")),
                          "--image", str(tmp_path / "x.png")], capture_output=True, text=True, timeout=120,
                         cwd=PKG_PARENT)
    assert out.returncode == 1
    assert "--mmproj" in out.stderr
