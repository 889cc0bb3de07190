"""Benchmarks: prompt processing, generation, image encoding, time to first token,
peak memory, and the machine's memory read bandwidth, all in one run.

``python -m pyllama_ernie bench MODEL.gguf [--mmproj M.gguf] [--image ...]`` runs
:func:`run_bench` and prints its :class:`BenchResult`. Every figure is the median
of several repetitions, with their min and max, after one warm-up of the same
work. The read bandwidth is probed right before each generation repetition, so
that the share of the memory bus a decode uses (:attr:`BenchResult.bus_fraction`)
compares figures taken seconds apart: on shared machines bandwidth drifts.

What is measured, and how it maps onto llama.cpp's ``llama-bench``:

- ``pp``: a prompt of ``n_prompt`` random tokens (BOS first) evaluated in one
  call into an empty KV cache, through :meth:`Model.generate` with
  ``max_tokens=0`` (llama-bench ``-p 512``).
- ``tg``: ``n_gen`` tokens generated greedily after a two-token prompt with
  end-of-generation banned, through the same decode loop users run
  (sampling, detokenization, stop handling; llama-bench ``-n 128``).
- ``host_us_per_token``: generation wall time minus llama.cpp's own decode timer
  (``llama_perf_context``), per token: what the Python loop adds to each token.
- ``image_ms``: :meth:`Model.image_features` on each image with the feature
  cache cleared (preprocessing included).
- ``ttft_ms``: an image and a question through the chat template: preprocessing,
  vision encoding and prompt evaluation into an empty cache, up to the first
  sampled token.
- ``peak_rss_mb``: the process's peak resident memory after the warm-up of
  every measured path (before the bandwidth probe allocates its buffer).
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

from ._lib import ffi, lib

__all__ = ["Stat", "BenchResult", "BandwidthProbe", "read_bandwidth", "active_weight_bytes", "run_bench", "synthetic_image"]

PathLike = Union[str, "os.PathLike[str]"]

#: the question asked about the image in the time-to-first-token measurement
TTFT_QUESTION = "What is in this picture? Answer in one sentence."


@dataclass
class Stat:
    """The median, min and max of repeated measurements (``values`` in the order taken)."""

    median: float
    min: float
    max: float
    values: list[float]

    @classmethod
    def of(cls, values: Sequence[float]) -> "Stat":
        if not values:
            raise ValueError("no measurements")
        vals = [float(v) for v in values]
        return cls(statistics.median(vals), min(vals), max(vals), vals)

    def __str__(self) -> str:
        return f"{_num(self.median)} ({_num(self.min)}..{_num(self.max)})"


def _num(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


# --- memory bandwidth ---------------------------------------------------------

class BandwidthProbe:
    """Measures the memory read bandwidth with a buffer much larger than the CPU caches.

    Each of ``n_threads`` threads sums its own slice of the buffer ``passes``
    times, all starting together; the figure is the bytes read over the wall
    time, in GB/s (1e9 bytes). The buffer is allocated (and its pages touched)
    once, here.
    """

    def __init__(self, size_mb: int = 256) -> None:
        if size_mb < 1:
            raise ValueError("size_mb must be >= 1")
        self.buffer = np.ones(size_mb * (1 << 20) // 8, dtype=np.uint64)

    def measure(self, n_threads: int, passes: int = 8) -> float:
        if n_threads < 1 or passes < 1:
            raise ValueError("n_threads and passes must be >= 1")
        base = ffi.cast("uint64_t *", ffi.from_buffer(self.buffer))
        per = len(self.buffer) // n_threads
        start = threading.Barrier(n_threads + 1)
        sums = [0] * n_threads

        def reader(i: int) -> None:
            p, s = base + i * per, 0
            start.wait()
            for _ in range(passes):
                s += lib.pyllama_ernie_read_sum(p, per)  # cffi releases the GIL here
            sums[i] = s

        threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(n_threads)]
        for t in threads:
            t.start()
        start.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - t0
        if sum(sums) != passes * per * n_threads:  # every word is 1
            raise RuntimeError("the bandwidth probe read wrong data")
        return passes * per * n_threads * 8 / seconds / 1e9


def read_bandwidth(n_threads: int, *, size_mb: int = 256, passes: int = 8) -> float:
    """The memory read bandwidth in GB/s with ``n_threads`` threads (see :class:`BandwidthProbe`)."""
    return BandwidthProbe(size_mb).measure(n_threads, passes)


# --- bytes a decode step reads ------------------------------------------------

def active_weight_bytes(path: PathLike) -> dict[str, int]:
    """Weight bytes one generated token reads from memory in text mode.

    Every tensor is read in full except: the token embedding (one row, unless
    the output projection shares it), the
    routed experts (``expert_used_count`` of ``expert_count``, read fully for
    each selected expert) and the vision experts of ``ernie4_5-vl-moe`` (not
    used by text tokens). Returns ``{"per_token": ..., "total": ...}`` and the
    parts: ``dense``, ``experts`` (active share), ``embedding`` (one row).
    """
    from .gguf_check import validate_gguf

    s = validate_gguf(path, role="model")
    arch = s.architecture or ""
    n_expert = int(s.get(f"{arch}.expert_count", 0) or 0)
    used = s.get(f"{arch}.expert_used_count", 0)
    n_used = int(np.max(used)) if used is not None and np.size(used) else 0
    tied = "output.weight" not in s.tensors  # the output projection reads the whole embedding
    dense = experts = embedding = total = 0
    for name, t in s.tensors.items():
        total += t.nbytes
        if name == "token_embd.weight" and not tied:
            embedding += t.nbytes // max(1, t.shape[-1])
        elif "_exps_vl." in name or "_inp_vl." in name or "exp_probs_b_vl" in name:
            continue  # the vision experts and their router: image tokens only
        elif "_exps." in name and n_expert:
            experts += t.nbytes * n_used // n_expert
        else:
            dense += t.nbytes
    return {"per_token": dense + experts + embedding, "total": total, "dense": dense,
            "experts": experts, "embedding": embedding}


# --- images --------------------------------------------------------------------

def synthetic_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """An HxWx3 uint8 test picture (gradients plus noise): no file needed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1),
                    (x + y) * 255 // max(1, width + height - 2)], axis=-1).astype(np.int16)
    img += rng.integers(-24, 25, size=img.shape, dtype=np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def _image_label(image: Any, i: int) -> str:
    if isinstance(image, np.ndarray):
        return f"{image.shape[1]}x{image.shape[0]}"
    if isinstance(image, (str, os.PathLike)):
        return Path(image).name
    size = getattr(image, "size", None)
    return f"{size[0]}x{size[1]}" if isinstance(size, tuple) else f"image{i + 1}"


# --- the run -------------------------------------------------------------------

def peak_rss_mb() -> float | None:
    """The process's peak resident memory in MiB (None where the OS does not say)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


@dataclass
class BenchResult:
    """What :func:`run_bench` measured (speeds in tokens per second, times in ms)."""

    model: str
    n_threads: int
    repetitions: int
    n_prompt: int
    n_gen: int
    pp: Stat
    tg: Stat
    host_us_per_token: Stat
    bandwidth_gbs: Stat
    weight_bytes_per_token: int
    file_bytes: int
    peak_rss_mb: float | None
    mmproj: str | None = None
    image_ms: dict[str, Stat] = field(default_factory=dict)
    ttft_ms: Stat | None = None
    gpu_memory_mb: float | None = None
    machine: dict[str, Any] = field(default_factory=dict)

    @property
    def bus_fraction(self) -> float:
        """Bytes a generated token reads times tokens per second, over the read bandwidth
        (medians of the same run)."""
        return self.weight_bytes_per_token * self.tg.median / (self.bandwidth_gbs.median * 1e9)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bus_fraction"] = self.bus_fraction
        return d

    def format(self) -> str:
        """A readable table: median (min..max) over the repetitions."""
        lines = [
            f"model            {self.model}",
            f"threads          {self.n_threads}    repetitions {self.repetitions}"
            + (f"    CPU variant {self.machine['cpu_variant']}" if self.machine.get("cpu_variant") else ""),
            f"pp{self.n_prompt:<14d} {self.pp} tok/s",
            f"tg{self.n_gen:<14d} {self.tg} tok/s",
            f"host per token   {self.host_us_per_token} us  (wall time minus llama.cpp's decode timer)",
        ]
        for label, st in self.image_ms.items():
            lines.append(f"image {label:<10s} {st} ms  (encode)")
        if self.ttft_ms is not None:
            lines.append(f"ttft image+text  {self.ttft_ms} ms")
        if self.peak_rss_mb is not None:
            lines.append(f"peak RSS         {self.peak_rss_mb:.0f} MiB")
        if self.gpu_memory_mb is not None:
            lines.append(f"GPU memory       {self.gpu_memory_mb:.0f} MiB  (taken by the model, its context and projector)")
        lines += [
            f"read bandwidth   {self.bandwidth_gbs} GB/s ({self.n_threads} threads, same run)",
            f"weights/token    {self.weight_bytes_per_token / 1e6:.1f} MB of {self.file_bytes / 1e6:.1f} MB",
            f"bus use          {self.bus_fraction * 100:.0f}% of the read bandwidth during generation",
        ]
        return "\n".join(lines)


def _machine(n_threads: int) -> dict[str, Any]:
    from .system import system_info

    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "cpus": os.cpu_count(), "threads": n_threads}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        info["cpu"] = platform.processor()
    sysinfo = system_info()
    info["cpu_features"] = " ".join(sysinfo["cpu_features"])
    info["cpu_variant"] = sysinfo["cpu_variant"]
    info["llama_cpp_commit"] = sysinfo["llama_cpp_commit"]
    info["patches"] = len(sysinfo["patches"])
    info["build"] = sysinfo["build"]
    info["gpus"] = [d["description"] for d in _gpus()]
    return info


def run_bench(
    model_path: PathLike,
    *,
    mmproj_path: PathLike | None = None,
    images: Sequence[Any] | None = None,
    n_threads: int | None = None,
    repetitions: int = 5,
    n_prompt: int = 512,
    n_gen: int = 128,
    log: Any | None = None,
    **model_kwargs: Any,
) -> BenchResult:
    """Measure ``model_path`` (and its projector): see the module docstring.

    ``images`` are the pictures to encode (paths, bytes, PIL images or arrays);
    by default, with a projector, synthetic 448x448 and 896x896 ones. The first
    is used for the time to first token. ``log`` (``callable(str)``) hears progress.
    Other keyword arguments go to :class:`Model` (``n_gpu_layers``, ``flash_attn``,
    ``cpu_moe``, ...).
    """
    from ._lib import default_threads
    from .model import Model

    if repetitions < 1:
        raise ValueError("repetitions must be >= 1")
    if n_prompt < 2 or n_gen < 1:
        raise ValueError("n_prompt must be >= 2 and n_gen >= 1")
    say = log or (lambda _msg: None)
    threads = n_threads or default_threads()
    weights = active_weight_bytes(model_path)
    if images is None and mmproj_path is not None:
        images = [synthetic_image(448, 448, 0), synthetic_image(896, 896, 1)]
    images = list(images or [])
    if images and mmproj_path is None:
        raise ValueError("images need the model's projector (mmproj_path)")

    # room for the prompt, or for one image of up to ~1500 tokens and the question
    n_ctx = max(n_prompt + 64, n_gen + 66, 2048 if images else 0)
    gpu_free_before = _gpu_free_bytes()
    with Model(model_path, n_ctx=n_ctx, n_batch=max(512, n_prompt),
               n_ubatch=512, n_threads=threads, mmproj_path=mmproj_path, **model_kwargs) as model:
        ctx = model.ctx
        rng = np.random.default_rng(1234)
        prompt = [model.bos_token if model.bos_token >= 0 else 0]
        prompt += [int(t) for t in rng.integers(0, model.n_vocab, n_prompt - 1)]
        gen_prompt = prompt[:2]
        labels = [_image_label(im, i) for i, im in enumerate(images)]
        ttft_prompt = _ttft_prompt(model, images[0]) if images else ""

        def pp_once() -> float:
            ctx.reset()
            c = model.generate(prompt, max_tokens=0, temperature=0)
            return c.timings.prompt_tokens_per_second

        def tg_once() -> tuple:
            ctx.reset()
            lib.llama_perf_context_reset(ctx._ptr)
            c = model.generate(gen_prompt, max_tokens=n_gen, temperature=0, ignore_eos=True)
            lib.llama_synchronize(ctx._ptr)
            perf = lib.llama_perf_context(ctx._ptr)
            if c.completion_tokens != n_gen:
                raise RuntimeError(f"generated {c.completion_tokens} tokens instead of {n_gen}")
            host_us = (c.timings.generation_ms - perf.t_eval_ms) * 1e3 / n_gen
            return c.timings.tokens_per_second, host_us

        def image_once(im: Any) -> float:
            model.media_cache_clear()
            t0 = time.perf_counter()
            model.image_features(im)
            return (time.perf_counter() - t0) * 1e3

        def ttft_once() -> float:
            model.media_cache_clear()
            ctx.reset()
            t0 = time.perf_counter()
            c = model.generate(ttft_prompt, images=images[:1], max_tokens=1, temperature=0, ignore_eos=True)
            # up to the first sampled token: leave out the decode of that token
            return (time.perf_counter() - t0) * 1e3 - c.timings.generation_ms

        say("warm-up")
        pp_once()
        tg_once()
        for im in images:
            image_once(im)
        if images:
            ttft_once()
        rss = peak_rss_mb()
        gpu_mb = (gpu_free_before - _gpu_free_bytes()) / 2**20 if model.offload.gpus else None

        probe = BandwidthProbe()
        pp: list[float] = []
        tg: list[float] = []
        host: list[float] = []
        bw: list[float] = []
        img: dict[str, list[float]] = {label: [] for label in labels}
        ttft: list[float] = []
        for r in range(repetitions):
            say(f"repetition {r + 1}/{repetitions}")
            pp.append(pp_once())
            bw.append(probe.measure(threads))
            speed, overhead = tg_once()
            tg.append(speed)
            host.append(overhead)
            for label, im in zip(labels, images):
                img[label].append(image_once(im))
            if images:
                ttft.append(ttft_once())
        del probe

        return BenchResult(
            model=str(model_path), mmproj=str(mmproj_path) if mmproj_path is not None else None,
            n_threads=threads, repetitions=repetitions, n_prompt=n_prompt, n_gen=n_gen,
            pp=Stat.of(pp), tg=Stat.of(tg), host_us_per_token=Stat.of(host), bandwidth_gbs=Stat.of(bw),
            weight_bytes_per_token=weights["per_token"], file_bytes=weights["total"], peak_rss_mb=rss,
            image_ms={label: Stat.of(v) for label, v in img.items()},
            ttft_ms=Stat.of(ttft) if ttft else None, gpu_memory_mb=gpu_mb, machine=_machine(threads),
        )


def _gpus() -> list[dict[str, Any]]:
    """The GPUs this build sees (:func:`pyllama_ernie.system.devices` entries)."""
    from .system import devices

    return [d for d in devices() if d["type"] in ("gpu", "igpu")]


def _gpu_free_bytes() -> int:
    """Free memory summed over the GPUs this build sees (0 without any)."""
    return sum(d["memory_free"] for d in _gpus())


def _ttft_prompt(model: Any, image: Any) -> str:
    """The chat prompt of one image and :data:`TTFT_QUESTION` (a plain prompt without a template)."""
    from .values import IMAGE_MARKER

    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": TTFT_QUESTION}]}]
    try:
        text = model.apply_chat_template(messages)
    except ValueError:  # no template, or one without image parts
        return IMAGE_MARKER + TTFT_QUESTION
    bos = model.token_to_piece(model.bos_token, special=True).decode("utf-8", "replace") \
        if model.bos_token >= 0 else ""
    # generate() adds BOS itself
    return text[len(bos):] if bos and text.startswith(bos) else text
