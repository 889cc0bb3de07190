"""asyncio over the blocking API: a call or a stream runs in its own thread, and the
event loop only waits for what the thread hands over.

A thread per call rather than the loop's default executor: that pool has a handful of
workers (``min(32, cores + 4)``), so with more concurrent requests than workers the rest
would wait there, unseen by the model's queue and its limits.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any, Callable, TypeVar

__all__ = ["CancelEvent", "call_in_thread", "stream_in_thread"]

T = TypeVar("T")


class CancelEvent:
    """A cancel flag with ``is_set()``/``set()`` like ``threading.Event``, also set while the
    caller's own event (``outer``) is set; setting this one leaves the caller's alone."""

    __slots__ = ("_own", "_outer")

    def __init__(self, outer: Any = None) -> None:
        self._own = threading.Event()
        self._outer = outer

    def is_set(self) -> bool:
        return self._own.is_set() or (self._outer is not None and self._outer.is_set())

    def set(self) -> None:
        self._own.set()


def _deliver(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> bool:
    """Run ``fn(*args)`` in the loop's thread; False once the loop is gone."""
    try:
        loop.call_soon_threadsafe(fn, *args)
        return True
    except RuntimeError:  # the loop was closed: nobody is waiting any more
        return False


def _settle(fut: asyncio.Future, ok: bool, value: Any) -> None:
    if not fut.done():
        fut.set_result(value) if ok else fut.set_exception(value)


async def call_in_thread(fn: Callable[[], T], cancel: CancelEvent) -> T:
    """``await`` ``fn()`` run in a new thread; cancelling the awaiting task sets ``cancel``
    (``fn`` is expected to end soon after) and does not wait for the thread."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future = loop.create_future()

    def work() -> None:
        try:
            value = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting task
            _deliver(loop, _settle, fut, False, e)
        else:
            _deliver(loop, _settle, fut, True, value)

    threading.Thread(target=work, name="pyllama_ernie-call", daemon=True).start()
    try:
        return await fut
    except asyncio.CancelledError:
        cancel.set()
        raise


async def stream_in_thread(make: Callable[[], Iterator[T]], cancel: CancelEvent) -> AsyncIterator[T]:
    """``make()`` (which checks its arguments and returns a blocking iterator) run in a new
    thread; returns once it returned, raising what it raised. The async iterator yields
    what the blocking one yields. Closing it early (``aclose()``, ``break`` out of
    ``async for``, a cancelled task) sets ``cancel``: the blocking iterator then ends
    within one token."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue = asyncio.Queue()
    ready: asyncio.Future = loop.create_future()
    done = object()

    def work() -> None:
        try:
            it = make()
        except BaseException as e:  # noqa: BLE001 - raised by the await below
            _deliver(loop, _settle, ready, False, e)
            return
        if not _deliver(loop, _settle, ready, True, None):
            cancel.set()
        try:
            for item in it:
                if not _deliver(loop, items.put_nowait, (True, item)):
                    cancel.set()
        except BaseException as e:  # noqa: BLE001 - raised by the async iterator
            _deliver(loop, items.put_nowait, (False, e))
        finally:
            _deliver(loop, items.put_nowait, (True, done))

    threading.Thread(target=work, name="pyllama_ernie-stream", daemon=True).start()
    try:
        await ready
    except asyncio.CancelledError:
        cancel.set()
        raise

    async def agen() -> AsyncIterator[T]:
        try:
            while True:
                ok, item = await items.get()
                if not ok:
                    raise item
                if item is done:
                    return
                yield item
        finally:
            cancel.set()  # a no-op once the stream ended on its own

    return agen()
