"""The server through OpenAI's own client: answers equal the library's, in OpenAI's types and stream shape.

Greedy (temperature 0) requests to a ``serve`` subprocess on the tiny synthetic models,
compared with the same request made in-process.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from server_harness import ServerProcess, data_uri, image_message

httpx = pytest.importorskip("httpx", reason="the server extra is not installed (pip install '.[server]')")
openai = pytest.importorskip("openai", reason="the test extra is not installed (pip install '.[test]')")
from openai.types import Completion as OpenAICompletion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

HELLO = [{"role": "user", "content": "hello"}]


def _client(server: ServerProcess) -> Any:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def _lib_chat(model: Any, messages: list[dict[str, Any]], max_tokens: int, **kw: Any) -> dict[str, Any]:
    return model.create_chat_completion(messages, max_tokens=max_tokens, temperature=0, **kw)


def _counts(usage: Any) -> tuple[int, int, int]:
    if isinstance(usage, dict):
        return usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]
    return usage.prompt_tokens, usage.completion_tokens, usage.total_tokens


def _sse_events(raw: str) -> list[str]:
    """The data of each Server-Sent Event, checking the framing (``data: ...`` then a blank line)."""
    assert raw.endswith("\n\n"), raw[-200:]
    events = raw[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), raw[:500]
    return [e[len("data: "):] for e in events]


# --- metadata endpoints ---------------------------------------------------------------------------

def test_models_and_health(text_server, text_model):
    client = _client(text_server)
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-text"]
    assert client.models.retrieve("tiny-text").id == "tiny-text"
    assert client.models.retrieve(text_model.name).id == "tiny-text"  # the file name is accepted too
    r = httpx.get(text_server.url + "/health", timeout=30)
    assert r.status_code == 200 and r.json() == {"status": "ok"}


# --- chat -----------------------------------------------------------------------------------------

def test_chat_equals_the_library(text_server, text_lib):
    messages = [{"role": "system", "content": "Be brief."}, *HELLO]
    r = _client(text_server).chat.completions.create(model="tiny-text", messages=messages, max_tokens=12,
                                                     temperature=0)
    assert isinstance(r, ChatCompletion)
    expected = _lib_chat(text_lib, messages, 12)
    assert r.model == "tiny-text"
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected["choices"][0]["message"]["content"]
    assert r.choices[0].finish_reason == expected["choices"][0]["finish_reason"]
    assert _counts(r.usage) == _counts(expected["usage"])
    assert r.usage.completion_tokens == 12


def test_chat_by_file_name_and_sampling_fields(text_server, text_lib, text_model):
    # llama-server's extras are taken; the model may be named by its file name
    r = _client(text_server).chat.completions.create(
        model=text_model.name, messages=HELLO, max_completion_tokens=6, temperature=0, stop=["\n\n"], seed=3,
        presence_penalty=0, frequency_penalty=0, user="someone",
        extra_body={"top_k": 1, "min_p": 0.0, "repeat_penalty": 1.0})
    expected = _lib_chat(text_lib, HELLO, 6, stop=["\n\n"], top_k=1, min_p=0.0)
    assert r.choices[0].message.content == expected["choices"][0]["message"]["content"]
    assert r.usage.completion_tokens == expected["usage"]["completion_tokens"]


def test_stream_equals_non_stream(text_server, text_lib):
    client = _client(text_server)
    whole = client.chat.completions.create(model="tiny-text", messages=HELLO, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny-text", messages=HELLO, max_tokens=10,
                                                 temperature=0, stream=True))
    assert chunks and all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage anywhere
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content == _lib_chat(text_lib, HELLO, 10)["choices"][0]["message"][
        "content"]


def test_stream_include_usage(text_server):
    client = _client(text_server)
    whole = client.chat.completions.create(model="tiny-text", messages=HELLO, max_tokens=7, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny-text", messages=HELLO, max_tokens=7, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert _counts(last.usage) == _counts(whole.usage)
    assert all(c.usage is None and c.choices for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "length"


def test_stream_wire_format(text_server):
    """Raw SSE: ``data: {json}`` events, the role first, ``data: [DONE]`` last."""
    body = {"model": "tiny-text", "messages": HELLO, "max_tokens": 4, "temperature": 0, "stream": True}
    r = httpx.post(text_server.base_url + "/chat/completions", json=body, timeout=60)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = _sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_async_client_concurrent_requests(text_server, text_lib):
    """More requests than slots at once: each gets its own greedy answer."""
    prompts = ["hello", "Tell me a story", "the quick brown fox", "你好", "good day", "ERNIE is"]

    async def ask_all() -> list[Any]:
        async with openai.AsyncOpenAI(base_url=text_server.base_url, api_key="unused", max_retries=0,
                                      timeout=120) as client:
            return await asyncio.gather(*(client.chat.completions.create(
                model="tiny-text", messages=[{"role": "user", "content": p}], max_tokens=8, temperature=0)
                for p in prompts))

    answers = asyncio.run(ask_all())
    for p, r in zip(prompts, answers):
        expected = _lib_chat(text_lib, [{"role": "user", "content": p}], 8)
        assert r.choices[0].message.content == expected["choices"][0]["message"]["content"], p
        assert _counts(r.usage) == _counts(expected["usage"]), p


def test_async_streaming(text_server, text_lib):
    async def stream() -> str:
        async with openai.AsyncOpenAI(base_url=text_server.base_url, api_key="unused", max_retries=0,
                                      timeout=120) as client:
            s = await client.chat.completions.create(model="tiny-text", messages=HELLO, max_tokens=9,
                                                     temperature=0, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in s])

    assert asyncio.run(stream()) == _lib_chat(text_lib, HELLO, 9)["choices"][0]["message"]["content"]


# --- completions ----------------------------------------------------------------------------------

def test_completions_equal_the_library(text_server, text_lib):
    client = _client(text_server)
    expected = text_lib.generate("Hello world", max_tokens=8, temperature=0)
    r = client.completions.create(model="tiny-text", prompt="Hello world", max_tokens=8, temperature=0)
    assert isinstance(r, OpenAICompletion)
    assert r.object == "text_completion" and r.model == "tiny-text"
    assert r.choices[0].text == expected.text
    assert r.choices[0].finish_reason == expected.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (expected.prompt_tokens, expected.completion_tokens)
    # token ids, and a batch of one, give the same
    ids = text_lib.tokenize("Hello world")
    assert client.completions.create(model="tiny-text", prompt=ids, max_tokens=8, temperature=0).choices[0].text \
        == expected.text
    assert client.completions.create(model="tiny-text", prompt=["Hello world"], max_tokens=8,
                                     temperature=0).choices[0].text == expected.text
    # streamed: the pieces make the same text; usage only on request
    chunks = list(client.completions.create(model="tiny-text", prompt="Hello world", max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == expected.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == expected.finish_reason


# --- thinking and images (the VL model) -----------------------------------------------------------

def test_thinking_goes_to_reasoning_content(vl_server, vl_lib):
    client = _client(vl_server)
    expected = _lib_chat(vl_lib, HELLO, 6, enable_thinking=True)["choices"][0]["message"]
    assert expected["reasoning_content"]  # the template's <think> prefill: the answer starts as reasoning
    r = client.chat.completions.create(model=vl_server_alias(vl_server), messages=HELLO, max_tokens=6,
                                       temperature=0, extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    msg = r.choices[0].message
    assert msg.model_extra["reasoning_content"] == expected["reasoning_content"]
    assert msg.content == expected["content"]
    chunks = list(client.chat.completions.create(model=vl_server_alias(vl_server), messages=HELLO, max_tokens=6,
                                                 temperature=0, stream=True,
                                                 extra_body={"enable_thinking": True}))
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks)
    assert reasoning == expected["reasoning_content"]
    # off: no reasoning
    off = client.chat.completions.create(model=vl_server_alias(vl_server), messages=HELLO, max_tokens=6,
                                         temperature=0, extra_body={"enable_thinking": False})
    assert off.choices[0].message.content == _lib_chat(vl_lib, HELLO, 6, enable_thinking=False)["choices"][0][
        "message"]["content"]


def vl_server_alias(server: ServerProcess) -> str:
    return _client(server).models.list().data[0].id


def test_image_data_uri_equals_the_library(vl_server, vl_lib, vl):
    uri = data_uri(vl["png"])
    messages = [image_message(uri)]
    expected = _lib_chat(vl_lib, messages, 8)
    assert expected["usage"]["prompt_tokens"] > 20  # the image's positions are in the prompt
    client = _client(vl_server)
    r = client.chat.completions.create(model=vl_server_alias(vl_server), messages=messages, max_tokens=8,
                                       temperature=0)
    assert r.choices[0].message.content == expected["choices"][0]["message"]["content"]
    assert _counts(r.usage) == _counts(expected["usage"])
    chunks = list(client.chat.completions.create(model=vl_server_alias(vl_server), messages=messages,
                                                 max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    # a multi-turn conversation with the image in the history
    history = [*messages, {"role": "assistant", "content": r.choices[0].message.content},
               {"role": "user", "content": "and now?"}]
    r2 = client.chat.completions.create(model=vl_server_alias(vl_server), messages=history, max_tokens=8,
                                        temperature=0)
    assert r2.choices[0].message.content == _lib_chat(vl_lib, history, 8)["choices"][0]["message"]["content"]


def test_local_and_remote_images_equal_the_data_uri(vl_server, vl_lib, vl, work):
    """A file inside --allow-local-media DIR and an http URL (--allow-remote-media) read as the same image."""
    import http.server
    import threading

    expected = _lib_chat(vl_lib, [image_message(data_uri(vl["png"]))], 8)["choices"][0]["message"]["content"]
    client = _client(vl_server)
    alias = vl_server_alias(vl_server)
    for url in ("x.png", str(vl["media"] / "x.png"), (vl["media"] / "x.png").as_uri()):
        r = client.chat.completions.create(model=alias, messages=[image_message(url)], max_tokens=8, temperature=0)
        assert r.choices[0].message.content == expected, url

    png = vl["png"]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/x.png":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        r = client.chat.completions.create(model=alias, messages=[image_message(base + "/x.png")], max_tokens=8,
                                           temperature=0)
        assert r.choices[0].message.content == expected
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=alias, messages=[image_message(base + "/missing.png")],
                                           max_tokens=8, temperature=0)
        assert "404" in e.value.message
    finally:
        httpd.shutdown()
        httpd.server_close()
