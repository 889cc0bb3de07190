"""Loads the compiled cffi module once, initialises llama.cpp, routes its logs.

llama.cpp and mtmd log through one callback into the ``pyllama_ernie`` logger.
By default that logger shows WARNING and above; ``set_log_level`` changes it.
The process's stdout and stderr are never redirected.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable, TypeVar

from . import errors

try:
    from ._cffi import ffi, lib
except ImportError as e:  # pragma: no cover - depends on how the package was installed
    raise ImportError(
        "pyllama_ernie's compiled module is missing: the package was not built. "
        "Install it with `pip install .` from a source checkout (this compiles llama.cpp), "
        f"not by putting the source folder on sys.path. ({e})"
    ) from e

__all__ = ["ffi", "lib", "logger", "set_log_level", "ensure_init", "ProgressHandle", "NodeObserver",
           "abort_flag_callback", "CResource", "live_handles", "ModelHandle", "default_threads"]

logger = logging.getLogger("pyllama_ernie")
if logger.level == logging.NOTSET:
    logger.setLevel(logging.WARNING)

_LEVELS = {
    lib.GGML_LOG_LEVEL_DEBUG: logging.DEBUG,
    lib.GGML_LOG_LEVEL_INFO: logging.INFO,
    lib.GGML_LOG_LEVEL_WARN: logging.WARNING,
    lib.GGML_LOG_LEVEL_ERROR: logging.ERROR,
    lib.GGML_LOG_LEVEL_NONE: logging.INFO,
}


def set_log_level(level: int | str) -> None:
    """Set the level of the ``pyllama_ernie`` logger (e.g. ``"INFO"`` to see llama.cpp's load log)."""
    logger.setLevel(level.upper() if isinstance(level, str) else level)


class _LineBuffer(threading.local):
    """llama.cpp logs partial lines (GGML_LOG_LEVEL_CONT); join them per thread."""

    def __init__(self) -> None:
        self.level = logging.INFO
        self.parts: list = []


_buf = _LineBuffer()


def _emit(level: int, line: str) -> None:
    if level >= logging.WARNING:
        errors.note_log_line(line.strip(), is_error=level >= logging.ERROR)
    if logger.isEnabledFor(level):
        logger.log(level, "%s", line.rstrip())


@ffi.def_extern()
def _pyllama_ernie_log(level: int, text: Any, user_data: Any) -> None:
    s = ffi.string(text).decode("utf-8", "replace")
    if level != lib.GGML_LOG_LEVEL_CONT:
        if _buf.parts:
            _emit(_buf.level, "".join(_buf.parts))
            _buf.parts = []
        _buf.level = _LEVELS.get(level, logging.INFO)
    while "\n" in s:
        head, s = s.split("\n", 1)
        _buf.parts.append(head)
        line = "".join(_buf.parts)
        _buf.parts = []
        if line.strip():
            _emit(_buf.level, line)
    if s:
        _buf.parts.append(s)


_R = TypeVar("_R", bound="CResource")

# live-handle accounting: how many objects of each CResource type hold a C
# pointer that is not yet freed. An RLock: a finalizer (CResource.__del__) may
# run in a thread that is already updating the counts.
_live_lock = threading.RLock()
_live: dict[str, int] = {}


def live_handles() -> dict[str, int]:
    """Objects whose C object is not yet freed, by type name (e.g. ``{"Model": 1, "Context": 2}``).

    Every type that ever held a C object is listed, with 0 once all are freed;
    meant for leak checks (``not any(live_handles().values())``).
    """
    with _live_lock:
        return dict(_live)


class CResource:
    """Base of the objects that own a C object: ``close()`` frees it (idempotently),
    and a ``with`` block or garbage collection calls ``close()``.

    A subclass calls ``self._track()`` once its C object exists and
    ``self._untrack()`` when it frees it, which keeps :func:`live_handles` right
    (both are idempotent).
    """

    _tracked = False
    #: the name :func:`live_handles` counts this type under (default: the class name)
    _live_name: str | None = None

    def _track(self) -> None:
        with _live_lock:
            if not self._tracked:
                name = self._live_name or type(self).__name__
                _live[name] = _live.get(name, 0) + 1
                self._tracked = True

    def _untrack(self) -> None:
        with _live_lock:
            if self._tracked:
                name = self._live_name or type(self).__name__
                _live[name] = _live.get(name, 0) - 1
                self._tracked = False

    def close(self) -> None:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def __enter__(self: _R) -> _R:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class ModelHandle(CResource):
    """Owns one ``llama_model*``: loads it, lends it, frees it after the last borrower.

    Contexts and the vision projector borrow the pointer with :meth:`acquire`
    and give it back with :meth:`release` when they free their own C object;
    :meth:`close` refuses new borrowers and frees the model as soon as none is
    left (at once, or when the last one releases). Whoever needs the pointer
    for a moment (metadata, the vocabulary) reads :attr:`ptr`, which raises
    :class:`~pyllama_ernie.errors.ClosedError` once close has begun.
    """

    _live_name = "Model"  # what users open and close; live_handles() counts it as such

    def __init__(self, path: str, params: Any, progress: Callable[[float], bool | None] | None = None) -> None:
        self._ptr = None
        self._lock = threading.Lock()
        self._borrowers = 0
        self._closing = False
        self.path = path
        ph = None
        if progress is not None:
            ph = ProgressHandle(progress)
            params.progress_callback = lib._pyllama_ernie_progress
            params.progress_callback_user_data = ph.handle
        errors.clear_log_line()
        ptr = lib.llama_model_load_from_file(os.fsencode(path), params)
        if ptr == ffi.NULL:
            if ph is not None:
                ph.reraise()
                if ph.cancelled:
                    raise errors.ModelLoadError(f"loading {path} was cancelled by the progress callback",
                                                llama_log="")
            errors.raise_error(errors.ModelLoadError, f"loading {path}")
        self._ptr = ptr
        self._track()
        #: the width of the model's input embeddings
        self.n_embd = int(lib.llama_model_n_embd(ptr))
        #: rope position rows per input embedding (4 for M-RoPE models such as ERNIE-4.5-VL)
        self.n_pos_per_embd = 4 if lib.llama_model_rope_type(ptr) in (lib.LLAMA_ROPE_TYPE_MROPE,
                                                                       lib.LLAMA_ROPE_TYPE_IMROPE) else 1

    @property
    def closed(self) -> bool:
        """Whether close has begun (borrowers may still be finishing)."""
        return self._closing or self._ptr is None

    @property
    def ptr(self) -> Any:
        """The ``llama_model*`` for a short use; ClosedError once close has begun."""
        ptr = self._ptr
        if self._closing or ptr is None:
            raise errors.ClosedError("the model is closed")
        return ptr

    def acquire(self) -> Any:
        """Borrow the pointer until :meth:`release`; ClosedError once close has begun."""
        with self._lock:
            if self._closing or self._ptr is None:
                raise errors.ClosedError("the model is closed")
            self._borrowers += 1
            return self._ptr

    def release(self) -> None:
        """Give back a pointer from :meth:`acquire` (its borrower freed what it built on it)."""
        with self._lock:
            self._borrowers -= 1
        self._free_if_unused()

    def close(self) -> None:
        """Refuse new borrowers; free the model now, or when the last borrower releases it."""
        with self._lock:
            self._closing = True
        self._free_if_unused()

    def _free_if_unused(self) -> None:
        with self._lock:
            if self._closing and self._borrowers == 0 and self._ptr is not None:
                lib.llama_model_free(self._ptr)
                self._ptr = None
                self._untrack()


def default_threads() -> int:
    """Physical cores available to this process (llama.cpp's own default is similar)."""
    try:
        n_avail = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n_avail = os.cpu_count() or 1
    cores = set()
    try:
        phys = core = None
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                elif not line.strip() and core is not None:
                    cores.add((phys, core))
                    phys = core = None
    except OSError:
        pass
    return max(1, min(n_avail, len(cores) or n_avail))


class ProgressHandle:
    """Carries a Python progress callable through llama.cpp's ``void *`` user data.

    The callable gets a float in [0, 1] and may return False to cancel. An
    exception inside it also cancels, and is re-raised by ``reraise()``.
    """

    def __init__(self, fn: Callable[[float], bool | None]) -> None:
        self.fn = fn
        self.error: BaseException | None = None
        self.cancelled = False
        self.handle = ffi.new_handle(self)

    def reraise(self) -> None:
        if self.error is not None:
            raise self.error


def _progress_onerror(exc: type, value: BaseException, tb: Any) -> bool:
    return False


@ffi.def_extern(onerror=_progress_onerror)
def _pyllama_ernie_progress(progress: float, user_data: Any) -> bool:
    ph: ProgressHandle = ffi.from_handle(user_data)
    try:
        ok = ph.fn(float(progress))
    except BaseException as e:  # keep it for the caller; cancel the load
        ph.error = e
        ph.cancelled = True
        return False
    if ok is False:
        ph.cancelled = True
        return False
    return True


class NodeObserver:
    """Carries a Python callable through llama.cpp's graph evaluation callback.

    ``fn(name, op, src_names, computed, buffer)`` is called once per graph node as the
    scheduler reaches it; ``computed`` says whether the node is marked for
    compute (nodes of an unselected graph branch are not); ``buffer`` names the
    buffer that holds its result, i.e. the backend that computes it ("CPU", "CUDA0", ...).
    """

    def __init__(self, fn: Callable[[str, str, tuple, bool, str], None]) -> None:
        self.fn = fn
        self.error: BaseException | None = None
        self.handle = ffi.new_handle(self)


def _eval_onerror(exc: type, value: BaseException, tb: Any) -> bool:
    return False


@ffi.def_extern(onerror=_eval_onerror)
def _pyllama_ernie_eval(t: Any, ask: bool, user_data: Any) -> bool:
    if not ask:
        return True
    obs: NodeObserver = ffi.from_handle(user_data)
    if obs.error is not None:
        return False
    try:
        srcs = tuple(ffi.string(s.name).decode("utf-8", "replace") for s in t.src if s != ffi.NULL)
        buffer = c_str(lib.ggml_backend_buffer_name(t.buffer)) if t.buffer != ffi.NULL else ""
        obs.fn(ffi.string(t.name).decode("utf-8", "replace"), c_str(lib.ggml_op_desc(t)), srcs,
               bool(t.flags & lib.GGML_TENSOR_FLAG_COMPUTE), buffer)
    except BaseException as e:  # keep it for the caller
        obs.error = e
    return False  # never ask for the node's data: no extra synchronisation


abort_flag_callback = ffi.addressof(lib, "pyllama_ernie_abort_flag")

_init_lock = threading.Lock()
_initialised = False


def ensure_init() -> None:
    """Initialise the llama.cpp backend and logging once per process."""
    global _initialised
    if _initialised:
        return
    with _init_lock:
        if _initialised:
            return
        lib.llama_log_set(lib._pyllama_ernie_log, ffi.NULL)
        lib.mtmd_log_set(lib._pyllama_ernie_log, ffi.NULL)
        lib.mtmd_helper_log_set(lib._pyllama_ernie_log, ffi.NULL)
        _load_backend_modules()
        lib.llama_backend_init()
        _initialised = True


PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def backend_modules() -> bool:
    """Whether this build's backends are modules loaded at run time (GGML_BACKEND_DL).

    True for the GPU builds and for x86-64 builds with CPU variants, where ggml loads the
    best ``libggml-cpu-<variant>.so`` the CPU supports.
    """
    try:
        from . import _build_info
    except ImportError:  # pragma: no cover - an incomplete install
        return False
    return bool(_build_info.GGML_BACKEND_DL)


def _load_backend_modules() -> None:
    """Load the backend modules (``libggml-cpu.so``, ``libggml-cuda.so``, ...) from the package folder.

    A module that cannot load (a GPU backend on a machine without the driver or its runtime
    libraries) is skipped by ggml; without a CPU backend nothing can run, which is an error.
    """
    if not backend_modules():
        return
    lib.ggml_backend_load_all_from_path(os.fsencode(PACKAGE_DIR))
    names = backend_names()
    if "CPU" not in names:
        raise ImportError(f"pyllama_ernie could not load its CPU backend module from {PACKAGE_DIR} "
                          f"(loaded: {', '.join(names) or 'none'}); reinstall the package")


def backend_names() -> list[str]:
    """Names of the registered ggml backends, e.g. ``["CPU"]`` or ``["CUDA", "CPU"]``."""
    return [c_str(lib.ggml_backend_reg_name(lib.ggml_backend_reg_get(i))) for i in range(lib.ggml_backend_reg_count())]


def module_load_error(name: str) -> str | None:
    """Why the backend module ``name`` (e.g. ``"cuda"``) of this build did not load, or None.

    None also when the build has no such module. The reason is the dynamic loader's
    (e.g. ``libcuda.so.1: cannot open shared object file``).
    """
    import ctypes

    path = os.path.join(PACKAGE_DIR, f"libggml-{name}.so")
    if not backend_modules() or not os.path.exists(path):
        return None
    try:
        ctypes.CDLL(path)
    except OSError as e:
        return str(e)
    return None


def c_str(p: Any) -> str:
    """A C string (or NULL) as a Python str."""
    return "" if p == ffi.NULL else ffi.string(p).decode("utf-8", "replace")
