"""Runs single ggml ops on one chosen CPU backend variant; used by tests/parity/test_kernels.py.

Run as a script, in a subprocess of its own, so that the variant it loads never joins the
registry of the test process (where llama.cpp takes the first CPU device it finds)::

    python _ggml_ops.py PACKAGE_DIR VARIANT JOB.npz OUT.npz

``VARIANT`` is a ``libggml-cpu-<variant>.so`` in ``PACKAGE_DIR`` (loaded with ``ggml_backend_load``,
which refuses a variant the CPU cannot run: exit status 3), or ``-`` for the backend the package
itself would pick (``ggml_backend_load_all_from_path``; also a build without CPU variants).
It talks to ``libggml.so`` / ``libggml-base.so`` through ctypes and never imports pyllama_ernie.

``JOB.npz`` holds ``op`` and the op's arrays (numpy layout: the last axis is ggml's ``ne[0]``):

* ``soft_max``: ``x0, x1, ...`` float32 [rows, n]; out ``y0, y1, ...`` = ``ggml_soft_max`` per row.
* ``mul_mat``: ``w0, x0, w1, x1, ...``; ``w`` uint8 [m, K/32*34], rows of Q8_0 blocks (f16 scale,
  32 int8); ``x`` float32 [n, K]; out ``y0, ...`` float32 [n, m], ``y[j, i] = w[i] . x[j]``.
* ``flash_attn``: ``q`` float32 [n_q, D], ``k`` float32 [n_kv, D], ``v`` float32 [n_kv, DV],
  ``mask`` float16 [n_q, n_kv], ``scale``; out ``y`` float32 [n_q, DV] (one head).
* ``score``: no arrays; out ``score`` = the variant's ``ggml_backend_score()`` (0: not supported here).
"""

from __future__ import annotations

import ctypes
import os
import sys

import numpy as np

F32, F16, Q8_0 = 0, 1, 8
CPU_DEVICE = 0  # GGML_BACKEND_DEVICE_TYPE_CPU

P = ctypes.c_void_p


class InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def _bind(lib: ctypes.CDLL, name: str, restype, *argtypes) -> None:
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)


def load_ggml(pkg_dir: str) -> ctypes.CDLL:
    base = ctypes.CDLL(os.path.join(pkg_dir, "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    ggml = ctypes.CDLL(os.path.join(pkg_dir, "libggml.so"), mode=ctypes.RTLD_GLOBAL)
    g = base
    _bind(g, "ggml_init", P, InitParams)
    _bind(g, "ggml_free", None, P)
    _bind(g, "ggml_tensor_overhead", ctypes.c_size_t)
    _bind(g, "ggml_graph_overhead", ctypes.c_size_t)
    _bind(g, "ggml_new_tensor", P, P, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int64))
    _bind(g, "ggml_nbytes", ctypes.c_size_t, P)
    _bind(g, "ggml_soft_max", P, P, P)
    _bind(g, "ggml_mul_mat", P, P, P, P)
    _bind(g, "ggml_flash_attn_ext", P, P, P, P, P, P, ctypes.c_float, ctypes.c_float, ctypes.c_float)
    _bind(g, "ggml_new_graph", P, P)
    _bind(g, "ggml_build_forward_expand", None, P, P)
    _bind(g, "ggml_backend_alloc_ctx_tensors", P, P, P)
    _bind(g, "ggml_backend_buffer_free", None, P)
    _bind(g, "ggml_backend_tensor_set", None, P, P, ctypes.c_size_t, ctypes.c_size_t)
    _bind(g, "ggml_backend_tensor_get", None, P, P, ctypes.c_size_t, ctypes.c_size_t)
    _bind(g, "ggml_backend_graph_compute", ctypes.c_int, P, P)
    _bind(g, "ggml_backend_free", None, P)
    _bind(ggml, "ggml_backend_load", P, ctypes.c_char_p)
    _bind(ggml, "ggml_backend_load_all_from_path", None, ctypes.c_char_p)
    _bind(ggml, "ggml_backend_reg_dev_get", P, P, ctypes.c_size_t)
    _bind(ggml, "ggml_backend_dev_by_type", P, ctypes.c_int)
    _bind(ggml, "ggml_backend_dev_backend_reg", P, P)
    _bind(ggml, "ggml_backend_dev_init", P, P, ctypes.c_char_p)
    _bind(ggml, "ggml_backend_reg_get_proc_address", P, P, ctypes.c_char_p)
    g.reg_api = ggml  # ggml_backend_load and the registry live in libggml.so
    return g


def cpu_backend(g: ctypes.CDLL, pkg_dir: str, variant: str, n_threads: int):
    api = g.reg_api
    if variant == "-":
        api.ggml_backend_load_all_from_path(os.fsencode(pkg_dir))
        dev = api.ggml_backend_dev_by_type(CPU_DEVICE)
        if not dev:
            sys.exit("no CPU backend")
        reg = api.ggml_backend_dev_backend_reg(dev)
    else:
        reg = api.ggml_backend_load(os.fsencode(os.path.join(pkg_dir, f"libggml-cpu-{variant}.so")))
        if not reg:
            print(f"variant {variant} not supported by this CPU", file=sys.stderr)
            sys.exit(3)
        dev = api.ggml_backend_reg_dev_get(reg, 0)
    backend = api.ggml_backend_dev_init(dev, None)
    fn = api.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_set_n_threads")
    if fn:
        ctypes.CFUNCTYPE(None, P, ctypes.c_int)(fn)(backend, n_threads)
    return backend


def run_graph(g, backend, build, inputs):
    """``build(ctx, new)`` returns the output tensors; ``inputs`` are (tensor, array) pairs it appends to."""
    params = InitParams(g.ggml_tensor_overhead() * 256 + g.ggml_graph_overhead(), None, True)
    ctx = g.ggml_init(params)

    def new(typ: int, *ne: int):
        arr = (ctypes.c_int64 * len(ne))(*ne)
        return g.ggml_new_tensor(ctx, typ, len(ne), arr)

    outs = build(new, ctx)
    graph = g.ggml_new_graph(ctx)
    for t in outs:
        g.ggml_build_forward_expand(graph, t)
    buf = g.ggml_backend_alloc_ctx_tensors(ctx, backend)
    for t, a in inputs:
        a = np.ascontiguousarray(a)
        assert a.nbytes == g.ggml_nbytes(t), (a.nbytes, g.ggml_nbytes(t))
        g.ggml_backend_tensor_set(t, a.ctypes.data, 0, a.nbytes)
    status = g.ggml_backend_graph_compute(backend, graph)
    if status != 0:
        sys.exit(f"graph compute failed: status {status}")
    res = []
    for t in outs:
        y = np.empty(g.ggml_nbytes(t) // 4, dtype=np.float32)
        g.ggml_backend_tensor_get(t, y.ctypes.data, 0, y.nbytes)
        res.append(y)
    g.ggml_backend_buffer_free(buf)
    g.ggml_free(ctx)
    return res


def main(pkg_dir: str, variant: str, job_path: str, out_path: str) -> None:
    job = dict(np.load(job_path))
    op = str(job.pop("op"))
    if op == "score":
        lib = ctypes.CDLL(os.path.join(pkg_dir, f"libggml-cpu-{variant}.so"))
        np.savez(out_path, score=np.int64(lib.ggml_backend_score()))
        return
    g = load_ggml(pkg_dir)
    backend = cpu_backend(g, pkg_dir, variant, int(job.pop("n_threads", 2)))
    inputs: list = []
    out: dict[str, np.ndarray] = {}
    if op == "soft_max":
        xs = [job[f"x{i}"] for i in range(len(job))]

        def build(new, ctx):
            ys = []
            for x in xs:
                t = new(F32, x.shape[1], x.shape[0])
                inputs.append((t, x.astype(np.float32)))
                ys.append(g.ggml_soft_max(ctx, t))
            return ys

        for i, (x, y) in enumerate(zip(xs, run_graph(g, backend, build, inputs))):
            out[f"y{i}"] = y.reshape(x.shape)
    elif op == "mul_mat":
        pairs = [(job[f"w{i}"], job[f"x{i}"]) for i in range(len(job) // 2)]

        def build(new, ctx):
            ys = []
            for w, x in pairs:
                n, k = x.shape
                tw = new(Q8_0, k, w.shape[0])
                tx = new(F32, k, n)
                inputs.extend([(tw, w), (tx, x.astype(np.float32))])
                ys.append(g.ggml_mul_mat(ctx, tw, tx))
            return ys

        for i, ((w, x), y) in enumerate(zip(pairs, run_graph(g, backend, build, inputs))):
            out[f"y{i}"] = y.reshape(x.shape[0], w.shape[0])
    elif op == "flash_attn":
        q, k, v, mask = job["q"], job["k"], job["v"], job["mask"]

        def build(new, ctx):
            tq = new(F32, q.shape[1], q.shape[0], 1, 1)
            tk = new(F32, k.shape[1], k.shape[0], 1, 1)
            tv = new(F32, v.shape[1], v.shape[0], 1, 1)
            tm = new(F16, mask.shape[1], mask.shape[0], 1, 1)
            inputs.extend([(tq, q.astype(np.float32)), (tk, k.astype(np.float32)),
                           (tv, v.astype(np.float32)), (tm, mask.astype(np.float16))])
            return [g.ggml_flash_attn_ext(ctx, tq, tk, tv, tm, float(job["scale"]), 0.0, 0.0)]

        out["y"] = run_graph(g, backend, build, inputs)[0].reshape(q.shape[0], v.shape[1])
    else:
        sys.exit(f"unknown op {op!r}")
    g.ggml_backend_free(backend)
    np.savez(out_path, **out)


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    main(*sys.argv[1:])
