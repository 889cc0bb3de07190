"""``python -m pyllama_ernie serve``: options, usage and start-up errors, the exposure warning, Ctrl-C."""

from __future__ import annotations

import socket
import subprocess
import sys
from typing import Any

import pytest
from server_harness import ROOT, ServerProcess, server_env

httpx = pytest.importorskip("httpx", reason="the server extra is not installed (pip install '.[server]')")


def serve(*args: Any, code: str | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pyllama_ernie", "serve", *map(str, args)]
    if code is not None:  # run the CLI after some set-up code
        cmd = [sys.executable, "-c", (f"{code}\nimport sys\nfrom pyllama_ernie.cli import main\n"
                                      f"sys.exit(main({['serve', *map(str, args)]!r}))")]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, encoding="utf-8", timeout=timeout,
                          env=server_env(), cwd=ROOT)


def assert_one_line_error(r: subprocess.CompletedProcess, says: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert says in r.stderr, r.stderr


def test_help_lists_the_options():
    r = serve("--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: python -m pyllama_ernie serve"), r.stderr
    for opt in ("--mmproj", "--host", "--port", "--parallel", "--api-key", "--model-alias", "--ctx-size",
                "--max-queue", "--allow-remote-media", "--allow-local-media", "--cors-origin", "--max-body-mb",
                "--n-gpu-layers", "--flash-attn"):
        assert opt in r.stdout, opt
    top = subprocess.run([sys.executable, "-m", "pyllama_ernie", "--help"], check=False, capture_output=True,
                         text=True, env=server_env(), cwd=ROOT)
    assert "serve" in top.stdout


def test_usage_errors_exit_2(text_model):
    for args in ((), (text_model, "--port", "http"), (text_model, "--parallel", "two")):
        r = serve(*args)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr and r.stderr.splitlines()[-1].startswith("python -m pyllama_ernie serve:")


def test_start_up_errors_exit_1_one_line(text_model, work):
    assert_one_line_error(serve(work / "missing.gguf"), "missing.gguf")
    assert_one_line_error(serve(text_model, "--allow-local-media", work / "no-such-dir"), "--allow-local-media")
    assert_one_line_error(serve(text_model, "--port", 70000), "--port")
    assert_one_line_error(serve(text_model, "--parallel", 0, "-c", 128), "--parallel")
    assert_one_line_error(serve(text_model, "--max-queue", -1, "-c", 128), "--max-queue")
    with socket.socket() as taken:  # a port someone else listens on
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert_one_line_error(serve(text_model, "-c", 128, "--port", taken.getsockname()[1]), "error: ")
    # without the server extra: a one-line hint, not a traceback
    r = serve(text_model, code="import sys; sys.modules['starlette'] = None")
    assert_one_line_error(r, "pyllama_ernie[server]")


def test_ctrl_c_stops_cleanly(text_model):
    s = ServerProcess(text_model, "-c", 128)
    assert s.url.startswith("http://127.0.0.1:")  # loopback by default
    assert httpx.get(s.url + "/health", timeout=30).status_code == 200
    assert s.stop() == 0
    stderr = "".join(s.stderr)
    assert "Traceback" not in stderr and "warning" not in stderr
    assert stderr.rstrip().endswith("stopped"), stderr


@pytest.mark.parametrize("key", [None, "k"])
def test_other_hosts_without_a_key_are_warned_about(text_model, key):
    args = ["-c", 128, "--host", "0.0.0.0"] + (["--api-key", key] if key else [])
    s = ServerProcess(text_model, *args)
    try:
        port = int(s.url.rsplit(":", 1)[1])
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code == 200
    finally:
        assert s.stop() == 0
    warned = "without an API key" in "".join(s.stderr)
    assert warned == (key is None), s.stderr
