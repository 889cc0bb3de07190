"""``python -m pyllama_ernie`` end to end, in subprocesses (exit codes and output)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pyllama_ernie._lib", reason="pyllama_ernie is not built (pip install .)")

import pyllama_ernie  # noqa: E402
from pyllama_ernie.convert.synthetic import write_tiny_gguf  # noqa: E402

# the subprocesses run in the folder holding the imported package: `python -m` puts the working
# directory first on sys.path, and the repository root would give them the source tree instead
PKG_PARENT = Path(pyllama_ernie.__file__).resolve().parent.parent


def cli(*args: str, input: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "pyllama_ernie", *args], capture_output=True, text=True,
                          input=input, timeout=timeout, env=env, cwd=PKG_PARENT)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_gguf("ernie4_5-moe", tmp_path_factory.mktemp("cli") / "tiny.gguf", seed=2)


@pytest.mark.slow
def test_selfcheck_passes():
    r = cli("selfcheck")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert any(l.startswith("PASS") and "ernie4_5-moe" in l for l in lines)
    assert any(l.startswith("PASS") and "ernie4_5 " in l for l in lines)
    assert "selfcheck passed" in r.stdout


def test_run_streams_greedy_text(tiny):
    import pyllama_ernie as pe

    with pe.Model(tiny, n_ctx=256) as m:
        expected = m.generate("Hello world", max_tokens=12, temperature=0).text
    r = cli("run", str(tiny), "Hello world", "-n", "12", "--temperature", "0", "-c", "256")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"
    assert "llama_model_loader" not in r.stderr  # quiet by default


def test_run_reads_stdin(tiny):
    r = cli("run", str(tiny), "-n", "3", "--temperature", "0", "-c", "128", input="Hello")
    assert r.returncode == 0, r.stderr


def test_info(tiny):
    r = cli("info", str(tiny), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["architecture"] == "ernie4_5-moe"
    assert info["vocab_size"] > 0
    assert info["tensors"] > 0


def test_quantize_and_run_quantized(tiny, tmp_path):
    import gguf

    out = tmp_path / "q8.gguf"
    r = cli("quantize", str(tiny), str(out), "Q8_0")
    assert r.returncode == 0, r.stderr
    reader = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert "Q8_0" in types.values()
    # routers and norms stay F32
    assert all(v == "F32" for k, v in types.items() if "ffn_gate_inp" in k or k.endswith("norm.weight"))
    r = cli("run", str(out), "Hello", "-n", "4", "--temperature", "0", "-c", "128")
    assert r.returncode == 0, r.stderr


def test_runtime_errors_exit_1_with_one_line(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"definitely not gguf")
    for args in (("run", str(bad), "hi"), ("info", str(bad)), ("run", str(tmp_path / "missing.gguf"), "hi"),
                 ("quantize", str(bad), str(tmp_path / "o.gguf"), "Q8_0")):
        r = cli(*args)
        assert r.returncode == 1, (args, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
        assert "Traceback" not in r.stderr


def test_usage_errors_exit_2(tiny):
    assert cli().returncode == 2
    assert cli("frobnicate").returncode == 2
    assert cli("run").returncode == 2
    assert cli("quantize", str(tiny), "x.gguf", "Q9_X").returncode == 2
    r = cli("run", "--help")
    assert r.returncode == 0 and "--max-tokens" in r.stdout


def test_convert_usage_error_exit_2():
    r = cli("convert")
    assert r.returncode == 2
