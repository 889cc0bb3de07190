"""Context: owns one ``llama_context``, its batch and the decode loop.

A Context evaluates token sequences and generates from them. It remembers which
tokens sit in its KV cache, so a call whose prompt starts with the previous
call's tokens evaluates only the new part.

Thread policy: a Context serialises its calls, so two threads may share one
(they take turns). Using a Context again from the thread that holds an
unfinished stream raises BusyError instead of corrupting the stream.

Lifetime policy: :meth:`Context.close` may be called from any thread at any
time. It cancels the running call, waits until that call is out of llama.cpp
(within one token or graph node), and only then frees the C context; a stream
paused at a ``yield`` is not waited for. The interrupted call ends cleanly (see
:meth:`Context.close`), and every later call raises ClosedError.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, List, Optional, Sequence, Union

import numpy as np

from . import _lib, errors
from ._lib import abort_flag_callback, ffi, lib
from .errors import BusyError, ClosedError, ContextError, DecodeError, PromptTooLongError

if TYPE_CHECKING:  # pragma: no cover
    from .model import Model

__all__ = ["Context", "Completion", "Embeddings", "Timings", "SamplingParams", "default_threads"]

_KV_TYPES = {"f32": lib.GGML_TYPE_F32, "f16": lib.GGML_TYPE_F16, "bf16": lib.GGML_TYPE_BF16, "q8_0": lib.GGML_TYPE_Q8_0}


def default_threads() -> int:
    """Physical cores available to this process (llama.cpp's own default is similar)."""
    try:
        n_avail = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n_avail = os.cpu_count() or 1
    cores = set()
    try:
        phys = core = None
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                elif not line.strip() and core is not None:
                    cores.add((phys, core))
                    phys = core = None
    except OSError:
        pass
    return max(1, min(n_avail, len(cores) or n_avail))


@dataclass(frozen=True)
class Timings:
    """Wall-clock timings of one call, in milliseconds."""

    prompt_ms: float
    generation_ms: float
    prompt_tokens: int
    generated_tokens: int

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prompt_tokens / (self.prompt_ms / 1e3) if self.prompt_ms > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / (self.generation_ms / 1e3) if self.generation_ms > 0 else 0.0


@dataclass
class Completion:
    """The result of :meth:`Model.generate`."""

    text: str
    tokens: List[int]
    #: "stop" (end-of-generation token or stop string), "length" or "cancelled"
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    #: prompt tokens actually evaluated (the rest came from the KV cache)
    prompt_tokens_evaluated: int
    timings: Timings
    #: the stop string that ended generation, if any
    stop: Optional[str] = field(default=None)
    #: images and videos run through the vision encoder for this call (the rest came from the cache)
    images_encoded: int = 0


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings. ``temperature <= 0`` means greedy (argmax)."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: Optional[int] = None

    def validate(self) -> None:
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 (0 disables it)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError("min_p must be in [0, 1]")
        if self.repeat_penalty <= 0:
            raise ValueError("repeat_penalty must be > 0 (1.0 disables it)")
        if self.seed is not None and not 0 <= self.seed < 2**32 - 1:
            raise ValueError("seed must be in [0, 2**32 - 2]")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0 and self.repeat_penalty == 1.0


class Embeddings:
    """Input embedding rows with their rope positions, to evaluate in place of tokens.

    Args:
        data: ``(n, n_embd)`` float32 rows, one per position.
        positions: ``(n,)`` positions, or ``(k, n)`` rows of positions for
            multi-axis rope (for ERNIE-4.5-VL: rows ``t, h, w``, see
            :func:`pyllama_ernie.mrope.image_positions`).
        next_pos: the position of whatever follows (default: ``max(t) + 1``).

    For ERNIE-4.5-VL an embedding batch goes through the vision experts: pass
    image features (with the image start/end token rows around them) this way.
    """

    __slots__ = ("data", "positions", "next_pos", "key", "n")

    def __init__(self, data: Any, positions: Any, next_pos: Optional[int] = None) -> None:
        arr = np.ascontiguousarray(data, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[0] == 0:
            raise ValueError("embeddings must be a non-empty 2-D array (n_positions, n_embd)")
        pos = np.asarray(positions)
        if pos.ndim == 1:
            pos = pos[None, :]
        if pos.ndim != 2 or pos.shape[1] != arr.shape[0] or pos.shape[0] not in (1, 3, 4):
            raise ValueError(f"positions must have shape (n,), (3, n) or (4, n) with n = {arr.shape[0]}")
        if not np.issubdtype(pos.dtype, np.integer) or (pos < 0).any() or (pos >= 2**31 - 1).any():
            raise ValueError("positions must be non-negative integers")
        pos = np.ascontiguousarray(pos, dtype=np.int32)
        if not np.isfinite(arr).all():
            raise ValueError("embeddings contain NaN or infinity")
        self.data = arr
        self.positions = pos
        self.n = arr.shape[0]
        self.next_pos = int(pos[0].max()) + 1 if next_pos is None else int(next_pos)
        if self.next_pos <= int(pos[0].max()):
            raise ValueError("next_pos must come after every position of the embeddings")
        h = hashlib.blake2b(arr.tobytes(), digest_size=16)
        h.update(pos.tobytes())
        h.update(self.next_pos.to_bytes(8, "little"))
        self.key = h.digest()

    def positions_for(self, n_rows: int) -> np.ndarray:
        """Positions as ``n_rows`` rows (1 for plain rope, 4 for M-RoPE: t, h, w, 0)."""
        have = self.positions.shape[0]
        if have == n_rows:
            return self.positions
        if n_rows == 1:
            return self.positions[:1]
        out = np.zeros((n_rows, self.n), dtype=np.int32)
        # one row (text-like): t = h = w; more rows: t, h, w as given; the 4th row stays 0
        out[:3] = self.positions[0] if have == 1 else self.positions[:3]
        return out

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"<Embeddings n={self.n} width={self.data.shape[1]} next_pos={self.next_pos}>"


class _Sampler(_lib.CResource):
    """Owns one llama.cpp sampler chain."""

    def __init__(self, params: SamplingParams, n_vocab: int, banned: Sequence[int] = ()) -> None:
        self._ptr = None
        cp = lib.llama_sampler_chain_default_params()
        cp.no_perf = True
        chain = lib.llama_sampler_chain_init(cp)
        if chain == ffi.NULL:
            errors.raise_error(ContextError, "llama_sampler_chain_init")
        self._ptr = chain
        self._track()
        add = lambda s: lib.llama_sampler_chain_add(chain, s)  # noqa: E731 - the chain owns each stage
        if banned:
            biases = ffi.new("llama_logit_bias[]", [(t, float("-inf")) for t in banned])
            add(lib.llama_sampler_init_logit_bias(n_vocab, len(banned), biases))
        if params.repeat_penalty != 1.0:
            add(lib.llama_sampler_init_penalties(n_vocab, params.repeat_last_n, params.repeat_penalty, 0.0, 0.0))
        if params.temperature <= 0:
            add(lib.llama_sampler_init_greedy())
            return
        if params.top_k > 0:
            add(lib.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            add(lib.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0.0:
            add(lib.llama_sampler_init_min_p(params.min_p, 1))
        add(lib.llama_sampler_init_temp(params.temperature))
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little") % (2**32 - 1)
        add(lib.llama_sampler_init_dist(seed))

    def accept(self, token: int) -> None:
        lib.llama_sampler_accept(self._ptr, token)

    def sample(self, ctx: Any) -> int:
        return lib.llama_sampler_sample(self._ptr, ctx, -1)

    def close(self) -> None:
        if self._ptr is not None:
            lib.llama_sampler_free(self._ptr)
            self._ptr = None
            self._untrack()


class Context(_lib.CResource):
    """One llama.cpp inference context over a :class:`~pyllama_ernie.Model`.

    Usually created for you by :class:`Model`; create more with
    :meth:`Model.context` to run several conversations at once (one context
    per thread runs them in parallel; threads sharing one take turns).
    """

    def __init__(
        self,
        model: "Model",
        *,
        n_ctx: int = 4096,
        n_batch: int = 512,
        n_ubatch: Optional[int] = None,
        n_threads: Optional[int] = None,
        n_threads_batch: Optional[int] = None,
        flash_attn: Optional[bool] = None,
        kv_cache_type: str = "f16",
        observe_nodes: Optional[Callable[[str, str, tuple, bool, str], None]] = None,
    ) -> None:
        self._ptr = None
        self._batch = None
        self._child = False  # counted in model._n_children (the model outlives its contexts)
        # call state, guarded by _cond: the thread holding the context (a call or an
        # open stream), whether that call is running (False while a stream is
        # paused at a yield) and whether close() has begun
        self._cond = threading.Condition(threading.Lock())
        self._owner: Optional[int] = None
        self._running = False
        self._closing = False
        self._abort = ffi.new("int *", 0)
        self.model = model
        model._handle()
        if n_ctx < 0 or n_batch <= 0:
            raise ValueError("n_ctx must be >= 0 (0 = the model's training context) and n_batch > 0")
        if kv_cache_type not in _KV_TYPES:
            raise ValueError(f"kv_cache_type must be one of {sorted(_KV_TYPES)}")
        threads = n_threads if n_threads else default_threads()
        p = lib.llama_context_default_params()
        p.n_ctx = n_ctx
        p.n_batch = n_batch
        p.n_ubatch = min(n_ubatch or n_batch, n_batch)
        p.n_seq_max = 1
        p.n_threads = threads
        p.n_threads_batch = n_threads_batch or threads
        p.flash_attn_type = (
            lib.LLAMA_FLASH_ATTN_TYPE_AUTO if flash_attn is None
            else lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
            else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        p.type_k = p.type_v = _KV_TYPES[kv_cache_type]
        p.no_perf = False
        p.abort_callback = abort_flag_callback
        p.abort_callback_data = self._abort
        self._observer = None
        if observe_nodes is not None:
            # debugging aid: a Python call per graph node (slow)
            self._observer = _lib.NodeObserver(observe_nodes)
            p.cb_eval = lib._pyllama_ernie_eval
            p.cb_eval_user_data = self._observer.handle
        # what the KV cache holds: one key per position (token id, or (chunk key, row)),
        # and the rope position that follows each
        self._keys: List[Any] = []
        self._next: List[int] = []
        self._ebatch = None
        # the model frees its llama_model only once every context made from it is freed
        with model._life_lock:
            if model._closing:
                raise ClosedError("the model is closed")
            model_ptr = model._handle()
            model._n_children += 1
            self._child = True
        try:
            errors.clear_log_line()
            ptr = lib.llama_init_from_model(model_ptr, p)
            if ptr == ffi.NULL:
                errors.raise_error(ContextError, "llama_init_from_model")
            self._ptr = ptr
            self._track()
            self.n_ctx = int(lib.llama_n_ctx(ptr))
            self.n_batch = int(lib.llama_n_batch(ptr))
            self._batch = lib.llama_batch_init(self.n_batch, 0, 1)
            b = self._batch
            for i in range(self.n_batch):
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
            self._mem = lib.llama_get_memory(ptr)
            self._n_vocab = model.n_vocab
            with model._life_lock:
                if model._closing:  # Model.close() ran meanwhile and could not see this context
                    raise ClosedError("the model is closed")
                model._register(self)
        except BaseException:
            self.close()
            raise

    # --- lifetime -------------------------------------------------------

    def close(self) -> None:
        """Free the llama.cpp context. Safe to call twice, and from any thread.

        From another thread while a call runs: the call is cancelled (as by
        :meth:`cancel`), ``close()`` waits until it is out of llama.cpp (within
        one token or graph node) and then frees the context. The interrupted
        call ends cleanly: a generation finishes with ``finish_reason ==
        "cancelled"`` and the text so far; a prompt being evaluated (or
        :meth:`logits`) raises :class:`ClosedError`.

        A stream paused at a ``yield`` (in any thread, including this one) is
        not waited for: the context is freed at once, and the stream's next
        step finishes it (``"cancelled"``) without touching llama.cpp. Closing
        from inside a running call of this context (a callback of it) raises
        :class:`BusyError`. After close, every call raises :class:`ClosedError`.
        """
        cond = self._cond
        with cond:
            if self._ptr is not None or self._batch is not None:
                if self._running and self._owner == threading.get_ident():
                    raise BusyError("close() was called from inside a running call of this context")
                self._closing = True
                self._abort[0] = 1
                while self._running:
                    cond.wait()
            self._closing = True
            if self._batch is not None:
                lib.llama_batch_free(self._batch)
                self._batch = None
            if self._ptr is not None:
                lib.llama_free(self._ptr)
                self._ptr = None
                self._untrack()
            self._ebatch = None
            self._keys, self._next = [], []
            release, self._child = self._child, False
            cond.notify_all()
        if release:
            self.model._release_child()

    @property
    def closed(self) -> bool:
        return self._ptr is None

    def _check(self) -> Any:
        if self._ptr is None:
            raise ClosedError("the context is closed")
        return self._ptr

    class _Using:
        __slots__ = ("ctx",)

        def __init__(self, ctx: "Context") -> None:
            self.ctx = ctx

        def __enter__(self) -> None:
            ctx = self.ctx
            me = threading.get_ident()
            with ctx._cond:
                if ctx._owner == me:
                    raise BusyError("this context is busy with an unfinished call in this thread "
                                    "(finish or close the open stream first)")
                while ctx._owner is not None and not ctx._closing:
                    ctx._cond.wait()
                if ctx._closing or ctx._ptr is None:
                    raise ClosedError("the context is closed")
                ctx._owner = me
                ctx._running = True
                ctx._abort[0] = 0

        def __exit__(self, *exc: Any) -> None:
            ctx = self.ctx
            with ctx._cond:
                ctx._owner = None
                ctx._running = False
                ctx._cond.notify_all()

    def _using(self) -> "_Using":
        """Hold the context for one call (a stream holds it until it finishes)."""
        return Context._Using(self)

    def _pause(self) -> None:
        """The holding call stops touching llama.cpp (a stream about to yield, or done with C)."""
        with self._cond:
            self._running = False
            self._cond.notify_all()

    def _resume(self) -> bool:
        """The holding call goes on; False if close() began meanwhile (then it must not touch C)."""
        with self._cond:
            if self._closing:
                return False
            self._running = True
            return True

    # --- cancellation ----------------------------------------------------

    def cancel(self) -> None:
        """Stop the running decode (from any thread) at the next graph node."""
        self._abort[0] = 1

    # --- evaluation ------------------------------------------------------

    def reset(self) -> None:
        """Forget the KV cache."""
        with self._using():
            self._clear()

    def _clear(self) -> None:
        lib.llama_memory_clear(self._mem, True)
        self._keys = []
        self._next = []

    @property
    def n_cached(self) -> int:
        """How many inputs (tokens or embedding rows) the KV cache holds."""
        return len(self._keys)

    def _next_pos(self) -> int:
        return self._next[-1] if self._next else 0

    def _emb_batch(self) -> Any:
        if self._ebatch is None:
            n, d = self.n_batch, self.model.n_embd
            self._emb_mem = mem = {
                "embd": ffi.new("float[]", n * d),
                "pos": ffi.new("llama_pos[]", 4 * n),
                "n_seq_id": ffi.new("int32_t[]", [1] * n),
                "seq": ffi.new("llama_seq_id[]", n),
                "logits": ffi.new("int8_t[]", n),
            }
            mem["seq_ptrs"] = ffi.new("llama_seq_id *[]", [mem["seq"] + i for i in range(n)])
            eb = ffi.new("llama_batch *")
            eb.token = ffi.NULL
            eb.embd = mem["embd"]
            eb.pos = mem["pos"]
            eb.n_seq_id = mem["n_seq_id"]
            eb.seq_id = mem["seq_ptrs"]
            eb.logits = mem["logits"]
            self._ebatch = eb
        return self._ebatch

    def _decode(self, units: Sequence[Any], start: int, logits_out: Optional[List[np.ndarray]] = None) -> None:
        """Decode ``units[start:]`` (token ids and (Embeddings, row) pairs) in batches of n_batch.

        With ``logits_out`` every position's logits are appended to it (one array
        per batch); otherwise only the last unit's logits are computed.
        """
        ctx, n_batch, n_vocab = self._ptr, self.n_batch, self._n_vocab
        all_logits = logits_out is not None
        keys, nexts = self._keys, self._next
        n = len(units)
        i = start
        while i < n:
            u = units[i]
            if isinstance(u, tuple):  # rows of one Embeddings chunk
                chunk, k = u
                m = min(n_batch, chunk.n - k, n - i)
                b = self._emb_batch()
                d = self.model.n_embd
                ffi.memmove(b.embd, ffi.from_buffer(chunk.data[k:k + m]), m * d * 4)
                npos = self.model.n_pos_per_embd
                pos = np.frombuffer(ffi.buffer(b.pos, 4 * npos * m), dtype=np.int32).reshape(npos, m)
                pos[:] = chunk.positions_for(npos)[:, k:k + m]
                for j in range(m):
                    b.logits[j] = all_logits
                b.logits[m - 1] = all_logits or i + m == n
                b.n_tokens = m
                rc = lib.llama_decode(ctx, b[0])
                if rc != 0:
                    self._decode_failed(rc)
                t_row = chunk.positions[0]
                for j in range(k, k + m):
                    keys.append((chunk.key, j))
                    nexts.append(chunk.next_pos if j == chunk.n - 1 else int(t_row[j]) + 1)
            else:
                b = self._batch
                cur = self._next_pos()
                m = 0
                while i + m < n and m < n_batch and not isinstance(units[i + m], tuple):
                    b.token[m] = units[i + m]
                    b.pos[m] = cur + m
                    b.logits[m] = all_logits
                    m += 1
                b.logits[m - 1] = all_logits or i + m == n
                b.n_tokens = m
                rc = lib.llama_decode(ctx, b)
                if rc != 0:
                    self._decode_failed(rc)
                keys.extend(units[i:i + m])
                nexts.extend(range(cur + 1, cur + m + 1))
            if all_logits:
                ptr = lib.llama_get_logits(ctx)
                arr = np.frombuffer(ffi.buffer(ptr, m * n_vocab * 4), dtype=np.float32)
                logits_out.append(arr.reshape(m, n_vocab).copy())
            i += m

    def _decode_failed(self, rc: int) -> None:
        # Failed or aborted batches may leave part of themselves in the cache;
        # start from a clean one rather than guess which part.
        self._clear()
        if self._closing or self.model._closing:  # Model.close() cancels every context before closing each
            raise ClosedError("the context was closed during the call", llama_log="")
        if rc == 2 or self._abort[0]:
            self._abort[0] = 0
            raise DecodeError("decoding was cancelled", code=rc)
        errors.raise_error(DecodeError, "llama_decode", rc)

    def _units(self, prompt: Sequence[Any]) -> List[Any]:
        """Flatten a prompt (token ids and :class:`Embeddings`) into per-position units."""
        units: List[Any] = []
        n_embd = None
        for part in prompt:
            if isinstance(part, Embeddings):
                if n_embd is None:
                    n_embd = self.model.n_embd
                if part.data.shape[1] != n_embd:
                    raise ValueError(f"embeddings have width {part.data.shape[1]}, the model needs {n_embd}")
                units.extend((part, j) for j in range(part.n))
            else:
                if not 0 <= part < self._n_vocab:
                    raise errors.TokenizeError(
                        f"token id {part} is outside the vocabulary (0..{self._n_vocab - 1})", llama_log="")
                units.append(part)
        return units

    def _prepare(self, units: Sequence[Any]) -> int:
        """Keep the cached prefix shared with ``units``; return how many are cached."""
        if not units:
            raise ValueError("the prompt is empty")
        if len(units) > self.n_ctx:
            raise PromptTooLongError(
                f"the prompt has {len(units)} positions; the context holds {self.n_ctx}"
                " (create the Model with a larger n_ctx)"
            )
        keys = self._keys
        n = 0
        for a, u in zip(keys, units):
            if a != (u if not isinstance(u, tuple) else (u[0].key, u[1])):
                break
            n += 1
        if n == len(units):
            n -= 1  # the last unit must be evaluated again to get its logits
        # never split an embedding chunk: its rows share the t position
        while n > 0 and isinstance(units[n], tuple) and units[n][1] > 0:
            n -= 1
        if n < len(keys):
            p0 = self._next[n - 1] if n > 0 else 0
            if n == 0 or not lib.llama_memory_seq_rm(self._mem, 0, p0, -1):
                self._clear()
                n = 0
            else:
                del keys[n:]
                del self._next[n:]
        return n

    def logits(self, prompt: Sequence[Any]) -> np.ndarray:
        """Logits at every position of ``prompt``: float32 array ``(n_positions, n_vocab)``.

        ``prompt`` holds token ids and :class:`Embeddings` (one row per position).
        """
        with self._using():
            units = self._units(prompt)
            if not units:
                raise ValueError("the prompt is empty")
            if len(units) > self.n_ctx:
                raise PromptTooLongError(f"{len(units)} positions do not fit in a context of {self.n_ctx}")
            self._clear()
            chunks: List[np.ndarray] = []
            self._decode(units, 0, chunks)
            return chunks[0] if len(chunks) == 1 else np.concatenate(chunks, axis=0)

    def generate_tokens(
        self,
        tokens: Sequence[Any],
        *,
        max_tokens: int,
        sampling: SamplingParams,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
        cancel: Optional[threading.Event] = None,
        stream: bool = True,
    ) -> Iterator[Union[str, Completion]]:
        """The decode loop: yields text pieces, then one final :class:`Completion`.

        Pieces never split a UTF-8 character and never contain (part of) a stop string.
        With ``stream=False`` (a caller that only wants the result) the loop yields no
        pieces on the way, only the :class:`Completion`: no hand-over per token.
        With ``ignore_eos`` end-of-generation tokens are never sampled. :meth:`cancel`
        (or setting ``cancel``) from another thread ends generation within one token,
        with ``finish_reason == "cancelled"``.
        """
        if max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        sampling.validate()
        stop = [s for s in stop if s]
        with self._using():
            units = self._units(tokens)
            t0 = time.perf_counter()
            n_cached = self._prepare(units)
            self._decode(units, n_cached)
            t1 = time.perf_counter()
            prompt_ms = (t1 - t0) * 1e3

            ctx, b, vocab = self._ptr, self._batch, self.model._vocab
            n_vocab = self._n_vocab
            banned = self.model.eog_tokens if ignore_eos else ()
            banned_idx = np.array(banned, dtype=np.int64)
            banned_set = frozenset(banned)
            sampler = None if sampling.greedy else _Sampler(sampling, n_vocab, banned)
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            partial = False  # the decoder holds the first bytes of a character
            piece_buf = ffi.new("char[]", 256)
            # Nobody looks at the text before the end (no stream, no stop strings): detokenize
            # once after the loop, not between two decodes.
            text_at_end = not stream and not stop
            out_tokens: List[int] = []
            text_parts: List[str] = []
            held = ""  # text not yet emitted because it may begin a stop string
            hold = max((len(s) for s in stop), default=1) - 1
            finish = "length"
            stop_hit: Optional[str] = None
            pos = self._next_pos()
            keys, nexts = self._keys, self._next
            try:
                if sampler is not None:
                    for u in units:
                        if not isinstance(u, tuple):
                            sampler.accept(u)
                for _ in range(max_tokens):
                    if self._abort[0] or (cancel is not None and cancel.is_set()):
                        finish = "cancelled"
                        break
                    if len(keys) >= self.n_ctx:
                        break
                    if sampler is None:
                        row = np.frombuffer(ffi.buffer(lib.llama_get_logits_ith(ctx, -1), n_vocab * 4), dtype=np.float32)
                        tok = int(row.argmax())
                        if tok in banned_set:  # rare: mask the banned tokens and look again
                            row = row.copy()
                            row[banned_idx] = -np.inf
                            tok = int(row.argmax())
                    else:
                        tok = sampler.sample(ctx)
                    if lib.llama_vocab_is_eog(vocab, tok):
                        finish = "stop"
                        break
                    out_tokens.append(tok)
                    if text_at_end:
                        piece = ""
                    elif partial:
                        piece = decoder.decode(piece_bytes(vocab, tok, piece_buf))
                        partial = bool(decoder.getstate()[0])
                    else:
                        raw = piece_bytes(vocab, tok, piece_buf)
                        try:  # the usual case, whole characters: no incremental decoder needed
                            piece = raw.decode("utf-8")
                        except UnicodeDecodeError:
                            piece = decoder.decode(raw)
                            partial = bool(decoder.getstate()[0])
                    if piece:
                        held += piece
                        if stop:
                            cut = _find_stop(held, stop)
                            if cut is not None:
                                idx, stop_hit = cut
                                held, emit = "", held[:idx]
                                finish = "stop"
                                if emit:
                                    text_parts.append(emit)
                                    if stream:
                                        self._pause()
                                        yield emit
                                break
                        if len(held) > hold:
                            emit, held = held[: len(held) - hold], held[len(held) - hold:]
                            text_parts.append(emit)
                            if stream:
                                self._pause()
                                yield emit
                                if not self._resume():  # closed while paused: the C context is gone
                                    finish = "cancelled"
                                    break
                    # feed the token back
                    b.token[0] = tok
                    b.pos[0] = pos
                    b.logits[0] = 1
                    b.n_tokens = 1
                    rc = lib.llama_decode(ctx, b)
                    if rc == 2 and self._abort[0]:  # cancelled inside the decode: the cache is cleared
                        self._clear()
                        self._abort[0] = 0
                        finish = "cancelled"
                        break
                    if rc != 0:
                        self._decode_failed(rc)
                    pos += 1
                    keys.append(tok)
                    nexts.append(pos)
                if text_at_end and out_tokens:  # while the model is still held
                    text_parts.append(b"".join(piece_bytes(vocab, t, piece_buf) for t in out_tokens)
                                      .decode("utf-8", "replace"))
                # no more llama.cpp calls on this context: close() need not wait for the rest
                self._pause()
                if not text_at_end and stop_hit is None:
                    held += decoder.decode(b"", final=True)
                    if held:
                        text_parts.append(held)
                        if stream:
                            yield held
            finally:
                if sampler is not None:
                    sampler.close()
            t2 = time.perf_counter()
            yield Completion(
                text="".join(text_parts),
                tokens=out_tokens,
                finish_reason=finish,
                prompt_tokens=len(units),
                completion_tokens=len(out_tokens),
                prompt_tokens_evaluated=len(units) - n_cached,
                timings=Timings(prompt_ms, (t2 - t1) * 1e3, len(units) - n_cached, len(out_tokens)),
                stop=stop_hit,
            )


def piece_bytes(vocab: Any, token: int, buf: Any, special: bool = False) -> bytes:
    """The bytes of one (valid) token's text; ``buf``: a scratch ``char[256]``."""
    n = lib.llama_token_to_piece(vocab, token, buf, 256, 0, special)
    if n < 0:
        big = ffi.new("char[]", -n)
        n = lib.llama_token_to_piece(vocab, token, big, -n, 0, special)
        return ffi.unpack(big, n)
    return ffi.unpack(buf, n)


def _find_stop(text: str, stops: Sequence[str]) -> Optional[tuple]:
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best
