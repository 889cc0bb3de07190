"""GPU offload settings: which layers and which tensors go to which device.

:class:`OffloadPlan` checks the user's settings before anything reaches
llama.cpp, and fills the device fields of ``llama_model_params``, keeping the
C strings and arrays it points them at alive as long as the plan.

The expert-offload control keeps MoE expert weights in CPU memory while the
rest of the model runs on the GPU (upstream llama.cpp's ``--cpu-moe`` /
``--n-cpu-moe``, through its tensor-buffer overrides): the attention, shared
experts and routers of every layer stay on the GPU, and the routed experts of
ERNIE-4.5-VL (text and vision) are read from system memory.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from . import _lib
from ._lib import ffi, lib, logger

__all__ = ["OffloadPlan", "gpu_devices", "SPLIT_MODES", "EXPERT_PATTERN"]

SPLIT_MODES = {
    "none": lib.LLAMA_SPLIT_MODE_NONE,  # the whole model on main_gpu
    "layer": lib.LLAMA_SPLIT_MODE_LAYER,  # layers (and their KV cache) spread over the GPUs
    "row": lib.LLAMA_SPLIT_MODE_ROW,  # matrices split by rows across GPUs where the backend can
}

#: the routed-expert weight tensors (text ``*_exps`` and vision ``*_exps_vl``); upstream's
#: ``LLM_FFN_EXPS_REGEX``. Shared experts (``*_shexp``) and routers do not match.
EXPERT_PATTERN = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"


def gpu_devices() -> list[Any]:
    """The ggml devices this build can offload to (GPUs and integrated GPUs), in order."""
    _lib.ensure_init()
    out = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        if lib.ggml_backend_dev_type(dev) in (lib.GGML_BACKEND_DEVICE_TYPE_GPU, lib.GGML_BACKEND_DEVICE_TYPE_IGPU):
            out.append(dev)
    return out


class OffloadPlan:
    """Checked offload settings (see :class:`pyllama_ernie.Model` for their meaning).

    Raises ValueError for settings that can never work (a negative expert count,
    an unknown split mode, a ``main_gpu`` or ``tensor_split`` beyond the GPUs
    found). Asking for GPU work where no GPU is found logs one warning and runs
    on the CPU.
    """

    def __init__(
        self,
        *,
        n_gpu_layers: int = 0,
        main_gpu: int = 0,
        tensor_split: Sequence[float] | None = None,
        split_mode: str = "layer",
        cpu_moe: bool | int = False,
    ) -> None:
        if isinstance(n_gpu_layers, bool) or not isinstance(n_gpu_layers, int):
            raise TypeError("n_gpu_layers must be an int (-1 = all layers)")
        mode = str(split_mode).lower()
        if mode not in SPLIT_MODES:
            raise ValueError(f"split_mode must be one of {', '.join(SPLIT_MODES)}, not {split_mode!r}")
        if isinstance(cpu_moe, bool):
            n_cpu_moe = -1 if cpu_moe else 0
        elif isinstance(cpu_moe, int) and cpu_moe >= 0:
            n_cpu_moe = cpu_moe
        else:
            raise ValueError("cpu_moe must be True/False, or the number of leading layers whose experts stay "
                             f"on the CPU (>= 0), not {cpu_moe!r}")
        if isinstance(main_gpu, bool) or not isinstance(main_gpu, int) or main_gpu < 0:
            raise ValueError(f"main_gpu must be a GPU index >= 0, not {main_gpu!r}")
        split: list[float] | None = None
        if tensor_split is not None:
            split = [float(x) for x in tensor_split]
            if not split or any(not math.isfinite(x) or x < 0 for x in split) or sum(split) <= 0:
                raise ValueError("tensor_split must be non-negative proportions, one per GPU, not all zero")
            if len(split) > lib.llama_max_devices():
                raise ValueError(f"tensor_split has {len(split)} entries; llama.cpp handles at most "
                                 f"{lib.llama_max_devices()} devices")

        self.gpus = gpu_devices()
        n_gpu = len(self.gpus)
        wants_gpu = n_gpu_layers != 0 or split is not None or main_gpu != 0
        if n_gpu:
            if main_gpu >= n_gpu:
                raise ValueError(f"main_gpu is {main_gpu} but {n_gpu} GPU(s) were found")
            if split is not None and len(split) > n_gpu:
                raise ValueError(f"tensor_split has {len(split)} entries but {n_gpu} GPU(s) were found")
        elif wants_gpu:
            logger.warning("no GPU found (%s): running on the CPU", no_gpu_reason())

        self.n_gpu_layers = n_gpu_layers
        self.main_gpu = main_gpu
        self.split_mode = mode
        self.tensor_split = split
        self.n_cpu_moe = n_cpu_moe  # -1: all layers
        self.patterns = expert_patterns(n_cpu_moe)
        self._keep: list[Any] = []

    @property
    def uses_gpu(self) -> bool:
        """Whether any layer goes to a GPU."""
        return bool(self.gpus) and self.n_gpu_layers != 0

    def apply(self, params: Any) -> None:
        """Fill the device fields of a ``llama_model_params``."""
        params.n_gpu_layers = self.n_gpu_layers
        params.main_gpu = self.main_gpu
        params.split_mode = SPLIT_MODES[self.split_mode]
        keep: list[Any] = []
        if self.tensor_split is not None:
            arr = ffi.new("float[]", max(len(self.tensor_split), int(lib.llama_max_devices())))
            for i, x in enumerate(self.tensor_split):
                arr[i] = x
            keep.append(arr)
            params.tensor_split = arr
        if self.patterns and self.uses_gpu:  # without a GPU every weight is in CPU memory already
            cpu = lib.ggml_backend_dev_by_type(lib.GGML_BACKEND_DEVICE_TYPE_CPU)
            buft = lib.ggml_backend_dev_buffer_type(cpu)
            overrides = ffi.new("struct llama_model_tensor_buft_override[]", len(self.patterns) + 1)
            for i, pat in enumerate(self.patterns):
                s = ffi.new("char[]", pat.encode())
                keep.append(s)
                overrides[i].pattern = s
                overrides[i].buft = buft
            keep.append(overrides)  # the last entry stays {NULL, NULL}: the terminator
            params.tensor_buft_overrides = overrides
        self._keep = keep


def expert_patterns(n_cpu_moe: int) -> list[str]:
    """The tensor-name regexes whose weights stay in CPU memory: all experts (-1),
    none (0), or those of the first ``n_cpu_moe`` layers."""
    if n_cpu_moe < 0:
        return [EXPERT_PATTERN]
    return [rf"blk\.{i}{EXPERT_PATTERN}" for i in range(n_cpu_moe)]


def matches(patterns: Sequence[str], tensor_name: str) -> bool:
    """Whether llama.cpp's override search (``std::regex_search``) puts ``tensor_name`` on the CPU."""
    return any(re.search(p, tensor_name) for p in patterns)


def no_gpu_reason() -> str:
    """Why this build has no GPU device, in words (for a build and machine where it has none)."""
    from . import _build_info

    built = [name for name, on in (("CUDA", _build_info.GGML_CUDA),) if on]
    for name in built:
        err = _lib.module_load_error(name.lower())
        if err:
            return f"this build has {name}, but its backend did not load: {err}"
    if built:
        return f"this build has {', '.join(built)}, but no device was found"
    return f"this build's backends: {', '.join(_lib.backend_names()) or 'none'}"
