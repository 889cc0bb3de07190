"""Serving benchmark: our OpenAI-compatible server against llama.cpp's ``llama-server``, in one run.

    python benchmarks/serve_bench.py [--servers ours,llama] [-c 1,2,4,8] [--models moe,vl]
                                     [--cases moe,vl,vl-image] [--rounds 2] [-t 2] [--anchor]
    python benchmarks/serve_bench.py --engine-only [...]      # the Python API, no HTTP

What it measures. For each model, each concurrency c and each server, the server is started
with c parallel slots: ours, ``python -m pyllama_ernie serve MODEL --parallel c --ctx-size W``
(W is each request's window); llama-server, built from the same patched tree by
``python benchmarks/build_tools.py --which patched --targets llama-server,llama-batched-bench``,
``-np c -c W*c --kv-unified --kv-unified-per-slot W`` (one KV buffer shared by the slots, each
slot capped at W: the layout of ours' default ``kv_unified=True``; ``--llama-kv split`` gives
llama-server its own default with an explicit -np, ``--no-kv-unified``, where each slot gets
-c / -np). Both get the same threads (``-t``), F16 KV cache and automatic flash attention (both
defaults). After a warm-up (c concurrent 4-token requests), R requests (``--requests``, default
max(4, 2c)) are sent by c concurrent clients (httpx, async, SSE streaming), every request with
its own prompt (no prompt-cache or image-cache hits on either side):

* ``moe``: POST /v1/completions on the MoE model, a prompt of 128 token ids (``--prompt-tokens``)
  drawn at random from the model's ordinary vocabulary entries;
* ``vl``: the same on the VL model (with its mmproj loaded), as text that the model's tokenizer
  makes into exactly 128 tokens (llama-server with an mmproj refuses token-id prompts);
* ``vl-image``: POST /v1/chat/completions on the VL model, one random 224x224 PNG (64 image
  tokens) as a data: URI and a short text per request (about 140 prompt tokens);

with ``max_tokens`` 64, ``temperature`` 0, ``stream_options.include_usage``, and llama.cpp's
``ignore_eos`` where the server takes it (probed per endpoint). The
models (``--vocab text``, the default) are copies of the bench files whose output rows of
non-text tokens are zero (``text_variant``): with random weights greedy decoding otherwise picks
empty ``[PADn]`` tokens 9 times in 10, which stream no text, and EOS; in the copy every token is
text and EOS never comes, at the same cost per token. completion_tokens (from usage) are checked
to be 64; mismatches are reported. Per request: time to first token (TTFT: the first SSE chunk
carrying text), total time, completion tokens. Per batch: aggregate generation throughput =
completion tokens of the R requests / wall time of the batch (first send to last byte, prompts
included), TTFT p50/p95, and the median per-request decode rate ((tokens - 1) / (total - TTFT)).

The servers alternate: for each c, each round starts both servers in turn (the order flips
between rounds and concurrencies), so both see the same machine state (these VMs drift: see
/work/shared/HAZARDS.md, 4). Other processes' CPU use is measured over each batch (/proc/stat
minus our processes): a batch is measured only after the machine has been quiet for a second
(waiting up to ``--quiet-wait`` s), and batches during which others used more than
``--foreign-limit`` of the CPUs are left out of the medians (on 2 cores another busy process
slows llama.cpp's spinning threads many times over). ``--anchor`` also runs llama.cpp's
``llama-batched-bench`` (-npp 128 -ntg 64 -npl 1,2,4,8) on each text model in the same run: a
no-HTTP, no-scheduling reference for the decode rates.

``--engine-only`` (or ``engine`` among ``--servers``) measures the same batches without HTTP:
c threads calling ``pyllama_ernie.Model(path, n_parallel=c, n_ctx=W, ...).stream(prompt,
max_tokens=64, temperature=0, ignore_eos=True)`` (TTFT = first piece; ``--engine-generate``:
``Model.generate``, no TTFT), in a child process per c and case. The servers and the engine run
this working tree's ``pyllama_ernie`` (PYTHONPATH; ``--package installed`` for the installed one).

Output: a markdown table (``--md``, default benchmarks/serve_results.md) and the raw figures
(``--json``, default benchmarks/serve_results.json), with the CPU (lscpu's model name), the ggml
CPU variant the package loads (``python -m pyllama_ernie system-info``) and the instruction sets
llama-server was compiled for; the servers' logs go to build/serve-bench-logs/. Models:
``benchmarks/make_models.py``'s bench-shape files (``--type``, default Q8_0; the Q8_0 mmproj);
``--make-models`` writes missing ones, ``--build`` builds a missing llama-server. The default run
(2 servers x 4 concurrencies x 2 rounds, MoE + VL text + VL image, with ``--anchor``) took 11
minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import io
import json
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:  # the OpenAI client's transport; the project's venv has the "httpx2" fork
    import httpx
except ImportError:  # pragma: no cover - environment dependent
    import httpx2 as httpx  # type: ignore[no-redef]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

DEFAULT_MODELS_DIR = HERE / "models"
DEFAULT_WORK = ROOT / "build" / "bench-tools"
SERVERS = ("ours", "llama", "engine")
SERVER_NAMES = {"ours": "ours (pyllama_ernie serve)", "llama": "llama-server", "engine": "ours, Python API (no HTTP)"}
MODELS = ("moe", "vl")
CASES = {"moe": ("moe",), "vl": ("vl", "vl-image")}  # the cases each model's server runs
IMAGE_SIDE = 224  # 16x16 patches of 14 px, merged 2x2: 64 image tokens


def child_env() -> dict[str, str]:
    """The environment of every child (servers, engine, system-info): PYTHONPATH picks the package.

    ``--package tree`` (default) runs the working tree's ``pyllama_ernie`` (built in place), the
    one being developed; ``installed`` the copy installed in this interpreter's environment.
    """
    env = dict(os.environ)
    if PACKAGE_FROM == "tree":
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


PACKAGE_FROM = "tree"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- machine ------------------------------------------------------------------

def cpu_name() -> str:
    """lscpu's "Model name" (falls back to /proc/cpuinfo, then platform)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        m = re.search(r"^Model name:\s*(.+)$", out, re.M)
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    try:
        m = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_system_info() -> dict[str, Any]:
    """``python -m pyllama_ernie system-info`` (JSON), or {"error": ...}."""
    proc = subprocess.run([sys.executable, "-m", "pyllama_ernie", "system-info"], capture_output=True, text=True,
                          check=False, env=child_env(), cwd=ROOT)
    where = subprocess.run([sys.executable, "-c", "import pyllama_ernie; print(pyllama_ernie.__file__)"],
                           capture_output=True, text=True, check=False, env=child_env(), cwd="/").stdout.strip()
    try:
        return dict(json.loads(proc.stdout), package_file=where)
    except ValueError:
        return {"error": (proc.stderr or proc.stdout)[-500:]}


def llama_server_build(binary: Path) -> dict[str, Any]:
    """The ggml instruction-set options llama-server was configured with (build_tools' stamp)."""
    stamp = binary.parent.parent / ".pyllama_ernie_tools.json"
    try:
        args = json.loads(stamp.read_text())["cmake_args"]
    except (OSError, ValueError, KeyError):
        return {}
    on = [a[len("-DGGML_"):-len("=ON")] for a in args if a.startswith("-DGGML_") and a.endswith("=ON")]
    return {"ggml_on": on, "native": "-DGGML_NATIVE=ON" in args}


def machine_info(llama_bin: Path | None) -> dict[str, Any]:
    si = package_system_info()
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_name(), "cpus": os.cpu_count(), "platform": platform.platform(),
        "cpu_variant": si.get("cpu_variant"), "package_version": si.get("version"),
        "package_error": si.get("error"), "package_file": si.get("package_file"),
    }
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=False).stdout.strip()
        info["dirty"] = bool(dirty)
    except OSError:
        pass
    if llama_bin is not None:
        info["llama_server"] = str(llama_bin)
        info["llama_server_build"] = llama_server_build(llama_bin)
    return info


# --- other load on the machine ---------------------------------------------------

def _system_busy_s() -> float:
    """CPU seconds all CPUs spent busy since boot (/proc/stat), the exited processes' included."""
    f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in f[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s(extra: list[int]) -> float:
    """CPU seconds of this process, the given ones and their live descendants, plus exited children."""
    import resource

    import psutil

    pids = {os.getpid(), *extra}
    for pid in list(pids):
        try:
            pids.update(c.pid for c in psutil.Process(pid).children(recursive=True))
        except psutil.Error:
            pass
    total = 0.0
    for pid in pids:
        try:
            ct = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += ct.user + ct.system
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)  # children that exited and were waited for
    return total + ch.ru_utime + ch.ru_stime


class ForeignLoad:
    """CPU seconds the machine spent on anything but our processes (this one, the server, children) over a span.

    System-wide busy time from /proc/stat minus our processes' CPU time, so that short-lived
    processes of others count too. On a 2-core machine another busy process slows llama.cpp's
    spinning threads far more than its share: runs with foreign load are flagged in the report.
    """

    def __init__(self, own: list[int]) -> None:
        self.own = own
        self.t0 = time.perf_counter()
        self.sys0 = _system_busy_s()
        self.own0 = _own_cpu_s(own)

    def stop(self) -> dict[str, float]:
        wall = time.perf_counter() - self.t0
        used = max(0.0, (_system_busy_s() - self.sys0) - (_own_cpu_s(self.own) - self.own0))
        return {"foreign_cpu_s": used, "foreign_share": used / (wall * (os.cpu_count() or 1)) if wall > 0 else 0.0}


def wait_until_quiet(max_wait: float, threshold: float = 0.10, own: list[int] | None = None) -> float:
    """Wait (up to ``max_wait`` s) until other processes use less than ``threshold`` of the CPUs over 1 s.

    Returns the seconds waited.
    """
    t0 = time.perf_counter()
    warned = False
    while True:
        fl = ForeignLoad(own or [])
        time.sleep(1.0)
        share = fl.stop()["foreign_share"]
        if share < threshold:
            return time.perf_counter() - t0
        if time.perf_counter() - t0 > max_wait:
            log(f"  machine still busy ({share:.0%} of the CPUs used by other processes); measuring anyway")
            return time.perf_counter() - t0
        if not warned:
            log(f"  other processes use {share:.0%} of the CPUs; waiting (up to {max_wait:.0f} s)")
            warned = True


# --- prompts ------------------------------------------------------------------

def normal_token_ids(model_path: Path) -> list[int]:
    """Ids of the model's ordinary vocabulary entries (GGUF token type NORMAL, no ``[...]``/``<...>``).

    Random prompts drawn from these tokenize back to themselves on both servers: no
    control, byte, padding or media tokens.
    """
    from gguf import GGUFReader

    r = GGUFReader(str(model_path))
    toks = r.fields["tokenizer.ggml.tokens"]
    types = r.fields.get("tokenizer.ggml.token_type")
    ids = []
    for i, di in enumerate(toks.data):
        text = bytes(toks.parts[di]).decode("utf-8", "replace")
        ttype = int(types.parts[types.data[i]][0]) if types is not None else 1
        if ttype != 1 or not text.strip("\u2581 ") or text.startswith(("[", "<")):
            continue
        ids.append(i)
    if len(ids) < 100:
        raise SystemExit(f"error: {model_path} has only {len(ids)} ordinary tokens")
    return ids


def text_variant(src: Path, dst_dir: Path | None = None) -> Path:
    """A copy of ``src`` whose output rows of non-text tokens are zero: greedy decoding emits text.

    The bench models have random weights and a vocabulary padded to 32000 with unused
    ``[PADn]`` entries (plus control and byte tokens), which detokenize to nothing: greedy
    decoding picks them about 9 times in 10, so a stream carries no text for most tokens,
    servers that send no chunk for an empty piece show no first token until the end, and
    EOS can end a request early. In this copy the output matrix (the tied token embedding,
    or ``output.weight``) has zero rows for every token that is not an ordinary (NORMAL)
    vocabulary entry: their logits are exactly 0, below the best ordinary token's, so every
    generated token is visible text and EOS is never chosen. Shapes, types and the work per
    token are the same as the original's (a zero row costs what any row costs). Kept beside
    the original as ``<name>-textonly.gguf`` and rebuilt when the original changes.
    """
    import shutil

    import numpy as np
    from gguf import GGUFReader

    dst = (dst_dir or src.parent) / f"{src.stem}-textonly.gguf"
    stamp = dst.with_suffix(".json")
    st = src.stat()
    want = {"source": str(src), "size": st.st_size, "mtime": st.st_mtime}
    try:
        if dst.exists() and json.loads(stamp.read_text()) == want:
            return dst
    except (OSError, ValueError):
        pass
    tmp = dst.with_suffix(".part")
    shutil.copyfile(src, tmp)
    r = GGUFReader(str(tmp), "r+")
    types = r.fields["tokenizer.ggml.token_type"]
    tt = np.array([int(types.parts[i][0]) for i in types.data])
    tensors = {t.name: t for t in r.tensors}
    out = tensors.get("output.weight") or tensors["token_embd.weight"]
    data = out.data  # rows of raw (quantized) bytes, one per token
    if data.shape[0] != len(tt):
        raise SystemExit(f"error: {out.name} of {src} has {data.shape[0]} rows for {len(tt)} tokens")
    data[tt != 1] = 0  # all-zero bytes are 0.0 in every ggml type (F32, F16, Q8_0, K-quants)
    data.flush() if hasattr(data, "flush") else None
    del r, data, out, tensors
    os.replace(tmp, dst)
    stamp.write_text(json.dumps(want))
    log(f"wrote {dst.name}: {int((tt != 1).sum())} non-text rows of the output matrix zeroed")
    return dst


def token_prompt(pool: list[int], n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice(pool) for _ in range(n)]


def png_data_uri(seed: int, side: int = IMAGE_SIDE) -> str:
    """A random RGB ``side`` x ``side`` PNG (seeded) as a data: URI."""
    import numpy as np
    from PIL import Image

    px = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_array(seed: int, side: int = IMAGE_SIDE):
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


WORDS = ("river stone lamp window garden cloud paper music orange silver winter forest bridge candle "
         "mountain letter harbor pocket violin meadow").split()


def chat_text(seed: int) -> str:
    rng = random.Random(seed)
    return f"Picture {seed}: " + " ".join(rng.choice(WORDS) for _ in range(12)) + ". Describe the picture."


def prompt_kind(case: str, args: argparse.Namespace) -> str:
    """Token ids or text. The VL model's prompts are always text: llama-server with an mmproj
    loaded refuses a token-id prompt ("type must be string, but is array")."""
    return "text" if case == "vl" else args.prompt_kind


def request_payload(case: str, seed: int, pool: list[int], args: argparse.Namespace,
                    max_tokens: int | None = None, ignore_eos: bool = True) -> tuple[str, dict[str, Any]]:
    """(endpoint, JSON body) of request ``seed`` of ``case``."""
    common = {"model": args.model_name, "max_tokens": args.max_tokens if max_tokens is None else max_tokens,
              "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if ignore_eos:
        common["ignore_eos"] = True
    if case == "vl-image":
        content = [{"type": "image_url", "image_url": {"url": png_data_uri(seed)}},
                   {"type": "text", "text": chat_text(seed)}]
        return "/v1/chat/completions", dict(common, messages=[{"role": "user", "content": content}])
    if prompt_kind(case, args) == "tokens":
        prompt: Any = token_prompt(pool, args.prompt_tokens, seed)
    else:
        prompt = args.text_prompts[seed]
    return "/v1/completions", dict(common, prompt=prompt)


# --- HTTP client ---------------------------------------------------------------

class RequestFailed(RuntimeError):
    pass


async def one_request(client: Any, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    chat = endpoint.endswith("/chat/completions")
    t0 = time.perf_counter()
    first_chunk = first_text = None
    n_text = 0
    usage = timings = finish = None
    async with client.stream("POST", endpoint, json=body) as resp:
        if resp.status_code != 200:
            raise RequestFailed(f"HTTP {resp.status_code}: {(await resp.aread())[:500]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            now = time.perf_counter()
            obj = json.loads(data)
            if "error" in obj:
                raise RequestFailed(f"error event: {obj['error']}")
            if first_chunk is None:
                first_chunk = now
            for ch in obj.get("choices") or ():
                if chat:
                    delta = ch.get("delta") or {}
                    text = (delta.get("content") or "") + (delta.get("reasoning_content") or "")
                else:
                    text = ch.get("text") or ""
                if text:
                    n_text += 1
                    if first_text is None:
                        first_text = now
                finish = ch.get("finish_reason") or finish
            if obj.get("usage"):
                usage = obj["usage"]
            if obj.get("timings"):
                timings = obj["timings"]
    t1 = time.perf_counter()
    first = first_text if first_text is not None else first_chunk if first_chunk is not None else t1
    res = {"t0": t0, "ttft": first - t0, "total": t1 - t0, "text_chunks": n_text, "finish_reason": finish,
           "ttft_from": "text" if first_text is not None else "chunk"}
    if usage:
        res["completion_tokens"] = usage.get("completion_tokens")
        res["prompt_tokens"] = usage.get("prompt_tokens")
        res["tokens_from"] = "usage"
    else:
        res["completion_tokens"] = n_text
        res["tokens_from"] = "chunks"
    if timings:
        res["server_timings"] = {k: timings.get(k) for k in ("prompt_n", "prompt_ms", "predicted_n", "predicted_ms")}
    return res


async def _batch(base_url: str, requests: list[tuple[str, dict[str, Any]]], c: int) -> tuple[list, float]:
    limits = httpx.Limits(max_connections=c + 2, max_keepalive_connections=c + 2)
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(900.0), limits=limits) as client:
        todo = list(enumerate(requests))
        results: list[Any] = [None] * len(requests)

        async def worker() -> None:
            while todo:
                i, (endpoint, body) = todo.pop(0)
                try:
                    results[i] = await one_request(client, endpoint, body)
                except (RequestFailed, httpx.HTTPError, ValueError) as e:
                    results[i] = {"error": f"{type(e).__name__}: {e}"}

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(c)))
        wall = time.perf_counter() - t0
    for r in results:
        if r and "t0" in r:
            r["start_offset"] = r.pop("t0") - t0
    return results, wall


def run_batch(base_url: str, requests: list[tuple[str, dict[str, Any]]], c: int) -> tuple[list, float]:
    return asyncio.run(_batch(base_url, requests, c))


# --- servers ------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on 127.0.0.1, its log in ``log_dir``; ``with`` stops it."""

    def __init__(self, kind: str, cmd: list[str], port: int, log_path: Path) -> None:
        self.kind, self.cmd, self.port, self.log_path = kind, cmd, port, log_path
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None

    def start(self, timeout: float) -> None:
        self._log = open(self.log_path, "w")
        self._log.write("$ " + " ".join(self.cmd) + "\n")
        self._log.flush()
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=ROOT, env=child_env())
        deadline = t0 + timeout
        with httpx.Client(timeout=2.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.kind} exited with status {self.proc.returncode} while starting:\n"
                                       + self.log_tail())
                try:
                    if client.get(self.url + "/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"{self.kind} did not answer /health within {timeout:.0f} s:\n" + self.log_tail())
                time.sleep(0.1)
        self.startup_s = time.perf_counter() - t0

    def props(self) -> dict[str, Any]:
        """What the server says about its slots (llama-server's /props; ours if it has one)."""
        try:
            with httpx.Client(timeout=5.0) as client:
                r = client.get(self.url + "/props")
                if r.status_code == 200:
                    p = r.json()
                    dgs = p.get("default_generation_settings") or {}
                    return {"n_ctx_slot": dgs.get("n_ctx", p.get("n_ctx")), "total_slots": p.get("total_slots")}
        except (httpx.HTTPError, ValueError):
            pass
        return {}

    def model_name(self) -> str:
        """The first model id of GET /v1/models (ours refuses other names), else "bench"."""
        if getattr(self, "_model_name", None) is None:
            self._model_name = "bench"
            try:
                with httpx.Client(timeout=10.0) as client:
                    r = client.get(self.url + "/v1/models")
                    if r.status_code == 200:
                        self._model_name = r.json()["data"][0]["id"]
            except (httpx.HTTPError, ValueError, KeyError, IndexError):
                pass
        return self._model_name

    def accepts_ignore_eos(self, chat: bool = False) -> bool:
        """Whether the server takes ``"ignore_eos": true`` (llama.cpp's extension) on /v1/completions (chat:
        on /v1/chat/completions)."""
        body: dict[str, Any] = {"model": self.model_name(), "max_tokens": 1, "temperature": 0, "ignore_eos": True}
        if chat:
            body["messages"] = [{"role": "user", "content": "Hello"}]
        else:
            body["prompt"] = "Hello"
        try:
            with httpx.Client(timeout=60.0) as client:
                r = client.post(self.url + ("/v1/chat/completions" if chat else "/v1/completions"), json=body)
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def server_command(kind: str, model: Path, mmproj: Path | None, c: int, port: int, args: argparse.Namespace) -> list[str]:
    slot = args.ctx_per_slot
    if kind == "ours":
        ctx = slot * c if args.ours_ctx == "total" else slot
        cmd = [sys.executable, "-m", "pyllama_ernie", "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
               "--parallel", str(c), "--ctx-size", str(ctx), "--threads", str(args.threads)]
        if mmproj is not None:
            cmd += ["--mmproj", str(mmproj)]
        return cmd + args.ours_args
    # llama-server: -c is the whole KV cache. Split (--no-kv-unified, its default with an explicit -np):
    # each slot gets -c / -np positions. Unified (as ours by default): one buffer of -c positions
    # shared by the slots, each capped at --kv-unified-per-slot positions.
    cmd = [str(args.llama_server), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
           "-np", str(c), "-c", str(slot * c), "-t", str(args.threads), "-tb", str(args.threads)]
    if args.llama_kv == "unified":
        cmd += ["--kv-unified", "--kv-unified-per-slot", str(slot)]
    else:
        cmd += ["--no-kv-unified"]
    if mmproj is not None:
        cmd += ["--mmproj", str(mmproj)]
    return cmd + args.llama_args


# --- the Python API (no HTTP), in a child process ------------------------------------

def engine_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one engine measurement (called in a child process): see ``--engine-only``."""
    from concurrent.futures import ThreadPoolExecutor

    from pyllama_ernie import Model

    c = spec["c"]
    kw: dict[str, Any] = dict(n_parallel=c, n_ctx=spec["n_ctx"], n_threads=spec["threads"])
    if spec.get("mmproj"):
        kw["mmproj_path"] = spec["mmproj"]
    t_load = time.perf_counter()
    model = Model(spec["model"], **kw)
    load_s = time.perf_counter() - t_load
    case = spec["case"]

    def call(item: dict[str, Any], max_tokens: int) -> dict[str, Any]:
        gkw: dict[str, Any] = dict(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        prompt = item["prompt"]
        if case == "vl-image":
            from pyllama_ernie import IMAGE_MARKER

            prompt = model.apply_chat_template([{"role": "user", "content": [
                {"type": "image", "image": image_array(item["seed"])}, {"type": "text", "text": item["text"]}]}])
            assert IMAGE_MARKER in prompt
            gkw["images"] = [image_array(item["seed"])]
        t0 = time.perf_counter()
        if spec["stream"]:
            first = None
            n = 0
            for piece in model.stream(prompt, **gkw):
                if piece and first is None:
                    first = time.perf_counter()
                n += 1 if piece else 0
            t1 = time.perf_counter()
            return {"t0": t0, "ttft": (first or t1) - t0, "total": t1 - t0, "completion_tokens": n,
                    "tokens_from": "pieces"}
        out = model.generate(prompt, **gkw)
        t1 = time.perf_counter()
        return {"t0": t0, "ttft": None, "total": t1 - t0, "completion_tokens": out.completion_tokens,
                "prompt_tokens": out.prompt_tokens, "finish_reason": out.finish_reason, "tokens_from": "usage"}

    with ThreadPoolExecutor(c) as pool:
        list(pool.map(lambda it: call(it, spec["warmup_tokens"]), spec["warmup"]))
        t0 = time.perf_counter()
        results = list(pool.map(lambda it: call(it, spec["max_tokens"]), spec["items"]))
        wall = time.perf_counter() - t0
    for r in results:
        r["start_offset"] = r.pop("t0") - t0
    model.close()
    return {"results": results, "wall": wall, "startup_s": load_s}


def engine_items(case: str, seeds: list[int], pool: list[int], args: argparse.Namespace) -> list[dict[str, Any]]:
    items = []
    for s in seeds:
        if case == "vl-image":
            items.append({"seed": s, "text": chat_text(s), "prompt": None})
        elif prompt_kind(case, args) == "tokens":
            items.append({"seed": s, "prompt": token_prompt(pool, args.prompt_tokens, s)})
        else:
            items.append({"seed": s, "prompt": args.text_prompts[s]})
    return items


def run_engine(case: str, model: Path, mmproj: Path | None, c: int, seeds: list[int], warm: list[int],
               pool: list[int], args: argparse.Namespace, log_path: Path) -> dict[str, Any]:
    spec = {"model": str(model), "mmproj": str(mmproj) if (mmproj and case == "vl-image") else None, "c": c,
            "n_ctx": args.ctx_per_slot * c if args.ours_ctx == "total" else args.ctx_per_slot,
            "threads": args.threads, "case": case, "stream": not args.engine_generate, "max_tokens": args.max_tokens,
            "warmup_tokens": args.warmup_tokens, "items": engine_items(case, seeds, pool, args),
            "warmup": engine_items(case, warm, pool, args)}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
        spec_path = f.name
    out_path = spec_path + ".out"
    try:
        with open(log_path, "w") as logf:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_engine-child", spec_path, out_path],
                                  stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT, check=False, timeout=900,
                                  env=child_env())
        if proc.returncode != 0:
            raise RuntimeError(f"engine child exited with {proc.returncode}:\n" + log_path.read_text()[-3000:])
        return json.loads(Path(out_path).read_text())
    finally:
        for p in (spec_path, out_path):
            try:
                os.unlink(p)
            except OSError:
                pass


# --- one measurement ------------------------------------------------------------

def percentile(xs: list[float], q: float) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    k = (len(xs) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarise(results: list[dict[str, Any]], wall: float, expect_tokens: int) -> dict[str, Any]:
    ok = [r for r in results if r and "error" not in r]
    errors = [r["error"] for r in results if r and "error" in r]
    toks = [r["completion_tokens"] or 0 for r in ok]
    ttft = [r["ttft"] for r in ok if r.get("ttft") is not None]
    decode = [(r["completion_tokens"] - 1) / (r["total"] - r["ttft"]) for r in ok
              if r.get("ttft") is not None and (r["completion_tokens"] or 0) > 1 and r["total"] > r["ttft"]]
    return {
        "requests": len(results), "ok": len(ok), "errors": errors[:5], "n_errors": len(errors),
        "wall_s": wall, "completion_tokens": sum(toks),
        "throughput": sum(toks) / wall if wall > 0 else None,
        "ttft_p50_ms": None if not ttft else 1e3 * percentile(ttft, 0.5),
        "ttft_p95_ms": None if not ttft else 1e3 * percentile(ttft, 0.95),
        "decode_per_request_median": statistics.median(decode) if decode else None,
        "token_mismatch": sum(1 for t in toks if t != expect_tokens),
        "tokens_from": sorted({r.get("tokens_from") for r in ok} - {None}),
        "prompt_tokens": sorted({r.get("prompt_tokens") for r in ok} - {None}),
        "finish_reasons": sorted({str(r.get("finish_reason")) for r in ok}),
        "ttft_from_chunk": sum(1 for r in ok if r.get("ttft_from") == "chunk"),
    }


def http_case(server: Server, case: str, c: int, seeds: list[int], warm: list[int], pool: list[int],
              args: argparse.Namespace, ignore_eos: bool = True) -> dict[str, Any]:
    warm_reqs = [request_payload(case, s, pool, args, max_tokens=args.warmup_tokens, ignore_eos=ignore_eos)
                 for s in warm]
    run_batch(server.url, warm_reqs, c)
    reqs = [request_payload(case, s, pool, args, ignore_eos=ignore_eos) for s in seeds]
    waited = wait_until_quiet(args.quiet_wait, own=[server.proc.pid])
    fl = ForeignLoad([server.proc.pid])
    results, wall = run_batch(server.url, reqs, c)
    out = summarise(results, wall, args.max_tokens)
    out.update(fl.stop(), waited_s=waited, ignore_eos_sent=ignore_eos)
    out["per_request"] = results
    return out


# --- llama-batched-bench anchor --------------------------------------------------

_BB_ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|"
                     r"\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|")


def batched_bench(binary: Path, model: Path, cs: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """``llama-batched-bench -npp P -ntg G -npl cs``: its S_TG (decode tok/s) and S (all tokens / time) per c."""
    n_ctx = max(cs) * (args.prompt_tokens + args.max_tokens + 64)
    cmd = [str(binary), "-m", str(model), "-c", str(n_ctx), "-b", "2048", "-ub", "512", "-npp", str(args.prompt_tokens),
           "-ntg", str(args.max_tokens), "-npl", ",".join(map(str, cs)), "-t", str(args.threads),
           "-tb", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL, timeout=900)
    rows = {}
    for line in proc.stdout.splitlines():
        m = _BB_ROW.match(line.strip())
        if m:
            pp, tg, b, n_kv, t_pp, s_pp, t_tg, s_tg, t, s = m.groups()
            rows[int(b)] = {"S_PP": float(s_pp), "S_TG": float(s_tg), "S": float(s), "T": float(t)}
    res: dict[str, Any] = {"cmd": " ".join([binary.name] + cmd[1:]), "rows": rows}
    if not rows:
        res["error"] = (proc.stderr or proc.stdout)[-2000:]
    return res


# --- report ---------------------------------------------------------------------

def _f(x: Any, nd: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def _ratio(a: Any, b: Any) -> str:
    return "n/a" if a is None or b in (None, 0) else f"{a / b:.3f}"


def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    xs = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(xs) if xs else None


def aggregate(R: dict[str, Any]) -> dict[str, Any]:
    """``{case: {server: {c: {throughput, ttft_p50_ms, ...}}}}``: medians over rounds."""
    agg: dict[str, Any] = {}
    limit = R["args"].get("foreign_limit", 1.0)
    for case, by_server in R["runs"].items():
        for srv, by_c in by_server.items():
            for c, runs in by_c.items():
                done = [r for r in runs if "error" not in r]
                good = [r for r in done if r.get("foreign_share", 0.0) <= limit]
                busy = len(done) - len(good)
                if not good:  # every round had other load: report them, flagged
                    good = done
                cell = {k: median_of(good, k) for k in ("throughput", "ttft_p50_ms", "ttft_p95_ms",
                                                        "decode_per_request_median", "wall_s")}
                cell["rounds"] = len(good)
                cell["busy_rounds"] = busy
                cell["all_busy"] = bool(done) and busy == len(done)
                cell["token_mismatch"] = sum(r.get("token_mismatch", 0) for r in good)
                cell["request_errors"] = sum(r.get("n_errors", 0) for r in good)
                cell["failed"] = [r["error"][:300] for r in runs if "error" in r]
                agg.setdefault(case, {}).setdefault(srv, {})[int(c)] = cell
    return agg


def markdown(R: dict[str, Any]) -> str:
    m = R["machine"]
    a = R["args"]
    agg = aggregate(R)
    llama_on = " ".join((m.get("llama_server_build") or {}).get("ggml_on", []))
    L = [f"# Serving benchmark ({m['date']})", "",
         f"CPU: {m['cpu']} ({m['cpus']} CPUs); ggml CPU variant loaded by the package: {m.get('cpu_variant')}"
         + (f"; llama-server: static build from the patched tree, ggml options ON: {llama_on}" if llama_on else "")
         + f". Commit {m.get('commit')}{' (with uncommitted changes)' if m.get('dirty') else ''}; {m['platform']}; "
         f"package {m.get('package_file')}.", "",
         f"Command: `{R['command']}` (took {R['elapsed_s'] / 60:.1f} min).", "",
         f"{a['threads']} threads; per request: {a['prompt_tokens']} prompt tokens (moe: random ordinary token ids; "
         f"vl: text of that many tokens; unique per request), max_tokens {a['max_tokens']}, temperature 0, "
         f"ignore_eos where taken; models with {'text-only output rows (--vocab text)' if a.get('vocab') == 'text' else 'all output rows'}; "
         f"context window per request {a['ctx_per_slot']} (ours: --ctx-size "
         f"{'x c' if a['ours_ctx'] == 'total' else 'per slot'}; llama-server: -c {a['ctx_per_slot']} x c, KV cache "
         f"{a['llama_kv']}); {a['rounds']} round(s), medians over rounds; requests per batch R = {a['requests_rule']}; "
         f"vl-image: one random {IMAGE_SIDE}x{IMAGE_SIDE} PNG per request via /v1/chat/completions.", ""]
    servers = [s for s in ("ours", "llama", "engine") if any(s in agg.get(cs, {}) for cs in agg)]
    for case in [cs for cs in ("moe", "vl", "vl-image") if cs in agg]:
        L += [f"## {case}", ""]
        head = ["c"]
        for s in servers:
            head += [f"{s} tok/s", f"{s} TTFT p50/p95 ms", f"{s} decode tok/s/req", f"{s}(c)/{s}(1)"]
        if "ours" in servers and "llama" in servers:
            head += ["ours/llama tok/s"]
        if "engine" in servers and "llama" in servers:
            head += ["engine/llama tok/s"]
        anchor = R.get("anchor", {}).get(case, {}).get("rows")
        if anchor:
            head += ["batched-bench S_TG", "batched-bench S"]
        L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        cs = sorted({c for s in servers for c in agg[case].get(s, {})})
        for c in cs:
            row = [str(c)]
            for s in servers:
                cell = agg[case].get(s, {}).get(c)
                base = agg[case].get(s, {}).get(1)
                if cell is None or cell["rounds"] == 0:
                    row += ["failed" if cell and cell["failed"] else "n/a", "", "", ""]
                    continue
                flag = ""
                if cell["token_mismatch"] or cell["request_errors"]:
                    flag = f" (!{cell['token_mismatch']} short, {cell['request_errors']} errors)"
                if cell["all_busy"]:
                    flag += " (busy machine)"
                row += [_f(cell["throughput"]) + flag, f"{_f(cell['ttft_p50_ms'], 0)} / {_f(cell['ttft_p95_ms'], 0)}",
                        _f(cell["decode_per_request_median"]),
                        _ratio(cell["throughput"], base["throughput"] if base else None)]
            for pair in (("ours", "llama"), ("engine", "llama")):
                if pair[0] in servers and "llama" in servers:
                    x = agg[case].get(pair[0], {}).get(c) or {}
                    y = agg[case].get("llama", {}).get(c) or {}
                    row.append(_ratio(x.get("throughput"), y.get("throughput")))
            if anchor:
                r = anchor.get(c) or anchor.get(str(c)) or {}
                row += [_f(r.get("S_TG")), _f(r.get("S"))]
            L.append("| " + " | ".join(row) + " |")
        L.append("")
    fails = [(case, s, c, f) for case, bs in agg.items() for s, bc in bs.items() for c, cell in bc.items()
             for f in cell["failed"]]
    if fails:
        L += ["Failures:", ""] + [f"- {case} {s} c={c}: {f.splitlines()[0] if f else ''}" for case, s, c, f in fails] + [""]
    for case, an in (R.get("anchor") or {}).items():
        busy = an.get("foreign_share", 0) > a.get("foreign_limit", 1)
        L.append(f"Anchor ({case}): `{an.get('cmd')}`" + (f" failed: {an['error'][-300:]}" if an.get("error") else "")
                 + (f" (busy machine: others used {an['foreign_share']:.0%} of the CPUs)" if busy else ""))
    L += ["",
          "tok/s = completion tokens of the batch / its wall time (prompt processing included); TTFT = first "
          "streamed chunk with text; decode tok/s/req = median over requests of (tokens - 1) / (total - TTFT); "
          "x(c)/x(1) = the same server's throughput at c over its own at c=1. batched-bench: llama.cpp's "
          "llama-batched-bench in the same run (S_TG: decode only; S: prompts + decode, all sequences at once). "
          "The client runs on the same CPUs as the server. Rounds during which other processes used more than "
          f"{a.get('foreign_limit', 0):.0%} of the CPUs are left out of the medians (\"busy machine\": all were).", ""]
    return "\n".join(L)


# --- driver -----------------------------------------------------------------------

def model_paths(key: str, args: argparse.Namespace) -> tuple[Path, Path | None]:
    """The bench-shape files (before ``text_variant``)."""
    d = args.models_dir
    if key == "moe":
        return d / f"ernie-moe-bench-{args.type}.gguf", None
    mm = d / f"mmproj-ernie-vl-bench-{args.type}.gguf"
    if not mm.exists():
        mm = d / "mmproj-ernie-vl-bench-F16.gguf"
    return d / f"ernie-vl-bench-{args.type}.gguf", mm


def parse_list(s: str, allowed: tuple | None = None, conv=str) -> list:
    out = [conv(x.strip()) for x in s.split(",") if x.strip()]
    if allowed is not None:
        bad = [x for x in out if x not in allowed]
        if bad:
            raise SystemExit(f"error: {', '.join(map(str, bad))} not among {', '.join(allowed)}")
    return out


def requests_for(c: int, args: argparse.Namespace) -> int:
    return args.requests if args.requests else max(args.min_requests, args.requests_per_slot * c)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_engine-child":
        spec = json.loads(Path(argv[1]).read_text())
        if os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] == str(ROOT):
            sys.path.insert(0, str(ROOT))
        Path(argv[2]).write_text(json.dumps(engine_child(spec)))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", default="ours,llama", help="of ours, llama, engine (default: %(default)s)")
    ap.add_argument("--engine-only", action="store_true", help="measure the Python API only (= --servers engine)")
    ap.add_argument("--engine-generate", action="store_true",
                    help="engine: call Model.generate (exact completion_tokens, no TTFT) instead of Model.stream "
                         "(the default: TTFT, and tokens counted as pieces, one per token with --vocab text)")
    ap.add_argument("-c", "--concurrency", default="1,2,4,8", help="comma-separated (default: %(default)s)")
    ap.add_argument("--models", default="moe,vl", help="of moe, vl (default: %(default)s)")
    ap.add_argument("--cases", default="moe,vl,vl-image", help="of moe, vl, vl-image (default: %(default)s)")
    ap.add_argument("--type", default="Q8_0", help="the bench models' GGUF type (default: %(default)s)")
    ap.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    ap.add_argument("--vocab", choices=("text", "all"), default="text",
                    help="text (default): run a copy of each model whose non-text output rows are zero, so that "
                         "every generated token is visible text and EOS never comes (see text_variant); all: the "
                         "files as make_models.py wrote them")
    ap.add_argument("--make-models", action="store_true", help="write missing bench models (make_models.py)")
    ap.add_argument("--llama-server", type=Path, default=None,
                    help="llama-server binary (default: build/bench-tools/build-patched/bin/llama-server)")
    ap.add_argument("--build", action="store_true", help="build llama-server (and batched-bench) when missing")
    ap.add_argument("--anchor", action="store_true", help="also run llama-batched-bench on the text models")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests", type=int, default=0, help="requests per batch (default: max(4, 2c))")
    ap.add_argument("--requests-per-slot", type=int, default=2)
    ap.add_argument("--min-requests", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--prompt-kind", choices=("tokens", "text"), default="tokens",
                    help="prompts as token-id lists (default) or as text of about --prompt-tokens tokens")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--warmup-tokens", type=int, default=4)
    ap.add_argument("--ctx-per-slot", type=int, default=1024, help="context window per request/slot")
    ap.add_argument("--ours-ctx", choices=("total", "per-slot"), default="per-slot",
                    help="what ours' --ctx-size (and Model n_ctx with n_parallel) means: the window of each "
                         "request (per-slot, the default: pyllama_ernie's KV cache holds n_parallel x n_ctx) or "
                         "the whole KV cache divided among slots like llama-server's -c (total)")
    ap.add_argument("--llama-kv", choices=("unified", "split"), default="unified",
                    help="llama-server's KV cache: one buffer shared by the slots, each capped at --ctx-per-slot "
                         "(unified, as pyllama_ernie's default kv_unified=True), or one per slot (split: "
                         "--no-kv-unified, llama-server's default with an explicit -np)")
    ap.add_argument("--ours-args", default="", help="extra arguments for ours (one string)")
    ap.add_argument("--llama-args", default="", help="extra arguments for llama-server (one string)")
    ap.add_argument("--start-timeout", type=float, default=180)
    ap.add_argument("--quiet-wait", type=float, default=120,
                    help="before each batch, wait up to this many seconds for other processes to go quiet")
    ap.add_argument("--foreign-limit", type=float, default=0.05,
                    help="flag (and leave out of the medians) batches during which other processes used more "
                         "than this share of the CPUs (default: %(default)s)")
    ap.add_argument("--json", type=Path, default=HERE / "serve_results.json")
    ap.add_argument("--md", type=Path, default=HERE / "serve_results.md")
    ap.add_argument("--logs", type=Path, default=ROOT / "build" / "serve-bench-logs")
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--package", choices=("tree", "installed"), default="tree",
                    help="which pyllama_ernie the servers and the engine run: this working tree's (built in "
                         "place; the default) or the one installed in this Python's environment")
    args = ap.parse_args(argv)
    global PACKAGE_FROM
    PACKAGE_FROM = args.package
    import shlex

    args.ours_args = shlex.split(args.ours_args)
    args.llama_args = shlex.split(args.llama_args)
    servers = ["engine"] if args.engine_only else parse_list(args.servers, SERVERS)
    cs = parse_list(args.concurrency, conv=int)
    models = parse_list(args.models, MODELS)
    cases = parse_list(args.cases, ("moe", "vl", "vl-image"))
    args.model_name = "bench"
    args.requests_rule = f"{args.requests}" if args.requests else f"max({args.min_requests}, {args.requests_per_slot}c)"
    args.logs.mkdir(parents=True, exist_ok=True)

    if args.llama_server is None:
        args.llama_server = DEFAULT_WORK / "build-patched" / "bin" / "llama-server"
    bb_bin = args.llama_server.parent / "llama-batched-bench"
    need_llama = "llama" in servers or args.anchor
    if need_llama and (not args.llama_server.exists() or (args.anchor and not bb_bin.exists())):
        if not args.build:
            raise SystemExit(f"error: {args.llama_server if not args.llama_server.exists() else bb_bin} is missing; "
                             "build it: python benchmarks/build_tools.py --which patched "
                             "--targets llama-server,llama-batched-bench (or pass --build)")
        import build_tools

        build_tools.build_tools(DEFAULT_WORK, ("patched",), 2, ("llama-server", "llama-batched-bench"))
    if args.make_models:
        import make_models as mk

        mk.make_models(args.models_dir, types=["F16", args.type], kinds=models, verbose=True)
    for key in models:
        p, mm = model_paths(key, args)
        missing = [str(x) for x in (p, mm) if x is not None and not x.exists()]
        if missing:
            raise SystemExit(f"error: missing {', '.join(missing)}; write them with "
                             f"python benchmarks/make_models.py --types F16,{args.type} --kinds {key} (or --make-models)")

    t_start = time.perf_counter()
    R: dict[str, Any] = {"machine": machine_info(args.llama_server if need_llama else None),
                         "command": "python benchmarks/serve_bench.py " + " ".join(shlex.quote(a) for a in argv),
                         "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                         "runs": {}, "startup": {}, "anchor": {}}
    m = R["machine"]
    log(f"CPU {m['cpu']}, package CPU variant {m.get('cpu_variant')}, servers {servers}, c {cs}, models {models}")

    def save() -> None:
        R["elapsed_s"] = time.perf_counter() - t_start
        args.json.write_text(json.dumps(R, indent=1, default=str) + "\n")
        args.md.write_text(markdown(R))

    seed_base = args.seed
    for key in models:
        model, mmproj = model_paths(key, args)
        model_cases = [cs_ for cs_ in CASES[key] if cs_ in cases]
        if not model_cases:
            continue
        if args.vocab == "text":
            model = text_variant(model)
        R.setdefault("model_files", {})[key] = {"model": str(model), "mmproj": str(mmproj) if mmproj else None}
        use_mmproj = mmproj if "vl-image" in model_cases else None
        pool = normal_token_ids(model)
        if any(prompt_kind(cs_, args) == "text" for cs_ in model_cases):
            args.text_prompts = _TextPrompts(pool, model, args.prompt_tokens)
            # make every prompt now (the tokenizer's model is closed before any server starts)
            sb = seed_base
            for c in cs:
                for _ in range(args.rounds):
                    for sd in list(range(sb, sb + requests_for(c, args))) + list(range(sb + 5000, sb + 5000 + c)):
                        args.text_prompts[sd]
                    sb += 10000
            args.text_prompts.close()
        if args.anchor:
            for attempt in range(3):  # one run, all c at once: retried when others loaded the machine
                log(f"{key}: llama-batched-bench")
                wait_until_quiet(args.quiet_wait)
                fl = ForeignLoad([])
                an = batched_bench(bb_bin, model, cs, args)
                an.update(fl.stop(), attempts=attempt + 1)
                if an["foreign_share"] <= args.foreign_limit:
                    break
                log(f"  other processes used {an['foreign_share']:.0%} of the CPUs during it; again")
            for cs_ in model_cases:
                if cs_ != "vl-image":
                    R["anchor"][cs_] = an
            log(f"  S_TG {({b: r['S_TG'] for b, r in an['rows'].items()})}")
        for ci, c in enumerate(cs):
            n_req = requests_for(c, args)
            for rnd in range(args.rounds):
                order = servers if (rnd + ci) % 2 == 0 else servers[::-1]
                # the same prompts for every server in this (c, round); new ones per round
                seed0 = seed_base
                seed_base += 10000
                seeds = list(range(seed0, seed0 + n_req))
                warm = list(range(seed0 + 5000, seed0 + 5000 + c))
                for srv in order:
                    tag = f"{key}-{srv}-c{c}-r{rnd}"
                    if srv == "engine":
                        for case in model_cases:
                            log(f"{tag} {case}: engine, {n_req} requests")
                            try:
                                waited = wait_until_quiet(args.quiet_wait)
                                # the child's own time counts as ours; its load and warm-up are inside the span
                                fl = ForeignLoad([])
                                res = run_engine(case, model, use_mmproj, c, seeds, warm, pool, args,
                                                 args.logs / f"{tag}-{case}.log")
                                out = summarise(res["results"], res["wall"], args.max_tokens)
                                out.update(fl.stop(), waited_s=waited)
                                out["per_request"] = res["results"]
                                out["startup_s"] = res["startup_s"]
                            except (RuntimeError, subprocess.TimeoutExpired) as e:
                                out = {"error": str(e)}
                            R["runs"].setdefault(case, {}).setdefault(srv, {}).setdefault(c, []).append(out)
                            _log_result(tag, case, out)
                        save()
                        continue
                    port = free_port()
                    cmd = server_command(srv, model, use_mmproj, c, port, args)
                    server = Server(srv, cmd, port, args.logs / f"{tag}.log")
                    try:
                        with server:
                            server.start(args.start_timeout)
                            props = server.props()
                            # ours may refuse llama.cpp's ignore_eos: then it is left out and the
                            # completion_tokens are checked (random-weight models rarely end early)
                            args.model_name = server.model_name()
                            ignore = {case: srv == "llama" or server.accepts_ignore_eos(chat=case == "vl-image")
                                      for case in model_cases}
                            R["startup"].setdefault(key, {}).setdefault(srv, {})[c] = {
                                "startup_s": server.startup_s, "cmd": " ".join(cmd), "ignore_eos": ignore,
                                **props}
                            for case in model_cases:
                                log(f"{tag} {case}: {n_req} requests, {c} clients"
                                    + ("" if ignore[case] else " (no ignore_eos)"))
                                out = http_case(server, case, c, seeds, warm, pool, args, ignore[case])
                                R["runs"].setdefault(case, {}).setdefault(srv, {}).setdefault(c, []).append(out)
                                _log_result(tag, case, out)
                    except RuntimeError as e:
                        log(f"{tag}: {str(e).splitlines()[0]}")
                        for case in model_cases:
                            R["runs"].setdefault(case, {}).setdefault(srv, {}).setdefault(c, []).append(
                                {"error": str(e)})
                    save()
    save()
    print(markdown(R))
    log(f"done in {(time.perf_counter() - t_start) / 60:.1f} min; {args.md}, {args.json}")
    return 0


def _log_result(tag: str, case: str, out: dict[str, Any]) -> None:
    if "error" in out:
        log(f"  {tag} {case}: FAILED {out['error'].splitlines()[0] if out['error'] else ''}")
        return
    log(f"  {tag} {case}: {_f(out['throughput'])} tok/s, TTFT p50 {_f(out['ttft_p50_ms'], 0)} ms, "
        f"decode/req {_f(out['decode_per_request_median'])} tok/s, wall {out['wall_s']:.2f} s, "
        f"{out['token_mismatch']} short, {out['n_errors']} errors, prompt tokens {out['prompt_tokens']}")


class _TextPrompts:
    """Text prompts of ``n`` tokens: pieces of random ordinary tokens, joined, grown or cut until the model's
    tokenizer (pyllama_ernie's, which both servers share) makes exactly ``n`` tokens of them (without BOS)."""

    def __init__(self, pool: list[int], model: Path, n: int) -> None:
        from gguf import GGUFReader

        r = GGUFReader(str(model))
        toks = r.fields["tokenizer.ggml.tokens"]
        self.pieces = {i: bytes(toks.parts[toks.data[i]]).decode("utf-8", "replace") for i in pool}
        self.pool, self.n, self.model = pool, n, model
        self._cache: dict[int, str] = {}
        self._tok = None

    def _count(self, text: str) -> int:
        if self._tok is None:
            if PACKAGE_FROM == "tree" and str(ROOT) not in sys.path:
                sys.path.insert(0, str(ROOT))
            from pyllama_ernie import Model

            self._tok = Model(self.model, n_ctx=64, n_threads=1)
        return len(self._tok.tokenize(text, add_special=False, parse_special=False))

    def _text(self, ids: list[int]) -> str:
        return "".join(self.pieces[i] for i in ids).replace("\u2581", " ").strip()

    def __getitem__(self, seed: int) -> str:
        if seed not in self._cache:
            rng = random.Random(seed)
            ids = [rng.choice(self.pool) for _ in range(self.n)]
            # merges make fewer tokens than pieces: add pieces until there are enough, then cut
            while self._count(self._text(ids)) < self.n:
                ids += [rng.choice(self.pool) for _ in range(8)]
            while len(ids) > 1 and self._count(self._text(ids[:-1])) >= self.n:
                ids.pop()
            self._cache[seed] = self._text(ids)
        return self._cache[seed]

    def close(self) -> None:
        if self._tok is not None:
            self._tok.close()
            self._tok = None


if __name__ == "__main__":
    sys.exit(main())
