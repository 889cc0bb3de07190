"""Model: owns one ``llama_model``; tokenization, logits and generation.

>>> with Model("ernie-4.5-0.3b.gguf") as m:
...     print(m.generate("The capital of France is", max_tokens=16, temperature=0).text)
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np

from . import _lib, errors
from ._lib import ffi, lib
from .context import Completion, Context, Embeddings, SamplingParams, default_threads, piece_bytes
from .offload import OffloadPlan
from .errors import (
    ClosedError,
    ImageError,
    ModelLoadError,
    TokenizeError,
)
from .vision import Features, Projector

__all__ = ["Model", "Prompt"]

#: text, or token ids (optionally mixed with :class:`Embeddings` rows)
Prompt = Union[str, Sequence[Union[int, Embeddings]]]
PathLike = Union[str, "os.PathLike[str]"]


def check_gguf_file(path: PathLike, role: Optional[str] = None) -> Path:
    """Refuse, with a clear error, a file llama.cpp cannot load (or would abort on); return its path.

    ``role``: ``"model"`` (an ERNIE 4.5 language model), ``"mmproj"`` (an ERNIE 4.5 VL
    vision projector) or None (either: a ``clip`` file is checked as an mmproj, anything
    else as a model). Only the header and metadata are read (see :mod:`.gguf_check`).
    Raises FileNotFoundError, :class:`InvalidModelFileError` (damaged, wrong kind, a
    directory) or :class:`ModelLoadError` (unreadable).
    """
    from .gguf_check import validate_gguf

    return validate_gguf(path, role=role or "auto").path


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

    The model is freed by :meth:`close`, by leaving a ``with`` block, or at
    garbage collection. Use after close raises :class:`ClosedError`.
    """

    def __init__(
        self,
        model_path: PathLike,
        *,
        n_ctx: int = 4096,
        n_batch: int = 512,
        n_ubatch: Optional[int] = None,
        n_threads: Optional[int] = None,
        n_gpu_layers: int = 0,
        seed: Optional[int] = None,
        flash_attn: Optional[bool] = None,
        kv_cache_type: str = "f16",
        use_mmap: bool = True,
        progress: Optional[Callable[[float], Optional[bool]]] = None,
        mmproj_path: Optional[PathLike] = None,
        main_gpu: int = 0,
        tensor_split: Optional[Sequence[float]] = None,
        split_mode: str = "layer",
        cpu_moe: Union[bool, int] = False,
        mmproj_gpu: Optional[bool] = None,
    ) -> None:
        self._ptr = None
        # lifetime bookkeeping (see close()): _n_children counts the contexts whose
        # llama_context is not freed yet; the llama_model is freed after the last one
        self._life_lock = threading.RLock()
        self._close_lock = threading.RLock()
        self._closing = False  # close() began: no new contexts
        self._free_ok = False  # close() closed the projector (it reads the model's vocabulary)
        self._n_children = 0
        #: the vision projector (None without ``mmproj_path``)
        self.projector: Optional[Projector] = None
        self._media_cache: "OrderedDict[bytes, Features]" = OrderedDict()
        self._media_lock = threading.Lock()
        self._contexts: "weakref.WeakSet[Context]" = weakref.WeakSet()
        self._default_ctx: Optional[Context] = None
        self._eog: Optional[List[int]] = None
        self._embd_tensor: Any = None
        self.path = check_gguf_file(model_path, role="model")
        self.seed = seed
        _lib.ensure_init()
        #: the checked offload settings (devices, layers, expert placement)
        self.offload = OffloadPlan(n_gpu_layers=n_gpu_layers, main_gpu=main_gpu, tensor_split=tensor_split,
                                   split_mode=split_mode, cpu_moe=cpu_moe)

        params = lib.llama_model_default_params()
        self.offload.apply(params)
        params.load_mode = lib.LLAMA_LOAD_MODE_MMAP if use_mmap else lib.LLAMA_LOAD_MODE_NONE
        ph = None
        if progress is not None:
            ph = _lib.ProgressHandle(progress)
            params.progress_callback = lib._pyllama_ernie_progress
            params.progress_callback_user_data = ph.handle
        errors.clear_log_line()
        ptr = lib.llama_model_load_from_file(str(self.path).encode(), params)
        if ptr == ffi.NULL:
            if ph is not None:
                ph.reraise()
                if ph.cancelled:
                    raise ModelLoadError(f"loading {self.path} was cancelled by the progress callback", llama_log="")
            errors.raise_error(ModelLoadError, f"loading {self.path}")
        self._ptr = ptr
        self._track()
        self._vocab = lib.llama_model_get_vocab(ptr)
        self.n_vocab = int(lib.llama_vocab_n_tokens(self._vocab))
        self.n_embd = int(lib.llama_model_n_embd(ptr))
        #: rope position rows per input embedding (4 for M-RoPE models such as ERNIE-4.5-VL)
        self.n_pos_per_embd = 4 if lib.llama_model_rope_type(ptr) in (lib.LLAMA_ROPE_TYPE_MROPE,
                                                                       lib.LLAMA_ROPE_TYPE_IMROPE) else 1
        self._ctx_args: Dict[str, Any] = dict(
            n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch, n_threads=n_threads,
            flash_attn=flash_attn, kv_cache_type=kv_cache_type,
        )
        try:
            self._default_ctx = Context(self, **self._ctx_args)
            if mmproj_path is not None:
                use_gpu = self.offload.uses_gpu if mmproj_gpu is None else bool(mmproj_gpu and self.offload.gpus)
                self.projector = Projector(mmproj_path, self, n_threads=n_threads or default_threads(),
                                           use_gpu=use_gpu, flash_attn=flash_attn)
        except BaseException:
            self.close()
            raise

    # --- lifetime -------------------------------------------------------

    def _handle(self) -> Any:
        if self._ptr is None:
            raise ClosedError("the model is closed")
        return self._ptr

    def _register(self, ctx: Context) -> None:
        self._contexts.add(ctx)

    def close(self) -> None:
        """Free the model and every context made from it. Safe to call twice, and from any thread.

        Contexts still generating in other threads are cancelled and waited for
        (within one token), as :meth:`Context.close` describes: their
        generations end with ``finish_reason == "cancelled"``, a prompt being
        evaluated raises :class:`ClosedError`. An image being encoded finishes
        first. New calls and new contexts raise :class:`ClosedError` at once.
        """
        with self._close_lock:
            with self._life_lock:
                self._closing = True
                contexts = list(self._contexts)
            if self._default_ctx is not None and self._default_ctx not in contexts:
                contexts.append(self._default_ctx)
            for ctx in contexts:  # stop them all first, then wait for each
                ctx.cancel()
            busy: BaseException | None = None
            for ctx in contexts:
                try:
                    ctx.close()
                except errors.BusyError as e:  # closed from inside one of its own calls
                    busy = busy or e
            # the closed default context and projector stay: a thread racing this close
            # (past its closed checks) gets ClosedError from them
            self._embd_tensor = None
            try:
                if self.projector is not None:
                    self.projector.close()
            finally:
                self._free_ok = True
                self._free_if_unused()
            if busy is not None:
                raise busy

    def _release_child(self) -> None:
        """A context of this model freed its llama_context."""
        with self._life_lock:
            self._n_children -= 1
        self._free_if_unused()

    def _free_if_unused(self) -> None:
        # A context still alive here was invisible to close(): the garbage collector
        # clears weak references before finalizers run. It frees the model when it goes.
        with self._life_lock:
            if self._free_ok and self._n_children == 0 and self._ptr is not None:
                lib.llama_model_free(self._ptr)
                self._ptr = None
                self._vocab = None
                self._untrack()

    @property
    def closed(self) -> bool:
        return self._ptr is None

    def __repr__(self) -> str:
        state = "closed" if self._ptr is None else self.description
        return f"<pyllama_ernie.Model {self.path.name!r} {state}>"

    def context(self, **overrides: Any) -> Context:
        """A new, independent context (its own KV cache) over this model.

        Takes the same context arguments as :class:`Model` (n_ctx, n_batch, ...).
        Close it when done, or let the model close it. Threads that each use
        their own context run in parallel; :meth:`generate` and friends use the
        default context :attr:`ctx`, which concurrent threads take in turns.
        """
        self._handle()
        args = dict(self._ctx_args)
        args.update(overrides)
        return Context(self, **args)

    @property
    def ctx(self) -> Context:
        """The default context used by :meth:`logits`, :meth:`generate` and :meth:`stream`."""
        self._handle()
        assert self._default_ctx is not None
        return self._default_ctx

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
        return self.ctx.n_ctx

    @property
    def metadata(self) -> Dict[str, str]:
        """The GGUF key/value metadata as strings (arrays are summarised by llama.cpp)."""
        ptr = self._handle()
        out: Dict[str, str] = {}
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
    def chat_template(self) -> Optional[str]:
        """The chat template stored in the GGUF, if any."""
        p = lib.llama_model_chat_template(self._handle(), ffi.NULL)
        return None if p == ffi.NULL else ffi.string(p).decode("utf-8", "replace")

    @property
    def bos_token(self) -> int:
        return int(lib.llama_vocab_bos(self._vocab_ptr()))

    @property
    def eos_token(self) -> int:
        return int(lib.llama_vocab_eos(self._vocab_ptr()))

    @property
    def add_bos(self) -> bool:
        """Whether :meth:`tokenize` with ``add_special=True`` puts BOS first."""
        return bool(lib.llama_vocab_get_add_bos(self._vocab_ptr()))

    @property
    def eog_tokens(self) -> List[int]:
        """The end-of-generation token ids (EOS, EOT, ...)."""
        if self._eog is None:
            vocab = self._vocab_ptr()
            self._eog = [t for t in range(self.n_vocab) if lib.llama_vocab_is_eog(vocab, t)]
        return self._eog

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends generation (EOS, EOT, ...)."""
        return bool(lib.llama_vocab_is_eog(self._vocab_ptr(), token))

    def _vocab_ptr(self) -> Any:
        self._handle()
        return self._vocab

    # --- tokens ---------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> List[int]:
        """Token ids of ``text``.

        ``add_special`` adds BOS (and EOS) as the model's metadata asks;
        ``parse_special`` turns the text of special tokens into their ids.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be str, not {type(text).__name__}")
        vocab = self._vocab_ptr()
        data = text.encode("utf-8")
        if len(data) > 2**31 - 16:
            raise TokenizeError("text is too long to tokenize", llama_log="")
        cap = len(data) + 8
        buf = ffi.new("llama_token[]", cap)
        n = lib.llama_tokenize(vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            if n == -(2**31):
                raise TokenizeError("tokenization overflowed", llama_log="")
            cap = -n
            buf = ffi.new("llama_token[]", cap)
            n = lib.llama_tokenize(vocab, data, len(data), buf, cap, add_special, parse_special)
            if n < 0:
                raise TokenizeError("llama_tokenize failed", llama_log="")
        return list(ffi.unpack(buf, n))

    def detokenize(self, tokens: Sequence[int], *, special: bool = True) -> str:
        """The text of ``tokens``; ``special=False`` leaves out special tokens' text."""
        vocab = self._vocab_ptr()
        toks = self._check_tokens(tokens)
        arr = ffi.new("llama_token[]", toks)
        cap = max(16, 8 * len(toks))
        buf = ffi.new("char[]", cap)
        n = lib.llama_detokenize(vocab, arr, len(toks), buf, cap, False, special)
        if n < 0:
            cap = -n
            buf = ffi.new("char[]", cap)
            n = lib.llama_detokenize(vocab, arr, len(toks), buf, cap, False, special)
            if n < 0:
                raise TokenizeError("llama_detokenize failed", llama_log="")
        return ffi.unpack(buf, n).decode("utf-8", "replace")

    def token_to_piece(self, token: int, *, special: bool = True) -> bytes:
        """The bytes one token stands for (may be part of a UTF-8 character)."""
        vocab = self._vocab_ptr()
        self._check_tokens([token])
        return piece_bytes(vocab, token, ffi.new("char[]", 256), special)

    def _check_tokens(self, tokens: Sequence[int]) -> List[int]:
        toks = [int(t) for t in tokens]
        n_vocab = self.n_vocab
        for t in toks:
            if not 0 <= t < n_vocab:
                raise TokenizeError(f"token id {t} is outside the vocabulary (0..{n_vocab - 1})", llama_log="")
        return toks

    def _prompt_tokens(self, prompt: Prompt, images: Optional[Sequence[Any]] = None,
                       videos: Optional[Sequence[Any]] = None) -> List[Any]:
        return self._prompt(prompt, images, videos)[0]

    def _prompt(self, prompt: Prompt, images: Optional[Sequence[Any]] = None, videos: Optional[Sequence[Any]] = None,
                add_special: bool = True) -> "tuple[List[Any], int]":
        """(token ids and Embeddings, images and videos encoded for it)."""
        if images or videos:
            from .multimodal import multimodal_prompt

            return multimodal_prompt(self, prompt, list(images or []), list(videos or []), self.ctx.n_ctx,
                                     add_special=add_special)
        if isinstance(prompt, str) and not add_special:
            toks = self.tokenize(prompt, add_special=False)
            if not toks:
                raise ValueError("the prompt is empty")
            return toks, 0
        return self._prompt_tokens_plain(prompt), 0

    def _prompt_tokens_plain(self, prompt: Prompt) -> List[Any]:
        if isinstance(prompt, str):
            toks: List[Any] = self.tokenize(prompt)
        elif isinstance(prompt, (bytes, bytearray)):
            raise TypeError("prompt must be str or a sequence of token ids, not bytes")
        elif any(isinstance(p, Embeddings) for p in prompt):
            toks = [p if isinstance(p, Embeddings) else self._check_tokens([p])[0] for p in prompt]
        else:
            toks = self._check_tokens(prompt)
        if not toks:
            raise ValueError("the prompt is empty")
        return toks

    def token_embeddings(self, tokens: Sequence[int]) -> np.ndarray:
        """Rows of the token embedding matrix (float32 ``(len(tokens), n_embd)``), read from the GGUF."""
        import gguf

        toks = np.asarray(self._check_tokens(tokens), dtype=np.int64)
        if self._embd_tensor is None:
            reader = gguf.GGUFReader(str(self.path))
            self._embd_tensor = next(t for t in reader.tensors if t.name == "token_embd.weight")
        t = self._embd_tensor
        rows = np.asarray(t.data[toks])
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            return rows.astype(np.float32)
        return gguf.quants.dequantize(rows, t.tensor_type).astype(np.float32).reshape(len(toks), -1)

    # --- vision ---------------------------------------------------------

    def _projector(self) -> Projector:
        self._handle()
        if self.projector is None:
            raise ImageError("this model has no vision projector: load it with Model(..., mmproj_path=...)")
        return self.projector

    #: how many encoded images/videos the model keeps (by content hash of their resized pixels)
    media_cache_size = 32

    def _media_features(self, media: Any) -> "tuple[Features, bool]":
        """Features of prepared media, from the cache when the same pixels were encoded before."""
        from .multimodal import features_of, media_key

        self._projector()
        key = media_key(media)
        with self._media_lock:
            hit = self._media_cache.get(key)
            if hit is not None:
                self._media_cache.move_to_end(key)
                return hit, False
        feats = features_of(self, media)
        with self._media_lock:
            self._media_cache[key] = feats
            while len(self._media_cache) > self.media_cache_size:
                self._media_cache.popitem(last=False)
        return feats, True

    def media_cache_clear(self) -> None:
        """Forget the encoded images and videos kept for reuse."""
        with self._media_lock:
            self._media_cache.clear()

    def _encode_media(self, media: Any) -> Features:
        return self._media_features(media)[0]

    def image_features(self, image: Any) -> Features:
        """Encode one image (path, bytes, PIL image or HxWx3 uint8 array) with the projector.

        The image is resized as the reference processor resizes it; the result's
        ``data`` has one row per image token (row-major over ``grid_h x grid_w``).
        """
        from .multimodal import prepare_image

        self._projector()
        return self._encode_media(prepare_image(self, image))

    def video_features(self, frames: Sequence[Any]) -> Features:
        """Encode a video given as its frames (an odd count is padded by repeating the last frame).

        ``data`` holds ``n_frames`` grids (one per pair of frames) one after the other.
        """
        from .multimodal import prepare_video

        self._projector()
        return self._encode_media(prepare_video(self, frames))

    # --- evaluation -----------------------------------------------------

    def logits(self, prompt: Prompt, *, images: Optional[Sequence[Any]] = None,
               videos: Optional[Sequence[Any]] = None) -> np.ndarray:
        """Logits at every position of ``prompt`` (str, tokenized with BOS, or token ids).

        Returns a float32 array of shape ``(n_positions, n_vocab)``; row i scores
        the token that follows position i. With ``images``/``videos`` (see
        :meth:`generate`) every image token is a position, so the rows line up
        with the reference's input ids.
        """
        return self.ctx.logits(self._prompt_tokens(prompt, images, videos))

    def _sampling(self, temperature: float, top_k: int, top_p: float, min_p: float,
                  repeat_penalty: float, seed: Optional[int]) -> SamplingParams:
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repeat_penalty=repeat_penalty, seed=self.seed if seed is None else seed)
        params.validate()
        return params

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
        seed: Optional[int] = None,
        stop: Union[str, Sequence[str], None] = None,
        ignore_eos: bool = False,
        images: Optional[Sequence[Any]] = None,
        videos: Optional[Sequence[Any]] = None,
        cancel: Optional[threading.Event] = None,
    ) -> Iterator[str]:
        """Generate from ``prompt``, yielding text pieces as they are produced.

        Same arguments as :meth:`generate`. Pieces never split a UTF-8 character.
        Arguments are checked (and the prompt tokenized) before the first piece.
        """
        gen = self._run(prompt, max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, seed, stop,
                        ignore_eos, images, videos, cancel)

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
        seed: Optional[int] = None,
        stop: Union[str, Sequence[str], None] = None,
        ignore_eos: bool = False,
        images: Optional[Sequence[Any]] = None,
        videos: Optional[Sequence[Any]] = None,
        cancel: Optional[threading.Event] = None,
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
        result: Optional[Completion] = None
        for item in self._run(prompt, max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, seed, stop,
                              ignore_eos, images, videos, cancel, stream=False):
            if isinstance(item, Completion):
                result = item
        assert result is not None
        return result

    def _run(self, prompt: Prompt, max_tokens: int, temperature: float, top_k: int, top_p: float,
             min_p: float, repeat_penalty: float, seed: Optional[int],
             stop: Union[str, Sequence[str], None], ignore_eos: bool, images: Optional[Sequence[Any]] = None,
             videos: Optional[Sequence[Any]] = None, cancel: Optional[threading.Event] = None,
             add_special: bool = True, stream: bool = True) -> Iterator[Union[str, Completion]]:
        params = self._sampling(temperature, top_k, top_p, min_p, repeat_penalty, seed)
        if max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        tokens, n_encoded = self._prompt(prompt, images, videos, add_special=add_special)
        ctx = self.ctx
        if sum(len(t) if isinstance(t, Embeddings) else 1 for t in tokens) > ctx.n_ctx:
            raise errors.PromptTooLongError(
                f"the prompt has {len(tokens)} tokens; the context holds {ctx.n_ctx} "
                "(create the Model with a larger n_ctx)", llama_log="")
        gen = ctx.generate_tokens(tokens, max_tokens=max_tokens, sampling=params, stop=stops, ignore_eos=ignore_eos,
                                  cancel=cancel, stream=stream)

        def counted() -> Iterator[Union[str, Completion]]:
            for item in gen:
                if isinstance(item, Completion):
                    item.images_encoded = n_encoded
                yield item

        return counted()

    def cancel(self) -> None:
        """Stop what this model's contexts are generating (from any thread).

        A generation ends within one token with ``finish_reason == "cancelled"``;
        a prompt being evaluated stops with a :class:`DecodeError`. The model
        stays usable.
        """
        with self._life_lock:
            contexts = list(self._contexts)
        for ctx in contexts:
            ctx.cancel()

    # --- chat -----------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[Dict[str, Any]], *, add_generation_prompt: bool = True,
                            enable_thinking: Optional[bool] = None, chat_template: Optional[str] = None,
                            **template_kwargs: Any) -> str:
        """The prompt text the chat template makes of ``messages``, images as ``IMAGE_MARKER``.

        Equal to transformers' ``apply_chat_template(..., tokenize=False)`` with
        the same template and arguments, except that each image (video) run the
        template writes is replaced by one ``IMAGE_MARKER`` (``VIDEO_MARKER``).
        """
        return self._render_chat(messages, add_generation_prompt, enable_thinking, chat_template,
                                 False, template_kwargs)[0]

    def _render_chat(self, messages: Sequence[Dict[str, Any]], add_generation_prompt: bool,
                     enable_thinking: Optional[bool], chat_template: Optional[str], allow_remote: bool,
                     template_kwargs: Dict[str, Any]) -> "tuple[str, List[Any], List[Any]]":
        from . import chat

        template = chat_template if chat_template is not None else self.chat_template
        if not template:
            raise ValueError("this model has no chat template; pass chat_template=... or use generate()")
        plain, images, videos = chat.prepare_chat(messages, allow_remote=allow_remote)
        kwargs = dict(template_kwargs)
        if enable_thinking is not None:
            kwargs.setdefault("enable_thinking", enable_thinking)
        text = chat.render_template(template, plain, add_generation_prompt=add_generation_prompt,
                                    bos_token=self._token_text(self.bos_token),
                                    eos_token=self._token_text(self.eos_token), **kwargs)
        return chat.place_media(text, len(images), len(videos)), images, videos

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self.token_to_piece(token, special=True).decode("utf-8", "replace")

    def create_chat_completion(
        self,
        messages: Sequence[Dict[str, Any]],
        *,
        stream: bool = False,
        max_tokens: int = 512,
        temperature: float = 0.8,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        stop: Union[str, Sequence[str], None] = None,
        seed: Optional[int] = None,
        enable_thinking: Optional[bool] = None,
        allow_remote: bool = False,
        chat_template: Optional[str] = None,
        cancel: Optional[threading.Event] = None,
        **template_kwargs: Any,
    ) -> Union[Dict[str, Any], Iterator[Dict[str, Any]]]:
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
        and ``template_kwargs`` are passed to it. ``<think>...</think>`` in the
        answer becomes ``message["reasoning_content"]``.

        ``usage`` has OpenAI's counts plus ``prompt_tokens_evaluated`` (the rest
        of the prompt came from the KV cache) and ``images_encoded`` (the rest of
        the images came from the feature cache). ``finish_reason`` is "stop",
        "length" or "cancelled" (:meth:`cancel` or ``cancel.set()``).
        """
        from . import chat

        prompt, images, videos = self._render_chat(messages, True, enable_thinking, chat_template, allow_remote,
                                                   template_kwargs)
        bos = self._token_text(self.bos_token)
        add_special = not (bos and prompt.startswith(bos))
        thinking = chat.opens_thinking(prompt)
        gen = self._run(prompt, max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, seed, stop,
                        False, images, videos, cancel, add_special=add_special, stream=stream)
        name = self.path.name
        if stream:
            return chat.chunks(name, gen, thinking)
        result: Optional[Completion] = None
        for item in gen:
            if isinstance(item, Completion):
                result = item
        assert result is not None
        return {
            "id": chat.completion_id(),
            "object": "chat.completion",
            "created": chat.now(),
            "model": name,
            "choices": [{"index": 0, "message": chat.message(result.text, thinking),
                         "finish_reason": result.finish_reason}],
            "usage": chat.usage(result),
        }

