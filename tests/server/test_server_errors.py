"""The server's failures: every status in OpenAI's error shape, limits, keys, CORS, a full queue, clients
that go away, and a model that is closed or fails.

Plain httpx (and raw sockets for disconnects) against ``serve`` subprocesses on the tiny models;
the 503 and 500 cases run the application in-process.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from server_harness import LONG_CTX, LONG_TOKENS, ServerProcess, data_uri, image_message

httpx = pytest.importorskip("httpx", reason="the server extra is not installed (pip install '.[server]')")
openai = pytest.importorskip("openai", reason="the test extra is not installed (pip install '.[test]')")

import pyllama_ernie
from pyllama_ernie.server import create_app

HELLO = [{"role": "user", "content": "hello"}]
KEY = "test-key-123"
CHAT_BUSY = 'pyllama_ernie_slots_busy'


def _post(server: ServerProcess, path: str, body: Any = None, *, content: Any = None,
          headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, content=content, headers=headers, timeout=60)


def assert_error(r: httpx.Response, status: int, *, code: str | None = None, param: str | None = None,
                 says: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    if says is not None:
        assert says in err["message"], err
    return err


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny-text", "messages": HELLO, "max_tokens": 2, "temperature": 0, **fields}


# --- 400: malformed bodies and bad fields ---------------------------------------------------------

def test_malformed_json_is_400(text_server):
    for content in (b"{not json", b"[1, 2]", b'"text"', b"", b'{"messages": NaN}', b"\xff\xfe{}",
                    b"[" * 100000 + b"]" * 100000):
        err = assert_error(_post(text_server, "/chat/completions", content=content), 400, code="invalid_json")
        assert err["type"] == "invalid_request_error"
    assert text_server.alive()


@pytest.mark.parametrize("fields, param, says", [
    ({"messages": []}, "messages", "non-empty"),
    ({"messages": "hello"}, "messages", None),
    ({"messages": [{"content": "no role"}]}, "messages", "role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages", None),
    ({"temperature": "hot"}, "temperature", "number"),
    ({"temperature": -1}, "temperature", ">= 0"),
    ({"top_p": 1.5}, "top_p", None),
    ({"max_tokens": -1}, "max_tokens", None),
    ({"max_tokens": 2.5}, "max_tokens", "integer"),
    ({"max_completion_tokens": True}, "max_completion_tokens", None),
    ({"top_k": -3}, "top_k", None),
    ({"stop": 5}, "stop", None),
    ({"stream": "yes"}, "stream", None),
    ({"stream_options": "x"}, "stream_options", None),
    ({"seed": "1"}, "seed", None),
    ({"model": 7}, "model", None),
    ({"n": 2}, "n", "not supported"),
    ({"presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ({"frequency_penalty": -1}, "frequency_penalty", "not supported"),
    ({"logprobs": True}, "logprobs", "not supported"),
    ({"logit_bias": {"5": 10}}, "logit_bias", "not supported"),
    ({"response_format": {"type": "json_object"}}, "response_format", "not supported yet"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not supported yet"),
    ({"tool_choice": "required"}, "tool_choice", "not supported"),
    ({"chat_template_kwargs": {"max_tokens": 3}}, "chat_template_kwargs", "max_tokens"),
    ({"chat_template_kwargs": []}, "chat_template_kwargs", None),
    ({"enable_thinking": True, "chat_template_kwargs": {"enable_thinking": False}}, "enable_thinking", None),
    ({"mirostat": 2}, "mirostat", "not supported"),
    ({"ignore_eos": "yes"}, "ignore_eos", None),
])
def test_bad_fields_are_400_and_named(text_server, fields, param, says):
    assert_error(_post(text_server, "/chat/completions", chat(**fields)), 400, param=param, says=says)


def test_neutral_values_and_extras_are_accepted(text_server):
    neutral = chat(n=1, presence_penalty=0, frequency_penalty=0.0, logprobs=False, response_format={"type": "text"},
                   tools=[], tool_choice="none", logit_bias={}, user="u1", metadata={"a": "b"}, store=False,
                   stream_options={"include_usage": True}, some_future_field={"x": 1})
    r = _post(text_server, "/chat/completions", neutral)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


def test_completion_fields(text_server):
    body = {"model": "tiny-text", "max_tokens": 2, "temperature": 0}
    for prompt, says in ((["a", "b"], "one prompt"), ("", "empty"), ([], None), ([1, "x"], None),
                         ([[1, 2], [3]], "one prompt"), (None, None), ([True, 5], None)):
        assert_error(_post(text_server, "/completions", {**body, "prompt": prompt}), 400, param="prompt", says=says)
    assert_error(_post(text_server, "/completions", {**body, "prompt": "x", "echo": True}), 400, param="echo")
    assert_error(_post(text_server, "/completions", {**body, "prompt": "x", "best_of": 3}), 400, param="best_of")
    # token ids outside the vocabulary: the library's TokenizeError, a 400
    assert_error(_post(text_server, "/completions", {**body, "prompt": [10**9]}), 400)


def test_prompt_too_long_names_the_limit(text_server):
    long = [{"role": "user", "content": "word " * 600}]
    err = assert_error(_post(text_server, "/chat/completions", chat(messages=long)), 400,
                       code="context_length_exceeded")
    assert "512" in err["message"]
    # streamed: still a status code, not an event (the first chunk is awaited before the headers)
    assert_error(_post(text_server, "/chat/completions", chat(messages=long, stream=True)), 400,
                 code="context_length_exceeded")
    err = assert_error(_post(text_server, "/completions", {"prompt": [5] * 600, "max_tokens": 1}), 400,
                       code="context_length_exceeded")
    assert "512" in err["message"]


# --- 404 / 405 ------------------------------------------------------------------------------------

def test_unknown_model_route_and_method(text_server, text_model):
    err = assert_error(_post(text_server, "/chat/completions", chat(model="gpt-4o")), 404, code="model_not_found",
                       param="model")
    assert "tiny-text" in err["message"]
    assert _post(text_server, "/chat/completions", chat(model=text_model.name)).status_code == 200
    assert _post(text_server, "/completions", {"model": "nope", "prompt": "x"}).status_code == 404
    assert_error(httpx.get(text_server.base_url + "/models/nope", timeout=30), 404, code="model_not_found")
    assert_error(httpx.get(text_server.url + "/v1/nothing", timeout=30), 404)
    assert_error(httpx.get(text_server.base_url + "/chat/completions", timeout=30), 405)
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=text_server.base_url, api_key="x", max_retries=0).chat.completions.create(
            model="gpt-4o", messages=HELLO, max_tokens=2)


# --- images the server refuses --------------------------------------------------------------------

def test_image_sources_off_by_default(text_server, vl):
    cases = [
        ("http://127.0.0.1:1/x.png", "remote_media_disabled"),
        ("https://example.com/x.png", "remote_media_disabled"),
        (str(vl["media"] / "x.png"), "local_media_disabled"),
        ((vl["media"] / "x.png").as_uri(), "local_media_disabled"),
        ("/etc/passwd", "local_media_disabled"),
        ("ftp://example.com/x.png", "invalid_image"),
    ]
    for url, code in cases:
        assert_error(_post(text_server, "/chat/completions", chat(messages=[image_message(url)])), 400, code=code,
                     param="messages")
    # the library's own path-taking part types are refused too
    for part in ({"type": "image", "image": "/etc/passwd"}, {"type": "video", "video": ["/etc/passwd"]},
                 {"type": "input_audio", "input_audio": {}}, {"type": "image_url"}, "text"):
        msg = [{"role": "user", "content": [part]}]
        assert_error(_post(text_server, "/chat/completions", chat(messages=msg)), 400, param="messages")
    # a data: URI reaches the model, whose text-only template cannot take it: a 400 that says so
    r = _post(text_server, "/chat/completions", chat(messages=[image_message(data_uri(vl["png"]))]))
    assert_error(r, 400, says="image")


def test_local_media_stays_inside_its_folder(vl_server, vl, work):
    outside = work / "outside.png"
    outside.write_bytes(vl["png"])
    link = vl["media"] / "link.png"
    if not link.exists():
        os.symlink(outside, link)
    fifo = vl["media"] / "fifo.png"  # opening a FIFO would wait for a writer: refused, not hung
    if not fifo.exists():
        os.mkfifo(fifo)
    for url in ("../outside.png", str(outside), outside.as_uri(), "link.png", str(link), "sub/../../outside.png"):
        assert_error(_post(vl_server, "/chat/completions", {"messages": [image_message(url)], "max_tokens": 1}), 400,
                     code="local_media_forbidden")
    for url in ("missing.png", "fifo.png", "."):
        assert_error(_post(vl_server, "/chat/completions", {"messages": [image_message(url)], "max_tokens": 1}), 400,
                     param="messages")
    bad = [image_message("data:image/png,notbase64"), image_message("data:image/png;base64,AAAA")]
    for m in bad:
        assert_error(_post(vl_server, "/chat/completions", {"messages": [m], "max_tokens": 1}), 400)
    assert vl_server.alive()


# --- keys, CORS and the body limit ----------------------------------------------------------------

@pytest.fixture(scope="module")
def guarded(text_model):
    """A key, one CORS origin, and a 1 MB body limit."""
    s = ServerProcess(text_model, "-c", 512, "--api-key", KEY, "--cors-origin", "http://app.example",
                      "--max-body-mb", 1, "--model-alias", "tiny-text")
    yield s
    s.stop()


AUTH = {"Authorization": f"Bearer {KEY}"}


def test_api_key(guarded):
    for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Basic x"}):
        assert_error(_post(guarded, "/chat/completions", chat(), headers=headers), 401, code="invalid_api_key")
        assert httpx.get(guarded.base_url + "/models", headers=headers, timeout=30).status_code == 401
        assert httpx.get(guarded.url + "/metrics", headers=headers, timeout=30).status_code == 401
    assert httpx.get(guarded.url + "/health", timeout=30).json() == {"status": "ok"}  # open without a key
    assert _post(guarded, "/chat/completions", chat(), headers=AUTH).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=guarded.base_url, api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=guarded.base_url, api_key=KEY, max_retries=0)
    assert client.chat.completions.create(model="tiny-text", messages=HELLO, max_tokens=2).usage.completion_tokens
    m = guarded.metrics(AUTH)
    assert m['pyllama_ernie_requests_total{endpoint="/v1/chat/completions",status="401"}'] >= 4


def test_cors_only_when_asked(guarded, text_server):
    pre = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization, content-type"}
    r = httpx.options(guarded.base_url + "/chat/completions", headers=pre, timeout=30)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
    r = httpx.options(guarded.base_url + "/chat/completions", headers={**pre, "Origin": "http://evil.example"},
                      timeout=30)
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(guarded.base_url + "/models", headers={**AUTH, "Origin": "http://app.example"}, timeout=30)
    assert r.headers["access-control-allow-origin"] == "http://app.example"
    r = httpx.get(text_server.base_url + "/models", headers={"Origin": "http://app.example"}, timeout=30)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    r = httpx.options(text_server.base_url + "/chat/completions", headers=pre, timeout=30)
    assert "access-control-allow-origin" not in r.headers


def test_body_limit_413(guarded):
    big = json.dumps(chat(messages=[{"role": "user", "content": "x" * (2 * 1024 * 1024)}])).encode()
    assert_error(_post(guarded, "/chat/completions", content=big, headers=AUTH), 413, code="request_too_large")

    def chunks():  # no Content-Length: the limit is enforced while reading
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]

    assert_error(_post(guarded, "/chat/completions", content=chunks(), headers=AUTH), 413, code="request_too_large")
    # just under the limit: read, and refused for what it says (too long a prompt), not for its size
    under = json.dumps(chat(messages=[{"role": "user", "content": "word " * 200000}])).encode()
    assert len(under) < 1024 * 1024
    assert_error(_post(guarded, "/chat/completions", content=under, headers=AUTH), 400,
                 code="context_length_exceeded")
    assert _post(guarded, "/chat/completions", chat(), headers=AUTH).status_code == 200


# --- a full queue, and clients that go away -------------------------------------------------------

@pytest.fixture(scope="module")
def busy(text_model):
    """One slot, no queue, a long context: a long answer holds the only slot."""
    s = ServerProcess(text_model, "-c", LONG_CTX, "--parallel", 1, "--max-queue", 0, "--model-alias", "tiny-text")
    yield s
    s.stop()


def _long(stream: bool) -> dict[str, Any]:
    return chat(max_tokens=LONG_TOKENS, stream=stream)


def test_queue_full_429_then_a_disconnect_frees_the_slot(busy):
    before = busy.metrics()
    with httpx.Client(timeout=120) as client:
        with client.stream("POST", busy.base_url + "/chat/completions", json=_long(True)) as s:
            assert s.status_code == 200
            lines = s.iter_lines()
            assert next(lines).startswith("data: ")
            busy.wait_metric(CHAT_BUSY, lambda v: v == 1)
            for body in (chat(), chat(stream=True)):
                r = httpx.post(busy.base_url + "/chat/completions", json=body, timeout=60)
                err = assert_error(r, 429, code="queue_full")
                assert err["type"] == "rate_limit_error"
                assert int(r.headers["Retry-After"]) >= 1
            assert_error(httpx.post(busy.base_url + "/completions", json={"prompt": "x"}, timeout=60), 429)
            with pytest.raises(openai.RateLimitError):
                openai.OpenAI(base_url=busy.base_url, api_key="x", max_retries=0).chat.completions.create(
                    model="tiny-text", messages=HELLO, max_tokens=2)
        # leaving the block closed the connection mid-stream
    m = busy.wait_metric(CHAT_BUSY, lambda v: v == 0)
    key = 'pyllama_ernie_client_disconnects_total{endpoint="/v1/chat/completions"}'
    assert m[key] == before.get(key, 0) + 1
    generated = m["pyllama_ernie_completion_tokens_total"] - before["pyllama_ernie_completion_tokens_total"]
    assert generated < LONG_TOKENS // 2  # cancelled, not run to its end
    assert m['pyllama_ernie_requests_total{endpoint="/v1/chat/completions",status="429"}'] >= 3
    r = httpx.post(busy.base_url + "/chat/completions", json=chat(), timeout=60)
    assert r.status_code == 200, r.text


def _raw_post(server: ServerProcess, path: str, body: dict[str, Any]) -> socket.socket:
    """Send a request on a raw socket (so the test can hang up without reading the answer)."""
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    data = json.dumps(body).encode()
    sock.sendall(f"POST /v1{path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


@pytest.mark.parametrize("path, body", [
    ("/completions", {"prompt": "Hello", "max_tokens": LONG_TOKENS, "temperature": 0}),
    ("/chat/completions", _long(False)),
])
def test_a_client_that_hangs_up_cancels_a_non_streamed_request(busy, path, body):
    before = busy.metrics()
    sock = _raw_post(busy, path, body)
    busy.wait_metric(CHAT_BUSY, lambda v: v == 1)
    sock.close()
    m = busy.wait_metric(CHAT_BUSY, lambda v: v == 0)
    key = f'pyllama_ernie_client_disconnects_total{{endpoint="/v1{path}"}}'
    assert m[key] == before.get(key, 0) + 1
    status = f'pyllama_ernie_requests_total{{endpoint="/v1{path}",status="499"}}'
    assert m[status] == before.get(status, 0) + 1
    generated = m["pyllama_ernie_completion_tokens_total"] - before["pyllama_ernie_completion_tokens_total"]
    assert generated < LONG_TOKENS // 2
    assert httpx.post(busy.base_url + path, json={**body, "max_tokens": 2}, timeout=60).status_code == 200


def test_metrics_exposition(busy):
    r = httpx.get(busy.url + "/metrics", timeout=30)
    assert r.headers["content-type"].startswith("text/plain")
    lines = r.text.splitlines()
    for name, kind in (("requests_total", "counter"), ("prompt_tokens_total", "counter"),
                       ("prompt_tokens_cached_total", "counter"), ("completion_tokens_total", "counter"),
                       ("queue_depth", "gauge"), ("slots_busy", "gauge"), ("slots_total", "gauge"),
                       ("generation_tokens_per_second", "gauge"), ("client_disconnects_total", "counter")):
        assert f"# TYPE pyllama_ernie_{name} {kind}" in lines, name
    m = busy.metrics()
    assert m["pyllama_ernie_slots_total"] == 1 and m["pyllama_ernie_queue_max"] == 0
    assert m['pyllama_ernie_info{model="tiny-text"}'] == 1
    assert m["pyllama_ernie_generation_tokens_per_second"] >= 0


# --- a closed model, a failing model (in-process) -------------------------------------------------

def _asgi(app: Any, method: str, path: str, body: Any = None) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return await c.request(method, path, json=body)

    return asyncio.run(go())


def test_closed_model_is_503(text_model):
    model = pyllama_ernie.Model(text_model, n_ctx=128)
    app = create_app(model, alias="t")
    assert _asgi(app, "POST", "/v1/chat/completions", {"messages": HELLO, "max_tokens": 1}).status_code == 200
    model.close()
    for path in ("/v1/chat/completions", "/v1/completions"):
        assert_error(_asgi(app, "POST", path, {"messages": HELLO, "prompt": "x", "max_tokens": 1}), 503,
                     code="model_closed")
    assert _asgi(app, "GET", "/health").status_code == 503


class _FailingModel:
    """Duck-typed model whose generation fails, to see the server answer 500 and carry on."""

    path = Path("failing.gguf")
    n_ctx = 128
    closed = False

    def stats(self) -> dict[str, int]:
        return {"busy": 0, "queued": 0}

    async def acreate_chat_completion(self, messages: Any, *, stream: bool = False, **kw: Any) -> Any:
        if messages[0]["content"] == "ok":
            return {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"},
                                 "finish_reason": "stop"}], "usage": {}}
        if not stream:
            raise RuntimeError("boom")

        async def chunks() -> Any:
            yield {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
                   "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
            raise RuntimeError("boom mid-stream")

        return chunks()


def test_internal_errors_are_500_in_openai_shape():
    app = create_app(_FailingModel())
    err = assert_error(_asgi(app, "POST", "/v1/chat/completions", {"messages": HELLO}), 500)
    assert err["type"] == "server_error" and "boom" not in err["message"]  # no internals leak out
    r = _asgi(app, "POST", "/v1/chat/completions", {"messages": HELLO, "stream": True})
    assert r.status_code == 200  # the headers were out before the failure: the error is the last event
    events = [e.removeprefix("data: ") for e in r.text.strip().split("\n\n")]
    assert json.loads(events[0])["choices"][0]["delta"] == {"role": "assistant"}
    assert json.loads(events[-1])["error"]["type"] == "server_error" and "[DONE]" not in events
    ok = _asgi(app, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "ok"}]})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "fine"
    assert ok.json()["model"] == "failing.gguf"
