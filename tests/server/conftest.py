"""Fixtures of the server tests (module-scoped: each test module starts its own servers).

* ``work``: a temporary folder; ``text_model``: the tiny ``ernie4_5`` GGUF;
* ``vl``: the tiny ERNIE-4.5-VL model with an image-taking chat template (``model``), its
  mmproj (``mmproj``), a PNG (``png``) and a folder holding it as ``x.png`` (``media``);
* ``text_server`` / ``vl_server``: ``serve`` subprocesses on them (n_ctx 512, two slots; the text
  one as "tiny-text", the VL one with ``--allow-local-media media --allow-remote-media``);
* ``text_lib`` / ``vl_lib``: the same models in-process, for the library's answers.

The helpers (``ServerProcess``, images, metrics) are in ``server_harness.py``, imported lazily
here so that a missing server extra skips the tests instead of breaking collection.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("server")


@pytest.fixture(scope="module")
def text_model(tiny_gguf) -> Path:
    return tiny_gguf("ernie4_5")


@pytest.fixture(scope="module")
def vl(tiny_gguf, work) -> dict[str, Any]:
    from server_harness import new_metadata, png_bytes

    import pyllama_ernie
    from pyllama_ernie.convert.synthetic import VL_CHAT_TEMPLATE, write_tiny_mmproj

    model = tiny_gguf("ernie4_5-vl-moe")
    with pyllama_ernie.Model(model, n_ctx=64) as m:
        n_embd = m.n_embd
    template = work / "vl.jinja"
    template.write_text(VL_CHAT_TEMPLATE, encoding="utf-8")
    templated = new_metadata(model, work / "vl-templated.gguf", "--chat-template-file", str(template))
    png = png_bytes()
    (work / "media").mkdir(exist_ok=True)
    (work / "media" / "x.png").write_bytes(png)
    return {"model": templated, "mmproj": write_tiny_mmproj(work / "mmproj.gguf", n_embd_text=n_embd),
            "png": png, "media": work / "media"}


@pytest.fixture(scope="module")
def text_server(text_model):
    from server_harness import N_CTX, ServerProcess

    s = ServerProcess(text_model, "-c", N_CTX, "--parallel", 2, "--model-alias", "tiny-text")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def text_lib(text_model):
    from server_harness import N_CTX

    import pyllama_ernie

    with pyllama_ernie.Model(text_model, n_ctx=N_CTX) as m:
        yield m


@pytest.fixture(scope="module")
def vl_server(vl):
    from server_harness import N_CTX, ServerProcess

    s = ServerProcess(vl["model"], "--mmproj", vl["mmproj"], "-c", N_CTX, "--parallel", 2,
                      "--allow-local-media", vl["media"], "--allow-remote-media")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def vl_lib(vl):
    from server_harness import N_CTX

    import pyllama_ernie

    with pyllama_ernie.Model(vl["model"], n_ctx=N_CTX, mmproj_path=vl["mmproj"]) as m:
        yield m
