"""OpenAI request bodies -> checked keyword arguments for :class:`~pyllama_ernie.Model` (the server's parsing).

Pure functions, no I/O: :mod:`pyllama_ernie.server` parses a JSON body with
:func:`parse_json`, then :func:`parse_chat` or :func:`parse_completion`; images go
through :mod:`pyllama_ernie._server_media` afterwards.

What a field does is decided here, once:

* OpenAI's sampling fields (``temperature``, ``top_p``, ``seed``, ``stop``,
  ``max_tokens``/``max_completion_tokens``) and llama-server's extras (``top_k``,
  ``min_p``, ``repeat_penalty``, ``ignore_eos``) are passed on; ``chat_template_kwargs`` and
  ``enable_thinking`` go to the chat template.
* Fields that would change the result but are not implemented (``n`` > 1, non-zero
  penalties, ``logprobs``, ``response_format`` other than text, ``tools``, ...) are
  refused with a 400 that names them, never silently ignored.
* Anything else (``user``, ``metadata``, ``store``, unknown keys) is ignored, as
  OpenAI-compatible servers do for clients that send extras.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ParsedRequest", "RequestError", "model_names_match", "parse_chat", "parse_completion", "parse_json"]

#: what the sampling fields default to when a request leaves them out (the library's defaults,
#: which are also llama-server's)
DEFAULTS = {"temperature": 0.8, "top_p": 0.95, "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.0}

# names chat_template_kwargs may not use: the renderer's own variables, and the call's own settings (a
# client that puts max_tokens there most likely meant the setting)
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "messages", "stream", "max_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "stop",
    "seed", "allow_remote", "chat_template", "cancel", "add_generation_prompt", "bos_token", "eos_token",
    "template",
})


class RequestError(ValueError):
    """A request the server refuses; ``status``, ``param`` and ``code`` go into OpenAI's error body."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status


@dataclass
class ParsedRequest:
    """One checked request: the model call's keyword arguments and how to shape the answer."""

    stream: bool
    include_usage: bool
    #: keyword arguments of the model call (sampling, stop, template arguments), without the
    #: messages or prompt
    kwargs: dict[str, Any]
    #: the model the request names (None when it names none)
    model: str | None
    messages: list[dict[str, Any]] = field(default_factory=list)
    prompt: str | list[int] = ""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object; :class:`RequestError` for anything else (NaN included)."""
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, too deep, huge ints
        raise RequestError(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise RequestError("the request body must be a JSON object", code="invalid_json")
    return data


def model_names_match(requested: str | None, names: tuple[str, ...]) -> bool:
    """Whether a request's ``model`` names the served model (no name: the served one)."""
    return requested is None or requested == "" or requested in names


# --- fields -------------------------------------------------------------------------------------

def _number(body: dict[str, Any], name: str, default: float, *, lo: float | None = None,
            hi: float | None = None) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise RequestError(f"'{name}' must be a number", param=name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise RequestError(f"'{name}' must be between {lo} and {hi}, not {v}" if hi is not None
                           else f"'{name}' must be >= {lo}, not {v}", param=name)
    return float(v)


def _int(body: dict[str, Any], name: str, default: int | None, *, lo: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(f"'{name}' must be an integer", param=name)
    if lo is not None and v < lo:
        raise RequestError(f"'{name}' must be >= {lo}, not {v}", param=name)
    return v


def _bool(body: dict[str, Any], name: str, default: bool | None) -> bool | None:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise RequestError(f"'{name}' must be true or false", param=name)
    return v


def _stop(body: dict[str, Any]) -> list[str] | None:
    v = body.get("stop")
    if v is None:
        return None
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise RequestError("'stop' must be a string or a list of strings", param="stop")
    # an empty stop string cannot end anything: leaving it out changes nothing
    return [s for s in items if s] or None


def _not_supported(body: dict[str, Any], name: str, neutral: tuple[Any, ...], what: str) -> None:
    """Refuse a field that would change the answer unless it has a neutral value."""
    v = body.get(name)
    if v is None or any(v == n and type(v) is type(n) for n in neutral):
        return
    raise RequestError(f"'{name}' is not supported yet ({what}); leave it out", param=name,
                       code="unsupported_parameter")


def _check_unsupported(body: dict[str, Any]) -> None:
    _not_supported(body, "n", (1,), "one choice per request")
    _not_supported(body, "best_of", (1,), "one choice per request")
    for penalty in ("presence_penalty", "frequency_penalty"):
        _not_supported(body, penalty, (0, 0.0), "only 0 is allowed; repeat_penalty is available")
    _not_supported(body, "logit_bias", ({},), "no logit bias")
    _not_supported(body, "logprobs", (False, 0), "no log probabilities")
    _not_supported(body, "top_logprobs", (0,), "no log probabilities")
    _not_supported(body, "echo", (False,), "the prompt is not echoed")
    _not_supported(body, "suffix", ("",), "no insertion")
    _not_supported(body, "tools", ([],), "no tool calls")
    _not_supported(body, "functions", ([],), "no tool calls")
    _not_supported(body, "tool_choice", ("none", "auto"), "no tool calls")
    _not_supported(body, "function_call", ("none", "auto"), "no tool calls")
    _not_supported(body, "audio", (), "text output only")
    _not_supported(body, "modalities", (["text"],), "text output only")
    _not_supported(body, "reasoning_effort", (), "use enable_thinking or chat_template_kwargs")
    _not_supported(body, "web_search_options", (), "no web search")
    _not_supported(body, "chat_template", (), "the server uses the model's chat template")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise RequestError("'response_format' is not supported yet (structured output); only {\"type\": \"text\"}",
                           param="response_format", code="unsupported_parameter")
    # llama-server's own sampling extras that this server does not implement
    for name, neutral in (("typical_p", (1, 1.0)), ("mirostat", (0,)),
                          ("tfs_z", (1, 1.0)), ("grammar", ("",)), ("json_schema", ({},)), ("n_probs", (0,)),
                          ("dry_multiplier", (0, 0.0)), ("xtc_probability", (0, 0.0)),
                          ("dynatemp_range", (0, 0.0)), ("n_keep", (0,)), ("samplers", ())):
        _not_supported(body, name, neutral, "a llama-server option this server does not implement")


def _ignore_eos(body: dict[str, Any]) -> dict[str, Any]:
    """llama-server's ``ignore_eos`` (benchmarks use it), passed on only when true."""
    return {"ignore_eos": True} if _bool(body, "ignore_eos", False) else {}


def _stream_options(body: dict[str, Any], stream: bool) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise RequestError("'stream_options' must be an object", param="stream_options")
    include = opts.get("include_usage")
    if include is not None and not isinstance(include, bool):
        raise RequestError("'stream_options.include_usage' must be true or false", param="stream_options")
    return bool(include) and stream


def _sampling(body: dict[str, Any], n_ctx: int) -> dict[str, Any]:
    """The sampling keyword arguments shared by both endpoints."""
    max_tokens = _int(body, "max_completion_tokens", None, lo=0)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", None, lo=0)
    seed = _int(body, "seed", None)
    return {
        # no limit given: as many as the context window holds (generation also stops when it is full)
        "max_tokens": n_ctx if max_tokens is None else max_tokens,
        "temperature": _number(body, "temperature", DEFAULTS["temperature"], lo=0.0),
        "top_p": _number(body, "top_p", DEFAULTS["top_p"], lo=0.0, hi=1.0),
        "top_k": _int(body, "top_k", DEFAULTS["top_k"], lo=0),
        "min_p": _number(body, "min_p", DEFAULTS["min_p"], lo=0.0, hi=1.0),
        "repeat_penalty": _number(body, "repeat_penalty", DEFAULTS["repeat_penalty"]),
        "stop": _stop(body),
        "seed": seed,
        **_ignore_eos(body),
    }


def _model(body: dict[str, Any]) -> str | None:
    name = body.get("model")
    if name is not None and not isinstance(name, str):
        raise RequestError("'model' must be a string", param="model")
    return name


def _common(body: dict[str, Any], n_ctx: int) -> tuple[bool, bool, dict[str, Any]]:
    _check_unsupported(body)
    stream = bool(_bool(body, "stream", False))
    return stream, _stream_options(body, stream), _sampling(body, n_ctx)


# --- chat -----------------------------------------------------------------------------------------

def _template_kwargs(body: dict[str, Any]) -> dict[str, Any]:
    """``chat_template_kwargs`` (less ``enable_thinking``) and ``enable_thinking`` as keyword
    arguments of the model call."""
    extra = body.get("chat_template_kwargs")
    if extra is None:
        extra = {}
    if not isinstance(extra, dict):
        raise RequestError("'chat_template_kwargs' must be an object", param="chat_template_kwargs")
    reserved = sorted(_RESERVED_TEMPLATE_KWARGS.intersection(extra))
    if reserved:
        raise RequestError(f"'chat_template_kwargs' may not set {', '.join(reserved)}",
                           param="chat_template_kwargs")
    kwargs = dict(extra)
    thinking = _bool(body, "enable_thinking", None)
    inner = kwargs.pop("enable_thinking", None)
    if inner is not None and not isinstance(inner, bool):
        raise RequestError("'chat_template_kwargs.enable_thinking' must be true or false",
                           param="chat_template_kwargs")
    if thinking is not None and inner is not None and thinking != inner:
        raise RequestError("'enable_thinking' and 'chat_template_kwargs.enable_thinking' disagree",
                           param="enable_thinking")
    return {"chat_template_kwargs": kwargs, "enable_thinking": thinking if thinking is not None else inner}


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The messages, each checked to be an object with a role; parts are checked by the media step."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of messages", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a string 'role'", param="messages")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise RequestError(f"messages[{i}].content must be a string or a list of parts", param="messages")
    return messages


def parse_chat(body: dict[str, Any], *, n_ctx: int) -> ParsedRequest:
    """Check a ``/v1/chat/completions`` body; the model call's arguments (the images still unresolved)."""
    stream, include_usage, kwargs = _common(body, n_ctx)
    kwargs.update(_template_kwargs(body))
    return ParsedRequest(stream=stream, include_usage=include_usage, kwargs=kwargs, model=_model(body),
                         messages=_messages(body))


# --- completions ----------------------------------------------------------------------------------

def _prompt(body: dict[str, Any]) -> str | list[int]:
    """A prompt string or token ids; a batch of one is taken, a bigger batch refused."""
    p = body.get("prompt")
    if isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p):
        if len(p) != 1:
            raise RequestError("one prompt per request (a batch of prompts is not supported)", param="prompt",
                               code="unsupported_parameter")
        p = p[0]
    if isinstance(p, str):
        if not p:
            raise RequestError("'prompt' is empty", param="prompt")
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return list(p)
    raise RequestError("'prompt' must be a non-empty string or a non-empty list of token ids", param="prompt")


def parse_completion(body: dict[str, Any], *, n_ctx: int) -> ParsedRequest:
    """Check a ``/v1/completions`` body; the model call's arguments."""
    stream, include_usage, kwargs = _common(body, n_ctx)
    return ParsedRequest(stream=stream, include_usage=include_usage, kwargs=kwargs, model=_model(body),
                         prompt=_prompt(body))
