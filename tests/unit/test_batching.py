"""Continuous batching (``Model(n_parallel=N)``): requests served together give the results
they give alone, keep their own settings, and the queue, cancellation and close behave.

Tiny synthetic models (no torch). "Alone" is the one-context path (``n_parallel=None``), itself
checked against transformers in tests/parity. f32 KV cache and no flash attention: the exact mode.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

import pyllama_ernie as pe
from pyllama_ernie import IMAGE_MARKER, _lib
from pyllama_ernie.errors import ClosedError, PromptTooLongError, QueueFullError

EXACT = dict(kv_cache_type="f32", flash_attn=False)


@pytest.fixture(scope="module")
def vl(tiny_vl):
    return tiny_vl


def _rgb(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _requests():
    """Eight requests of different lengths, images, stop strings and sampling settings."""
    reqs = []
    for i in range(8):
        text = "one two three " * (1 + 3 * i)
        kw = dict(max_tokens=12 + 5 * i, temperature=0)
        if i % 3 == 0:
            kw["images"] = [_rgb(28 + 14 * (i % 2), 42, seed=i)]
            text = f"look {IMAGE_MARKER} at {text}"
        if i % 4 == 1:
            kw.update(temperature=0.9, seed=100 + i, top_k=20)  # sampled, seeded
        if i == 5:
            kw["ignore_eos"] = True
        reqs.append((text, kw))
    return reqs


def _alone(path, mmproj, reqs):
    with pe.Model(path, mmproj_path=mmproj, n_ctx=1024, **EXACT) as m:
        return [m.generate(text, **kw) for text, kw in reqs]


def _together(m, reqs, stream=False):
    out = [None] * len(reqs)
    errors = []

    def run(i):
        text, kw = reqs[i]
        try:
            if stream:
                out[i] = "".join(m.stream(text, **kw))
            else:
                out[i] = m.generate(text, **kw)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    return out


def test_eight_concurrent_requests_match_each_run_alone(vl):
    path, mmproj = vl
    reqs = _requests()
    alone = _alone(path, mmproj, reqs)
    # a stop string taken from what request 2 says alone, so that it is hit midway
    stop_text = alone[2].text[len(alone[2].text) // 2:][:3]
    if stop_text.strip():
        reqs[2][1]["stop"] = [stop_text]
        alone[2] = _alone(path, mmproj, [reqs[2]])[0]
        assert alone[2].finish_reason == "stop"
    with pe.Model(path, mmproj_path=mmproj, n_ctx=1024, n_parallel=4, **EXACT) as m:
        together = _together(m, reqs)
        streamed = _together(m, reqs, stream=True)
        stats = m.stats()
    for a, b, s in zip(alone, together, streamed):
        assert b.tokens == a.tokens
        assert b.text == a.text == s
        assert b.finish_reason == a.finish_reason
        assert b.prompt_tokens == a.prompt_tokens
    assert stats["requests_total"] == 16 and stats["busy"] == 0 and stats["queued"] == 0
    assert stats["completion_tokens_total"] == 2 * sum(a.completion_tokens for a in alone)
    # the second round found some prompts (those whose sequences were not reused) in the caches
    assert stats["prompt_tokens_cached_total"] > 0


def test_logits_through_the_engine_model_match(tiny_gguf):
    path = tiny_gguf("ernie4_5-moe")
    with pe.Model(path, n_ctx=256, **EXACT) as m:
        ref = m.logits("the logits of a prompt")
    with pe.Model(path, n_ctx=256, n_parallel=2, **EXACT) as m:
        np.testing.assert_array_equal(m.logits("the logits of a prompt"), ref)


def test_a_continued_conversation_reuses_its_sequence(tiny_gguf):
    path = tiny_gguf("ernie4_5-moe")
    with pe.Model(path, n_ctx=512, n_parallel=3, **EXACT) as m:
        first = m.generate("a conversation that goes on and on", max_tokens=8, temperature=0)
        m.generate("something else entirely, to take another sequence", max_tokens=4, temperature=0)
        prompt = m.tokenize("a conversation that goes on and on") + first.tokens + m.tokenize(" more", False)
        second = m.generate(prompt, max_tokens=4, temperature=0)
    # everything but the final answer token and " more" came from the cache
    assert second.prompt_tokens_evaluated == len(prompt) - (first.prompt_tokens + first.completion_tokens - 1)


def test_queue_full_raises_and_a_slot_frees(tiny_gguf):
    path = tiny_gguf("ernie4_5")
    with pe.Model(path, n_ctx=256, n_parallel=1, max_queue=1) as m:
        held = m.stream("hold the only sequence", max_tokens=200, ignore_eos=True, temperature=0)
        next(held)
        waiting = m.create_completion("wait in the queue", stream=True, max_tokens=2, temperature=0,
                                      ignore_eos=True)
        with pytest.raises(QueueFullError) as e:
            m.generate("one too many", max_tokens=2)
        assert e.value.retry_after > 0
        held.close()  # leaving a stream cancels it: the waiting request gets the sequence
        last = list(waiting)[-1]
        assert (last["usage"]["completion_tokens"], last["choices"][0]["finish_reason"]) == (2, "length")
        assert m.stats()["busy"] == 0
        assert m.stats()["cancelled_total"] == 1


def test_an_abandoned_waiting_request_frees_its_place(tiny_gguf):
    path = tiny_gguf("ernie4_5")
    with pe.Model(path, n_ctx=256, n_parallel=1, max_queue=1) as m:
        held = m.stream("hold the only sequence", max_tokens=240, ignore_eos=True, temperature=0)
        next(held)
        waiting = m.stream("never read", max_tokens=2, temperature=0)
        assert m.stats()["queued"] == 1
        del waiting  # dropped unread: its place in the queue is free again
        assert m.stats()["queued"] == 0
        again = m.create_completion("takes the place", stream=True, max_tokens=2, temperature=0, ignore_eos=True)
        with pytest.raises(QueueFullError):
            m.generate("one too many", max_tokens=2)
        held.close()
        assert list(again)[-1]["usage"]["completion_tokens"] == 2
        assert m.stats()["cancelled_total"] == 2


def test_cancel_one_request_leaves_the_others(tiny_gguf):
    path = tiny_gguf("ernie4_5")
    with pe.Model(path, n_ctx=256, n_parallel=3, **EXACT) as m:
        ref = m.generate("keep going", max_tokens=30, temperature=0, ignore_eos=True)
        ev = threading.Event()
        victim = m.stream("stop me", max_tokens=200, temperature=0, ignore_eos=True, cancel=ev)
        next(victim)
        other = m.generate("keep going", max_tokens=30, temperature=0, ignore_eos=True)
        ev.set()
        rest = list(victim)
        assert len(rest) < 200
        assert other.tokens == ref.tokens


def test_model_cancel_ends_every_request(tiny_gguf):
    path = tiny_gguf("ernie4_5")
    with pe.Model(path, n_ctx=256, n_parallel=2, max_queue=4) as m:
        results = []
        threads = [threading.Thread(target=lambda: results.append(
            m.generate("long", max_tokens=240, ignore_eos=True, temperature=0))) for _ in range(4)]
        for t in threads:
            t.start()
        while m.stats()["busy"] == 0:
            time.sleep(0.01)
        m.cancel()
        for t in threads:
            t.join(60)
        assert len(results) == 4
        assert {r.finish_reason for r in results} <= {"cancelled", "length"}
        assert any(r.finish_reason == "cancelled" for r in results)
        # still usable
        assert m.generate("after", max_tokens=3, temperature=0, ignore_eos=True).completion_tokens == 3


def test_prompt_too_long_names_the_window(tiny_gguf):
    path = tiny_gguf("ernie4_5")
    with pe.Model(path, n_ctx=256, n_parallel=2) as m:
        with pytest.raises(PromptTooLongError) as e:
            m.generate(list(range(5, 5 + 300)), max_tokens=1)
        assert e.value.n_ctx == 256 and e.value.n_prompt == 300
        assert "256" in str(e.value)


def test_close_while_generating_and_waiting(tiny_gguf):
    path = tiny_gguf("ernie4_5")
    m = pe.Model(path, n_ctx=256, n_parallel=1, max_queue=2)
    running = m.stream("running", max_tokens=250, ignore_eos=True, temperature=0)
    next(running)
    waiting = m.stream("waiting", max_tokens=5, temperature=0)
    m.close()
    rest = list(running)  # what was produced before the close, then it ends without an error
    assert len(rest) < 250
    with pytest.raises(ClosedError):
        list(waiting)
    with pytest.raises(ClosedError):
        m.generate("after close")
    assert _lib.live_handles().get("Engine", 0) == 0


def test_asyncio_requests_run_together_and_aclose_cancels(tiny_gguf):
    path = tiny_gguf("ernie4_5")
    prompts = [f"prompt number {i} " * (i + 1) for i in range(6)]
    with pe.Model(path, n_ctx=512, **EXACT) as m:
        ref = [m.create_completion(p, max_tokens=10, temperature=0)["choices"][0]["text"] for p in prompts]
    with pe.Model(path, n_ctx=512, n_parallel=3, **EXACT) as m:
        async def main():
            texts = await asyncio.gather(*(m.acreate_completion(p, max_tokens=10, temperature=0) for p in prompts))
            stream = await m.astream("hi", max_tokens=200, ignore_eos=True, temperature=0)
            got = []
            async for piece in stream:
                got.append(piece)
                if len(got) == 3:
                    break
            await stream.aclose()
            for _ in range(200):
                if m.stats()["busy"] == 0:
                    break
                await asyncio.sleep(0.01)
            return [t["choices"][0]["text"] for t in texts], m.stats()

        texts, stats = asyncio.run(main())
    assert texts == ref
    assert stats["busy"] == 0 and stats["cancelled_total"] == 1


def test_async_errors_come_from_the_await(tiny_gguf):
    path = tiny_gguf("ernie4_5")
    with pe.Model(path, n_ctx=256, n_parallel=2) as m:
        async def main():
            with pytest.raises(PromptTooLongError):
                await m.acreate_completion(list(range(5, 400)), max_tokens=1)
            with pytest.raises(ValueError):
                await m.acreate_completion("x", max_tokens=-1)
        asyncio.run(main())


@pytest.mark.parametrize("n_parallel", [None, 2])
def test_edges_end_as_one_context_ends_them(tiny_gguf, n_parallel):
    path = tiny_gguf("ernie4_5")
    with pe.Model(path, n_ctx=256, n_parallel=n_parallel, **EXACT) as m:
        zero = m.generate("nothing", max_tokens=0)
        assert (zero.completion_tokens, zero.finish_reason, zero.text) == (0, "length", "")
        full = m.generate(list(range(10, 10 + 256)), max_tokens=5, temperature=0)  # fills the window
        assert (full.completion_tokens, full.finish_reason) == (0, "length")
        near = m.generate(list(range(10, 10 + 253)), max_tokens=10, temperature=0, ignore_eos=True)
        assert (near.completion_tokens, near.finish_reason) == (3, "length")


def test_n_ctx_0_gives_each_sequence_the_training_length(tiny_gguf):
    path = tiny_gguf("ernie4_5")
    with pe.Model(path, n_ctx=0, n_parallel=2) as m:
        assert m.n_ctx == m.n_ctx_train
        assert m.generate("fits", max_tokens=2, temperature=0, ignore_eos=True).completion_tokens == 2


def test_invalid_engine_settings_raise(tiny_gguf):
    path = tiny_gguf("ernie4_5")
    for bad in (dict(n_parallel=0), dict(n_parallel=1.5), dict(n_parallel=1, max_queue=-1)):
        with pytest.raises(ValueError):
            pe.Model(path, n_ctx=256, **bad)
    assert _lib.live_handles().get("Model", 0) == 0


def test_images_are_encoded_in_the_engine_thread(vl, monkeypatch):
    """A second OpenMP team (an encode in the caller's thread) made libgomp throttle every
    team's spin-waits, and each decode step of the engine slower (batching.Engine.call)."""
    from pyllama_ernie.vision import Projector

    path, mmproj = vl
    seen = []
    features = Projector.features

    def spy(self, media):
        seen.append(threading.current_thread().name)
        return features(self, media)

    monkeypatch.setattr(Projector, "features", spy)
    with pe.Model(path, mmproj_path=mmproj, n_ctx=512, n_parallel=2) as m:
        m.generate(f"see {IMAGE_MARKER}", images=[_rgb(28, 28, 1)], max_tokens=2, temperature=0)
        m.image_features(_rgb(28, 56, 2))
    assert seen == ["pyllama_ernie-engine"] * 2


def test_an_internal_error_fails_its_requests_and_says_why_later(tiny_gguf, monkeypatch):
    """A failure inside the engine thread (here: the sampler) reaches the waiting callers instead
    of hanging them, and later calls say what stopped the engine."""
    from pyllama_ernie import context

    path = tiny_gguf("ernie4_5")
    with pe.Model(path, n_ctx=256, n_parallel=2) as m:
        def broken(self, ctx, idx=-1):
            raise RuntimeError("sampler exploded")

        monkeypatch.setattr(context._Picker, "pick", broken)
        with pytest.raises(RuntimeError, match="sampler exploded"):
            m.generate("boom", max_tokens=4)
        with pytest.raises(ClosedError, match="sampler exploded"):
            m.generate("after", max_tokens=4)
    assert _lib.live_handles().get("Engine", 0) == 0
