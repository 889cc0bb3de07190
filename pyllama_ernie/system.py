"""What this build of pyllama_ernie is made of, and what it runs on."""

from __future__ import annotations

import re
from typing import Any

from . import _lib
from ._lib import c_str, ffi, lib

__all__ = ["system_info", "backends", "cpu_variant"]

_DEV_TYPES = {
    lib.GGML_BACKEND_DEVICE_TYPE_CPU: "cpu",
    lib.GGML_BACKEND_DEVICE_TYPE_GPU: "gpu",
    lib.GGML_BACKEND_DEVICE_TYPE_IGPU: "igpu",
    lib.GGML_BACKEND_DEVICE_TYPE_ACCEL: "accel",
}


def backends() -> list[str]:
    """Names of the compiled (registered) ggml backends, e.g. ``["CPU"]`` or ``["CUDA", "CPU"]``."""
    _lib.ensure_init()
    return _lib.backend_names()


def cpu_variant() -> str | None:
    """The CPU backend variant this process runs, e.g. ``"zen4"`` (AVX-512 with VNNI and BF16).

    x86-64 builds compile ggml's CPU backend once per instruction-set level and load the
    best one the CPU supports (``system_info()["build"]["cpu_variants"]`` lists them).
    None for a build with one CPU backend, or where the loaded module cannot be told
    (outside Linux).
    """
    from . import _build_info as bi

    if not getattr(bi, "GGML_CPU_VARIANTS", None):
        return None
    _lib.ensure_init()
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return None
    found = set(re.findall(r"libggml-cpu-([A-Za-z0-9_.]+)\.so", maps))
    return found.pop() if len(found) == 1 else None


def devices() -> list[dict[str, Any]]:
    """The devices ggml can run on, with their memory."""
    _lib.ensure_init()
    out = []
    free, total = ffi.new("size_t *"), ffi.new("size_t *")
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        lib.ggml_backend_dev_memory(dev, free, total)
        out.append({
            "name": c_str(lib.ggml_backend_dev_name(dev)),
            "description": c_str(lib.ggml_backend_dev_description(dev)),
            "type": _DEV_TYPES.get(lib.ggml_backend_dev_type(dev), "other"),
            "memory_free": int(free[0]),
            "memory_total": int(total[0]),
        })
    return out


def system_info() -> dict[str, Any]:
    """A dictionary describing this build: versions, llama.cpp base, patches, backends, CPU features."""
    from . import _build_info as bi
    from ._version import __version__

    _lib.ensure_init()
    raw = c_str(lib.llama_print_system_info())
    # "CPU : SSE3 = 1 | AVX2 = 1 | ... | CUDA : ARCHS = 900 | ..."
    features: dict[str, dict[str, str]] = {}
    current = ""
    for section in raw.split("|"):
        if ":" in section:
            current, _, section = section.partition(":")
            current = current.strip()
        key, eq, val = section.partition("=")
        if eq and key.strip():
            features.setdefault(current, {})[key.strip()] = val.strip()
    vendor = bi.VENDOR or {}
    return {
        "version": __version__,
        "llama_cpp_commit": vendor.get("base_commit", "unknown"),
        "llama_cpp_source": vendor.get("sdist", "unknown"),
        "patches": [p["name"] for p in vendor.get("patches", [])],
        "backends": backends(),
        "devices": devices(),
        "cpu_features": sorted(k for k, v in features.get("CPU", {}).items() if v == "1"),
        "build": {
            "cuda": bi.GGML_CUDA,
            "native": bi.GGML_NATIVE,
            "build_type": bi.CMAKE_BUILD_TYPE,
            "compiler": bi.COMPILER,
            "backend_modules": _lib.backend_modules(),
            "cpu_variants": list(getattr(bi, "GGML_CPU_VARIANTS", [])),
        },
        "cpu_variant": cpu_variant(),
        "llama_system_info": raw.strip(),
        "gpu_offload": bool(lib.llama_supports_gpu_offload()),
        # why a GPU build sees no GPU here (None when it sees one, or is a CPU build)
        "no_gpu_reason": _no_gpu_reason(bi),
        "mmap": bool(lib.llama_supports_mmap()),
    }


def _no_gpu_reason(bi: Any) -> str | None:
    from . import offload

    if not bi.GGML_CUDA or offload.gpu_devices():
        return None
    return offload.no_gpu_reason()
