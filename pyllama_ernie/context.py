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
import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, Callable

import numpy as np

from . import _lib, errors
from ._lib import ModelHandle, abort_flag_callback, default_threads, ffi, lib
from .errors import BusyError, ClosedError, ContextError, DecodeError, PromptTooLongError
from .values import KV_CACHE_TYPES, Completion, ContextParams, Embeddings, SamplingParams, Timings
from .vocab import Vocab, piece_bytes

# Completion, Embeddings, SamplingParams and Timings are defined in .values; these names stay
# importable from here as before.
__all__ = ["Context", "Completion", "Embeddings", "Timings", "SamplingParams", "default_threads"]

_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])  # llama_token_data
_KV_TYPES = {name: getattr(lib, f"GGML_TYPE_{name.upper()}") for name in KV_CACHE_TYPES}  # ContextParams checks the names


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

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """The distribution the chain draws from for one row of logits (``(n_vocab,)`` float32;
        0 for the tokens its filters removed). Draws one token, as a sample would."""
        n = len(logits)
        data = ffi.new("llama_token_data[]", n)
        rows = np.frombuffer(ffi.buffer(data), dtype=_TOKEN_DATA)
        rows["id"] = np.arange(n)
        rows["logit"] = logits
        cur = ffi.new("llama_token_data_array *", {"data": data, "size": n, "selected": -1, "sorted": False})
        lib.llama_sampler_apply(self._ptr, cur)
        kept = np.frombuffer(ffi.buffer(cur.data, cur.size * _TOKEN_DATA.itemsize), dtype=_TOKEN_DATA)
        out = np.zeros(n, dtype=np.float32)
        out[kept["id"]] = kept["p"]
        return out

    def sample(self, ctx: Any, idx: int = -1) -> int:
        return lib.llama_sampler_sample(self._ptr, ctx, idx)

    def close(self) -> None:
        if self._ptr is not None:
            lib.llama_sampler_free(self._ptr)
            self._ptr = None
            self._untrack()


def c_context_params(params: ContextParams, abort: Any, *, n_seq_max: int = 1, kv_unified: bool = False,
                     n_ctx: int | None = None) -> Any:
    """The ``llama_context_params`` for ``params``; ``abort`` is the ``int *`` flag that
    stops a running decode. ``n_ctx`` overrides ``params.n_ctx`` (a batching context
    holds several sequences)."""
    threads = params.n_threads or default_threads()
    p = lib.llama_context_default_params()
    p.n_ctx = params.n_ctx if n_ctx is None else n_ctx
    p.n_batch = params.n_batch
    p.n_ubatch = min(params.n_ubatch or params.n_batch, params.n_batch)
    p.n_seq_max = n_seq_max
    p.kv_unified = kv_unified
    p.n_threads = threads
    p.n_threads_batch = params.n_threads_batch or threads
    p.flash_attn_type = (
        lib.LLAMA_FLASH_ATTN_TYPE_AUTO if params.flash_attn is None
        else lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if params.flash_attn
        else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )
    p.type_k = p.type_v = _KV_TYPES[params.kv_cache_type]
    p.no_perf = False
    p.abort_callback = abort_flag_callback
    p.abort_callback_data = abort
    return p


def flatten_prompt(prompt: Sequence[Any], n_vocab: int, n_embd: int) -> list[Any]:
    """A prompt (token ids and :class:`Embeddings`) as per-position units: token ids and
    ``(Embeddings, row)`` pairs. Checks token ids and embedding widths."""
    units: list[Any] = []
    for part in prompt:
        if isinstance(part, Embeddings):
            if part.data.shape[1] != n_embd:
                raise ValueError(f"embeddings have width {part.data.shape[1]}, the model needs {n_embd}")
            units.extend((part, j) for j in range(part.n))
        else:
            if not 0 <= part < n_vocab:
                raise errors.TokenizeError(
                    f"token id {part} is outside the vocabulary (0..{n_vocab - 1})", llama_log="")
            units.append(part)
    return units


def unit_key(unit: Any) -> Any:
    """What the KV cache remembers of one unit: the token id, or (chunk key, row)."""
    return (unit[0].key, unit[1]) if isinstance(unit, tuple) else unit


def reusable_prefix(keys: Sequence[Any], units: Sequence[Any]) -> int:
    """How many leading ``units`` a cache holding ``keys`` can keep: the shared prefix, less
    the last unit (evaluated again for its logits), never splitting an embedding chunk (its
    rows share the t position)."""
    n = 0
    for a, u in zip(keys, units):
        if a != unit_key(u):
            break
        n += 1
    if n == len(units):
        n -= 1
    while n > 0 and isinstance(units[n], tuple) and units[n][1] > 0:
        n -= 1
    return n


def seq_payload(ctx: Any, seq: int) -> bytes:
    """``llama_state_seq_get_data`` of one sequence."""
    n = lib.llama_state_seq_get_size(ctx, seq)
    buf = ffi.new("uint8_t[]", n)
    got = lib.llama_state_seq_get_data(ctx, buf, n, seq)
    if got == 0:
        errors.raise_error(errors.ContextError, "llama_state_seq_get_data")
    return bytes(ffi.buffer(buf, got))


def seq_restore(ctx: Any, seq: int, payload: bytes) -> None:
    """``llama_state_seq_set_data`` into ``seq``; ContextError when llama.cpp refuses it."""
    errors.clear_log_line()
    if lib.llama_state_seq_set_data(ctx, ffi.from_buffer(payload), len(payload), seq) == 0:
        errors.raise_error(errors.ContextError, "llama_state_seq_set_data (the saved state does not fit "
                                                "this context)")


class EmbdBatch:
    """A ``llama_batch`` of embedding rows (``embd`` instead of ``token``) with M-RoPE
    positions; the memory is owned by cffi and freed with this object."""

    def __init__(self, n: int, n_embd: int, n_pos_per_embd: int) -> None:
        self._n_embd, self._npos = n_embd, n_pos_per_embd
        self._mem = mem = {
            "embd": ffi.new("float[]", n * n_embd),
            "pos": ffi.new("llama_pos[]", 4 * n),
            "n_seq_id": ffi.new("int32_t[]", [1] * n),
            "seq": ffi.new("llama_seq_id[]", n),
            "logits": ffi.new("int8_t[]", n),
        }
        mem["seq_ptrs"] = ffi.new("llama_seq_id *[]", [mem["seq"] + i for i in range(n)])
        b = ffi.new("llama_batch *")
        b.token = ffi.NULL
        b.embd = mem["embd"]
        b.pos = mem["pos"]
        b.n_seq_id = mem["n_seq_id"]
        b.seq_id = mem["seq_ptrs"]
        b.logits = mem["logits"]
        self.batch = b

    def fill(self, chunk: Embeddings, k: int, m: int, *, seq: int = 0, all_logits: bool = False,
             last_logits: bool = False) -> Any:
        """Rows ``k:k+m`` of ``chunk`` for sequence ``seq``; the ``llama_batch`` to decode."""
        b, mem = self.batch, self._mem
        ffi.memmove(b.embd, ffi.from_buffer(chunk.data[k:k + m]), m * self._n_embd * 4)
        npos = self._npos
        pos = np.frombuffer(ffi.buffer(b.pos, 4 * npos * m), dtype=np.int32).reshape(npos, m)
        pos[:] = chunk.positions_for(npos)[:, k:k + m]
        seqs = np.frombuffer(ffi.buffer(mem["seq"], 4 * m), dtype=np.int32)
        seqs[:] = seq
        flags = np.frombuffer(ffi.buffer(b.logits, m), dtype=np.int8)
        flags[:] = all_logits
        b.logits[m - 1] = all_logits or last_logits
        b.n_tokens = m
        return b[0]

    @staticmethod
    def nexts(chunk: Embeddings, k: int, m: int) -> list[int]:
        """The position that follows each of rows ``k:k+m``."""
        t_row = chunk.positions[0]
        return [chunk.next_pos if j == chunk.n - 1 else int(t_row[j]) + 1 for j in range(k, k + m)]


class Context(_lib.CResource):
    """One llama.cpp inference context over a loaded model.

    Made by :class:`~pyllama_ernie.Model` (its default context :attr:`Model.ctx`),
    and by :meth:`Model.context` for more: one context per thread runs several
    conversations in parallel; threads sharing one take turns.

    Args:
        model: the model's handle; the context borrows its pointer until :meth:`close`.
        vocab: the model's vocabulary.
        params: the context's settings.
        observe_nodes: debugging aid, a Python call per graph node (slow): see
            :class:`pyllama_ernie._lib.NodeObserver`.
    """

    def __init__(self, model: ModelHandle, vocab: Vocab, params: ContextParams = ContextParams(), *,
                 observe_nodes: Callable[[str, str, tuple, bool, str], None] | None = None) -> None:
        self._ptr = None
        self._batch = None
        self._model: ModelHandle | None = None  # set while this context borrows the model
        # call state, guarded by _cond: the thread holding the context (a call or an
        # open stream), whether that call is running (False while a stream is
        # paused at a yield) and whether close() has begun
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._running = False
        self._closing = False
        self._abort = ffi.new("int *", 0)
        # what the KV cache holds: one key per position (token id, or (chunk key, row)),
        # and the rope position that follows each
        self._keys: list[Any] = []
        self._next: list[int] = []
        self._ebatch = None
        params.validate()
        self.params = params
        self._vocab = vocab
        self._n_vocab = vocab.n_vocab
        self._n_embd = model.n_embd
        self._n_pos_per_embd = model.n_pos_per_embd
        p = c_context_params(params, self._abort)
        self._observer = None
        if observe_nodes is not None:
            self._observer = _lib.NodeObserver(observe_nodes)
            p.cb_eval = lib._pyllama_ernie_eval
            p.cb_eval_user_data = self._observer.handle
        model_ptr = model.acquire()  # ClosedError once the model is closing
        self._model = model
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
        except BaseException:
            self.close()
            raise

    # --- lifetime -------------------------------------------------------

    def shutdown(self) -> None:
        """Begin :meth:`close` without waiting: the running call is cancelled and new calls
        raise :class:`ClosedError`. :meth:`close` then waits and frees. (Closing many contexts
        at once: shut them all down first, then close each.)"""
        with self._cond:
            self._closing = True
            self._abort[0] = 1

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
            model, self._model = self._model, None
            cond.notify_all()
        if model is not None:
            model.release()

    @property
    def closed(self) -> bool:
        return self._ptr is None

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

    def _emb_batch(self) -> EmbdBatch:
        if self._ebatch is None:
            self._ebatch = EmbdBatch(self.n_batch, self._n_embd, self._n_pos_per_embd)
        return self._ebatch

    def _decode(self, units: Sequence[Any], start: int, logits_out: list[np.ndarray] | None = None) -> None:
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
                rc = lib.llama_decode(ctx, self._emb_batch().fill(chunk, k, m, all_logits=all_logits,
                                                                  last_logits=i + m == n))
                if rc != 0:
                    self._decode_failed(rc)
                keys.extend((chunk.key, j) for j in range(k, k + m))
                nexts.extend(EmbdBatch.nexts(chunk, k, m))
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
        if self._closing:  # close() or shutdown() began: the call ends as closed, not as failed
            raise ClosedError("the context was closed during the call", llama_log="")
        if rc == 2 or self._abort[0]:
            self._abort[0] = 0
            raise DecodeError("decoding was cancelled", code=rc)
        errors.raise_error(DecodeError, "llama_decode", rc)

    def _units(self, prompt: Sequence[Any]) -> list[Any]:
        """Flatten a prompt (token ids and :class:`Embeddings`) into per-position units."""
        return flatten_prompt(prompt, self._n_vocab, self._n_embd)

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
        n = reusable_prefix(keys, units)
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
            chunks: list[np.ndarray] = []
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
        cancel: threading.Event | None = None,
        stream: bool = True,
    ) -> Iterator[str | Completion]:
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
            vocab = self._vocab.raw
            picker = _Picker(sampling, self._n_vocab, self._vocab.eog_tokens if ignore_eos else ())
            # Nobody looks at the text before the end (no stream, no stop strings): detokenize
            # once after the loop, not between two decodes.
            out = _TextOut(vocab, stop, at_end=not stream and not stop)
            out_tokens: list[int] = []
            finish = "length"
            # bound once: the loop runs per token (host time per token is a benchmark figure)
            pick, feed, step, is_eog = picker.pick, out.feed, self._step, lib.llama_vocab_is_eog
            abort, keys, n_ctx, ctx = self._abort, self._keys, self.n_ctx, self._ptr
            try:
                picker.accept_prompt(units)
                for _ in range(max_tokens):
                    if abort[0] or (cancel is not None and cancel.is_set()):
                        finish = "cancelled"
                        break
                    if len(keys) >= n_ctx:
                        break
                    tok = pick(ctx)
                    if is_eog(vocab, tok):
                        finish = "stop"
                        break
                    out_tokens.append(tok)
                    piece = feed(tok)
                    if piece and stream:
                        self._pause()
                        yield piece
                        if out.stop_hit is None and not self._resume():  # closed while paused: no C
                            finish = "cancelled"
                            break
                    if out.stop_hit is not None:
                        finish = "stop"
                        break
                    if not step(tok):
                        finish = "cancelled"
                        break
                rest = out.finish(out_tokens)  # may read the vocabulary: while the model is held
                # no more llama.cpp calls on this context: close() need not wait for the rest
                self._pause()
                if rest and stream:
                    yield rest
            finally:
                picker.close()
            t2 = time.perf_counter()
            yield Completion(
                text=out.text,
                tokens=out_tokens,
                finish_reason=finish,
                prompt_tokens=len(units),
                completion_tokens=len(out_tokens),
                prompt_tokens_evaluated=len(units) - n_cached,
                timings=Timings((t1 - t0) * 1e3, (t2 - t1) * 1e3, len(units) - n_cached, len(out_tokens)),
                stop=out.stop_hit,
            )

    def save_state(self) -> "tuple[bytes, list[Any], list[int]]":
        """The KV cache's llama.cpp state with what it holds: ``(payload, keys, nexts)``
        (see :meth:`pyllama_ernie.Model.save_state`)."""
        with self._using():
            if not self._keys:
                raise ValueError("no conversation to save: generate first")
            return seq_payload(self._ptr, 0), list(self._keys), list(self._next)

    def load_state(self, payload: bytes, keys: list[Any], nexts: list[int]) -> int:
        """Replace the KV cache with a saved state (see :meth:`pyllama_ernie.Model.load_state`)."""
        if len(keys) > self.n_ctx:
            raise PromptTooLongError(f"the saved conversation has {len(keys)} positions; the context holds "
                                     f"{self.n_ctx}", n_prompt=len(keys), n_ctx=self.n_ctx)
        with self._using():
            self._clear()
            seq_restore(self._ptr, 0, payload)
            self._keys, self._next = list(keys), list(nexts)
            return len(keys)

    def _step(self, tok: int) -> bool:
        """Evaluate one generated token after the cache; False if it was cancelled inside the decode."""
        b = self._batch
        pos = self._next_pos()
        b.token[0] = tok
        b.pos[0] = pos
        b.logits[0] = 1
        b.n_tokens = 1
        rc = lib.llama_decode(self._ptr, b)
        if rc == 2 and self._abort[0]:  # cancelled inside the decode: the cache is cleared
            self._clear()
            self._abort[0] = 0
            return False
        if rc != 0:
            self._decode_failed(rc)
        self._keys.append(tok)
        self._next.append(pos + 1)
        return True


class _Picker:
    """Chooses each next token: the argmax for greedy settings, else llama.cpp's sampler chain.

    ``banned`` tokens are never chosen (``ignore_eos``).
    """

    def __init__(self, sampling: SamplingParams, n_vocab: int, banned: Sequence[int] = ()) -> None:
        self._n_vocab = n_vocab
        self._sampler = None if sampling.greedy else _Sampler(sampling, n_vocab, banned)
        self._banned_idx = np.array(banned, dtype=np.int64)
        self._banned = frozenset(banned)

    def accept_prompt(self, units: Sequence[Any]) -> None:
        """Let the sampler see the prompt's tokens (for the repeat penalty)."""
        if self._sampler is not None:
            for u in units:
                if not isinstance(u, tuple):
                    self._sampler.accept(u)

    def pick(self, ctx: Any, idx: int = -1) -> int:
        """The next token from the logits of batch row ``idx`` (-1: the last)."""
        if self._sampler is not None:
            return self._sampler.sample(ctx, idx)
        row = np.frombuffer(ffi.buffer(lib.llama_get_logits_ith(ctx, idx), self._n_vocab * 4), dtype=np.float32)
        tok = int(row.argmax())
        if tok in self._banned:  # rare: mask the banned tokens and look again
            row = row.copy()
            row[self._banned_idx] = -np.inf
            tok = int(row.argmax())
        return tok

    def close(self) -> None:
        if self._sampler is not None:
            self._sampler.close()


class _TextOut:
    """Turns generated tokens into text pieces that never split a UTF-8 character and never
    show (part of) a stop string: the last ``len(longest stop) - 1`` characters are held back
    until they cannot begin one.

    With ``at_end`` (nobody reads the text on the way) :meth:`feed` does nothing and
    :meth:`finish` detokenizes everything once.
    """

    def __init__(self, vocab: Any, stop: Sequence[str], at_end: bool) -> None:
        self._vocab = vocab
        self._stop = list(stop)
        self._at_end = at_end
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._partial = False  # the decoder holds the first bytes of a character
        self._buf = ffi.new("char[]", 256)
        self._held = ""
        self._parts: list[str] = []
        #: the stop string that ended generation, once one appeared
        self.stop_hit: str | None = None

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._parts)

    def feed(self, tok: int) -> str:
        """The text that can be shown after ``tok`` ("" if none); sets :attr:`stop_hit` on a stop string."""
        if self._at_end:
            return ""
        raw = piece_bytes(self._vocab, tok, self._buf)
        if self._partial:
            piece = self._decoder.decode(raw)
            self._partial = bool(self._decoder.getstate()[0])
        else:
            try:  # the usual case, whole characters: no incremental decoder needed
                piece = raw.decode("utf-8")
            except UnicodeDecodeError:
                piece = self._decoder.decode(raw)
                self._partial = bool(self._decoder.getstate()[0])
        if not piece:
            return ""
        held = self._held + piece
        if self._stop:
            cut = _find_stop(held, self._stop)
            if cut is not None:
                idx, self.stop_hit = cut
                self._held = ""
                return self._emit(held[:idx])
        if len(held) > self._hold:
            n = len(held) - self._hold
            self._held = held[n:]
            return self._emit(held[:n])
        self._held = held
        return ""

    def finish(self, tokens: Sequence[int]) -> str:
        """What is left to show once generation ended ("" after a stop string)."""
        if self._at_end:
            if tokens:
                buf = self._buf
                self._emit(b"".join(piece_bytes(self._vocab, t, buf) for t in tokens).decode("utf-8", "replace"))
            return ""
        if self.stop_hit is not None:
            return ""
        rest, self._held = self._held + self._decoder.decode(b"", final=True), ""
        return self._emit(rest)

    def _emit(self, text: str) -> str:
        if text:
            self._parts.append(text)
        return text


def _find_stop(text: str, stops: Sequence[str]) -> tuple | None:
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best
