"""Stream an answer into a GUI-style token callback, with a Cancel button, without a GUI toolkit.

Run (with pyllama_ernie installed; in a source checkout built in place, prefix PYTHONPATH=.)::

    python examples/gui_streaming.py MODEL.gguf
    python examples/gui_streaming.py MODEL.gguf --prompt "Tell me a long story" --cancel-after 2
    python examples/gui_streaming.py MODEL.gguf --mmproj MMPROJ.gguf --image photo.jpg --prompt "What is this?"

The shape is the one a Tk/Qt/GTK application needs:

* generation must not block the UI, so a **worker thread** runs
  ``Model.create_chat_completion(..., stream=True)`` and puts every piece into a
  ``queue.Queue``;
* the **UI loop** (here the main thread; in an application the toolkit's event loop,
  polling the queue from a timer such as Tk's ``after`` or a ``QTimer``) takes the pieces
  off the queue and calls ``on_token(piece)``, which would append to a text widget;
* the **Cancel button** is simulated by a UI timer that "clicks" it after
  ``--cancel-after`` seconds; its handler calls ``model.cancel()`` from the UI thread.
  Generation then ends within one token and the last chunk says
  ``finish_reason == "cancelled"``.

The handler also sets the ``threading.Event`` given to the call as ``cancel=``:
``model.cancel()`` stops the decoding that is running *now* (a click while the prompt is
still being evaluated interrupts that too, and the call raises ``DecodeError``), but a
click that comes before decoding starts (say, while an image is being encoded) would be
forgotten; the event is remembered and ends generation before its first token.

``--chat-template FILE`` (alias ``--chat-template-file``, as in ``python -m pyllama_ernie
chat``) replaces the chat template stored in the GGUF, e.g. for the tiny test models of
``examples/make_tiny_models.py``, whose template takes no image parts. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import queue
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional

import pyllama_ernie as pe


# --- the "widgets": what a GUI would do with each event ----------------------------------------

class FakeWindow:
    """Stands in for a window with a text area, a status bar and a Cancel button."""

    def __init__(self) -> None:
        self.field: Optional[str] = None
        self.n_pieces = 0

    def on_token(self, piece: str, field: str = "content") -> None:
        """Append a piece of the answer (a GUI would insert it into a text widget)."""
        if field != self.field:
            print(("\n" if self.field else "") + ("[reasoning] " if field == "reasoning_content" else "[answer] "),
                  end="")
            self.field = field
        self.n_pieces += 1
        print(piece, end="", flush=True)

    def on_done(self, finish_reason: str, usage: Optional[Dict[str, Any]]) -> None:
        print()
        extra = ""
        if usage:
            extra = f", {usage['completion_tokens']} tokens, {usage['prompt_tokens_evaluated']} prompt tokens evaluated"
        self.status(f"finished: finish_reason={finish_reason!r}{extra}")

    def on_error(self, error: BaseException) -> None:
        print()
        self.status(f"error: {error}")

    def status(self, text: str) -> None:
        print(f"[status] {text}", file=sys.stderr, flush=True)


# --- the worker thread ------------------------------------------------------------------------

def generate_in_background(model: pe.Model, messages: List[Dict[str, Any]], events: "queue.Queue[tuple]",
                           cancel: threading.Event, **kwargs: Any) -> threading.Thread:
    """Start a thread that streams the answer into ``events``; it never touches the UI itself."""

    def work() -> None:
        try:
            for chunk in model.create_chat_completion(messages, stream=True, cancel=cancel, **kwargs):
                choice = chunk["choices"][0]
                for field in ("reasoning_content", "content"):
                    text = choice["delta"].get(field)
                    if text:
                        events.put(("token", text, field))
                if choice["finish_reason"] is not None:
                    events.put(("done", choice["finish_reason"], chunk.get("usage")))
        except pe.DecodeError as e:
            if cancel.is_set():  # the click interrupted the prompt evaluation itself
                events.put(("done", "cancelled", None))
            else:
                events.put(("error", e))
        except Exception as e:  # report to the UI instead of dying silently in a thread
            events.put(("error", e))

    t = threading.Thread(target=work, name="generation", daemon=True)
    t.start()
    return t


# --- the UI loop (main thread) ------------------------------------------------------------------

def ui_loop(window: FakeWindow, events: "queue.Queue[tuple]", timers: List[list], tick: float = 0.02) -> bool:
    """A minimal event loop: run due timers, then drain the queue, until generation is done.

    ``timers`` holds ``[due_time, callback]`` pairs, like ``root.after(ms, callback)``.
    Returns False when generation failed.
    """
    while True:
        now = time.monotonic()
        for timer in list(timers):
            if timer[0] <= now:
                timers.remove(timer)
                timer[1]()
        try:
            event = events.get(timeout=tick)
        except queue.Empty:
            continue  # a real loop would repaint, handle input, ...
        while True:
            kind = event[0]
            if kind == "token":
                window.on_token(event[1], event[2])
            elif kind == "done":
                window.on_done(event[1], event[2])
                return True
            elif kind == "error":
                window.on_error(event[1])
                return False
            try:
                event = events.get_nowait()  # take everything queued before repainting
            except queue.Empty:
                break


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Worker-thread streaming into a UI callback, with cancellation.")
    ap.add_argument("model", help="the model .gguf")
    ap.add_argument("--mmproj", help="the vision projector .gguf (ERNIE-4.5-VL), needed for --image")
    ap.add_argument("--image", help="an image to ask about (needs --mmproj)")
    ap.add_argument("--prompt", default="Tell me a long story about a fox.")
    ap.add_argument("--cancel-after", type=float, default=3.0, metavar="SECONDS",
                    help="click Cancel after this many seconds (default 3; 0 = never)")
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--chat-template", "--chat-template-file", metavar="FILE",
                    help="a jinja chat template to use instead of the GGUF's")
    args = ap.parse_args(argv)
    if args.image and not args.mmproj:
        ap.error("--image needs --mmproj")

    template = open(args.chat_template, encoding="utf-8").read() if args.chat_template else None
    content: Any = args.prompt
    if args.image:
        content = [{"type": "image", "image": args.image}, {"type": "text", "text": args.prompt}]
    messages = [{"role": "user", "content": content}]

    window = FakeWindow()
    try:
        model = pe.Model(args.model, mmproj_path=args.mmproj, n_ctx=args.n_ctx, n_threads=args.threads,
                         n_gpu_layers=args.n_gpu_layers)
    except (pe.ErnieError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    with model:
        events: "queue.Queue[tuple]" = queue.Queue()
        cancel = threading.Event()

        def on_cancel_clicked() -> None:  # the Cancel button's handler, run by the UI loop
            window.status("Cancel clicked")
            cancel.set()    # remembered, even if decoding has not started yet
            model.cancel()  # stops a decode in progress, within one token

        timers: List[list] = []
        if args.cancel_after > 0:
            timers.append([time.monotonic() + args.cancel_after, on_cancel_clicked])
        worker = generate_in_background(model, messages, events, cancel, max_tokens=args.max_tokens,
                                        temperature=args.temperature, seed=args.seed, chat_template=template)
        ok = ui_loop(window, events, timers)
        worker.join()  # finished: the model can be closed safely
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
