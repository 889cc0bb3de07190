"""Engine: many requests in one ``llama_context`` (continuous batching).

An :class:`Engine` owns one llama.cpp context with ``n_parallel`` sequences and one
thread that drives it. Requests from any thread (and from asyncio, see
:meth:`pyllama_ernie.Model.acreate_chat_completion`) wait in a bounded queue, take a
free sequence (a *slot*) and from then on share every decode step with the others:
each step evaluates one token of every generating request plus a chunk of the prompts
still being read, so a new request starts without waiting for the others to finish.

Each request keeps its own sampling settings, seed, stop strings and cancellation, and
each slot keeps what its KV cache holds (tokens and image rows, with ERNIE's 3-D
positions), so a request whose prompt continues a conversation that slot already holds
evaluates only the new part. Greedy results are those of the request run alone.

Only the engine thread calls llama.cpp on the engine's context; other threads talk to
it through the queue, per-request result queues and ``_c_lock`` (held for each step, and
by :meth:`Engine.save_state` / :meth:`Engine.load_state`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from . import _lib, errors
from ._lib import ModelHandle, ffi, lib
from .context import EmbdBatch, _Picker, _TextOut, c_context_params, reusable_prefix, seq_payload, seq_restore
from .errors import ClosedError, DecodeError, PromptTooLongError, QueueFullError
from .values import Completion, ContextParams, SamplingParams, Timings
from .vocab import Vocab

__all__ = ["COUNTERS", "Engine"]

#: the counters of :meth:`Engine.stats` (and of :meth:`pyllama_ernie.Model.stats` without an engine)
COUNTERS = ("requests_total", "prompt_tokens_total", "prompt_tokens_cached_total", "completion_tokens_total",
            "cancelled_total")

T = TypeVar("T")

@dataclass(eq=False)
class _Job:
    """One request: its prompt as units, its settings and where its results go."""

    units: list[Any]
    max_tokens: int
    sampling: SamplingParams
    stop: list[str]
    ignore_eos: bool
    cancel: Any  # the caller's threading.Event (or anything with is_set()), or None
    stream: bool
    results: "queue.SimpleQueue[Any]" = field(default_factory=queue.SimpleQueue)
    stopped: bool = False  # the consumer went away, or Model.cancel(): finish at the next step

    def cancelled(self) -> bool:
        return self.stopped or (self.cancel is not None and self.cancel.is_set())


class _Results:
    """The iterator of one request's pieces and Completion. Closing it, or dropping it (also
    before its first item), cancels the request: the engine drops it at its next step."""

    __slots__ = ("_job", "_done")

    def __init__(self, job: _Job) -> None:
        self._job = job
        self._done = False

    def __iter__(self) -> "_Results":
        return self

    def __next__(self) -> str | Completion:
        if self._done:
            raise StopIteration
        item = self._job.results.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        if isinstance(item, Completion):
            self._done = True
        return item

    def close(self) -> None:
        self._done = True
        self._job.stopped = True  # a no-op once the request is done

    def __del__(self) -> None:
        self._job.stopped = True


class _Slot:
    """One sequence of the context: what its KV cache holds and the request it serves."""

    __slots__ = ("seq", "keys", "nexts", "job", "pos", "pending", "picker", "out", "tokens", "n_cached",
                 "t0", "t1", "used", "row")

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.keys: list[Any] = []  # per cached position: token id or (chunk key, row)
        self.nexts: list[int] = []  # the rope position that follows each
        self.job: _Job | None = None
        self.used = 0.0  # when its last request ended (the least recently used slot is reused first)
        self._reset()

    def _reset(self) -> None:
        self.pos = 0  # the next unit of the job's prompt to evaluate
        self.pending: int | None = None  # a sampled token waiting to be evaluated
        self.picker: _Picker | None = None
        self.out: _TextOut | None = None
        self.tokens: list[int] = []
        self.n_cached = 0
        self.t0 = self.t1 = 0.0
        self.row = -1  # its row with logits in the batch being decoded

    @property
    def next_pos(self) -> int:
        return self.nexts[-1] if self.nexts else 0


class Engine(_lib.CResource):
    """``n_parallel`` sequences in one llama.cpp context, continuously batched.

    Made by :class:`~pyllama_ernie.Model` when it is given ``n_parallel``; use the
    model's methods rather than this class.

    Args:
        model: the model's handle; borrowed until :meth:`close`.
        vocab: the model's vocabulary.
        params: context settings; ``n_ctx`` is each sequence's window.
        n_parallel: sequences decoded together.
        max_queue: requests that may wait for a free sequence; one more raises
            :class:`~pyllama_ernie.errors.QueueFullError`.
        kv_unified: one KV buffer for all sequences (each step is one graph) rather than
            one per sequence (llama.cpp then splits a step into equal-length parts).
    """

    def __init__(self, model: ModelHandle, vocab: Vocab, params: ContextParams, n_parallel: int,
                 max_queue: int = 64, *, kv_unified: bool = True) -> None:
        if not isinstance(n_parallel, int) or isinstance(n_parallel, bool) or not 1 <= n_parallel <= 256:
            raise ValueError("n_parallel must be an int from 1 to 256")
        if not isinstance(max_queue, int) or isinstance(max_queue, bool) or max_queue < 0:
            raise ValueError("max_queue must be an int >= 0")
        params.validate()
        self._ptr = None
        self._batch = None
        self._model: ModelHandle | None = None
        self._abort = ffi.new("int *", 0)
        self.params = params
        self.n_parallel = n_parallel
        self.max_queue = max_queue
        self.kv_unified = kv_unified
        self._vocab = vocab
        self._n_vocab = vocab.n_vocab
        # the queue, the slots' job fields and the counters are guarded by _cond
        self._cond = threading.Condition(threading.Lock())
        self._waiting: collections.deque[_Job] = collections.deque()
        self._tasks: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future]] = collections.deque()
        self._closing = False
        self._error: BaseException | None = None  # what stopped the engine thread, if not close()
        self._c_lock = threading.Lock()  # held while llama.cpp runs on this context
        self._counters = dict.fromkeys(COUNTERS, 0)
        self._last_slot: _Slot | None = None
        model_ptr = model.acquire()
        self._model = model
        try:
            # n_ctx 0 means the training length, per sequence; llama.cpp pads a window to 256
            n_ctx = params.n_ctx or int(lib.llama_model_n_ctx_train(model_ptr))
            per_seq = -(-n_ctx // 256) * 256
            p = c_context_params(params, self._abort, n_seq_max=n_parallel, kv_unified=kv_unified,
                                 n_ctx=per_seq * n_parallel)
            errors.clear_log_line()
            ptr = lib.llama_init_from_model(model_ptr, p)
            if ptr == ffi.NULL:
                errors.raise_error(errors.ContextError, "llama_init_from_model")
            self._ptr = ptr
            self._track()
            #: each sequence's window in positions
            self.n_ctx = per_seq if kv_unified else int(lib.llama_n_ctx_seq(ptr))
            self.n_batch = int(lib.llama_n_batch(ptr))
            self.n_ubatch = int(lib.llama_n_ubatch(ptr))
            if n_parallel > self.n_ubatch:  # every step must hold one token of each sequence
                raise ValueError(f"n_parallel ({n_parallel}) must not exceed n_ubatch ({self.n_ubatch})")
            self._batch = lib.llama_batch_init(self.n_batch, 0, 1)
            for i in range(self.n_batch):
                self._batch.n_seq_id[i] = 1
            self._ebatch = EmbdBatch(self.n_batch, model.n_embd, model.n_pos_per_embd)
            self._mem = lib.llama_get_memory(ptr)
            self._slots = [_Slot(s) for s in range(n_parallel)]
            self._thread = threading.Thread(target=self._run, name="pyllama_ernie-engine", daemon=True)
            self._thread.start()
        except BaseException:
            self.close()
            raise

    # --- requests ---------------------------------------------------------

    def submit(self, units: list[Any], *, max_tokens: int, sampling: SamplingParams, stop: Sequence[str] = (),
               ignore_eos: bool = False, cancel: Any = None, stream: bool = True) -> Iterator[str | Completion]:
        """Queue one generation; its pieces and final :class:`Completion`, as
        :meth:`Context.generate_tokens` yields them.

        ``units`` come from :func:`~pyllama_ernie.context.flatten_prompt`. Raises at once
        (not from the iterator) :class:`PromptTooLongError`, :class:`QueueFullError` or
        :class:`ClosedError`. Leaving the iterator early cancels the request.
        """
        if not units:
            raise ValueError("the prompt is empty")
        if len(units) > self.n_ctx:
            raise PromptTooLongError(
                f"the prompt has {len(units)} positions; a sequence holds {self.n_ctx} "
                "(create the Model with a larger n_ctx)", n_prompt=len(units), n_ctx=self.n_ctx)
        if max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        sampling.validate()
        job = _Job(units, max_tokens, sampling, [s for s in stop if s], ignore_eos, cancel, stream)
        with self._cond:
            if self._closing:
                raise self._closed_error()
            self._purge_waiting()
            busy = sum(s.job is not None for s in self._slots)
            if busy + len(self._waiting) >= self.n_parallel + self.max_queue:
                raise QueueFullError(
                    f"all {self.n_parallel} sequences are busy and {len(self._waiting)} requests wait "
                    f"(max_queue={self.max_queue})", retry_after=1.0)
            self._waiting.append(job)
            self._counters["requests_total"] += 1
            self._cond.notify_all()
        return _Results(job)

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` in the engine thread, between two steps, and return its result.

        For the vision encoder: ggml's CPU backend runs each calling thread's graphs on an
        OpenMP team of its own, and once a second team exists (an encode in a caller's
        thread) libgomp counts more threads than cores and throttles the spin-waits of
        every team, so each decode step of the engine waited on futexes: 128 tokens took
        3.5 s instead of 2.1 s on the bench VL model (2 cores) for as long as the
        encoding thread lived. In the engine thread the encoder shares its team.
        """
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._closing:
                raise self._closed_error()
            self._tasks.append((fn, fut))
            self._cond.notify_all()
        return fut.result()

    def _run_task(self) -> None:
        with self._cond:
            if not self._tasks:
                return
            fn, fut = self._tasks.popleft()
        if fut.set_running_or_notify_cancel():
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - raised in the caller's thread
                fut.set_exception(e)

    def cancel_all(self) -> None:
        """End every request within one step: generating ones finish with ``"cancelled"`` and
        the text so far, waiting ones with an empty ``"cancelled"`` completion."""
        with self._cond:
            for job in [s.job for s in self._slots if s.job is not None] + list(self._waiting):
                job.stopped = True
            self._cond.notify_all()

    def stats(self) -> dict[str, int]:
        """Counters and gauges: ``n_parallel``, ``busy`` (sequences serving a request),
        ``queued``, ``max_queue``, ``requests_total``, ``prompt_tokens_total``,
        ``prompt_tokens_cached_total`` (prompt positions found in a sequence's KV cache),
        ``completion_tokens_total`` and ``cancelled_total``."""
        with self._cond:
            self._purge_waiting()
            out = {"n_parallel": self.n_parallel, "busy": sum(s.job is not None for s in self._slots),
                   "queued": len(self._waiting), "max_queue": self.max_queue}
            out.update(self._counters)
        return out

    # --- lifetime -----------------------------------------------------------

    def shutdown(self) -> None:
        """Begin :meth:`close` without waiting."""
        with self._cond:
            self._closing = True
            self._abort[0] = 1
            self._cond.notify_all()

    def close(self) -> None:
        """Stop the engine thread and free the context. Generating requests finish with
        ``finish_reason == "cancelled"``; requests still reading their prompt or waiting
        raise :class:`ClosedError`. Safe to call twice."""
        self.shutdown()
        thread = getattr(self, "_thread", None)
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._c_lock:
            if self._batch is not None:
                lib.llama_batch_free(self._batch)
                self._batch = None
            if self._ptr is not None:
                lib.llama_free(self._ptr)
                self._ptr = None
                self._untrack()
        model, self._model = self._model, None
        if model is not None:
            model.release()

    @property
    def closed(self) -> bool:
        return self._ptr is None

    def _closed_error(self) -> ClosedError:
        if self._error is not None:
            return ClosedError(f"the model's batching engine stopped after an error ({self._error!r}); "
                               "close the model and load it again", llama_log="")
        return ClosedError("the model is closed")

    # --- the engine thread --------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while (not self._closing and not self._waiting and not self._tasks
                           and not any(s.job for s in self._slots)):
                        self._cond.wait()
                    if self._closing:
                        break
                    admitted = self._take_waiting()
                self._run_task()  # one per step: several encodes do not stall running streams in a row
                with self._c_lock:
                    for slot, job in admitted:
                        self._admit(slot, job)
                    self._step()
        except BaseException as e:  # a bug or a failure outside a decode: nobody may hang
            with self._cond:
                self._closing = True
                self._error = e
            self._fail_all(e)
            return
        self._fail_all(None)

    def _purge_waiting(self) -> None:
        """Drop the waiting requests whose callers went away or cancelled (under _cond), so they
        no longer hold places in the queue."""
        if any(job.cancelled() for job in self._waiting):
            keep = collections.deque()
            for job in self._waiting:
                if job.cancelled():
                    self._finish_unstarted(job)
                else:
                    keep.append(job)
            self._waiting = keep

    def _take_waiting(self) -> list[tuple[_Slot, _Job]]:
        """Give free slots to waiting jobs (under _cond): the slot whose cache keeps the most of
        the job's prompt, else the least recently used."""
        out = []
        free = [s for s in self._slots if s.job is None]
        while self._waiting and free:
            job = self._waiting.popleft()
            if job.cancelled():
                self._finish_unstarted(job)
                continue
            slot = max(free, key=lambda s: (reusable_prefix(s.keys, job.units) if s.keys else 0, -s.used))
            free.remove(slot)
            slot.job = job
            out.append((slot, job))
        return out

    def _admit(self, slot: _Slot, job: _Job) -> None:
        """Keep the slot's cached prefix of the job's prompt, drop the rest; set up sampling."""
        n = reusable_prefix(slot.keys, job.units) if slot.keys else 0
        if n < len(slot.keys):
            p0 = slot.nexts[n - 1] if n > 0 else -1
            if n == 0 or not lib.llama_memory_seq_rm(self._mem, slot.seq, p0, -1):
                lib.llama_memory_seq_rm(self._mem, slot.seq, -1, -1)
                n = 0
            del slot.keys[n:]
            del slot.nexts[n:]
        slot._reset()
        slot.pos = slot.n_cached = n
        slot.t0 = time.perf_counter()
        banned = self._vocab.eog_tokens if job.ignore_eos else ()
        slot.picker = _Picker(job.sampling, self._n_vocab, banned)
        slot.picker.accept_prompt(job.units)
        slot.out = _TextOut(self._vocab.raw, job.stop, at_end=not job.stream and not job.stop)
        with self._cond:
            self._counters["prompt_tokens_total"] += len(job.units)
            self._counters["prompt_tokens_cached_total"] += n

    def _step(self) -> None:
        """One decode of every generating slot's pending token plus prompt chunks, then an
        embedding batch for a prompt at an image, then sampling for the rows with logits."""
        active = [s for s in self._slots if s.job is not None]
        for s in active:
            if s.job.cancelled():
                self._finish(s, "cancelled")
        active = [s for s in active if s.job is not None]
        if not active:
            return
        generating = [s for s in active if s.pending is not None]
        reading = sorted((s for s in active if s.pending is None), key=lambda s: s.t0)  # first come, first read
        # While streams run, a step is one ubatch: a long prompt comes in chunks between their
        # tokens instead of stalling them for its whole length.
        budget = (self.n_ubatch if generating else self.n_batch) - len(generating)
        b = self._batch
        n = 0
        for s in generating:
            n = self._put_token(b, n, s, s.pending, True)
        embd_slot = None
        fed = list(generating)
        for s in reading:
            if budget <= 0:
                break
            units, i = s.job.units, s.pos
            if isinstance(units[i], tuple):  # an image: the rest of the budget, in its own batch
                embd_slot = s
                break
            m = 0
            while m < budget and i + m < len(units) and not isinstance(units[i + m], tuple):
                m += 1
            for j in range(m):
                n = self._put_token(b, n, s, units[i + j], i + j == len(units) - 1)
            s.pos += m
            budget -= m
            if m:
                fed.append(s)
        if n:
            b.n_tokens = n
            if not self._decode(b, fed):
                return
            for s in active:
                if s.row >= 0:
                    self._advance(s, s.row)
        if embd_slot is not None and embd_slot.job is not None and budget > 0:
            self._embd_step(embd_slot, budget)

    def _put_token(self, b: Any, n: int, s: _Slot, tok: int, logits: bool) -> int:
        b.token[n] = tok
        b.pos[n] = s.next_pos
        b.seq_id[n][0] = s.seq
        b.logits[n] = logits
        s.keys.append(tok)
        s.nexts.append(s.next_pos + 1)
        if logits:
            s.row = n
        if s.pending is not None:
            s.pending = None
        return n + 1

    def _embd_step(self, s: _Slot, budget: int) -> None:
        units, i = s.job.units, s.pos
        chunk, k = units[i]
        m = min(self.n_batch, budget, chunk.n - k, len(units) - i)
        last = i + m == len(units)
        batch = self._ebatch.fill(chunk, k, m, seq=s.seq, last_logits=last)
        s.keys.extend((chunk.key, j) for j in range(k, k + m))
        s.nexts.extend(EmbdBatch.nexts(chunk, k, m))
        s.pos += m
        if last:
            s.row = m - 1
        if self._decode(batch, [s]) and last:
            self._advance(s, m - 1)

    def _decode(self, batch: Any, slots: list[_Slot]) -> bool:
        """Decode; on failure, fail the requests in the batch and clear their sequences."""
        rc = lib.llama_decode(self._ptr, batch)
        if rc == 0:
            return True
        closing = self._closing
        for s in slots:
            lib.llama_memory_seq_rm(self._mem, s.seq, -1, -1)
            s.keys, s.nexts = [], []
            if s.job is None:
                continue
            if closing and s.tokens:
                self._finish(s, "cancelled")
            elif closing:
                self._fail(s, ClosedError("the model was closed during the call", llama_log=""))
            else:
                self._fail(s, errors.error(DecodeError, "llama_decode", rc))
        self._abort[0] = 0 if not closing else 1
        return False

    def _advance(self, s: _Slot, row: int) -> None:
        """Sample the slot's next token from batch row ``row``; hand out text; finish or go on."""
        s.row = -1
        job = s.job
        if not s.t1:
            s.t1 = time.perf_counter()
        if len(s.tokens) >= job.max_tokens:
            self._finish(s, "length")
            return
        if job.cancelled():
            self._finish(s, "cancelled")
            return
        if len(s.keys) >= self.n_ctx:
            self._finish(s, "length")
            return
        tok = s.picker.pick(self._ptr, row)
        if lib.llama_vocab_is_eog(self._vocab.raw, tok):
            self._finish(s, "stop")
            return
        s.tokens.append(tok)
        piece = s.out.feed(tok)
        if piece and job.stream:
            job.results.put(piece)
        if s.out.stop_hit is not None:
            self._finish(s, "stop")
        elif len(s.tokens) >= job.max_tokens:
            self._finish(s, "length")  # its last token needs no evaluation
        else:
            s.pending = tok

    def _finish(self, s: _Slot, reason: str) -> None:
        job = s.job
        assert job is not None
        rest = s.out.finish(s.tokens) if s.out is not None else ""
        if rest and job.stream:
            job.results.put(rest)
        t2 = time.perf_counter()
        t1 = s.t1 or t2
        n_units = len(job.units)
        job.results.put(Completion(
            text=s.out.text if s.out is not None else "",
            tokens=list(s.tokens),
            finish_reason=reason,
            prompt_tokens=n_units,
            completion_tokens=len(s.tokens),
            prompt_tokens_evaluated=n_units - s.n_cached,
            timings=Timings((t1 - s.t0) * 1e3, (t2 - t1) * 1e3, n_units - s.n_cached, len(s.tokens)),
            stop=s.out.stop_hit if s.out is not None else None,
        ))
        self._release(s, reason == "cancelled", len(s.tokens))

    def _fail(self, s: _Slot, exc: BaseException) -> None:
        job = s.job
        assert job is not None
        job.results.put(exc)
        self._release(s, False, len(s.tokens))

    def _release(self, s: _Slot, cancelled: bool, n_tokens: int) -> None:
        if s.picker is not None:
            s.picker.close()
        s._reset()  # keys/nexts stay: what the cache holds (a cut prompt, or without the last token)
        with self._cond:
            s.job = None
            s.used = time.monotonic()
            self._last_slot = s
            self._counters["completion_tokens_total"] += n_tokens
            self._counters["cancelled_total"] += cancelled
            self._cond.notify_all()

    def _finish_unstarted(self, job: _Job) -> None:
        """A job cancelled while it waited: its Completion is empty."""
        self._counters["cancelled_total"] += 1
        n = len(job.units)
        job.results.put(Completion(text="", tokens=[], finish_reason="cancelled", prompt_tokens=n,
                                   completion_tokens=0, prompt_tokens_evaluated=0,
                                   timings=Timings(0.0, 0.0, 0, 0)))

    def _fail_all(self, exc: BaseException | None) -> None:
        """The engine stops: generating requests end as cancelled, the others raise."""
        with self._c_lock:
            for s in self._slots:
                if s.job is None:
                    continue
                if exc is None and s.tokens:
                    self._finish(s, "cancelled")
                else:
                    self._fail(s, exc or ClosedError("the model was closed during the call", llama_log=""))
        with self._cond:
            waiting, self._waiting = list(self._waiting), collections.deque()
            tasks, self._tasks = list(self._tasks), collections.deque()
        for _, fut in tasks:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(ClosedError("the model was closed before the images were encoded", llama_log=""))
        for job in waiting:
            job.results.put(ClosedError("the model was closed before the request started", llama_log=""))

    # --- state ----------------------------------------------------------------

    def save_state(self) -> tuple[bytes, list[Any], list[int]]:
        """The llama.cpp state of the slot whose request finished last, with what its cache
        holds: ``(payload, keys, nexts)``. Raises :class:`BusyError` while that slot serves
        another request."""
        with self._c_lock:
            s = self._last_slot
            if s is None or not s.keys:
                raise ValueError("no conversation to save: generate first")
            if s.job is not None:
                raise errors.BusyError("the sequence of the last conversation is serving another request; "
                                       "save right after the call returns")
            if self._ptr is None:
                raise ClosedError("the model is closed")
            return seq_payload(self._ptr, s.seq), list(s.keys), list(s.nexts)

    def load_state(self, payload: bytes, keys: list[Any], nexts: list[int]) -> int:
        """Put a saved conversation into the least recently used free slot; a later request
        whose prompt starts with it evaluates only the rest. Returns the positions loaded."""
        if len(keys) > self.n_ctx:
            raise PromptTooLongError(f"the saved conversation has {len(keys)} positions; a sequence holds "
                                     f"{self.n_ctx}", n_prompt=len(keys), n_ctx=self.n_ctx)
        with self._c_lock:
            if self._ptr is None:
                raise ClosedError("the model is closed")
            with self._cond:
                free = [s for s in self._slots if s.job is None]
                if not free:
                    raise errors.BusyError("every sequence is serving a request; load the state when one is free")
                s = min(free, key=lambda x: x.used)
            lib.llama_memory_seq_rm(self._mem, s.seq, -1, -1)
            s.keys, s.nexts = [], []
            seq_restore(self._ptr, s.seq, payload)
            s.keys, s.nexts = list(keys), list(nexts)
            s.used = time.monotonic()
            return len(keys)
