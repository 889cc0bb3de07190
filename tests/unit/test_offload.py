"""Offload controls: checked before llama.cpp, and the expert override reaches llama.cpp's loader.

This machine has no GPU; what a GPU run does with them is checked by benchmarks/gpu_check.sh.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pyllama_ernie as pe
from pyllama_ernie import offload
from pyllama_ernie._lib import set_log_level


@pytest.mark.parametrize("kwargs, match", [
    (dict(split_mode="diagonal"), "split_mode"),
    (dict(cpu_moe=-1), "cpu_moe"),
    (dict(cpu_moe=1.5), "cpu_moe"),
    (dict(main_gpu=-1), "main_gpu"),
    (dict(tensor_split=[1, -1]), "tensor_split"),
    (dict(tensor_split=[0, 0]), "tensor_split"),
    (dict(tensor_split=[float("nan")]), "tensor_split"),
    (dict(tensor_split=[1.0] * 4096), "tensor_split"),
])
def test_bad_settings_raise_before_loading(tiny_gguf, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pe.Model(tiny_gguf("ernie4_5-moe"), n_ctx=64, **kwargs)


def test_expert_patterns_select_routed_experts_only():
    every = offload.expert_patterns(-1)
    for name in ("blk.1.ffn_up_exps.weight", "blk.7.ffn_down_exps.weight", "blk.3.ffn_gate_exps_vl.weight"):
        assert offload.matches(every, name)
    for name in ("blk.1.ffn_up_shexp.weight", "blk.1.ffn_gate_inp.weight", "blk.0.ffn_up.weight",
                 "blk.1.exp_probs_b.bias", "blk.1.ffn_gate_inp_vl.weight", "token_embd.weight"):
        assert not offload.matches(every, name)
    first2 = offload.expert_patterns(2)
    assert offload.matches(first2, "blk.1.ffn_up_exps.weight")
    assert offload.matches(first2, "blk.0.ffn_down_exps_vl.weight")
    assert not offload.matches(first2, "blk.2.ffn_up_exps.weight")
    assert not offload.matches(first2, "blk.10.ffn_up_exps.weight")  # blk.1 is not a prefix match
    assert offload.expert_patterns(0) == []


@pytest.mark.gpu  # declared skip: on a machine with a GPU (tests/gpu/test_gpu.py covers that)
def test_no_gpu_warns_once_and_runs_on_cpu(tiny_gguf, caplog):
    if offload.gpu_devices():
        pytest.skip("a GPU is present")
    path = tiny_gguf("ernie4_5-moe")
    with pe.Model(path, n_ctx=64, kv_cache_type="f32") as m:
        ref = m.logits("hello world")
    with caplog.at_level(logging.WARNING, logger="pyllama_ernie"):
        with pe.Model(path, n_ctx=64, kv_cache_type="f32", n_gpu_layers=-1, cpu_moe=True, main_gpu=0,
                      split_mode="row") as m:
            got = m.logits("hello world")
            assert not m.offload.uses_gpu
    msgs = [r.getMessage() for r in caplog.records if "no GPU found" in r.getMessage()]
    assert len(msgs) == 1 and "running on the CPU" in msgs[0]
    np.testing.assert_array_equal(got, ref)


def test_no_gpu_reason_names_the_module_that_did_not_load(tmp_path, monkeypatch):
    """A GPU build (backend modules) on a machine without the driver: the warning says why."""
    from pyllama_ernie import _build_info, _lib

    (tmp_path / "libggml-cuda.so").write_bytes(b"not a shared library")
    monkeypatch.setattr(_lib, "PACKAGE_DIR", str(tmp_path))
    monkeypatch.setattr(_lib, "backend_modules", lambda: True)
    monkeypatch.setattr(_build_info, "GGML_CUDA", True)
    why = offload.no_gpu_reason()
    assert why.startswith("this build has CUDA, but its backend did not load: ") and "libggml-cuda.so" in why
    (tmp_path / "libggml-cuda.so").unlink()  # no module file: the build loaded it, no device answered
    assert offload.no_gpu_reason() == "this build has CUDA, but no device was found"
    monkeypatch.setattr(_build_info, "GGML_CUDA", False)
    assert offload.no_gpu_reason() == "this build's backends: CPU"


def test_expert_override_reaches_the_loader(tiny_gguf, caplog, monkeypatch):
    """With a GPU the overrides are passed; pretend one is used to check what llama.cpp does with them."""
    monkeypatch.setattr(offload.OffloadPlan, "uses_gpu", property(lambda self: True))
    set_log_level("DEBUG")
    try:
        with caplog.at_level(logging.DEBUG, logger="pyllama_ernie"):
            with pe.Model(tiny_gguf("ernie4_5-vl-moe"), n_ctx=64, cpu_moe=True) as m:
                assert m.generate("hi", max_tokens=2, temperature=0).completion_tokens == 2
    finally:
        set_log_level("WARNING")
    moved = {r.getMessage().split()[1] for r in caplog.records if "buffer type overridden to CPU" in r.getMessage()}
    assert moved, "llama.cpp applied no override"
    assert all(offload.matches(offload.expert_patterns(-1), n) for n in moved)
    assert any(n.endswith("_exps_vl.weight") for n in moved) and any(n.endswith("_exps.weight") for n in moved)
    assert not any("shexp" in n for n in moved)


def test_cli_device_options(tiny_gguf):
    path = str(tiny_gguf("ernie4_5-moe"))
    run = lambda *a: subprocess.run([sys.executable, "-m", "pyllama_ernie", "run", path, "hi", "-n", "2",  # noqa: E731
                                     "--temperature", "0", *a], capture_output=True, text=True, timeout=120,
                                    cwd=Path(pe.__file__).resolve().parent.parent)  # not the repository root
    ok = run("-ngl", "-1", "--cpu-moe", "--tensor-split", "1", "--split-mode", "layer", "--no-flash-attn",
             "--no-mmproj-offload")
    assert ok.returncode == 0, ok.stderr
    if not offload.gpu_devices():
        assert "no GPU found" in ok.stderr
    both = run("--cpu-moe", "--n-cpu-moe", "2")
    assert both.returncode == 1 and "exclude each other" in both.stderr
    bad = run("--tensor-split", "a,b")
    assert bad.returncode == 2 and "comma-separated" in bad.stderr
