"""Lifetime, leaks and concurrency of Model / Context / Projector on tiny synthetic GGUFs.

The policy under test (see Context.close and Model.close):

* ``close()`` from another thread cancels the running call, waits until it is out
  of llama.cpp and then frees; the interrupted generation ends with
  ``finish_reason == "cancelled"`` (a prompt being evaluated raises ClosedError);
* a stream paused at a ``yield`` is not waited for: close frees at once and the
  stream's next step finishes it without touching llama.cpp;
* close from inside a running call of the same context raises BusyError;
* after close every call raises ClosedError; ``_lib.live_handles()`` counts the C
  objects not yet freed, and garbage collection frees what was never closed.
"""

from __future__ import annotations

import ctypes
import gc
import random
import threading
import time

import numpy as np
import pytest

pytest.importorskip("pyllama_ernie._lib", reason="pyllama_ernie is not built (pip install .)")

import pyllama_ernie
from pyllama_ernie import Model
from pyllama_ernie._lib import live_handles
from pyllama_ernie.context import Completion, SamplingParams
from pyllama_ernie.convert.synthetic import write_tiny_gguf, write_tiny_mmproj

GREEDY = SamplingParams(temperature=0)
#: RSS growth allowed over 200 generations and 30 load/close cycles (one leaked context
#: of these sizes costs several MB; keeping the 30 models alive costs ~500 MB)
RSS_BOUND_MB = 30.0


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("res")
    return {
        "text": write_tiny_gguf("ernie4_5", d / "text.gguf", seed=1),
        "vl": write_tiny_gguf("ernie4_5-vl-moe", d / "vl.gguf", seed=1),
        "mmproj": write_tiny_mmproj(d / "mmproj.gguf", n_embd_text=64),
    }


@pytest.fixture
def model(paths):
    with Model(paths["text"], n_ctx=2048, n_batch=256, n_threads=1) as m:
        yield m


def _live_delta(before):
    gc.collect()
    now = live_handles()
    return {k: now.get(k, 0) - before.get(k, 0) for k in set(now) | set(before) if now.get(k, 0) != before.get(k, 0)}


def _run(ctx, tokens, max_tokens, *, on_piece=None, ignore_eos=True):
    """Consume ctx.generate_tokens; the Completion, or the exception it raised."""
    try:
        out = None
        for item in ctx.generate_tokens(tokens, max_tokens=max_tokens, sampling=GREEDY, ignore_eos=ignore_eos):
            if isinstance(item, Completion):
                out = item
            elif on_piece is not None:
                on_piece()
        return out
    except Exception as e:  # noqa: BLE001 - reported by the caller
        return e


def _thread(fn, *args, **kwargs):
    box = {}

    def target():
        box["result"] = fn(*args, **kwargs)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


# --- accounting --------------------------------------------------------------


def test_live_handles_count_open_objects(paths):
    before = live_handles()
    m = Model(paths["vl"], n_ctx=256, n_threads=1, mmproj_path=paths["mmproj"])
    c = m.context(n_ctx=128)
    assert _live_delta(before) == {"Model": 1, "Context": 2, "Projector": 1}
    c.close()
    assert _live_delta(before) == {"Model": 1, "Context": 1, "Projector": 1}
    m.close()
    m.close()
    assert _live_delta(before) == {}
    assert all(v >= 0 for v in live_handles().values())


# --- leaks -------------------------------------------------------------------


def test_many_generations_and_load_cycles_do_not_leak(paths):
    psutil = pytest.importorskip("psutil")
    proc = psutil.Process()
    img = (np.random.default_rng(0).random((56, 56, 3)) * 255).astype(np.uint8)

    try:  # hand free heap pages back first: measure what is kept, not what malloc caches
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        trim = None

    def rss_mb():
        gc.collect()
        if trim is not None:
            trim(0)
        return proc.memory_info().rss / 2**20

    def cycle(i):
        vl = i % 3 == 0  # every third with the vision projector and one image encode
        with Model(paths["vl" if vl else "text"], n_ctx=1024, n_batch=256, n_threads=1,
                   mmproj_path=paths["mmproj"] if vl else None) as m:
            with m.context(n_ctx=512) as c:
                out = _run(c, [1, 5, 6], 8)
                assert isinstance(out, Completion) and out.completion_tokens == 8
            if vl:
                assert m.image_features(img).data.shape[1] == m.n_embd
            assert m.generate("Hello", max_tokens=4, temperature=0).completion_tokens <= 4

    def generations(m, n):
        for i in range(n):
            prompt = "Hello world " * (1 + i % 5)
            if i % 4 == 3:  # a stream left after two pieces
                it = m.stream(prompt, max_tokens=12, temperature=0.8, seed=i, ignore_eos=True)
                next(it)
                next(it)
                it.close()
            else:
                m.generate(prompt, max_tokens=12, temperature=0.8 if i % 2 else 0, seed=i)

    before = live_handles()
    with Model(paths["text"], n_ctx=1024, n_batch=256, n_threads=1) as m:
        generations(m, 20)  # warm-up: allocator pools, lazily built caches
        for i in range(3):
            cycle(i)
        r0 = rss_mb()
        generations(m, 200)
        r1 = rss_mb()
        for i in range(30):
            cycle(i)
        r2 = rss_mb()
    print(f"RSS: after warm-up {r0:.1f} MB, after 200 generations {r1:.1f} MB ({r1 - r0:+.1f}), "
          f"after 30 load/close cycles {r2:.1f} MB ({r2 - r0:+.1f}); bound {RSS_BOUND_MB} MB")
    assert r1 - r0 < RSS_BOUND_MB
    assert r2 - r0 < RSS_BOUND_MB
    assert _live_delta(before) == {}
    if not any(before.values()):  # nothing else in this process holds handles
        assert not any(live_handles().values()), live_handles()


# --- threads -----------------------------------------------------------------

PROMPTS = [[1, 5, 6, 7], [1, 40, 41, 300, 12], [1, 260, 261, 262], [1, 9, 9, 9, 9, 9, 300]]


def test_threads_with_own_contexts_match_sequential_runs(model):
    expected = [model.generate(p, max_tokens=40, temperature=0, ignore_eos=True).tokens for p in PROMPTS]
    contexts = [model.context(n_ctx=256) for _ in PROMPTS]
    results = {}

    def work(i):
        got = []
        for r in range(3):  # each thread runs every prompt, starting at its own
            j = (i + r) % len(PROMPTS)
            out = _run(contexts[i], PROMPTS[j], 40)
            got.append((j, out.tokens if isinstance(out, Completion) else out))
        results[i] = got

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    assert len(results) == len(PROMPTS)
    for got in results.values():
        for j, toks in got:
            assert toks == expected[j]
    for c in contexts:
        c.close()


def test_cancel_one_of_four_generating_threads(model):
    n = 600
    expected = [model.generate(p, max_tokens=n, temperature=0, ignore_eos=True).tokens for p in PROMPTS]
    contexts = [model.context(n_ctx=1024) for _ in PROMPTS]
    started = threading.Event()
    victim = 1
    jobs = [_thread(_run, c, p, n, on_piece=started.set if i == victim else None)
            for i, (c, p) in enumerate(zip(contexts, PROMPTS))]
    assert started.wait(30)
    contexts[victim].cancel()
    for t, _ in jobs:
        t.join(60)
        assert not t.is_alive()
    outs = [box["result"] for _, box in jobs]
    assert all(isinstance(o, Completion) for o in outs), outs
    assert outs[victim].finish_reason == "cancelled"
    assert outs[victim].completion_tokens < n
    assert outs[victim].tokens == expected[victim][: outs[victim].completion_tokens]
    for i, o in enumerate(outs):
        if i != victim:
            assert o.finish_reason == "length" and o.tokens == expected[i]
    # the cancelled context is still usable
    assert _run(contexts[victim], PROMPTS[0], 5).tokens == expected[0][:5]
    for c in contexts:
        c.close()


def _long_prompt(n):
    return [1] + [5 + (i % 200) for i in range(n)]


@pytest.mark.parametrize("trial", range(6))
def test_close_context_while_another_thread_generates(model, trial):
    before = live_handles()
    ctx = model.context(n_ctx=2048)
    started = threading.Event()
    t, box = _thread(_run, ctx, PROMPTS[0], 1900, on_piece=started.set)
    assert started.wait(30)
    time.sleep(random.Random(trial).random() * 0.05)
    t0 = time.perf_counter()
    ctx.close()  # cancels, waits for the call to leave llama.cpp, frees
    closed_in = time.perf_counter() - t0
    t.join(30)
    assert not t.is_alive()
    out = box["result"]
    assert isinstance(out, (Completion, pyllama_ernie.ClosedError)), out
    if isinstance(out, Completion):
        assert out.finish_reason == "cancelled" and out.completion_tokens < 1900
    assert closed_in < 5
    assert ctx.closed
    with pytest.raises(pyllama_ernie.ClosedError):
        ctx.logits([1, 2])
    with pytest.raises(pyllama_ernie.ClosedError):
        _raise(_run(ctx, [1, 2], 2))
    assert _live_delta(before) == {}
    assert model.generate([1, 5, 6], max_tokens=2, temperature=0).prompt_tokens == 3


def _raise(result):
    if isinstance(result, Exception):
        raise result
    return result


def test_close_while_a_prompt_is_evaluated(paths):
    with Model(paths["text"], n_ctx=2048, n_batch=2048, n_threads=1) as m:
        ctx = m.context()
        t, box = _thread(_run, ctx, _long_prompt(1900), 4)
        time.sleep(0.02)
        ctx.close()
        t.join(30)
        assert not t.is_alive()
        out = box["result"]
        # closed during the prompt: ClosedError; if the prompt was already done: a cancelled generation
        assert isinstance(out, pyllama_ernie.ClosedError) or out.finish_reason in ("cancelled", "length"), out
        assert ctx.closed


@pytest.mark.parametrize("trial", range(4))
def test_model_close_while_two_contexts_generate(paths, trial):
    before = live_handles()
    m = Model(paths["text"], n_ctx=2048, n_batch=256, n_threads=1)
    a, b = m.context(), m.context()
    started = [threading.Event(), threading.Event()]
    jobs = [_thread(_run, c, p, 1900, on_piece=e.set) for c, p, e in zip((a, b), PROMPTS, started)]
    # one more thread on the default context, through the public API
    default_job = _thread(lambda: _catch(m.generate, PROMPTS[2], max_tokens=1900, temperature=0, ignore_eos=True))
    for e in started:
        assert e.wait(30)
    time.sleep(random.Random(trial).random() * 0.05)
    m.close()
    for t, _ in jobs + [default_job]:
        t.join(30)
        assert not t.is_alive()
    for _, box in jobs + [default_job]:
        out = box["result"]
        assert isinstance(out, pyllama_ernie.ClosedError) or (
            isinstance(out, Completion) and out.finish_reason == "cancelled"), out
    assert m.closed and a.closed and b.closed
    with pytest.raises(pyllama_ernie.ClosedError):
        m.generate("x", max_tokens=1)
    with pytest.raises(pyllama_ernie.ClosedError):
        m.context()
    assert _live_delta(before) == {}


@pytest.mark.parametrize("trial", range(5))
def test_public_calls_racing_model_close_end_with_closed_error(paths, trial):
    """Threads calling generate / stream / logits / ctx in a loop while the model closes:
    each ends with ClosedError (never an AssertionError, AttributeError or a crash)."""
    before = live_handles()
    m = Model(paths["text"], n_ctx=512, n_batch=64, n_threads=1)
    rnd = random.Random(trial)
    running = threading.Barrier(4)

    def hammer(kind):
        running.wait()
        try:
            for i in range(100000):
                if kind == 0:
                    out = m.generate(PROMPTS[i % 4], max_tokens=1 + i % 7, temperature=0)
                    assert out.finish_reason in ("stop", "length", "cancelled")
                elif kind == 1:
                    for _ in m.stream(PROMPTS[i % 4], max_tokens=5, temperature=0.5, seed=i):
                        pass
                else:
                    with m.context(n_ctx=256) as c:
                        c.logits(PROMPTS[i % 4])
            return "never closed"
        except pyllama_ernie.ClosedError as e:
            return e
        except Exception as e:  # noqa: BLE001 - reported below
            return e

    jobs = [_thread(hammer, k) for k in range(3)]
    running.wait()
    time.sleep(0.01 + rnd.random() * 0.1)
    m.close()
    for t, _ in jobs:
        t.join(30)
        assert not t.is_alive()
    for _, box in jobs:
        assert isinstance(box["result"], pyllama_ernie.ClosedError), repr(box["result"])
    assert _live_delta(before) == {}


def _catch(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - reported by the caller
        return e


@pytest.mark.parametrize("trial", range(3))
def test_model_close_while_images_are_encoded(paths, trial):
    # the projector reads the model's vocabulary while it encodes: the model is freed after it
    before = live_handles()
    m = Model(paths["vl"], n_ctx=512, n_threads=1, mmproj_path=paths["mmproj"])
    rng = np.random.default_rng(1)
    images = [(rng.random((56, 56, 3)) * 255).astype(np.uint8) for _ in range(200)]
    first = threading.Event()

    def encode_all():
        n = 0
        try:
            for img in images:
                m.image_features(img)
                n += 1
                first.set()
        except pyllama_ernie.ErnieError as e:  # ClosedError (or "no projector" once it is gone)
            return n, e
        return n, None

    t, box = _thread(encode_all)
    assert first.wait(30)
    time.sleep(random.Random(trial).random() * 0.03)
    m.close()
    t.join(30)
    assert not t.is_alive()
    n, err = box["result"]
    assert n >= 1 and (err is None or isinstance(err, (pyllama_ernie.ClosedError, pyllama_ernie.ImageError)))
    assert _live_delta(before) == {}


# --- same thread ---------------------------------------------------------------


def test_close_with_an_open_stream_in_this_thread(model):
    ctx = model.context(n_ctx=256)
    gen = ctx.generate_tokens(PROMPTS[0], max_tokens=100, sampling=GREEDY, ignore_eos=True)
    first = next(gen)
    assert isinstance(first, str)
    ctx.close()  # the stream is paused: freed at once
    assert ctx.closed
    rest = list(gen)  # the next step finishes the stream without touching llama.cpp
    assert isinstance(rest[-1], Completion) and rest[-1].finish_reason == "cancelled"
    assert all(isinstance(p, str) for p in rest[:-1])
    with pytest.raises(pyllama_ernie.ClosedError):
        ctx.logits([1, 2])


def test_model_close_with_an_open_public_stream(paths):
    m = Model(paths["text"], n_ctx=256, n_threads=1)
    it = m.stream(PROMPTS[0], max_tokens=100, temperature=0, ignore_eos=True)
    next(it)
    m.close()
    assert m.closed
    list(it)  # ends cleanly
    with pytest.raises(pyllama_ernie.ClosedError):
        m.generate("x", max_tokens=1)


def test_close_from_inside_a_running_call_is_refused(model):
    seen = []

    def observe(name, op, srcs, computed, buffer):
        if not seen:
            try:
                ctx.close()
            except pyllama_ernie.BusyError as e:
                seen.append(e)

    ctx = model.context(n_ctx=128, observe_nodes=observe)
    ctx.logits([1, 5, 6])
    assert seen and isinstance(seen[0], pyllama_ernie.BusyError)
    assert not ctx.closed
    ctx.close()
    assert ctx.closed


def test_a_waiting_caller_gets_closed_error(model):
    ctx = model.context(n_ctx=2048)
    started = threading.Event()
    t1, box1 = _thread(_run, ctx, PROMPTS[0], 1900, on_piece=started.set)
    assert started.wait(30)
    t2, box2 = _thread(_run, ctx, PROMPTS[1], 5)  # waits for its turn
    time.sleep(0.02)
    ctx.close()
    t1.join(30)
    t2.join(30)
    assert not t1.is_alive() and not t2.is_alive()
    r1, r2 = box1["result"], box2["result"]
    assert isinstance(r1, (Completion, pyllama_ernie.ClosedError)), r1
    if isinstance(r1, Completion) and r1.finish_reason == "length":  # finished before close: r2 had its turn
        assert isinstance(r2, (Completion, pyllama_ernie.ClosedError)), r2
    else:
        assert isinstance(r2, pyllama_ernie.ClosedError), r2


# --- garbage collection -----------------------------------------------------


def test_dropping_a_model_without_close_frees_everything(paths):
    before = live_handles()
    m = Model(paths["vl"], n_ctx=256, n_threads=1, mmproj_path=paths["mmproj"])
    extra = m.context(n_ctx=128)
    m.generate([1, 5, 6], max_tokens=3, temperature=0)
    _run(extra, [1, 5], 3)
    it = m.stream([1, 7, 8], max_tokens=50, temperature=0.7, seed=1, ignore_eos=True)
    next(it)  # an open stream (holding a sampler) is dropped too
    assert _live_delta(before) == {"Model": 1, "Context": 2, "Projector": 1, "_Sampler": 1}
    del m, extra, it
    gc.collect()
    assert _live_delta(before) == {}


def test_model_outlives_a_context_it_cannot_see(paths):
    # the garbage collector clears the model's weak references to its contexts before
    # finalizers run, so Model.close() may not see a context: the model is freed with it
    before = live_handles()
    m = Model(paths["text"], n_ctx=128, n_threads=1)
    hidden = m.context()
    m._contexts.discard(hidden)
    m.close()
    assert _live_delta(before) == {"Model": 1, "Context": 1}
    with pytest.raises(pyllama_ernie.ClosedError):
        m.context()
    hidden.close()
    assert m.closed and _live_delta(before) == {}


def test_gc_in_a_loop_of_dropped_models(paths):
    before = live_handles()
    for i in range(10):
        m = Model(paths["text"], n_ctx=128, n_threads=1)
        m.context()  # dropped at once
        c = m.context()
        m.generate([1, 5], max_tokens=2, temperature=0)
        if i % 2:
            del c  # model and a context in one garbage cycle
        m = None
    gc.collect()
    assert _live_delta(before) == {}
