"""A bounded load test: 200 mixed requests at concurrency 16, some abandoned midway.

Text and image chats, streamed and not, completions, and clients that hang up during a
stream or before a non-streamed answer. Afterwards: no 5xx, the process alive and idle
(no busy slot, empty queue), and its resident memory back near its level after a warm-up
run of the same mix (tolerance: 10 % + 32 MiB for allocator noise, about 40 MiB on the tiny
model's ~75 MiB: a leak of more than about 200 KiB per request would exceed it).
"""

from __future__ import annotations

import asyncio
import collections
import json
from typing import Any

import pytest
from server_harness import ServerProcess, data_uri, image_message, png_bytes

httpx = pytest.importorskip("httpx", reason="the server extra is not installed (pip install '.[server]')")
psutil = pytest.importorskip("psutil", reason="the test extra is not installed (pip install '.[test]')")

pytestmark = pytest.mark.slow

CONCURRENCY = 16
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def loaded(vl):
    s = ServerProcess(vl["model"], "--mmproj", vl["mmproj"], "-c", 512, "--parallel", 4, "--max-queue", 256)
    yield s
    s.stop()


async def _one(client: httpx.AsyncClient, i: int, images: list[str]) -> str:
    """Request number ``i`` of the mix; its outcome ("200", "cancelled", or another status)."""
    text = [{"role": "user", "content": f"request {i}: tell me a story"}]
    kind = i % 8
    if kind in (0, 4):  # an image chat (three distinct pictures: the media cache hits and misses)
        body = {"messages": [image_message(images[i % 3], f"picture {i}?")], "max_tokens": 8, "temperature": 0}
    elif kind == 1:  # a streamed chat, read to its end
        body = {"messages": text, "max_tokens": 16, "stream": True, "temperature": 0.7, "seed": i,
                "stream_options": {"include_usage": True}}
    elif kind == 2:  # a streamed chat abandoned after two events
        async with client.stream("POST", "/v1/chat/completions",
                                 json={"messages": text, "max_tokens": 400, "stream": True}) as r:
            if r.status_code != 200:
                return str(r.status_code)
            n = 0
            async for line in r.aiter_lines():
                n += line.startswith("data: ")
                if n == 2:
                    return "cancelled"
        return "200"
    elif kind == 6:  # a non-streamed chat whose client gives up
        try:
            r = await asyncio.wait_for(client.post("/v1/chat/completions",
                                                   json={"messages": text, "max_tokens": 400}), timeout=0.05)
        except asyncio.TimeoutError:
            return "cancelled"
        return str(r.status_code)
    elif kind == 3:
        return await _complete(client, {"prompt": f"Once upon a time {i}", "max_tokens": 12})
    else:
        body = {"messages": text, "max_tokens": 12}
    if body.get("stream"):
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            raw = (await r.aread()).decode()
            if r.status_code == 200:
                assert raw.endswith("data: [DONE]\n\n")
                assert json.loads(raw.split("data: ")[-2])["usage"]["completion_tokens"] > 0
            return str(r.status_code)
    r = await client.post("/v1/chat/completions", json=body)
    if r.status_code == 200:
        assert r.json()["usage"]["completion_tokens"] > 0
    return str(r.status_code)


async def _complete(client: httpx.AsyncClient, body: dict[str, Any]) -> str:
    r = await client.post("/v1/completions", json=body)
    if r.status_code == 200:
        assert r.json()["object"] == "text_completion"
    return str(r.status_code)


def _run(server: ServerProcess, n: int, images: list[str]) -> collections.Counter[str]:
    async def go() -> collections.Counter[str]:
        limit = asyncio.Semaphore(CONCURRENCY)
        async with httpx.AsyncClient(base_url=server.url, timeout=300,
                                     limits=httpx.Limits(max_connections=CONCURRENCY)) as client:
            async def bounded(i: int) -> str:
                async with limit:
                    return await _one(client, i, images)

            return collections.Counter(await asyncio.gather(*(bounded(i) for i in range(n))))

    return asyncio.run(go())


def _idle(server: ServerProcess) -> dict[str, float]:
    server.wait_metric("pyllama_ernie_slots_busy", lambda v: v == 0)
    return server.wait_metric("pyllama_ernie_queue_depth", lambda v: v == 0)


def test_load_mixed_with_cancellations(loaded):
    images = [data_uri(png_bytes(seed, 56 + 28 * seed, 84)) for seed in range(3)]
    proc = psutil.Process(loaded.pid)
    warm = _run(loaded, 64, images)
    assert set(warm) <= {"200", "cancelled"}, warm
    _idle(loaded)
    rss_warm = proc.memory_info().rss

    outcomes = _run(loaded, 200, images)
    assert set(outcomes) <= {"200", "cancelled"}, outcomes  # no 5xx, no 429 (the queue holds them all)
    assert outcomes["200"] >= 150 and outcomes["cancelled"] >= 25, outcomes
    assert loaded.alive()
    m = _idle(loaded)
    assert not any(k.startswith("pyllama_ernie_requests_total") and 'status="5' in k for k in m), m
    disconnects = sum(v for k, v in m.items() if k.startswith("pyllama_ernie_client_disconnects_total"))
    assert disconnects >= 25
    assert httpx.get(loaded.url + "/health", timeout=30).json() == {"status": "ok"}
    rss = proc.memory_info().rss
    assert rss <= rss_warm * 1.10 + 32 * MiB, (rss_warm / MiB, rss / MiB)
