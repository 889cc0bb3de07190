"""OpenAI-style chat: messages, the GGUF's chat template, thinking, and the OpenAI result shapes.

:class:`~pyllama_ernie.Model` uses these; nothing here touches a model.

* The chat template stored in the GGUF is rendered with jinja2 in an immutable
  sandbox, with the globals transformers gives templates (``raise_exception``,
  ``strftime_now``, ``namespace``, a ``tojson`` that does not escape HTML,
  ``bos_token``/``eos_token``, ``add_generation_prompt`` and whatever template
  arguments the caller passes, e.g. ``enable_thinking``). A template cannot
  reach Python internals, and nothing in a model file runs as Python code.
* Messages are OpenAI-shaped: ``content`` is a string or a list of parts:
  ``{"type": "text", "text": ...}``, ``{"type": "image_url", "image_url": {"url": ...}}``
  (a ``data:`` URI, ``file://`` URL or local path; ``http(s)://`` only with
  ``allow_remote=True``), and for convenience ``{"type": "image", "image": x}``
  with a path, bytes, PIL image or numpy array, and ``{"type": "video", "video": [frames]}``.
* The template writes its own image placeholder (ERNIE-4.5-VL:
  ``Picture 1:<|IMAGE_START|><|image@placeholder|><|IMAGE_END|>``); each
  ``<|IMAGE_START|>...<|IMAGE_END|>`` run it writes becomes one
  :data:`~pyllama_ernie.IMAGE_MARKER`, so images are never doubled.
* ``<think>...</think>`` in the answer is returned as ``reasoning_content``
  (also while streaming), including when the template opened the ``<think>``
  itself (a thinking prefill).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from .errors import ImageError
from .values import IMAGE_MARKER, VIDEO_MARKER, Completion

__all__ = ["render_template", "prepare_chat", "ThinkSplitter", "MAX_REMOTE_BYTES", "completion", "chunks"]

#: the most bytes read from one remote image (``allow_remote=True``)
MAX_REMOTE_BYTES = 50 * 1024 * 1024

_IMAGE_RUN = re.compile(r"<\|IMAGE_START\|>.*?<\|IMAGE_END\|>", re.S)
_VIDEO_RUN = re.compile(r"<\|VIDEO_START\|>.*?<\|VIDEO_END\|>", re.S)
_MEDIA_RUN = re.compile(f"{_IMAGE_RUN.pattern}|{_VIDEO_RUN.pattern}", re.S)

_THINK_OPEN = "<think>"
_THINK_CLOSE = "</think>"


# --- the template ------------------------------------------------------------------------------

@lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    class Namespace(jinja2.utils.Namespace):
        """``namespace()`` that refuses underscore attributes (no way to CPython internals)."""

        def __init__(*args: Any, **kwargs: Any) -> None:
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["namespace"] = Namespace
    return env.from_string(template)


def render_template(template: str, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True,
                    bos_token: str = "", eos_token: str = "", **kwargs: Any) -> str:
    """Render a chat template as transformers' ``apply_chat_template(..., tokenize=False)`` does.

    Template errors (including a template's ``raise_exception``) and sandbox
    violations raise ``ValueError``.
    """
    import jinja2

    try:
        return _compile(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         bos_token=bos_token, eos_token=eos_token, **kwargs)
    except jinja2.exceptions.SecurityError as e:
        raise ValueError(f"the chat template tried something the sandbox forbids: {e}") from e
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"the chat template failed: {e}") from e
    except (TypeError, AttributeError, KeyError, IndexError, ValueError) as e:  # e.g. parts given to a text-only template
        raise ValueError(f"the chat template failed on these messages ({type(e).__name__}: {e}); "
                         "does this model's template take image parts?") from e


# --- messages ----------------------------------------------------------------------------------

def _image_from_url(url: str, allow_remote: bool) -> Any:
    """An ``image_url`` URL -> something :func:`pyllama_ernie.images.load_image` takes."""
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        if ";base64" not in head:
            raise ImageError("a data: image URL must be base64-encoded (data:image/png;base64,...)")
        try:
            return base64.b64decode(data, validate=False)
        except (binascii.Error, ValueError) as e:
            raise ImageError(f"a data: image URL has invalid base64: {e}") from e
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme in ("http", "https"):
        if not allow_remote:
            raise ImageError(f"{url!r} is a remote image: pass allow_remote=True to download it")
        try:
            with urllib.request.urlopen(url, timeout=30) as resp:  # noqa: S310 - http(s) only, checked above
                data = resp.read(MAX_REMOTE_BYTES + 1)
        except OSError as e:
            raise ImageError(f"downloading {url!r} failed: {e}") from e
        if len(data) > MAX_REMOTE_BYTES:
            raise ImageError(f"{url!r} is larger than {MAX_REMOTE_BYTES} bytes")
        return data
    if parsed.scheme == "file":
        return urllib.request.url2pathname(parsed.path) if parsed.path else url
    if parsed.scheme and len(parsed.scheme) > 1:
        raise ImageError(f"unsupported image URL scheme {parsed.scheme!r} in {url[:60]!r}")
    return os.path.expanduser(url)


def prepare_chat(messages: Sequence[dict[str, Any]], allow_remote: bool = False
                 ) -> tuple[list[dict[str, Any]], list[Any], list[Any]]:
    """Check OpenAI-style messages; return (messages for the template, images, videos).

    The template sees plain data only: text parts as given, media parts reduced
    to their ``type`` (and an ``image_url.url`` of ``"<image>"``).
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out: list[dict[str, Any]] = []
    images: list[Any] = []
    videos: list[Any] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise ValueError(f"message {i} must be a dict with a string 'role'")
        m = {k: v for k, v in msg.items() if k != "content"}
        content = msg.get("content")
        if content is None or isinstance(content, str):
            if isinstance(content, str) and (IMAGE_MARKER in content or VIDEO_MARKER in content):
                raise ValueError(f"message {i} contains pyllama_ernie's media marker text; pass images as parts")
            m["content"] = content if content is not None else ""
        elif isinstance(content, Sequence):
            parts = []
            for j, part in enumerate(content):
                where = f"message {i}, part {j}"
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise ValueError(f"{where} must be a dict with a 'type'")
                kind = part["type"]
                if kind == "text":
                    text = part.get("text")
                    if not isinstance(text, str):
                        raise ValueError(f"{where}: a text part needs a string 'text'")
                    if IMAGE_MARKER in text or VIDEO_MARKER in text:
                        raise ValueError(f"{where} contains pyllama_ernie's media marker text")
                    parts.append({"type": "text", "text": text})
                elif kind == "image_url":
                    ref = part.get("image_url")
                    url = ref.get("url") if isinstance(ref, dict) else ref
                    if not isinstance(url, str) or not url:
                        raise ValueError(f"{where}: image_url needs a 'url' string")
                    images.append(_image_from_url(url, allow_remote))
                    parts.append({"type": "image_url", "image_url": {"url": "<image>"}})
                elif kind == "image":
                    if part.get("image") is None:
                        raise ValueError(f"{where}: an image part needs 'image' (path, bytes, PIL image or array)")
                    images.append(part["image"])
                    parts.append({"type": "image"})
                elif kind == "video":
                    frames = part.get("video")
                    if isinstance(frames, (str, bytes)) or not isinstance(frames, Sequence) or not frames:
                        raise ValueError(f"{where}: a video part needs 'video': a list of frames")
                    videos.append(list(frames))
                    parts.append({"type": "video"})
                else:
                    raise ValueError(f"{where}: unsupported part type {kind!r} (text, image_url, image, video)")
            m["content"] = parts
        else:
            raise ValueError(f"message {i}: content must be a string or a list of parts")
        out.append(m)
    return out, images, videos


def place_media(rendered: str, n_images: int, n_videos: int) -> str:
    """Replace the template's image/video placeholder runs by our markers (one each, in order)."""
    n_img = len(_IMAGE_RUN.findall(rendered))
    n_vid = len(_VIDEO_RUN.findall(rendered))
    if (n_img, n_vid) != (n_images, n_videos):
        raise ValueError(
            f"the chat template wrote {n_img} image and {n_vid} video placeholder(s) for {n_images} image(s) "
            f"and {n_videos} video(s) in the messages (does this model's template support images?)")
    return _MEDIA_RUN.sub(lambda m: IMAGE_MARKER if m.group(0).startswith("<|IMAGE_START|>") else VIDEO_MARKER,
                          rendered)


def opens_thinking(prompt: str) -> bool:
    """Whether the prompt leaves the assistant inside ``<think>`` (a thinking prefill)."""
    tail = prompt.rstrip()
    i = tail.rfind(_THINK_OPEN)
    return i >= 0 and _THINK_CLOSE not in tail[i:]


class ThinkSplitter:
    """Splits streamed text into ``reasoning_content`` and ``content`` at ``<think>``/``</think>``.

    ``feed(piece)`` returns ``[(field, text), ...]``; text that might be the
    start of a tag is held back until the next piece (or :meth:`flush`).
    """

    def __init__(self, thinking: bool = False) -> None:
        self.field = "reasoning_content" if thinking else "content"
        self.started = thinking  # a <think> may only open the answer
        self.buf = ""
        self.strip_next = False

    def feed(self, piece: str) -> list[tuple[str, str]]:
        self.buf += piece
        out: list[tuple[str, str]] = []
        while self.buf:
            if not self.started:
                stripped = self.buf.lstrip()
                if _THINK_OPEN.startswith(stripped) and len(stripped) < len(_THINK_OPEN):
                    return out  # maybe the start of <think>
                self.started = True
                if stripped.startswith(_THINK_OPEN):
                    self.buf = stripped[len(_THINK_OPEN):]
                    self.field = "reasoning_content"
                continue
            if self.field == "reasoning_content":
                i = self.buf.find(_THINK_CLOSE)
                if i >= 0:
                    if i:
                        out.append((self.field, self.buf[:i]))
                    self.buf = self.buf[i + len(_THINK_CLOSE):]
                    self.field = "content"
                    self.strip_next = True
                    continue
                keep = _partial_suffix(self.buf, _THINK_CLOSE)
                emit, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                if emit:
                    out.append((self.field, emit))
                return out
            if self.strip_next:
                self.buf = self.buf.lstrip("\n")
                if not self.buf:
                    return out
                self.strip_next = False
            out.append(("content", self.buf))
            self.buf = ""
        return out

    def flush(self) -> list[tuple[str, str]]:
        rest, self.buf = self.buf, ""
        if not rest:
            return []
        if not self.started:
            self.started = True
        return [(self.field, rest)]


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def now() -> int:
    return int(time.time())


def chunks(model_name: str, pieces: Iterator[Any], thinking: bool) -> Iterator[dict[str, Any]]:
    """OpenAI ``chat.completion.chunk`` dicts for a stream of pieces ending with a Completion."""
    cid, created = completion_id(), now()

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
        c = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name,
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        c.update(extra)
        return c

    yield chunk({"role": "assistant"})
    split = ThinkSplitter(thinking)
    for item in pieces:
        if isinstance(item, Completion):
            for field, text in split.flush():
                yield chunk({field: text})
            yield chunk({}, item.finish_reason, usage=usage(item))
            return
        for field, text in split.feed(item):
            yield chunk({field: text})


def completion(model_name: str, result: Completion, thinking: bool) -> dict[str, Any]:
    """The OpenAI ``chat.completion`` dict for a whole answer."""
    return {
        "id": completion_id(),
        "object": "chat.completion",
        "created": now(),
        "model": model_name,
        "choices": [{"index": 0, "message": message(result.text, thinking), "finish_reason": result.finish_reason}],
        "usage": usage(result),
    }


def message(text: str, thinking: bool) -> dict[str, Any]:
    """The assistant message for a whole answer (reasoning split off)."""
    split = ThinkSplitter(thinking)
    parts = split.feed(text) + split.flush()
    content = "".join(t for f, t in parts if f == "content")
    reasoning = "".join(t for f, t in parts if f == "reasoning_content")
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning or thinking:
        msg["reasoning_content"] = reasoning
    return msg


def usage(c: Completion) -> dict[str, Any]:
    """OpenAI usage for a Completion, with our cache counters."""
    return {
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "total_tokens": c.prompt_tokens + c.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": c.prompt_tokens - c.prompt_tokens_evaluated},
        "prompt_tokens_evaluated": c.prompt_tokens_evaluated,
        "images_encoded": c.images_encoded,
    }


def text_completion(model_name: str, result: Completion) -> dict[str, Any]:
    """The OpenAI ``text_completion`` dict (``/v1/completions``) for a whole answer."""
    return {
        "id": "cmpl-" + uuid.uuid4().hex[:24],
        "object": "text_completion",
        "created": now(),
        "model": model_name,
        "choices": [{"index": 0, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason}],
        "usage": usage(result),
    }


def text_chunks(model_name: str, pieces: Iterator[Any]) -> Iterator[dict[str, Any]]:
    """OpenAI ``text_completion`` chunks for a stream of pieces ending with a Completion: one per
    piece, then one with an empty text, the ``finish_reason`` and ``usage``."""
    cid, created = "cmpl-" + uuid.uuid4().hex[:24], now()

    def chunk(text: str, finish: str | None = None, **extra: Any) -> dict[str, Any]:
        c = {"id": cid, "object": "text_completion", "created": created, "model": model_name,
             "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
        c.update(extra)
        return c

    for item in pieces:
        if isinstance(item, Completion):
            yield chunk("", item.finish_reason, usage=usage(item))
            return
        yield chunk(item)
