"""Chat: template rendering vs transformers, message shapes, streaming, thinking, caches, threads, cancellation."""

from __future__ import annotations

import base64
import io
import threading

import numpy as np
import pytest

pytest.importorskip("pyllama_ernie._lib", reason="pyllama_ernie is not built (pip install .)")

from pyllama_ernie import IMAGE_MARKER, ImageError, Model, SamplingParams  # noqa: E402
from pyllama_ernie.chat import ThinkSplitter, render_template  # noqa: E402
from pyllama_ernie.convert.synthetic import VL_CHAT_TEMPLATE as VL_TEMPLATE  # noqa: E402


def _png(h=56, w=84, seed=0):
    from PIL import Image

    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return rgb, buf.getvalue()


@pytest.fixture(scope="module")
def vlm(vl_gguf, vl_mmproj):
    with Model(vl_gguf("vl_trained"), mmproj_path=vl_mmproj("vl_trained"), n_ctx=1024,
               kv_cache_type="f32", flash_attn=False) as m:
        yield m


def _conversation(image_part):
    return [
        {"role": "system", "content": "You describe pictures."},
        {"role": "user", "content": [image_part, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A square."},
        {"role": "user", "content": "And its colour?"},
    ]


@pytest.mark.parametrize("thinking", [None, True, False])
def test_template_matches_transformers(vlm, reference_tokenizer_vl, thinking):
    import re

    tok = reference_tokenizer_vl("vl_trained")
    msgs = _conversation({"type": "image"}) + [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": "2"}]}]
    kw = {} if thinking is None else {"enable_thinking": thinking}
    want = tok.apply_chat_template(msgs, chat_template=VL_TEMPLATE, tokenize=False, add_generation_prompt=True,
                                   bos_token=vlm.vocab.token_text(vlm.bos_token), **kw)
    want = re.sub(r"<\|IMAGE_START\|>.*?<\|IMAGE_END\|>", IMAGE_MARKER, want)
    rgb, _ = _png()
    ours_msgs = _conversation({"type": "image", "image": rgb}) + [
        {"role": "user", "content": [{"type": "image", "image": rgb}, {"type": "text", "text": "2"}]}]
    got = vlm.apply_chat_template(ours_msgs, chat_template=VL_TEMPLATE, enable_thinking=thinking)
    assert got == want
    assert got.count(IMAGE_MARKER) == 2 and "image@placeholder" not in got
    assert "Picture 1:" in got and "Picture 2:" in got


def test_template_sandbox_blocks_python_internals(vlm):
    for evil in ("{{ ''.__class__.__mro__[1].__subclasses__() }}",
                 "{{ messages.__class__.__init__.__globals__ }}",
                 "{% set ns = namespace() %}{% set ns.__class__ = 1 %}"):
        with pytest.raises(ValueError, match="sandbox|template"):
            render_template(evil, [{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="stop here"):
        render_template("{{ raise_exception('stop here') }}", [])


def test_every_image_input_shape_gives_the_same_answer(vlm, tmp_path):
    rgb, png = _png(seed=3)
    path = tmp_path / "x.png"
    path.write_bytes(png)
    from PIL import Image

    parts = [
        {"type": "image", "image": rgb},
        {"type": "image", "image": png},
        {"type": "image", "image": str(path)},
        {"type": "image", "image": Image.open(path)},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}},
        {"type": "image_url", "image_url": {"url": path.as_uri()}},
        {"type": "image_url", "image_url": str(path)},
    ]
    answers = []
    for part in parts:
        r = vlm.create_chat_completion([{"role": "user", "content": [part, {"type": "text", "text": "describe"}]}],
                                       chat_template=VL_TEMPLATE, max_tokens=6, temperature=0)
        answers.append(r["choices"][0]["message"]["content"])
    assert len(set(answers)) == 1
    # and the same tokens as generate() on the rendered prompt
    prompt = vlm.apply_chat_template([{"role": "user", "content": [parts[0], {"type": "text", "text": "describe"}]}],
                                     chat_template=VL_TEMPLATE)
    assert prompt.startswith(vlm.vocab.token_text(vlm.bos_token))


def test_result_shape_and_string_content(vlm):
    r = vlm.create_chat_completion([{"role": "user", "content": "hello"}], chat_template=VL_TEMPLATE,
                                   max_tokens=5, temperature=0)
    assert r["object"] == "chat.completion" and r["id"].startswith("chatcmpl-")
    ch = r["choices"][0]
    assert ch["index"] == 0 and ch["message"]["role"] == "assistant" and ch["finish_reason"] in ("stop", "length")
    u = r["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert u["images_encoded"] == 0


def test_streaming_chunks(vlm):
    msgs = [{"role": "user", "content": "count"}]
    chunks = list(vlm.create_chat_completion(msgs, chat_template=VL_TEMPLATE, max_tokens=8, temperature=0,
                                             stream=True))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and "usage" in chunks[-1]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    whole = vlm.create_chat_completion(msgs, chat_template=VL_TEMPLATE, max_tokens=8, temperature=0)
    assert text == whole["choices"][0]["message"]["content"]


@pytest.mark.parametrize("pieces, thinking, reasoning, content", [
    (["<think>", "a b", "</think>", "\n\nanswer"], False, "a b", "answer"),
    (["<th", "ink>x</th", "ink>y"], False, "x", "y"),
    (["plain ", "text"], False, "", "plain text"),
    (["because", " so</think>", "\nok"], True, "because so", "ok"),
    (["  <think>r</think>c"], False, "r", "c"),
    (["<", "b>bold</b>"], False, "", "<b>bold</b>"),
])
def test_think_splitter(pieces, thinking, reasoning, content):
    s = ThinkSplitter(thinking)
    out = [p for piece in pieces for p in s.feed(piece)] + s.flush()
    assert "".join(t for f, t in out if f == "reasoning_content") == reasoning
    assert "".join(t for f, t in out if f == "content") == content


def test_thinking_prefill_goes_to_reasoning(vlm):
    r = vlm.create_chat_completion([{"role": "user", "content": "hi"}], chat_template=VL_TEMPLATE,
                                   enable_thinking=True, max_tokens=6, temperature=0)
    msg = r["choices"][0]["message"]
    # the template opened <think>: what the model writes (no </think> within 6 tokens) is reasoning
    assert "reasoning_content" in msg and msg["reasoning_content"] and msg["content"] == ""


def test_image_chat_turn_two_reuses_the_cache(vlm):
    rgb, _ = _png(seed=5)
    turn1 = [{"role": "user", "content": [{"type": "image", "image": rgb}, {"type": "text", "text": "what?"}]}]
    vlm.media_cache_clear()
    vlm.ctx.reset()
    r1 = vlm.create_chat_completion(turn1, chat_template=VL_TEMPLATE, max_tokens=4, temperature=0)
    assert r1["usage"]["images_encoded"] == 1
    assert r1["usage"]["prompt_tokens_evaluated"] == r1["usage"]["prompt_tokens"]
    turn2 = turn1 + [{"role": "assistant", "content": r1["choices"][0]["message"]["content"]},
                     {"role": "user", "content": "and then?"}]
    r2 = vlm.create_chat_completion(turn2, chat_template=VL_TEMPLATE, max_tokens=4, temperature=0)
    u = r2["usage"]
    assert u["images_encoded"] == 0
    n_image = 2 * 3  # 56x84 -> 2x3 tokens
    assert u["prompt_tokens_details"]["cached_tokens"] > n_image
    assert u["prompt_tokens_evaluated"] < u["prompt_tokens"] - n_image


def test_remote_images_need_permission(vlm):
    msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                                        {"type": "text", "text": "x"}]}]
    with pytest.raises(ImageError, match="allow_remote"):
        vlm.create_chat_completion(msg, chat_template=VL_TEMPLATE)


@pytest.mark.parametrize("bad", [
    [], "hello", [{"content": "no role"}], [{"role": "user", "content": [{"type": "audio"}]}],
    [{"role": "user", "content": [{"type": "text"}]}], [{"role": "user", "content": 5}],
    [{"role": "user", "content": f"sneaky {IMAGE_MARKER}"}],
])
def test_bad_messages(vlm, bad):
    with pytest.raises(ValueError):
        vlm.create_chat_completion(bad, chat_template=VL_TEMPLATE)


def test_text_template_refuses_image_parts_clearly(vlm):
    rgb, _ = _png()
    with pytest.raises(ValueError, match="template"):
        vlm.create_chat_completion([{"role": "user", "content": [{"type": "image", "image": rgb}]}])


# --- cancellation and threads --------------------------------------------------------------

def _final(items):
    """The text pieces and the one final Completion of a ``Context.generate_tokens`` generator."""
    items = list(items)
    pieces = [x for x in items if isinstance(x, str)]
    finals = [x for x in items if not isinstance(x, str)]
    assert len(finals) == 1 and items[-1] is finals[0], items[-3:]
    return pieces, finals[0]


def test_cancel_from_another_thread(vlm):
    """Model.cancel() from another thread, while the stream runs, ends it early as "cancelled"."""
    budget = vlm.ctx.n_ctx - 10  # without the cancel it would run until the context is full ("length")
    gen = vlm.ctx.generate_tokens(vlm.tokenize("the"), max_tokens=budget, sampling=SamplingParams(temperature=0),
                                  ignore_eos=True)
    first = next(gen)
    assert isinstance(first, str) and first
    canceller = threading.Timer(0.02, vlm.cancel)  # about 40 of the 1014 tokens (2000 tokens/s measured)
    canceller.start()
    pieces, done = _final(gen)
    canceller.join(timeout=30)
    assert not canceller.is_alive()
    assert done.finish_reason == "cancelled", (done.finish_reason, done.completion_tokens)
    assert done.completion_tokens < budget - 2  # stopped early, not at the end of the context
    assert "".join([first, *pieces]) == done.text
    gen = vlm.generate("the", max_tokens=3, temperature=0, ignore_eos=True)  # still usable
    assert gen.completion_tokens == 3 and gen.finish_reason == "length"
    ev = threading.Event()
    ev.set()
    assert vlm.generate("the", max_tokens=5, cancel=ev).finish_reason == "cancelled"


def test_cancel_finish_reason(vlm):
    """Setting the ``cancel`` event after the third piece ends generation within a token."""
    ev = threading.Event()
    pieces = []
    final = None
    gen = vlm.ctx.generate_tokens(vlm.tokenize("the"), max_tokens=100000, sampling=SamplingParams(temperature=0),
                                  ignore_eos=True, cancel=ev)
    for item in gen:
        if isinstance(item, str):
            assert final is None
            pieces.append(item)
            if len(pieces) == 3:
                ev.set()
        else:
            final = item
    assert final is not None, "the generation ended without a Completion"
    assert final.finish_reason == "cancelled"
    assert len(pieces) == 3 and final.completion_tokens <= 4


def test_two_contexts_in_two_threads_match_sequential(vlm):
    prompts = ["the quick brown", "你好 world"]
    seq = [vlm.generate(p, max_tokens=12, temperature=0, ignore_eos=True).tokens for p in prompts]
    ctxs = [vlm.context(n_ctx=256, kv_cache_type="f32", flash_attn=False) for _ in prompts]
    out = [None, None]

    def work(i):
        toks = vlm.tokenize(prompts[i])
        res = None
        for item in ctxs[i].generate_tokens(toks, max_tokens=12, sampling=SamplingParams(temperature=0, seed=0),
                                            ignore_eos=True):
            res = item
        out[i] = res.tokens

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a generation thread did not finish"
    for c in ctxs:
        c.close()
    assert out == seq


def test_template_variables_go_in_one_argument_and_typos_raise(tiny_gguf):
    """Unknown arguments raise TypeError instead of vanishing into the template (a typo such as
    ``max_token=3`` once ran to the end of the context); template variables go in
    ``chat_template_kwargs``, with ``enable_thinking`` as a named convenience."""
    template = "{{ tone }}|{% for m in messages %}{{ m['content'] }}{% endfor %}|{{ enable_thinking }}"
    msgs = [{"role": "user", "content": "hi"}]
    with Model(tiny_gguf("ernie4_5"), n_ctx=256) as m:
        text = m.apply_chat_template(msgs, chat_template=template, chat_template_kwargs={"tone": "dry"},
                                     enable_thinking=False)
        assert text == "dry|hi|False"
        assert m.apply_chat_template(msgs, chat_template=template,
                                     chat_template_kwargs={"enable_thinking": True}) == "|hi|True"
        for typo in ({"max_token": 3}, {"temprature": 0.0}, {"response_format": {"type": "json_object"}}):
            with pytest.raises(TypeError):
                m.create_chat_completion(msgs, chat_template=template, **typo)
        with pytest.raises(TypeError):
            m.apply_chat_template(msgs, chat_template=template, tone="dry")
        with pytest.raises(ValueError, match="messages"):
            m.apply_chat_template(msgs, chat_template=template, chat_template_kwargs={"messages": []})
        with pytest.raises(ValueError, match="disagree"):
            m.apply_chat_template(msgs, chat_template=template, enable_thinking=True,
                                  chat_template_kwargs={"enable_thinking": False})
        with pytest.raises(TypeError):
            m.apply_chat_template(msgs, chat_template=template, chat_template_kwargs=[("tone", "x")])
        r = m.create_chat_completion(msgs, chat_template=template, chat_template_kwargs={"tone": "dry"},
                                     max_tokens=3, temperature=0, ignore_eos=True)
        assert r["usage"]["completion_tokens"] == 3
