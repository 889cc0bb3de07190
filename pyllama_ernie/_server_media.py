"""The server's image policy: which ``image_url`` a client may send, and fetching them without blocking.

The library's :func:`pyllama_ernie.chat.prepare_chat` reads local paths and
``file://`` URLs, which a server must never do on a client's word. So every
message part is checked and rewritten here before the model sees it:

* ``text`` parts stay; ``data:`` URIs stay (the library decodes them; the body limit
  bounds their size);
* ``http(s)`` URLs only with ``allow_remote``: downloaded here with httpx (asynchronously,
  redirects followed, at most ``max_bytes`` and ``timeout`` seconds each) and passed on
  as bytes;
* local paths and ``file://`` URLs only with ``local_dir``, and only files inside it
  once symlinks and ``..`` are resolved (a relative path is taken relative to it): read
  here, in a worker thread, and passed on as bytes;
* every other part type (the library's own ``image``/``video`` conveniences included,
  since they take paths) and URL scheme is refused with :class:`RequestError`.
"""

from __future__ import annotations

import os
import stat
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._openai_request import RequestError

__all__ = ["MAX_MEDIA_BYTES", "MediaPolicy", "resolve_media"]

#: the most bytes of one downloaded or local image (a data: URI is bounded by the body limit)
MAX_MEDIA_BYTES = 20 * 1024 * 1024


@dataclass(frozen=True)
class MediaPolicy:
    """Where images may come from. ``local_dir`` must be an absolute, resolved directory."""

    allow_remote: bool = False
    local_dir: Path | None = None
    max_bytes: int = MAX_MEDIA_BYTES
    timeout: float = 30.0
    #: the most images one request may download or read (data: URIs not counted)
    max_fetches: int = 16


def _bad(message: str, code: str = "invalid_image") -> RequestError:
    return RequestError(message, param="messages", code=code)


def _url_of(part: dict[str, Any], where: str) -> str:
    ref = part.get("image_url")
    url = ref.get("url") if isinstance(ref, dict) else ref
    if not isinstance(url, str) or not url:
        raise _bad(f"{where}: an image_url part needs image_url.url, a string")
    return url


def _local_path(url: str, policy: MediaPolicy, where: str) -> Path:
    """The file a ``file://`` URL or a path names, if it is inside ``policy.local_dir``."""
    if policy.local_dir is None:
        raise _bad(f"{where}: local image paths are off (start the server with --allow-local-media DIR)",
                   code="local_media_disabled")
    parsed = urllib.parse.urlparse(url)
    raw = urllib.request.url2pathname(parsed.path) if parsed.scheme == "file" else url
    if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
        raise _bad(f"{where}: a file:// URL must name a local file")
    path = Path(os.path.realpath(policy.local_dir / raw))  # an absolute raw replaces local_dir
    if path != policy.local_dir and policy.local_dir not in path.parents:
        raise _bad(f"{where}: {raw!r} is outside the folder the server may read images from",
                   code="local_media_forbidden")
    return path


def _read_local(path: Path, max_bytes: int) -> bytes:
    """A regular file's bytes (no FIFOs or devices, which could block or never end)."""
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        with open(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise _bad(f"{path.name!r} is not a regular file")
            if st.st_size > max_bytes:
                raise _bad(f"{path.name!r} is larger than {max_bytes} bytes", code="image_too_large")
            return f.read(max_bytes + 1)
    except OSError as e:
        raise _bad(f"cannot read image {path.name!r}: {e.strerror or e}") from None


async def _download(client: Any, url: str, policy: MediaPolicy) -> bytes:
    """An image's bytes from an http(s) URL, within the size and time limits."""
    import anyio
    import httpx

    try:
        with anyio.fail_after(policy.timeout):
            async with client.stream("GET", url) as resp:
                if resp.status_code != 200:
                    raise _bad(f"downloading {url[:200]!r} failed: HTTP {resp.status_code}", code="image_download")
                declared = resp.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > policy.max_bytes:
                    raise _bad(f"{url[:200]!r} is larger than {policy.max_bytes} bytes", code="image_too_large")
                data = bytearray()
                async for chunk in resp.aiter_bytes():
                    data += chunk
                    if len(data) > policy.max_bytes:
                        raise _bad(f"{url[:200]!r} is larger than {policy.max_bytes} bytes",
                                   code="image_too_large")
                return bytes(data)
    except TimeoutError:
        raise _bad(f"downloading {url[:200]!r} took longer than {policy.timeout:g} s", code="image_download") from None
    except httpx.HTTPError as e:
        raise _bad(f"downloading {url[:200]!r} failed: {e}", code="image_download") from None


async def resolve_media(messages: list[dict[str, Any]], policy: MediaPolicy, client: Any = None
                        ) -> list[dict[str, Any]]:
    """The messages with every image part checked and made safe for the model (see the module doc).

    ``client`` is an ``httpx.AsyncClient`` for remote images (needed only when they are allowed).
    Raises :class:`RequestError` for a part the policy refuses or an image that cannot be fetched.
    """
    import anyio

    out: list[dict[str, Any]] = []
    fetches = 0
    for i, msg in enumerate(messages):
        content = msg.get("content")
        if not isinstance(content, list):
            out.append(msg)
            continue
        parts = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append(part)
                continue
            if kind != "image_url":
                raise RequestError(f"{where}: unsupported content part type {kind!r} (text and image_url only)",
                                   param="messages")
            url = _url_of(part, where)
            scheme = urllib.parse.urlparse(url).scheme.lower()
            if url.startswith("data:"):
                parts.append({"type": "image_url", "image_url": {"url": url}})
                continue
            fetches += 1
            if fetches > policy.max_fetches:
                raise _bad(f"at most {policy.max_fetches} images per request may be downloaded or read")
            if scheme in ("http", "https"):
                if not policy.allow_remote:
                    raise _bad(f"{where}: remote image URLs are off (start the server with --allow-remote-media)",
                               code="remote_media_disabled")
                data = await _download(client, url, policy)
            elif scheme in ("", "file") or len(scheme) == 1:  # a path (a drive letter parses as a scheme)
                path = _local_path(url, policy, where)
                data = await anyio.to_thread.run_sync(_read_local, path, policy.max_bytes)
            else:
                raise _bad(f"{where}: unsupported image URL scheme {scheme!r} (data:, http(s):, file:)")
            parts.append({"type": "image", "image": data})
        out.append({**msg, "content": parts})
    return out
