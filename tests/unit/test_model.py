"""The Python API on tiny synthetic GGUFs (no torch needed).

Numbers are checked against the independent NumPy forward pass in
pyllama_ernie.selfcheck; behaviour (streaming, stops, seeds, lifetime, errors)
against what the API promises.
"""

from __future__ import annotations

import gc
import logging
import platform
import threading

import numpy as np
import pytest

pe = pytest.importorskip("pyllama_ernie._lib", reason="pyllama_ernie is not built (pip install .)")

import pyllama_ernie  # noqa: E402
from pyllama_ernie import Model  # noqa: E402
from pyllama_ernie.convert.synthetic import write_tiny_gguf  # noqa: E402
from pyllama_ernie.selfcheck import numpy_forward  # noqa: E402

PROMPT = "Hello world, this is a test of ERNIE."


@pytest.fixture(scope="module", params=["ernie4_5", "ernie4_5-moe"])
def tiny_path(request, tmp_path_factory):
    return write_tiny_gguf(request.param, tmp_path_factory.mktemp("tiny") / f"{request.param}.gguf", seed=1)


@pytest.fixture(scope="module")
def exact(tiny_path):
    """A model configured for exact numbers (f32 KV cache, no flash attention)."""
    with Model(tiny_path, n_ctx=512, n_batch=8, kv_cache_type="f32", flash_attn=False) as m:
        yield m


def test_logits_match_numpy_reference(exact, tiny_path):
    toks = exact.tokenize(PROMPT)
    assert len(toks) > 8  # spans more than one n_batch=8 decode
    ours = exact.logits(toks)
    ref = numpy_forward(tiny_path, toks)
    assert ours.shape == (len(toks), exact.n_vocab)
    assert ours.dtype == np.float32
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    assert rel < 1e-5, rel


def test_logits_of_str_and_tokens_agree(exact):
    a = exact.logits(PROMPT)
    b = exact.logits(exact.tokenize(PROMPT))
    np.testing.assert_array_equal(a, b)


def test_greedy_is_argmax_of_logits(exact):
    toks = exact.tokenize(PROMPT)
    out = exact.generate(toks, max_tokens=8, temperature=0)
    # every greedy token is the argmax of the logits over the extended sequence
    seq = toks + out.tokens
    lg = exact.logits(seq)
    for i, t in enumerate(out.tokens):
        assert int(lg[len(toks) - 1 + i].argmax()) == t


def test_stream_joins_to_generate(exact):
    full = exact.generate(PROMPT, max_tokens=24, temperature=0)
    pieces = list(exact.stream(PROMPT, max_tokens=24, temperature=0))
    assert "".join(pieces) == full.text
    assert all(isinstance(p, str) and p for p in pieces)


def test_max_tokens_and_finish_reason(exact):
    out = exact.generate(PROMPT, max_tokens=5, temperature=0)
    assert out.finish_reason in ("length", "stop")
    if out.finish_reason == "length":
        assert out.completion_tokens == 5 == len(out.tokens)
    assert exact.generate(PROMPT, max_tokens=0, temperature=0).tokens == []


def test_stop_string_is_not_emitted(exact):
    full = exact.generate(PROMPT, max_tokens=24, temperature=0)
    text = full.text
    assert len(text) > 6
    stop = text[3:6]
    cut = exact.generate(PROMPT, max_tokens=24, temperature=0, stop=[stop, "\x00never"])
    assert cut.finish_reason == "stop"
    assert cut.stop == stop
    assert cut.text == text[: text.index(stop)]
    streamed = "".join(exact.stream(PROMPT, max_tokens=24, temperature=0, stop=stop))
    assert streamed == cut.text


def test_seeded_sampling_is_reproducible(exact):
    a = exact.generate(PROMPT, max_tokens=16, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=42)
    b = exact.generate(PROMPT, max_tokens=16, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=42)
    c = exact.generate(PROMPT, max_tokens=16, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=43)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens


def test_prefix_cache_evaluates_only_new_tokens(exact):
    toks = exact.tokenize(PROMPT)
    first = exact.generate(toks, max_tokens=4, temperature=0)
    again = exact.generate(toks + first.tokens, max_tokens=4, temperature=0)
    assert again.prompt_tokens == len(toks) + len(first.tokens)
    assert again.prompt_tokens_evaluated <= len(first.tokens) + 1
    # and the cached result equals a cold one
    exact.ctx.reset()
    cold = exact.generate(toks + first.tokens, max_tokens=4, temperature=0)
    assert cold.prompt_tokens_evaluated == cold.prompt_tokens
    assert cold.tokens == again.tokens


def test_tokenize_detokenize_roundtrip(exact):
    text = "Hello world 你好 🙂  spaces\tand\nlines"
    toks = exact.tokenize(text, add_special=False)
    assert exact.detokenize(toks) == text
    with_special = exact.tokenize(text)
    if exact.add_bos:
        assert with_special[0] == exact.bos_token and with_special[1:] == toks
    else:
        assert with_special == toks


def test_stream_never_splits_utf8(exact):
    # whatever is generated, every piece is valid str and joins to the full text
    out = exact.generate("你好🙂", max_tokens=32, temperature=1.0, seed=3, top_k=0, min_p=0.0)
    pieces = list(exact.stream("你好🙂", max_tokens=32, temperature=1.0, seed=3, top_k=0, min_p=0.0))
    assert "".join(pieces) == out.text
    for p in pieces:
        p.encode("utf-8")  # a lone surrogate would raise


def test_close_twice_and_use_after_close(tiny_path):
    m = Model(tiny_path, n_ctx=128)
    ctx = m.context()
    m.close()
    m.close()
    assert m.closed and ctx.closed
    with pytest.raises(pyllama_ernie.ClosedError):
        m.tokenize("x")
    with pytest.raises(pyllama_ernie.ClosedError):
        m.generate("x", max_tokens=1)
    with pytest.raises(pyllama_ernie.ClosedError):
        ctx.logits([1, 2])


def test_context_manager_and_finalizer(tiny_path):
    with Model(tiny_path, n_ctx=128) as m:
        assert not m.closed
    assert m.closed
    m2 = Model(tiny_path, n_ctx=128)
    del m2
    gc.collect()


def test_independent_contexts(exact):
    with exact.context(n_ctx=256) as other:
        a = exact.ctx.logits(exact.tokenize(PROMPT))
        b = other.logits(exact.tokenize(PROMPT))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_reentrant_use_during_stream_is_refused(exact):
    it = exact.stream(PROMPT, max_tokens=8, temperature=0)
    next(it)
    with pytest.raises(pyllama_ernie.BusyError):
        exact.generate(PROMPT, max_tokens=1)
    it.close()
    assert exact.generate(PROMPT, max_tokens=1, temperature=0).completion_tokens <= 1


def test_two_threads_share_a_context_in_turns(exact):
    expected = exact.generate(PROMPT, max_tokens=12, temperature=0).tokens
    results, errors = [], []

    def work():
        try:
            results.append(exact.generate(PROMPT, max_tokens=12, temperature=0).tokens)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a generating thread did not finish"
    assert not errors
    assert results == [expected] * 3


def test_prompt_too_long(tiny_path):
    with Model(tiny_path, n_ctx=32) as m:
        long = [3 + i % 100 for i in range(m.n_ctx + 8)]
        with pytest.raises(pyllama_ernie.PromptTooLongError):
            m.logits(long)
        with pytest.raises(pyllama_ernie.PromptTooLongError):
            m.generate(long, max_tokens=1)
        with pytest.raises(pyllama_ernie.PromptTooLongError):
            m.stream(long, max_tokens=1)
        # still usable
        assert m.generate([1, 5, 6], max_tokens=2, temperature=0).prompt_tokens == 3


def test_generation_stops_when_context_is_full(tiny_path):
    with Model(tiny_path, n_ctx=32) as m:
        n = m.n_ctx
        out = m.generate([3 + i % 100 for i in range(n - 4)], max_tokens=100, temperature=0)
        assert out.finish_reason in ("length", "stop")
        assert out.prompt_tokens + out.completion_tokens <= n


def test_bad_arguments(exact):
    with pytest.raises(pyllama_ernie.TokenizeError):
        exact.logits([exact.n_vocab + 5])
    with pytest.raises(ValueError):
        exact.generate(PROMPT, top_p=0.0)
    with pytest.raises(ValueError):
        exact.generate("", max_tokens=1)
    with pytest.raises(TypeError):
        exact.tokenize(b"bytes")  # type: ignore[arg-type]


@pytest.mark.parametrize("content, exc", [
    (b"", pyllama_ernie.InvalidModelFileError),
    (b"not a gguf file at all, just some text", pyllama_ernie.InvalidModelFileError),
    (b"GGUF\x09\x00\x00\x00" + b"\x00" * 16, pyllama_ernie.InvalidModelFileError),
    (b"GGUF\x03\x00\x00\x00" + b"\xff" * 16, pyllama_ernie.InvalidModelFileError),
])
def test_bad_files_raise(tmp_path, content, exc):
    p = tmp_path / "bad.gguf"
    p.write_bytes(content)
    with pytest.raises(exc):
        Model(p)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        Model(tmp_path / "nope.gguf")
    with pytest.raises(pyllama_ernie.ModelLoadError):
        Model(tmp_path)


def test_truncated_file_is_a_load_error(tiny_path, tmp_path):
    data = tiny_path.read_bytes()
    p = tmp_path / "truncated.gguf"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(pyllama_ernie.ModelLoadError) as ei:
        Model(p)
    assert "truncated" in str(ei.value)  # refused before llama.cpp reads it, saying why


def test_progress_callback_and_cancel(tiny_path):
    seen = []
    with Model(tiny_path, n_ctx=64, progress=lambda f: seen.append(f)) as m:
        assert m.n_vocab > 0
    assert seen and seen[-1] == pytest.approx(1.0)
    with pytest.raises(pyllama_ernie.ModelLoadError, match="cancelled"):
        Model(tiny_path, progress=lambda f: False)

    def boom(f):
        raise RuntimeError("from the callback")

    with pytest.raises(RuntimeError, match="from the callback"):
        Model(tiny_path, progress=boom)


def test_cancel_from_another_thread(tiny_path):
    with Model(tiny_path, n_ctx=4096, n_batch=4096) as m:
        toks = [1] + [5 + (i % 200) for i in range(3000)]
        done = threading.Event()

        def keep_cancelling():
            while not done.is_set():
                m.ctx.cancel()
                done.wait(0.001)

        t = threading.Thread(target=keep_cancelling)
        t.start()
        try:
            with pytest.raises(pyllama_ernie.DecodeError, match="cancelled"):
                m.logits(toks)
        finally:
            done.set()
            t.join(timeout=30)
        assert not t.is_alive()
        # the model stays usable
        assert m.generate([1, 5, 6], max_tokens=2, temperature=0).prompt_tokens == 3


def test_logs_go_to_python_logging(tiny_path, caplog):
    pyllama_ernie.set_log_level("INFO")
    try:
        with caplog.at_level(logging.INFO, logger="pyllama_ernie"):
            with Model(tiny_path, n_ctx=64):
                pass
        assert any("llama_model_loader" in r.getMessage() or "print_info" in r.getMessage() for r in caplog.records)
        assert all(r.name == "pyllama_ernie" for r in caplog.records)
    finally:
        pyllama_ernie.set_log_level("WARNING")


def test_quiet_by_default(tiny_path, capfd):
    with Model(tiny_path, n_ctx=64) as m:
        m.generate("Hello", max_tokens=2)
    captured = capfd.readouterr()
    assert captured.out == ""
    assert "llama_model_loader" not in captured.err
    assert "special_eot_id" not in captured.err  # <|end_of_sentence|> is an end-of-generation token (patch 0003)


def test_ignore_eos_takes_the_best_token_that_is_not_banned(exact):
    """Greedy with ignore_eos: when the best token ends generation, the next best is taken."""
    row = exact.logits(PROMPT)[-1]
    order = np.argsort(-row, kind="stable")
    best, second = int(order[0]), int(order[1])
    assert row[best] > row[second]  # no tie at the top for this prompt
    real = exact.eog_tokens
    try:
        exact.vocab._eog = real + [best]  # pretend the best token is an end-of-generation token
        out = exact.generate(PROMPT, max_tokens=1, temperature=0, ignore_eos=True)
    finally:
        exact.vocab._eog = real
    assert out.tokens == [second]
    assert exact.generate(PROMPT, max_tokens=1, temperature=0, ignore_eos=True).tokens == [best]


def test_system_info():
    info = pyllama_ernie.system_info()
    assert info["version"] == pyllama_ernie.__version__
    assert info["llama_cpp_commit"].startswith("0c1e57098")
    assert "CPU" in info["backends"]
    assert isinstance(info["patches"], list)
    assert info["cpu_features"]
    if platform.machine() in ("x86_64", "AMD64"):
        assert "AVX2" in info["cpu_features"]  # these machines get a variant with AVX2 or more
    from pyllama_ernie import _build_info, offload

    assert info["build"]["backend_modules"] is _build_info.GGML_BACKEND_DL
    if _build_info.GGML_CUDA and not offload.gpu_devices():
        assert info["no_gpu_reason"].startswith("this build has CUDA")
    else:
        assert info["no_gpu_reason"] is None


# the instruction sets of the package's x86 CPU variants (CMakeLists.txt), as /proc/cpuinfo names them
_HASWELL = {"sse4_2", "avx", "f16c", "fma", "avx2", "bmi2"}
_AVX512 = _HASWELL | {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"}
_VARIANT_FLAGS = {
    "x64": set(), "haswell": _HASWELL, "alderlake": _HASWELL | {"avx_vnni"}, "skylakex": _AVX512,
    "icelake": _AVX512 | {"avx512vbmi", "avx512_vnni"}, "zen4": _AVX512 | {"avx512vbmi", "avx512_vnni", "avx512_bf16"},
}


@pytest.mark.cpu_feature  # declared skip: a build without CPU variants (not x86), no /proc/cpuinfo
def test_loads_the_best_cpu_variant_this_cpu_has():
    info = pyllama_ernie.system_info()
    variants = info["build"]["cpu_variants"]
    if not variants:
        pytest.skip("a build with one CPU backend")
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(ln for ln in f if ln.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo")
    assert set(variants) <= set(_VARIANT_FLAGS), variants
    got = info["cpu_variant"]
    supported = [v for v in variants if _VARIANT_FLAGS[v] <= flags]
    assert got in supported, (got, supported)
    assert not [v for v in supported if _VARIANT_FLAGS[v] > _VARIANT_FLAGS[got]]
    assert info["build"]["backend_modules"]
    if got in ("skylakex", "icelake", "zen4"):
        assert "AVX512" in info["cpu_features"]


def test_ignore_eos_never_ends_early(exact):
    out = exact.generate(PROMPT, max_tokens=40, temperature=0, ignore_eos=True)
    assert out.finish_reason == "length" and out.completion_tokens == 40
    assert not any(exact.is_eog(t) for t in out.tokens)
    sampled = exact.generate(PROMPT, max_tokens=40, temperature=1.5, top_k=0, min_p=0.0, seed=5, ignore_eos=True)
    assert sampled.completion_tokens == 40 and not any(exact.is_eog(t) for t in sampled.tokens)
    assert exact.eog_tokens and all(exact.is_eog(t) for t in exact.eog_tokens)
    end_of_turn = exact.tokenize("<|end_of_sentence|>", add_special=False)
    assert len(end_of_turn) == 1 and exact.is_eog(end_of_turn[0])
