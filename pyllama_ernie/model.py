"""Model: the front door. Opens a GGUF (and an mmproj), owns the default context; generate,
stream, logits and chat.

>>> with Model("ernie-4.5-0.3b.gguf") as m:
...     print(m.generate("The capital of France is", max_tokens=16, temperature=0).text)

The pieces it puts together live on the floors below: the model handle
(:class:`~pyllama_ernie._lib.ModelHandle`), the vocabulary (:mod:`.vocab`),
contexts (:mod:`.context`), the vision projector (:mod:`.vision`), prompts with
media (:mod:`.multimodal`) and chat templates (:mod:`.chat`).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Union

import numpy as np

from . import _aio, _lib, chat, state_file
from ._lib import ModelHandle, default_threads, ffi, lib
from .batching import COUNTERS, Engine
from .context import Context, flatten_prompt
from .errors import BusyError, ClosedError, ImageError, PromptTooLongError
from .gguf_check import check_gguf_file, validate_gguf
from .multimodal import multimodal_prompt
from .offload import OffloadPlan
from .values import Completion, ContextParams, Embeddings, Features, Media, SamplingParams
from .vision import Projector
from .vocab import Vocab

# check_gguf_file is defined in .gguf_check; it stays importable from here as before.
__all__ = ["Model", "Prompt", "check_gguf_file"]

#: text, or token ids (optionally mixed with :class:`Embeddings` rows)
Prompt = Union[str, Sequence[Union[int, Embeddings]]]
PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class _Request:
    """One generation call's checked settings."""

    sampling: SamplingParams
    max_tokens: int
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    images: tuple[Any, ...] = ()
    videos: tuple[Any, ...] = ()
    cancel: threading.Event | None = None
    add_special: bool = True

    @classmethod
    def make(cls, default_seed: int | None, *, max_tokens: int, temperature: float, top_k: int, top_p: float,
             min_p: float, repeat_penalty: float, seed: int | None, stop: str | Sequence[str] | None,
             **rest: Any) -> "_Request":
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                  repeat_penalty=repeat_penalty, seed=default_seed if seed is None else seed)
        sampling.validate()
        if max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        images, videos = rest.pop("images", None), rest.pop("videos", None)
        return cls(sampling, max_tokens, stops, images=tuple(images or ()), videos=tuple(videos or ()), **rest)


class Model(_lib.CResource):
    """An ERNIE 4.5 model loaded from a GGUF file.

    Args:
        model_path: the ``.gguf`` file.
        n_ctx: context window in tokens (0 = the model's training length).
        n_batch: tokens per ``llama_decode`` call while evaluating a prompt.
        n_ubatch: physical batch size (default: ``n_batch``).
        n_threads: CPU threads (default: the physical cores available).
        n_gpu_layers: layers to offload to a GPU (-1 = all; needs a GPU build, e.g.
            ``CMAKE_ARGS="-DGGML_CUDA=on" pip install .``). Without a GPU the model
            runs on the CPU and one warning is logged.
        seed: default seed for sampling (None = random each call).
        flash_attn: True/False to force, None to let llama.cpp decide.
        kv_cache_type: "f16" (default), "f32", "bf16" or "q8_0".
        use_mmap: map the file instead of reading it.
        progress: ``callable(fraction) -> bool | None`` called while loading;
            returning False cancels the load (ModelLoadError).
        mmproj_path: the vision projector (mmproj ``.gguf``) of an ERNIE-4.5-VL
            model; with it, prompts take images and videos (see ``IMAGE_MARKER``).
        main_gpu: the GPU that holds the model with ``split_mode="none"``, and
            the intermediate results otherwise.
        tensor_split: how much of the model each GPU gets, e.g. ``[3, 1]``.
        split_mode: ``"layer"`` (default: whole layers per GPU), ``"row"`` or ``"none"``.
        cpu_moe: keep MoE expert weights in CPU memory while the rest of the model
            runs on the GPU: True for every layer, an int N for the first N layers.
            ERNIE-4.5-VL-28B-A3B at Q4_K_M then needs a few GB of GPU memory.
        mmproj_gpu: run the vision encoder on the GPU (default: when layers are offloaded).
        n_parallel: serve this many requests at once from one context (continuous
            batching, see :mod:`pyllama_ernie.batching`): calls from several threads or
            asyncio tasks share each decode step instead of taking turns. Each request
            gets a window of ``n_ctx`` positions (the KV cache holds ``n_parallel * n_ctx``).
            None (default): one context whose calls take turns.
        max_queue: with ``n_parallel``, how many requests may wait for a free sequence;
            one more raises :class:`~pyllama_ernie.errors.QueueFullError`.
        kv_unified: with ``n_parallel``, one KV buffer shared by the sequences (default;
            every step is one graph) or one per sequence.

    The context settings are kept as :attr:`context_params` (a
    :class:`~pyllama_ernie.values.ContextParams`) and the offload settings as
    :attr:`offload`. The model is freed by :meth:`close`, by leaving a ``with``
    block, or at garbage collection. Use after close raises :class:`ClosedError`.
    """

    def __init__(
        self,
        model_path: PathLike,
        *,
        n_ctx: int = 4096,
        n_batch: int = 512,
        n_ubatch: int | None = None,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        seed: int | None = None,
        flash_attn: bool | None = None,
        kv_cache_type: str = "f16",
        use_mmap: bool = True,
        progress: Callable[[float], bool | None] | None = None,
        mmproj_path: PathLike | None = None,
        main_gpu: int = 0,
        tensor_split: Sequence[float] | None = None,
        split_mode: str = "layer",
        cpu_moe: bool | int = False,
        mmproj_gpu: bool | None = None,
        n_parallel: int | None = None,
        max_queue: int = 64,
        kv_unified: bool = True,
    ) -> None:
        self._model: ModelHandle | None = None
        self._engine: Engine | None = None
        self._counts = dict.fromkeys(COUNTERS, 0)  # without an engine (the engine counts its own)
        # guards _closing and _contexts; close() runs once at a time
        self._lock = threading.Lock()
        self._close_lock = threading.RLock()
        self._closing = False
        self._contexts: "weakref.WeakSet[Context]" = weakref.WeakSet()
        self._default_ctx: Context | None = None
        #: the vision projector (None without ``mmproj_path``)
        self.projector: Projector | None = None
        summary = validate_gguf(model_path, role="model")
        self.path = summary.path
        self.seed = seed
        #: the settings of the default context (and the defaults of :meth:`context`)
        self.context_params = ContextParams(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch, n_threads=n_threads,
                                            flash_attn=flash_attn, kv_cache_type=kv_cache_type)
        self.context_params.validate()
        _lib.ensure_init()
        #: the checked offload settings (devices, layers, expert placement)
        self.offload = OffloadPlan(n_gpu_layers=n_gpu_layers, main_gpu=main_gpu, tensor_split=tensor_split,
                                   split_mode=split_mode, cpu_moe=cpu_moe)
        params = lib.llama_model_default_params()
        self.offload.apply(params)
        params.load_mode = lib.LLAMA_LOAD_MODE_MMAP if use_mmap else lib.LLAMA_LOAD_MODE_NONE
        self._model = ModelHandle(str(self.path), params, progress)
        try:
            #: the tokenizer (:class:`~pyllama_ernie.vocab.Vocab`)
            self.vocab = Vocab(self._model, summary)
            self.n_vocab = self.vocab.n_vocab
            self.n_embd = self._model.n_embd
            #: rope position rows per input embedding (4 for M-RoPE models such as ERNIE-4.5-VL)
            self.n_pos_per_embd = self._model.n_pos_per_embd
            if n_parallel is None:
                self._default_ctx = self._open_context(self.context_params)
            else:
                self._engine = Engine(self._model, self.vocab, self.context_params, n_parallel, max_queue,
                                      kv_unified=kv_unified)
            if mmproj_path is not None:
                use_gpu = self.offload.uses_gpu if mmproj_gpu is None else bool(mmproj_gpu and self.offload.gpus)
                self.projector = Projector(mmproj_path, self._model, n_threads=n_threads or default_threads(),
                                           use_gpu=use_gpu, flash_attn=flash_attn)
        except BaseException:
            self.close()
            raise

    # --- lifetime -------------------------------------------------------

    def _handle(self) -> Any:
        """The ``llama_model*`` for a short use; ClosedError once the model is closing."""
        if self._model is None:
            raise ClosedError("the model is closed")
        return self._model.ptr

    def _open_context(self, params: ContextParams, observe_nodes: Callable[..., None] | None = None) -> Context:
        if self._model is None:
            raise ClosedError("the model is closed")
        ctx = Context(self._model, self.vocab, params, observe_nodes=observe_nodes)
        with self._lock:
            closing = self._closing
            if not closing:
                self._contexts.add(ctx)
        if closing:  # close() ran meanwhile and could not see this context
            ctx.close()
            raise ClosedError("the model is closed")
        return ctx

    def close(self) -> None:
        """Free the model and every context made from it. Safe to call twice, and from any thread.

        Contexts still generating in other threads are cancelled and waited for
        (within one token), as :meth:`Context.close` describes: their
        generations end with ``finish_reason == "cancelled"``, a prompt being
        evaluated raises :class:`ClosedError`. An image being encoded finishes
        first. New calls and new contexts raise :class:`ClosedError` at once.
        """
        with self._close_lock:
            with self._lock:
                self._closing = True
                contexts = list(self._contexts)
            if self._engine is not None:
                self._engine.close()
            if self._default_ctx is not None and self._default_ctx not in contexts:
                contexts.append(self._default_ctx)
            for ctx in contexts:  # stop them all first, then wait for each
                ctx.shutdown()
            busy: BaseException | None = None
            for ctx in contexts:
                try:
                    ctx.close()
                except BusyError as e:  # closed from inside one of its own calls: it frees itself later
                    busy = busy or e
            # the closed default context and projector stay: a thread racing this close
            # (past its closed checks) gets ClosedError from them
            try:
                if self.projector is not None:
                    self.projector.close()
            finally:
                # a context still alive here was invisible to close() (the garbage collector
                # clears weak references before finalizers run): it frees the model when it goes
                if self._model is not None:
                    self._model.close()
            if busy is not None:
                raise busy

    @property
    def closed(self) -> bool:
        return self._model is None or self._model.closed

    def __repr__(self) -> str:
        state = "closed" if self.closed else self.description
        return f"<pyllama_ernie.Model {self.path.name!r} {state}>"

    def context(self, *, observe_nodes: Callable[[str, str, tuple, bool, str], None] | None = None,
                **overrides: Any) -> Context:
        """A new, independent context (its own KV cache) over this model.

        Takes the fields of :class:`~pyllama_ernie.values.ContextParams` (n_ctx, n_batch,
        n_ubatch, n_threads, n_threads_batch, flash_attn, kv_cache_type); the others
        are this model's :attr:`context_params`. Close it when done, or let the model
        close it. Threads that each use their own context run in parallel;
        :meth:`generate` and friends use the default context :attr:`ctx`, which
        concurrent threads take in turns.
        """
        self._handle()
        return self._open_context(dataclasses.replace(self.context_params, **overrides), observe_nodes)

    @property
    def ctx(self) -> Context:
        """The default context used by :meth:`logits`, :meth:`generate` and :meth:`stream`.

        With ``n_parallel`` generation goes through the batching engine instead, and this
        context (its own KV cache) is made on first use, for :meth:`logits`."""
        self._handle()
        if self._default_ctx is None:
            with self._close_lock:
                if self._default_ctx is None:
                    self._default_ctx = self._open_context(self.context_params)
        return self._default_ctx

    @property
    def n_parallel(self) -> int | None:
        """Requests served at once (None: one context whose calls take turns)."""
        return self._engine.n_parallel if self._engine is not None else None

    def stats(self) -> dict[str, int]:
        """Counters since the model was loaded: ``requests_total``, ``prompt_tokens_total``,
        ``prompt_tokens_cached_total`` (prompt positions found in the KV cache),
        ``completion_tokens_total``, ``cancelled_total``; and gauges: ``n_parallel``, ``busy``
        (requests generating), ``queued`` (requests waiting for a sequence; always 0 without
        ``n_parallel``, where waiting threads are not counted) and ``max_queue``."""
        if self._engine is not None:
            return self._engine.stats()
        ctx = self._default_ctx
        with self._lock:
            out = {"n_parallel": 1, "busy": int(ctx is not None and ctx._owner is not None), "queued": 0,
                   "max_queue": 0}
            out.update(self._counts)
        return out

    # --- metadata -------------------------------------------------------

    @property
    def description(self) -> str:
        buf = ffi.new("char[]", 256)
        lib.llama_model_desc(self._handle(), buf, 256)
        return ffi.string(buf).decode("utf-8", "replace")

    @property
    def n_ctx_train(self) -> int:
        return int(lib.llama_model_n_ctx_train(self._handle()))

    @property
    def n_layer(self) -> int:
        return int(lib.llama_model_n_layer(self._handle()))

    @property
    def n_ctx(self) -> int:
        """The context window of one request, in positions."""
        if self._engine is not None:
            self._handle()
            return self._engine.n_ctx
        return self.ctx.n_ctx

    @property
    def metadata(self) -> dict[str, str]:
        """The GGUF key/value metadata as strings (arrays are summarised by llama.cpp)."""
        ptr = self._handle()
        out: dict[str, str] = {}
        buf = ffi.new("char[]", 4096)
        for i in range(lib.llama_model_meta_count(ptr)):
            if lib.llama_model_meta_key_by_index(ptr, i, buf, 4096) < 0:
                continue
            key = ffi.string(buf).decode("utf-8", "replace")
            n = lib.llama_model_meta_val_str_by_index(ptr, i, buf, 4096)
            if n >= 4096:
                big = ffi.new("char[]", n + 1)
                lib.llama_model_meta_val_str_by_index(ptr, i, big, n + 1)
                out[key] = ffi.string(big).decode("utf-8", "replace")
            else:
                out[key] = ffi.string(buf).decode("utf-8", "replace")
        return out

    @property
    def chat_template(self) -> str | None:
        """The chat template stored in the GGUF, if any."""
        p = lib.llama_model_chat_template(self._handle(), ffi.NULL)
        return None if p == ffi.NULL else ffi.string(p).decode("utf-8", "replace")

    # --- tokens (see Vocab) ------------------------------------------------

    @property
    def bos_token(self) -> int:
        return self.vocab.bos

    @property
    def eos_token(self) -> int:
        return self.vocab.eos

    @property
    def add_bos(self) -> bool:
        """Whether :meth:`tokenize` with ``add_special=True`` puts BOS first."""
        return self.vocab.add_bos

    @property
    def eog_tokens(self) -> list[int]:
        """The end-of-generation token ids (EOS, EOT, ...)."""
        return self.vocab.eog_tokens

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends generation (EOS, EOT, ...)."""
        return self.vocab.is_eog(token)

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``.

        ``add_special`` adds BOS (and EOS) as the model's metadata asks;
        ``parse_special`` turns the text of special tokens into their ids.
        """
        return self.vocab.tokenize(text, add_special, parse_special)

    def detokenize(self, tokens: Sequence[int], *, special: bool = True) -> str:
        """The text of ``tokens``; ``special=False`` leaves out special tokens' text."""
        return self.vocab.detokenize(tokens, special=special)

    def token_to_piece(self, token: int, *, special: bool = True) -> bytes:
        """The bytes one token stands for (may be part of a UTF-8 character)."""
        return self.vocab.token_to_piece(token, special=special)

    def token_embeddings(self, tokens: Sequence[int]) -> np.ndarray:
        """Rows of the token embedding matrix (float32 ``(len(tokens), n_embd)``), read from the GGUF."""
        return self.vocab.token_embeddings(tokens)

    def _prompt(self, prompt: Prompt, images: Sequence[Any] = (), videos: Sequence[Any] = (),
                add_special: bool = True) -> "tuple[list[Any], int]":
        """(token ids and Embeddings, images and videos encoded for it)."""
        if images or videos:
            return multimodal_prompt(self.vocab, self._projector(), prompt, list(images), list(videos), self.n_ctx,
                                     add_special=add_special, encode=self._encode)
        if isinstance(prompt, str):
            toks: list[Any] = self.vocab.tokenize(prompt, add_special=add_special)
        elif isinstance(prompt, (bytes, bytearray)):
            raise TypeError("prompt must be str or a sequence of token ids, not bytes")
        elif any(isinstance(p, Embeddings) for p in prompt):
            toks = [p if isinstance(p, Embeddings) else self.vocab.check_tokens([p])[0] for p in prompt]
        else:
            toks = self.vocab.check_tokens(prompt)
        if not toks:
            raise ValueError("the prompt is empty")
        return toks, 0

    # --- vision ---------------------------------------------------------

    def _projector(self) -> Projector:
        self._handle()
        if self.projector is None:
            raise ImageError("this model has no vision projector: load it with Model(..., mmproj_path=...)")
        return self.projector

    def _encode(self, media: Media) -> "tuple[Features, bool]":
        """Encode prepared media; with ``n_parallel`` in the engine's thread (see
        :meth:`pyllama_ernie.batching.Engine.call` for why)."""
        proj = self._projector()
        if self._engine is None:
            return proj.features(media)
        return self._engine.call(lambda: proj.features(media))

    @property
    def media_cache_size(self) -> int:
        """How many encoded images/videos are kept for reuse (the projector's cache; default 32)."""
        return self.projector.cache_size if self.projector is not None else Projector.cache_size

    @media_cache_size.setter
    def media_cache_size(self, n: int) -> None:
        if n < 0:
            raise ValueError("media_cache_size must be >= 0")
        self._projector().cache_size = int(n)

    def media_cache_clear(self) -> None:
        """Forget the encoded images and videos kept for reuse."""
        if self.projector is not None:
            self.projector.cache_clear()

    def image_features(self, image: Any) -> Features:
        """Encode one image (path, bytes, PIL image or HxWx3 uint8 array) with the projector.

        The image is resized as the reference processor resizes it; the result's
        ``data`` has one row per image token (row-major over ``grid_h x grid_w``).
        """
        return self._encode(self._projector().prepare_image(image))[0]

    def video_features(self, frames: Sequence[Any]) -> Features:
        """Encode a video given as its frames (an odd count is padded by repeating the last frame).

        ``data`` holds ``n_frames`` grids (one per pair of frames) one after the other.
        """
        return self._encode(self._projector().prepare_video(frames))[0]

    # --- evaluation -----------------------------------------------------

    def logits(self, prompt: Prompt, *, images: Sequence[Any] | None = None,
               videos: Sequence[Any] | None = None) -> np.ndarray:
        """Logits at every position of ``prompt`` (str, tokenized with BOS, or token ids).

        Returns a float32 array of shape ``(n_positions, n_vocab)``; row i scores
        the token that follows position i. With ``images``/``videos`` (see
        :meth:`generate`) every image token is a position, so the rows line up
        with the reference's input ids.
        """
        return self.ctx.logits(self._prompt(prompt, images or (), videos or ())[0])

    def stream(
        self,
        prompt: Prompt,
        *,
        max_tokens: int = 256,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        ignore_eos: bool = False,
        images: Sequence[Any] | None = None,
        videos: Sequence[Any] | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[str]:
        """Generate from ``prompt``, yielding text pieces as they are produced.

        Same arguments as :meth:`generate`. Pieces never split a UTF-8 character.
        Arguments are checked (and the prompt tokenized) before the first piece.
        """
        req = _Request.make(self.seed, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            min_p=min_p, repeat_penalty=repeat_penalty, seed=seed, stop=stop, ignore_eos=ignore_eos,
                            images=images, videos=videos, cancel=cancel)
        gen = self._run(prompt, req, stream=True)

        def pieces() -> Iterator[str]:
            for item in gen:
                if isinstance(item, str):
                    yield item

        return pieces()

    def generate(
        self,
        prompt: Prompt,
        *,
        max_tokens: int = 256,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        ignore_eos: bool = False,
        images: Sequence[Any] | None = None,
        videos: Sequence[Any] | None = None,
        cancel: threading.Event | None = None,
    ) -> Completion:
        """Generate a completion of ``prompt``.

        Args:
            prompt: text (tokenized with BOS) or token ids.
            max_tokens: the most tokens to generate.
            temperature: 0 for greedy decoding.
            top_k, top_p, min_p: sampling filters (0, 1.0, 0.0 disable them).
            repeat_penalty: penalty on recently seen tokens (1.0 = off).
            seed: sampling seed (default: the model's ``seed``; None = random).
            stop: strings that end generation; they are not included in the text.
            ignore_eos: never produce end-of-generation tokens (benchmarks).
            images: images for the ``IMAGE_MARKER``s in ``prompt``, in order: file
                paths, bytes, PIL images or HxWx3 uint8 arrays (needs ``mmproj_path``).
            videos: videos for the ``VIDEO_MARKER``s, each a list of frames.
            cancel: a ``threading.Event``; setting it (or calling :meth:`cancel`) from
                another thread ends generation within one token, with
                ``finish_reason == "cancelled"``.

        Generation also stops on the model's end-of-generation tokens and when
        the context is full (``finish_reason == "length"``).
        """
        req = _Request.make(self.seed, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            min_p=min_p, repeat_penalty=repeat_penalty, seed=seed, stop=stop, ignore_eos=ignore_eos,
                            images=images, videos=videos, cancel=cancel)
        return _last(self._run(prompt, req, stream=False))

    def _run(self, prompt: Prompt, req: _Request, stream: bool) -> Iterator[str | Completion]:
        """Check and build the prompt now; return the generator of pieces and the final Completion."""
        tokens, n_encoded = self._prompt(prompt, req.images, req.videos, add_special=req.add_special)
        n_ctx = self.n_ctx
        n_prompt = sum(len(t) if isinstance(t, Embeddings) else 1 for t in tokens)
        if n_prompt > n_ctx:
            raise PromptTooLongError(
                f"the prompt has {n_prompt} positions; the context holds {n_ctx} "
                "(create the Model with a larger n_ctx)", n_prompt=n_prompt, n_ctx=n_ctx)
        engine = self._engine
        if engine is not None:
            gen = engine.submit(flatten_prompt(tokens, self.n_vocab, self.n_embd), max_tokens=req.max_tokens,
                                sampling=req.sampling, stop=req.stop, ignore_eos=req.ignore_eos, cancel=req.cancel,
                                stream=stream)
        else:
            gen = self.ctx.generate_tokens(tokens, max_tokens=req.max_tokens, sampling=req.sampling, stop=req.stop,
                                           ignore_eos=req.ignore_eos, cancel=req.cancel, stream=stream)

        def counted() -> Iterator[str | Completion]:
            for item in gen:
                if isinstance(item, Completion):
                    item.images_encoded = n_encoded
                    if engine is None:
                        self._count(item)
                yield item

        return counted()

    def _count(self, c: Completion) -> None:
        with self._lock:
            n = self._counts
            n["requests_total"] += 1
            n["prompt_tokens_total"] += c.prompt_tokens
            n["prompt_tokens_cached_total"] += c.prompt_tokens - c.prompt_tokens_evaluated
            n["completion_tokens_total"] += c.completion_tokens
            n["cancelled_total"] += c.finish_reason == "cancelled"

    def cancel(self) -> None:
        """Stop what this model's contexts are generating (from any thread).

        A generation ends within one token with ``finish_reason == "cancelled"``;
        a prompt being evaluated stops with a :class:`DecodeError` (with
        ``n_parallel``: requests reading their prompt or waiting end with an empty
        ``"cancelled"`` completion). The model stays usable.
        """
        with self._lock:
            contexts = list(self._contexts)
        for ctx in contexts:
            ctx.cancel()
        if self._engine is not None:
            self._engine.cancel_all()

    # --- chat -----------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True,
                            enable_thinking: bool | None = None, chat_template: str | None = None,
                            chat_template_kwargs: dict[str, Any] | None = None) -> str:
        """The prompt text the chat template makes of ``messages``, images as ``IMAGE_MARKER``.

        Equal to transformers' ``apply_chat_template(..., tokenize=False)`` with
        the same template and arguments, except that each image (video) run the
        template writes is replaced by one ``IMAGE_MARKER`` (``VIDEO_MARKER``).
        ``chat_template_kwargs`` are more variables for the template (see
        :meth:`create_chat_completion`).
        """
        return self._render_chat(messages, add_generation_prompt, enable_thinking, chat_template,
                                 False, chat_template_kwargs)[0]

    def _render_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool,
                     enable_thinking: bool | None, chat_template: str | None, allow_remote: bool,
                     template_kwargs: dict[str, Any] | None) -> "tuple[str, list[Any], list[Any]]":
        template = chat_template if chat_template is not None else self.chat_template
        if not template:
            raise ValueError("this model has no chat template; pass chat_template=... or use generate()")
        kwargs = _template_variables(template_kwargs, enable_thinking)
        plain, images, videos = chat.prepare_chat(messages, allow_remote=allow_remote)
        text = chat.render_template(template, plain, add_generation_prompt=add_generation_prompt,
                                    bos_token=self.vocab.token_text(self.bos_token),
                                    eos_token=self.vocab.token_text(self.eos_token), **kwargs)
        return chat.place_media(text, len(images), len(videos)), images, videos

    def create_chat_completion(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        stream: bool = False,
        max_tokens: int = 512,
        temperature: float = 0.8,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        ignore_eos: bool = False,
        enable_thinking: bool | None = None,
        allow_remote: bool = False,
        chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        cancel: threading.Event | None = None,
    ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """Answer OpenAI-format ``messages``; returns an OpenAI ``chat.completion`` dict.

        With ``stream=True`` returns an iterator of ``chat.completion.chunk``
        dicts (the first carries the role, the last ``finish_reason`` and
        ``usage``). Messages and images are checked and the prompt is built
        before anything is returned.

        Content is a string or a list of parts: ``{"type": "text", "text": ...}``,
        ``{"type": "image_url", "image_url": {"url": ...}}`` (``data:`` URI,
        ``file://`` URL or path; ``http(s)`` only with ``allow_remote=True``),
        ``{"type": "image", "image": path | bytes | PIL.Image | ndarray}`` and
        ``{"type": "video", "video": [frames]}``. The GGUF's chat template (or
        ``chat_template``) is rendered in a jinja2 sandbox; ``enable_thinking``
        and the variables in ``chat_template_kwargs`` (a dict, as vLLM and
        llama-server call it) are passed to it. An argument this method does not
        have raises ``TypeError`` (a typo is never ignored). ``<think>...</think>``
        in the answer becomes ``message["reasoning_content"]``.

        ``usage`` has OpenAI's counts plus ``prompt_tokens_evaluated`` (the rest
        of the prompt came from the KV cache) and ``images_encoded`` (the rest of
        the images came from the feature cache). ``finish_reason`` is "stop",
        "length" or "cancelled" (:meth:`cancel` or ``cancel.set()``).
        """
        prompt, images, videos = self._render_chat(messages, True, enable_thinking, chat_template, allow_remote,
                                                   chat_template_kwargs)
        bos = self.vocab.token_text(self.bos_token)
        thinking = chat.opens_thinking(prompt)
        req = _Request.make(self.seed, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            min_p=min_p, repeat_penalty=repeat_penalty, seed=seed, stop=stop, ignore_eos=ignore_eos,
                            images=images, videos=videos, cancel=cancel,
                            add_special=not (bos and prompt.startswith(bos)))
        gen = self._run(prompt, req, stream=stream)
        if stream:
            return chat.chunks(self.path.name, gen, thinking)
        return chat.completion(self.path.name, _last(gen), thinking)

    def create_completion(
        self,
        prompt: Prompt,
        *,
        stream: bool = False,
        max_tokens: int = 256,
        temperature: float = 0.8,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        ignore_eos: bool = False,
        cancel: threading.Event | None = None,
    ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """Complete ``prompt`` (text, tokenized with BOS, or token ids); returns an OpenAI
        ``text_completion`` dict (``choices[0]["text"]``, ``usage`` as in
        :meth:`create_chat_completion`).

        With ``stream=True`` returns an iterator of ``text_completion`` chunks, one per
        piece, the last with an empty text, the ``finish_reason`` and ``usage``. The
        arguments are those of :meth:`generate`.
        """
        req = _Request.make(self.seed, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            min_p=min_p, repeat_penalty=repeat_penalty, seed=seed, stop=stop, ignore_eos=ignore_eos,
                            cancel=cancel)
        gen = self._run(prompt, req, stream=stream)
        if stream:
            return chat.text_chunks(self.path.name, gen)
        return chat.text_completion(self.path.name, _last(gen))

    # --- asyncio ------------------------------------------------------------

    async def acreate_chat_completion(self, messages: Sequence[dict[str, Any]], *, stream: bool = False,
                                      cancel: threading.Event | None = None, **kwargs: Any) -> Any:
        """:meth:`create_chat_completion` for asyncio: ``await`` it for the dict, or with
        ``stream=True`` for an async iterator of chunk dicts.

        The prompt is built and the images encoded in a worker thread, so the event loop
        never blocks; errors in the arguments are raised by the ``await``. Cancelling the
        awaiting task, or closing the iterator early (``aclose()``, leaving ``async for``),
        ends the generation within one token. With ``n_parallel`` concurrent calls share
        the decode steps; without it they take turns.
        """
        return await _in_thread(lambda ev: self.create_chat_completion(messages, stream=stream, cancel=ev, **kwargs),
                                stream, cancel)

    async def acreate_completion(self, prompt: Prompt, *, stream: bool = False,
                                 cancel: threading.Event | None = None, **kwargs: Any) -> Any:
        """:meth:`create_completion` for asyncio, as :meth:`acreate_chat_completion` is for chat."""
        return await _in_thread(lambda ev: self.create_completion(prompt, stream=stream, cancel=ev, **kwargs),
                                stream, cancel)

    async def agenerate(self, prompt: Prompt, *, cancel: threading.Event | None = None, **kwargs: Any) -> Completion:
        """:meth:`generate` for asyncio (a cancelled task ends the generation within one token)."""
        return await _in_thread(lambda ev: self.generate(prompt, cancel=ev, **kwargs), False, cancel)

    async def astream(self, prompt: Prompt, *, cancel: threading.Event | None = None, **kwargs: Any) -> Any:
        """:meth:`stream` for asyncio: ``await`` it for an async iterator of text pieces."""
        return await _in_thread(lambda ev: self.stream(prompt, cancel=ev, **kwargs), True, cancel)

    # --- conversations on disk -----------------------------------------------

    def _state_identity(self) -> "tuple[dict[str, Any], dict[str, Any]]":
        ptr = self._handle()
        model = {"desc": self.description, "n_embd": self.n_embd, "n_layer": self.n_layer, "n_vocab": self.n_vocab,
                 "n_params": int(lib.llama_model_n_params(ptr)), "size": int(lib.llama_model_size(ptr))}
        context = {"kv_cache_type": self.context_params.kv_cache_type, "n_pos_per_embd": self.n_pos_per_embd}
        return model, context

    def save_state(self, path: PathLike) -> int:
        """Save the last conversation's KV cache (images included) to ``path``.

        The conversation is the one the last finished call evaluated: its prompt and
        answer. :meth:`load_state` later puts it back, so the next call that continues
        it evaluates only what is new. The file is written atomically and holds the
        model's identity (a foreign file is refused on load). Returns the positions saved.
        With ``n_parallel`` save right after the call: once another request reuses that
        sequence this raises :class:`BusyError`.
        """
        model_id, ctx_id = self._state_identity()
        if self._engine is not None:
            payload, keys, nexts = self._engine.save_state()
        else:
            payload, keys, nexts = self.ctx.save_state()
        state_file.write_state(path, state_file.SeqState(model=model_id, context=ctx_id, keys=keys, nexts=nexts,
                                                         payload=payload, created=time.time()))
        return len(keys)

    def load_state(self, path: PathLike) -> int:
        """Load a conversation saved by :meth:`save_state` (by this model, or one with the same
        weights and KV cache type). The file is checked before llama.cpp reads it: a damaged,
        foreign or newer-format file raises :class:`~pyllama_ernie.state_file.StateFileError`.
        Returns the positions loaded; the next call whose prompt starts with the saved
        conversation evaluates only the rest."""
        model_id, ctx_id = self._state_identity()
        st = state_file.read_state(path, model=model_id, context=ctx_id)
        if self._engine is not None:
            return self._engine.load_state(st.payload, st.keys, st.nexts)
        return self.ctx.load_state(st.payload, st.keys, st.nexts)


async def _in_thread(call: Callable[[Any], Any], stream: bool, cancel: threading.Event | None) -> Any:
    """``call(event)`` in a worker thread (see :mod:`pyllama_ernie._aio`); the event is set when
    the awaiting task is cancelled or the async iterator closed, and follows ``cancel``."""
    ev = _aio.CancelEvent(cancel)
    if stream:
        return await _aio.stream_in_thread(lambda: call(ev), ev)
    return await _aio.call_in_thread(lambda: call(ev), ev)


#: variables every chat template gets from the renderer itself
_TEMPLATE_OWN = frozenset({"messages", "add_generation_prompt", "bos_token", "eos_token"})


def _template_variables(extra: dict[str, Any] | None, enable_thinking: bool | None) -> dict[str, Any]:
    """The template variables of a call: ``chat_template_kwargs`` checked, with ``enable_thinking``."""
    if extra is None:
        extra = {}
    if not isinstance(extra, dict) or not all(isinstance(k, str) for k in extra):
        raise TypeError("chat_template_kwargs must be a dict with str keys")
    own = sorted(_TEMPLATE_OWN.intersection(extra))
    if own:
        raise ValueError(f"chat_template_kwargs may not set {', '.join(own)}: the renderer sets them")
    kwargs = dict(extra)
    if enable_thinking is not None:
        if kwargs.get("enable_thinking", enable_thinking) != enable_thinking:
            raise ValueError("enable_thinking and chat_template_kwargs['enable_thinking'] disagree")
        kwargs["enable_thinking"] = enable_thinking
    return kwargs


def _last(gen: Iterator[str | Completion]) -> Completion:
    """Run a generation to its end; its Completion."""
    result: Completion | None = None
    for item in gen:
        if isinstance(item, Completion):
            result = item
    assert result is not None
    return result
