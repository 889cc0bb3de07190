"""The server's pure parts, without a model: request parsing, result shaping, the metrics text."""

from __future__ import annotations

import pytest

pytest.importorskip("starlette", reason="the server extra is not installed (pip install '.[server]')")

from pyllama_ernie._openai_request import (
    DEFAULTS,
    RequestError,
    model_names_match,
    parse_chat,
    parse_completion,
    parse_json,
)
from pyllama_ernie._server_metrics import Metrics
from pyllama_ernie.server import _as_http_error, _chunks, _result

MSG = [{"role": "user", "content": "hi"}]


def test_chat_fields_become_model_arguments():
    r = parse_chat({"messages": MSG, "max_tokens": 5, "max_completion_tokens": 7, "temperature": 0, "top_p": 0.5,
                    "top_k": 3, "min_p": 0.1, "repeat_penalty": 1.1, "stop": "\n", "seed": 9, "stream": True,
                    "stream_options": {"include_usage": True}, "enable_thinking": True,
                    "chat_template_kwargs": {"tone": "dry"}, "user": "x"}, n_ctx=100)
    assert r.kwargs == {"max_tokens": 7, "temperature": 0.0, "top_p": 0.5, "top_k": 3, "min_p": 0.1,
                        "repeat_penalty": 1.1, "stop": ["\n"], "seed": 9, "enable_thinking": True,
                        "chat_template_kwargs": {"tone": "dry"}}
    assert r.stream and r.include_usage and r.messages == MSG and r.model is None


def test_defaults_and_quiet_fields():
    r = parse_chat({"messages": MSG, "stop": ["", "x", ""], "stream_options": {"include_usage": True}}, n_ctx=100)
    assert r.kwargs["max_tokens"] == 100  # the context window
    assert {k: r.kwargs[k] for k in DEFAULTS} == DEFAULTS
    assert r.kwargs["stop"] == ["x"] and r.kwargs["seed"] is None and r.kwargs["enable_thinking"] is None
    assert not r.stream and not r.include_usage  # include_usage means nothing without a stream
    inner = parse_chat({"messages": MSG, "chat_template_kwargs": {"enable_thinking": False}}, n_ctx=1)
    assert inner.kwargs["enable_thinking"] is False and "ignore_eos" not in inner.kwargs
    assert parse_chat({"messages": MSG, "ignore_eos": True}, n_ctx=1).kwargs["ignore_eos"] is True


def test_completion_prompts():
    assert parse_completion({"prompt": "a"}, n_ctx=8).prompt == "a"
    assert parse_completion({"prompt": [1, 2]}, n_ctx=8).prompt == [1, 2]
    assert parse_completion({"prompt": [[1, 2]]}, n_ctx=8).prompt == [1, 2]
    assert parse_completion({"prompt": ["b"]}, n_ctx=8).prompt == "b"
    with pytest.raises(RequestError) as e:
        parse_completion({"prompt": ["a", "b"]}, n_ctx=8)
    assert e.value.param == "prompt" and e.value.status == 400


@pytest.mark.parametrize("body", [b"NaN", b'{"a": Infinity}', b"{", b"[]", b"\xff", b"1" * 5000])
def test_parse_json_refuses(body):
    with pytest.raises(RequestError) as e:
        parse_json(body)
    assert e.value.code == "invalid_json"


def test_model_names():
    assert model_names_match(None, ("a", "a.gguf")) and model_names_match("a.gguf", ("a", "a.gguf"))
    assert not model_names_match("b", ("a", "a.gguf"))


def test_stream_chunks_follow_openai():
    first = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "file.gguf",
             "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
    last = {**first, "choices": [{"index": 0, "delta": {}, "finish_reason": "cancelled"}], "usage": {"n": 1}}
    assert _chunks(first, "alias", False) == [{**first, "model": "alias", "choices": [
        {"index": 0, "delta": {"role": "assistant"}, "finish_reason": None, "logprobs": None}]}]
    plain = _chunks(last, "alias", False)
    assert len(plain) == 1 and "usage" not in plain[0] and plain[0]["choices"][0]["finish_reason"] == "stop"
    with_usage = _chunks(last, "alias", True)
    assert with_usage[0]["usage"] is None and with_usage[1]["choices"] == [] and with_usage[1]["usage"] == {"n": 1}
    assert _chunks(first, "alias", True)[0]["usage"] is None
    whole = _result({"model": "f", "choices": [{"finish_reason": "length"}], "usage": {}}, "alias")
    assert whole["model"] == "alias" and whole["choices"][0]["finish_reason"] == "length"


def test_errors_map_to_statuses():
    from pyllama_ernie.errors import (
        ClosedError,
        ImageError,
        PromptTooLongError,
        QueueFullError,
    )

    assert _as_http_error(QueueFullError("full", retry_after=2.5)).headers == {"Retry-After": "3"}
    assert _as_http_error(QueueFullError("full", retry_after=0.1)).status == 429
    assert _as_http_error(PromptTooLongError("too long: 600 > 512")).body["code"] == "context_length_exceeded"
    assert _as_http_error(ClosedError("closed")).status == 503
    assert _as_http_error(ImageError("bad")).status == 400
    internal = _as_http_error(KeyError("secret"))
    assert internal.status == 500 and "secret" not in internal.body["message"]


def test_metrics_text_and_rate():
    stats = {"completion_tokens_total": 0, "busy": 1, "n_parallel": 2, "queued": 0, "max_queue": 4}
    m = Metrics(lambda: dict(stats), window=10)
    m.sample(now=100.0)
    stats["completion_tokens_total"] = 50
    m.sample(now=105.0)
    assert m.tokens_per_second() == 10.0
    stats["completion_tokens_total"] = 80
    m.sample(now=120.0)  # the older samples leave the window, one stays as its start
    assert m.tokens_per_second() == pytest.approx(30 / 15)
    m.count_request("/v1/completions", 200)
    m.count_request("/v1/completions", 200)
    m.count_disconnect("/v1/completions")
    text = m.render('al"ias')
    assert 'pyllama_ernie_requests_total{endpoint="/v1/completions",status="200"} 2' in text
    assert 'pyllama_ernie_client_disconnects_total{endpoint="/v1/completions"} 1' in text
    assert 'pyllama_ernie_info{model="al\\"ias"} 1' in text
    assert "pyllama_ernie_slots_busy 1" in text and "# TYPE pyllama_ernie_slots_busy gauge" in text
    assert text.endswith("\n")
