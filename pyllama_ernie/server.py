"""An OpenAI-compatible HTTP server over one :class:`~pyllama_ernie.Model` (``python -m pyllama_ernie serve``).

>>> from pyllama_ernie import Model
>>> from pyllama_ernie.server import serve
>>> with Model("ernie.gguf", n_ctx=4096, n_parallel=4) as model:
...     serve(model, host="127.0.0.1", port=8080)

Endpoints: ``POST /v1/chat/completions`` (text and images, streaming as Server-Sent
Events), ``POST /v1/completions``, ``GET /v1/models``, ``GET /health`` and ``GET
/metrics`` (Prometheus). Built on Starlette and uvicorn (``pip install
"pyllama_ernie[server]"``); docs/serving.md describes the behaviour.

The event loop never waits on llama.cpp: generation runs through the model's async
API (``acreate_chat_completion``, ``acreate_completion``), images are downloaded with
httpx and local files read in worker threads. A client that goes away cancels its
generation: streams notice the disconnect while waiting for the next token, and a
non-streamed request is watched for it while its answer is computed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ._openai_request import (
    ParsedRequest,
    RequestError,
    model_names_match,
    parse_chat,
    parse_completion,
    parse_json,
)
from ._server_media import MAX_MEDIA_BYTES, MediaPolicy, resolve_media
from ._server_metrics import CONTENT_TYPE, Metrics
from .errors import ClosedError, ErnieError, PromptTooLongError, QueueFullError

if TYPE_CHECKING:  # pragma: no cover
    from .model import Model

__all__ = ["DEFAULT_MAX_BODY_BYTES", "create_app", "is_loopback", "serve"]

logger = logging.getLogger("pyllama_ernie.server")

#: the largest request body read (data: images are inside it)
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
ENDPOINTS = (CHAT, COMPLETIONS, "/v1/models", "/health", "/metrics")

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
                500: "server_error", 503: "server_error"}


# --- errors ---------------------------------------------------------------------------------------

class HTTPError(Exception):
    """An answer in OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"message": message, "type": _ERROR_TYPES.get(status, "server_error"), "param": param,
                     "code": code}
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.body}, status_code=self.status, headers=self.headers)


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def _as_http_error(e: BaseException) -> HTTPError:
    """The HTTP answer for an exception raised while serving a request."""
    if isinstance(e, HTTPError):
        return e
    if isinstance(e, RequestError):
        return HTTPError(e.status, e.message, param=e.param, code=e.code)
    if isinstance(e, QueueFullError):
        retry = max(1, int(-(-float(e.retry_after) // 1)))
        return HTTPError(429, f"the server is busy: every slot is generating and the queue is full; retry in "
                              f"{retry} s", code="queue_full", headers={"Retry-After": str(retry)})
    if isinstance(e, PromptTooLongError):
        return HTTPError(400, str(e), param="messages", code="context_length_exceeded")
    if isinstance(e, ClosedError):
        return HTTPError(503, "the model is closed (the server is shutting down)", code="model_closed")
    if isinstance(e, ValueError):  # bad messages, images, templates, sampling values, token ids
        return HTTPError(400, " ".join(str(e).split()) or type(e).__name__, code="invalid_value")
    if isinstance(e, ErnieError):
        return HTTPError(500, f"the model failed: {' '.join(str(e).split())}", code="model_error")
    return HTTPError(500, f"internal server error ({type(e).__name__})", code="internal_error")


# --- shaping the model's results ----------------------------------------------------------------

def _finish(reason: Any) -> Any:
    # "cancelled" is this library's own; OpenAI clients know "stop" and "length"
    return "stop" if reason == "cancelled" else reason


def _choices(choices: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**c, "finish_reason": _finish(c.get("finish_reason")), "logprobs": c.get("logprobs")}
            for c in choices]


def _result(result: dict[str, Any], alias: str) -> dict[str, Any]:
    """A whole ``chat.completion`` or ``text_completion`` as OpenAI sends it."""
    return {**result, "model": alias, "choices": _choices(result.get("choices", []))}


def _chunks(chunk: dict[str, Any], alias: str, include_usage: bool) -> list[dict[str, Any]]:
    """The stream events for one chunk of the model's stream.

    As OpenAI streams: usage only with ``stream_options.include_usage``, then as
    ``"usage": null`` on every chunk and a last chunk with no choices and the usage.
    """
    c = {**chunk, "model": alias, "choices": _choices(chunk.get("choices", []))}
    usage = c.pop("usage", None)
    if not include_usage:
        return [c]
    c["usage"] = None
    out = [c]
    if usage is not None:
        out.append({"id": c.get("id"), "object": c.get("object"), "created": c.get("created"), "model": alias,
                    "choices": [], "usage": usage})
    return out


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


# --- a streamed answer that notices the client going away ---------------------------------------

class _EventStream(Response):
    """Server-Sent Events from an async iterator of encoded events.

    While events are produced, the connection is watched for ``http.disconnect``;
    when it comes first, producing stops (the iterator is closed, which cancels
    the generation) and ``on_disconnect`` is called.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], on_disconnect: Callable[[], None]) -> None:
        self.events = events
        self.on_disconnect = on_disconnect
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        finished = False

        async def produce() -> None:
            nonlocal finished
            try:
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                async for data in self.events:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                finished = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:  # servers of ASGI spec 2.4 report a disconnect as a failed send
                pass
            finally:
                with anyio.CancelScope(shield=True):
                    await self.events.aclose()  # type: ignore[attr-defined]
                tg.cancel_scope.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(produce)
            while (await receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()
        if not finished:
            self.on_disconnect()


async def _aclose(it: Any) -> None:
    with anyio.CancelScope(shield=True):
        await it.aclose()


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


# --- the application ----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Settings:
    alias: str
    names: tuple[str, ...]
    api_key: str | None
    media: MediaPolicy
    max_body_bytes: int


class _Api:
    """The endpoints over one model."""

    def __init__(self, model: Model, settings: _Settings) -> None:
        self.model = model
        self.s = settings
        self.metrics = Metrics(model.stats)
        self.created = int(time.time())
        self._client: Any = None  # httpx.AsyncClient, made on the first remote image

    # --- plumbing

    def route(self, endpoint: str, handler: Callable[[Request], Awaitable[Response]], *, auth: bool = True
              ) -> Callable[[Request], Awaitable[Response]]:
        """``handler`` with the API key check, and every failure answered in OpenAI's error shape."""

        async def run(request: Request) -> Response:
            try:
                if auth:
                    self._check_key(request)
                return await handler(request)
            except (_ClientGone, ClientDisconnect):
                self.metrics.count_disconnect(endpoint)
                return Response(status_code=499)  # nobody reads it; counted as 499 in /metrics
            except Exception as e:  # a bad request must never end the server
                err = _as_http_error(e)
                if err.status >= 500 and not isinstance(e, ClosedError):
                    logger.error("%s failed: %s", endpoint, e, exc_info=e)
                return err.response()

        return run

    def _check_key(self, request: Request) -> None:
        if self.s.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.s.api_key.encode()):
            raise HTTPError(401, "invalid or missing API key (send the header 'Authorization: Bearer KEY')",
                            code="invalid_api_key")

    async def _json(self, request: Request) -> dict[str, Any]:
        """The JSON body, refused with 413 as soon as it is larger than the limit (while reading)."""
        limit = self.s.max_body_bytes
        too_large = HTTPError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
        data = parse_json(bytes(body))
        name = data.get("model")
        if isinstance(name, str) and not model_names_match(name, self.s.names):
            raise HTTPError(404, f"the model {name!r} does not exist; this server serves {self.s.alias!r}",
                            param="model", code="model_not_found")
        return data

    def _http_client(self) -> Any:
        if self._client is None:
            import httpx

            self._client = httpx.AsyncClient(follow_redirects=True, max_redirects=5,
                                             timeout=httpx.Timeout(self.s.media.timeout),
                                             headers={"User-Agent": "pyllama_ernie-server"})
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _watched(self, request: Request, work: Awaitable[Any]) -> Any:
        """``await work``, cancelled (raising _ClientGone) if the client disconnects first."""
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when this request itself is cancelled (server shutdown)
            watcher.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if task.cancelled():
            raise _ClientGone()
        return task.result()

    async def _call(self, method: Callable[..., Awaitable[Any]], first: Any, req: ParsedRequest,
                    stream: bool) -> Any:
        try:
            return await method(first, stream=stream, **req.kwargs)
        except TypeError as e:  # a value of the wrong type reached the model
            raise RequestError(str(e)) from e

    # --- generation endpoints

    async def chat(self, request: Request) -> Response:
        req = parse_chat(await self._json(request), n_ctx=self.model.n_ctx)

        async def call(stream: bool) -> Any:
            client = self._http_client() if self.s.media.allow_remote else None
            messages = await resolve_media(req.messages, self.s.media, client)
            return await self._call(self.model.acreate_chat_completion, messages, req, stream)

        return await self._generate(request, CHAT, req, call)

    async def completions(self, request: Request) -> Response:
        req = parse_completion(await self._json(request), n_ctx=self.model.n_ctx)

        async def call(stream: bool) -> Any:
            return await self._call(self.model.acreate_completion, req.prompt, req, stream)

        return await self._generate(request, COMPLETIONS, req, call)

    async def _generate(self, request: Request, endpoint: str, req: ParsedRequest,
                        call: Callable[[bool], Awaitable[Any]]) -> Response:
        if not req.stream:
            return JSONResponse(_result(await self._watched(request, call(False)), self.s.alias))

        # the model checks the request and takes a slot or a queue place before the await
        # returns, so a full queue or a too-long prompt is still answered with its status code
        it = await self._watched(request, call(True))
        return _EventStream(self._events(it, req.include_usage),
                            on_disconnect=lambda: self.metrics.count_disconnect(endpoint))

    async def _events(self, it: Any, include_usage: bool) -> AsyncIterator[bytes]:
        try:
            async for chunk in it:
                for c in _chunks(chunk, self.s.alias, include_usage):
                    yield _event(c)
            yield b"data: [DONE]\n\n"
        except Exception as e:  # the status is sent: the error goes into the stream, as OpenAI's do
            err = _as_http_error(e)
            if err.status >= 500 and not isinstance(e, ClosedError):
                logger.error("a stream failed: %s", e, exc_info=e)
            yield _event({"error": err.body})
        finally:
            await _aclose(it)

    # --- the other endpoints

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.s.alias, "object": "model", "created": self.created, "owned_by": "pyllama_ernie"}

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def one_model(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self.s.names:
            raise HTTPError(404, f"the model {name!r} does not exist; this server serves {self.s.alias!r}",
                            param="model", code="model_not_found")
        return JSONResponse(self._model_card())

    async def health(self, request: Request) -> Response:
        if self.model.closed:
            return JSONResponse({"status": "closed"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.render(self.s.alias), media_type=CONTENT_TYPE)

    async def sample_forever(self, every: float = 1.0) -> None:
        """Sample the model's counters every second, for the tokens/s gauge."""
        while True:
            with contextlib.suppress(Exception):  # a closed model: the gauge just stops moving
                self.metrics.sample()
            await asyncio.sleep(every)


class _CountRequests:
    """ASGI middleware: counts every answered request by endpoint and status (499: the client left first)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 499

        async def counting_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else ("/v1/models/{name}" if path.startswith("/v1/models/")
                                                   else "other")
        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.count_request(endpoint, status)


def create_app(model: Model, *, alias: str | None = None, api_key: str | None = None,
               allow_remote_media: bool = False, allow_local_media: str | Path | None = None,
               cors_origins: Sequence[str] = (), max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               max_media_bytes: int = MAX_MEDIA_BYTES, media_timeout: float = 30.0) -> Starlette:
    """The ASGI application serving ``model`` (run it with uvicorn, or in-process with httpx).

    Args:
        model: the model; the application does not close it.
        alias: the model's name in the API (default: the GGUF file's name). Requests may
            name the model by its alias or its file name.
        api_key: when set, every endpoint but ``/health`` needs ``Authorization: Bearer KEY``.
        allow_remote_media: download ``http(s)`` image URLs (at most ``max_media_bytes`` each,
            ``media_timeout`` seconds each).
        allow_local_media: a folder whose files clients may name as images (paths or
            ``file://`` URLs inside it only).
        cors_origins: origins allowed to call the API from a browser (none by default).
        max_body_bytes: larger request bodies are refused with 413 while being read.
    """
    local = Path(allow_local_media).expanduser().resolve() if allow_local_media is not None else None
    if local is not None and not local.is_dir():
        raise ValueError(f"the media folder {str(allow_local_media)!r} is not a directory")
    if max_body_bytes <= 0 or max_media_bytes <= 0 or media_timeout <= 0:
        raise ValueError("max_body_bytes, max_media_bytes and media_timeout must be > 0")
    name = alias or model.path.name
    settings = _Settings(alias=name, names=(name, model.path.name), api_key=api_key or None,
                         media=MediaPolicy(allow_remote=allow_remote_media, local_dir=local,
                                           max_bytes=max_media_bytes, timeout=media_timeout),
                         max_body_bytes=max_body_bytes)
    api = _Api(model, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        sampler = asyncio.ensure_future(api.sample_forever())
        try:
            yield
        finally:
            sampler.cancel()
            await api.close()

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        message = "no such endpoint" if status == 404 else f"method {request.method} not allowed here"
        return HTTPError(status, f"{message}: {request.method} {request.url.path}", code="not_found"
                         if status == 404 else "method_not_allowed").response()

    routes = [
        Route(CHAT, api.route(CHAT, api.chat), methods=["POST"]),
        Route(COMPLETIONS, api.route(COMPLETIONS, api.completions), methods=["POST"]),
        Route("/v1/models", api.route("/v1/models", api.models), methods=["GET"]),
        Route("/v1/models/{name:path}", api.route("/v1/models/{name}", api.one_model), methods=["GET"]),
        Route("/health", api.route("/health", api.health, auth=False), methods=["GET"]),
        Route("/metrics", api.route("/metrics", api.metrics_text), methods=["GET"]),
    ]
    middleware = [Middleware(_CountRequests, metrics=api.metrics)]
    if cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(cors_origins),
                                     allow_methods=["GET", "POST", "OPTIONS"],
                                     allow_headers=["Authorization", "Content-Type"], max_age=600))
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={HTTPException: not_found})
    app.state.api = api  # for tests and embedding: the metrics and settings
    return app


# --- running it -----------------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one). OSError when it cannot be bound."""
    family, kind, proto, _, addr = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except BaseException:
        sock.close()
        raise
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(model: Model, *, host: str = "127.0.0.1", port: int = 8080,
          ready: Callable[[str], None] | None = None, log_level: str = "warning", **app_options: Any) -> None:
    """Serve ``model`` over HTTP until SIGINT or SIGTERM (then return after a graceful shutdown).

    ``ready(url)`` is called once the server accepts connections (``url`` has the real
    port when ``port`` is 0). ``app_options`` are :func:`create_app`'s. The model is not
    closed here. Raises OSError when the address cannot be bound.
    """
    import uvicorn

    app = create_app(model, **app_options)
    sock = _bind(host, port)
    url = _url(sock)

    class _Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started and ready is not None:
                ready(url)

        @contextlib.contextmanager
        def capture_signals(self) -> Any:
            with super().capture_signals():
                yield
                # a signal ends serve() normally instead of being raised again after the shutdown
                getattr(self, "_captured_signals", []).clear()

    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=5)
    try:
        _Server(config).run(sockets=[sock])
    finally:
        sock.close()
