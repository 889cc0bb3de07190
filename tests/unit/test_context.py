"""Prompts at the edges: too long, filling the context, byte-fallback tokens, empty,
special-looking text, out-of-range ids, abandoned streams (tiny synthetic GGUF)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pyllama_ernie._lib", reason="pyllama_ernie is not built (pip install .)")

import pyllama_ernie
from pyllama_ernie import Model
from pyllama_ernie.context import Completion, Embeddings, SamplingParams
from pyllama_ernie.convert.synthetic import tiny_vocab, write_tiny_gguf

GREEDY = SamplingParams(temperature=0)
PROMPT = [1, 5, 6, 7, 40, 41]


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return write_tiny_gguf("ernie4_5", tmp_path_factory.mktemp("inputs") / "tiny.gguf", seed=1)


@pytest.fixture(scope="module")
def m(path):
    # llama.cpp rounds n_ctx up to a multiple of 256: the context holds 256 positions
    with Model(path, n_ctx=256, n_batch=64, n_threads=1) as model:
        yield model


@pytest.fixture(scope="module")
def byte_id():
    """Token id of the byte-fallback token ``<0xXX>`` of a byte value."""
    ids = {t: i for i, t in enumerate(tiny_vocab().tokens)}
    return lambda b: ids[f"<0x{b:02X}>".encode()]


def _run(ctx, tokens, max_tokens, sampling=GREEDY, **kw):
    items = list(ctx.generate_tokens(tokens, max_tokens=max_tokens, sampling=sampling, **kw))
    assert isinstance(items[-1], Completion)
    return items[:-1], items[-1]


# --- length ------------------------------------------------------------------


def test_prompt_longer_than_the_context_is_refused_before_any_decode(m):
    n = m.n_ctx
    first = m.generate(PROMPT, max_tokens=4, temperature=0)
    cached = m.ctx.n_cached
    assert cached >= len(PROMPT)
    too_long = [5 + i % 200 for i in range(n + 1)]
    with pytest.raises(pyllama_ernie.PromptTooLongError):
        m.generate(too_long, max_tokens=1)
    with pytest.raises(pyllama_ernie.PromptTooLongError):
        m.stream(too_long, max_tokens=1)  # at the call, before the first piece
    with pytest.raises(pyllama_ernie.PromptTooLongError):
        m.logits(too_long)
    with pytest.raises(pyllama_ernie.PromptTooLongError):
        m.generate("Hello world " * n, max_tokens=1)
    with pytest.raises(pyllama_ernie.PromptTooLongError):
        _run(m.ctx, too_long, 1)
    with pytest.raises(pyllama_ernie.PromptTooLongError):
        m.ctx.logits(too_long)
    rows = Embeddings(np.zeros((n + 1, m.n_embd), np.float32), np.arange(n + 1))
    with pytest.raises(pyllama_ernie.PromptTooLongError):
        _run(m.ctx, [rows], 1)
    # nothing was decoded or cleared: the KV cache still holds the first call's tokens
    assert m.ctx.n_cached == cached
    again = m.generate(PROMPT, max_tokens=4, temperature=0)
    assert again.prompt_tokens_evaluated == 1  # only the last prompt token, for its logits
    assert again.tokens == first.tokens
    # PromptTooLongError is also a ValueError and a DecodeError
    assert issubclass(pyllama_ernie.PromptTooLongError, ValueError)


def test_a_prompt_that_exactly_fills_the_context(m):
    n = m.n_ctx
    full = [5 + i % 200 for i in range(n)]
    out = m.generate(full, max_tokens=10, temperature=0, ignore_eos=True)
    assert out.finish_reason == "length" and out.completion_tokens == 0 and out.text == ""
    out = m.generate(full[:-1], max_tokens=10, temperature=0, ignore_eos=True)
    assert out.finish_reason == "length" and out.completion_tokens == 1


@pytest.mark.parametrize("sampled", [False, True])
def test_generation_that_reaches_the_end_of_the_context(m, sampled):
    n = m.n_ctx
    kw = {"temperature": 1.2, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": 7} if sampled else {"temperature": 0}
    out = m.generate(PROMPT, max_tokens=10 * n, ignore_eos=True, **kw)
    assert out.finish_reason == "length"
    assert out.completion_tokens < 10 * n  # stopped by the context, not by max_tokens
    assert out.prompt_tokens + out.completion_tokens == n
    out.text.encode("utf-8")  # valid text (no lone surrogates)
    assert out.text == m.detokenize(out.tokens, special=False)
    pieces = list(m.stream(PROMPT, max_tokens=10 * n, ignore_eos=True, **kw))
    assert "".join(pieces) == out.text
    # the model still works after a full context
    assert m.generate(PROMPT[:3], max_tokens=2, temperature=0).prompt_tokens == 3


# --- bytes -------------------------------------------------------------------


def test_byte_fallback_tokens_detokenize_without_raising(m, byte_id):
    ni = [byte_id(b) for b in "你".encode()]  # e4 bd a0
    assert [m.token_to_piece(t) for t in ni] == [b"\xe4", b"\xbd", b"\xa0"]
    assert m.detokenize(ni) == "你"
    assert m.detokenize(ni[:2]) == "\ufffd"  # a character cut short
    assert m.detokenize(ni[1:]) == "\ufffd\ufffd"  # continuation bytes without a lead byte
    assert m.detokenize([byte_id(0xFF), byte_id(0x41)]) == "\ufffdA"  # never valid in UTF-8
    assert m.detokenize([byte_id(0xC0), byte_id(0x80)]) == "\ufffd\ufffd"  # overlong form
    assert m.detokenize([byte_id(0xED), byte_id(0xA0), byte_id(0x80)]).count("\ufffd") >= 1  # a surrogate
    for text in ("é", "aé你🙂z", "🙂🙂", "\u00a0x"):
        toks = m.tokenize(text)
        assert m.detokenize(toks) == text
    # "é" is not in the tiny vocabulary: byte tokens carry it
    assert m.tokenize("é") == [byte_id(0xC3), byte_id(0xA9)]


def test_byte_tokens_in_a_prompt_and_prompts_that_split_a_character(m, byte_id):
    ni = [byte_id(b) for b in "你".encode()]
    for prompt in ([1] + ni, [1] + ni[:2], [1] + ni[1:], [1, byte_id(0xFF)] * 3):
        out = m.generate(prompt, max_tokens=8, temperature=0, ignore_eos=True)
        out.text.encode("utf-8")
        assert "".join(m.stream(prompt, max_tokens=8, temperature=0, ignore_eos=True)) == out.text


def test_stream_pieces_never_split_a_character(m, byte_id):
    """Sampled generations full of byte tokens: pieces are whole characters, invalid bytes U+FFFD."""
    byte_of = {byte_id(b): b for b in range(256)}
    assembled = replaced = 0
    for seed in range(12):
        kw = {"max_tokens": 80, "temperature": 1.5, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": seed,
              "ignore_eos": True, "stop": ["\ufffd" * 4] if seed % 3 == 0 else None}
        out = m.generate(PROMPT, **kw)
        pieces = list(m.stream(PROMPT, **kw))
        assert "".join(pieces) == out.text
        for p in pieces:
            assert p  # no empty pieces
            p.encode("utf-8")  # no lone surrogates
        raw = b"".join(m.token_to_piece(t, special=False) for t in out.tokens)
        expect = raw.decode("utf-8", "replace")
        if out.stop is None:
            assert out.text == expect
        else:
            assert expect.startswith(out.text)
        replaced += out.text.count("\ufffd")
        # multi-byte characters assembled from consecutive byte tokens
        run = bytearray()
        for t in out.tokens + [-1]:
            if t in byte_of:
                run.append(byte_of[t])
                continue
            assembled += sum(ord(c) > 127 for c in bytes(run).decode("utf-8", "replace") if c != "\ufffd")
            run.clear()
    assert replaced > 0, "no invalid byte sequence was generated: the test does not exercise U+FFFD"
    assert assembled > 0, "no character was assembled from byte tokens: the test does not exercise splitting"


# --- odd prompts -------------------------------------------------------------


def test_empty_prompt_is_a_value_error(m):
    for call in (
        lambda: m.generate("", max_tokens=1),
        lambda: m.generate([], max_tokens=1),
        lambda: m.stream("", max_tokens=1),
        lambda: m.logits([]),
        lambda: m.logits(""),
        lambda: m.ctx.logits([]),
        lambda: _run(m.ctx, [], 1),
    ):
        with pytest.raises(ValueError):
            call()
    assert m.tokenize("") == []
    assert m.detokenize([]) == ""
    assert m.generate(PROMPT, max_tokens=2, temperature=0).prompt_tokens == len(PROMPT)


def test_unknown_special_looking_text_is_plain_text(m):
    special_ids = {t for t in range(m.n_vocab) if m.token_to_piece(t, special=False) == b""}
    for text in ("<|not_a_token|>", "<|IMAGE_STAR|>", "<|end_of_sentence", "</s >", "<mask:9>"):
        toks = m.tokenize(text)
        assert toks and not set(toks) & special_ids, (text, toks)
        assert m.detokenize(toks) == text
        assert b"".join(m.token_to_piece(t) for t in toks).decode() == text
        out = m.generate(text, max_tokens=3, temperature=0)
        assert out.prompt_tokens == len(toks)
    # a real special token is one id, unless special parsing is off
    eos_text = m.token_to_piece(m.eog_tokens[-1]).decode()
    assert m.tokenize(eos_text) == [m.eog_tokens[-1]]
    assert m.eog_tokens[-1] not in m.tokenize(eos_text, parse_special=False)


@pytest.mark.parametrize("bad", [-1, "n_vocab", "n_vocab+5", 2**31, 2**40])
def test_out_of_range_token_ids_are_tokenize_errors(m, bad):
    tok = {"n_vocab": m.n_vocab, "n_vocab+5": m.n_vocab + 5}.get(bad, bad)
    for call in (
        lambda: m.generate([1, tok], max_tokens=1),
        lambda: m.stream([1, tok], max_tokens=1),
        lambda: m.logits([tok]),
        lambda: m.detokenize([1, tok]),
        lambda: m.token_to_piece(tok),
        lambda: m.ctx.logits([1, tok]),
        lambda: _run(m.ctx, [1, tok], 1),
    ):
        with pytest.raises(pyllama_ernie.TokenizeError):
            call()
    # nothing reached llama.cpp; the model still works
    assert m.generate(PROMPT, max_tokens=2, temperature=0).prompt_tokens == len(PROMPT)


# --- abandoned streams -------------------------------------------------------


def test_stream_closed_early_then_generate_again(path):
    with Model(path, n_ctx=256, n_batch=64, n_threads=1) as model:
        expected = model.generate(PROMPT, max_tokens=20, temperature=0, ignore_eos=True)
        it = model.stream(PROMPT, max_tokens=20, temperature=0, ignore_eos=True)
        first = next(it)
        assert expected.text.startswith(first)
        it.close()
        again = model.generate(PROMPT, max_tokens=20, temperature=0, ignore_eos=True)
        assert again.tokens == expected.tokens and again.text == expected.text

        # dropped without close (freed by reference counting)
        it = model.stream(PROMPT, max_tokens=20, temperature=0.9, seed=3, ignore_eos=True)
        next(it)
        del it
        assert model.generate(PROMPT, max_tokens=20, temperature=0, ignore_eos=True).tokens == expected.tokens

        # closed after the last piece (before the Completion was reached)
        it = model.stream(PROMPT, max_tokens=3, temperature=0, ignore_eos=True)
        assert "".join(list(it)) == model.generate(PROMPT, max_tokens=3, temperature=0, ignore_eos=True).text

        # created, never started: holds nothing
        idle = model.stream(PROMPT, max_tokens=5, temperature=0)
        assert model.generate(PROMPT, max_tokens=20, temperature=0, ignore_eos=True).tokens == expected.tokens
        assert "".join(idle) == model.generate(PROMPT, max_tokens=5, temperature=0).text

        # the same on a context of its own, through the low-level generator
        with model.context(n_ctx=256) as ctx:
            gen = ctx.generate_tokens(PROMPT, max_tokens=20, sampling=GREEDY, ignore_eos=True)
            next(gen)
            gen.close()
            pieces, out = _run(ctx, PROMPT, 20, ignore_eos=True)
            assert out.tokens == expected.tokens and "".join(pieces) == out.text
