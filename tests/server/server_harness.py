"""Shared pieces of the server tests: a ``python -m pyllama_ernie serve`` subprocess, images, metrics.

Imported by the ``test_server_*.py`` modules and by the fixtures in this folder's conftest.py. The
server runs from wherever the tests import ``pyllama_ernie`` (the installed package in CI,
the source tree locally): ``sys.executable -m pyllama_ernie`` with that folder first on
``PYTHONPATH`` and as the working directory.
"""

from __future__ import annotations

import base64
import io
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

pytest.importorskip("pyllama_ernie._lib", reason="pyllama_ernie is not built (pip install .)")
pytest.importorskip("starlette", reason="the server extra is not installed (pip install '.[server]')")
httpx = pytest.importorskip("httpx", reason="the server extra is not installed (pip install '.[server]')")

import pyllama_ernie

#: the folder holding the imported package: the server subprocess runs from there
ROOT = Path(pyllama_ernie.__file__).resolve().parent.parent
N_CTX = 512
#: a context so long that the tiny model's greedy answer runs for many seconds unless cancelled
LONG_CTX = 16384
LONG_TOKENS = 16000


def server_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8",
                PYTHONPATH=str(ROOT) + (os.pathsep + path if path else ""))


class ServerProcess:
    """``python -m pyllama_ernie serve ARGS --port 0``; waits for its "listening on URL" line."""

    def __init__(self, *args: Any, timeout: float = 120) -> None:
        cmd = [sys.executable, "-m", "pyllama_ernie", "serve", *map(str, args)]
        if "--port" not in cmd:
            cmd += ["--port", "0"]
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=server_env(),
                                  cwd=ROOT)
        self.lines: queue.Queue[str] = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        threading.Thread(target=self._pump, args=(self.p.stdout, self.stdout, self.lines), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.p.stderr, self.stderr, None), daemon=True).start()
        self.url = self._wait_ready(timeout)
        self.base_url = self.url + "/v1"

    @staticmethod
    def _pump(stream: Any, into: list[str], lines: queue.Queue[str] | None) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace")
            into.append(line)
            if lines is not None:
                lines.put(line)

    def _wait_ready(self, timeout: float) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                if self.p.poll() is not None:
                    time.sleep(0.2)  # let the pumps collect the last words
                    raise AssertionError(f"the server exited with {self.p.returncode}: {''.join(self.stderr)}")
                continue
            m = re.match(r"listening on (http://\S+) ", line)
            if m:
                return m.group(1)
        self.p.kill()
        raise AssertionError(f"no 'listening on' line after {timeout}s: {''.join(self.stderr)}")

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self, timeout: float = 60) -> int:
        """SIGINT (a graceful shutdown), then the exit code; killed if it does not end."""
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGINT)
        try:
            return self.p.wait(timeout)
        finally:
            if self.p.poll() is None:
                self.p.kill()
                self.p.wait()

    def metrics(self, headers: dict[str, str] | None = None) -> dict[str, float]:
        """``/metrics`` as {"name{labels}": value}."""
        r = httpx.get(self.url + "/metrics", headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        return parse_metrics(r.text)

    def wait_metric(self, name: str, ok: Callable[[float], bool], timeout: float = 120,
                    headers: dict[str, str] | None = None) -> dict[str, float]:
        """Poll /metrics until ``ok(value of name)``; the metrics then (fails after ``timeout``)."""
        end = time.monotonic() + timeout
        while True:
            m = self.metrics(headers)
            if ok(m.get(name, 0.0)):
                return m
            if time.monotonic() > end:
                raise AssertionError(f"{name} stayed at {m.get(name)} for {timeout}s")
            time.sleep(0.05)


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def png_bytes(seed: int = 0, h: int = 56, w: int = 84) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def image_message(url: str, text: str = "What is in the picture?") -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": text}]}


def new_metadata(src: Path, dst: Path, *args: str) -> Path:
    """A copy of ``src`` with changed metadata (gguf-py's gguf_new_metadata script)."""
    r = subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(src), str(dst), *args,
                        "--force"], check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return dst
