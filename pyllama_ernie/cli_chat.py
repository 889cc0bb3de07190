"""The interactive chat of ``python -m pyllama_ernie chat``: a REPL over :meth:`Model.create_chat_completion`.

Answers stream as they are generated; Ctrl-C stops an answer (a signal handler
cancels it, so no KeyboardInterrupt lands inside the loop), and Ctrl-C twice at
the prompt quits.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import threading
from typing import Any, TextIO

__all__ = ["ChatSession", "CHAT_HELP", "one_line", "safe_output"]



CHAT_HELP = """commands:
  /image PATH  attach an image to your next message (needs --mmproj)
  /reset       forget the conversation and the attached images
  /help        show this help
  /exit        quit (also end of input, Ctrl-D)
Ctrl-C stops an answer; Ctrl-C twice at the prompt quits."""


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def safe_output(stream: TextIO) -> None:
    """Model output may hold characters the terminal's encoding cannot show: replace them."""
    reconfigure = getattr(stream, "reconfigure", None)
    if reconfigure is not None:
        try:
            reconfigure(errors="replace")
        except (ValueError, OSError):  # pragma: no cover - a stream that cannot change
            pass


class _AnswerPrinter:
    """Writes one streamed answer: content as is, reasoning (only when shown) inside [thinking] lines."""

    def __init__(self, out: TextIO, show_thinking: bool) -> None:
        self.out = out
        self.show_thinking = show_thinking
        self.in_thinking = False
        self.last = "\n"
        self.content: list[str] = []

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()
            self.last = text[-1]

    def reasoning(self, text: str) -> None:
        if not self.show_thinking or not text:
            return
        if not self.in_thinking:
            self._write("" if self.last == "\n" else "\n")
            self._write("[thinking]\n")
            self.in_thinking = True
        self._write(text)

    def answer(self, text: str) -> None:
        if not text:
            return
        self._close_thinking()
        self.content.append(text)
        self._write(text)

    def _close_thinking(self) -> None:
        if self.in_thinking:
            self._write("" if self.last == "\n" else "\n")
            self._write("[/thinking]\n")
            self.in_thinking = False

    def end(self) -> None:
        """End the answer's line (an empty answer is an empty line, unless its thinking was shown)."""
        shown_thinking = self.in_thinking
        self._close_thinking()
        if self.content or not shown_thinking:
            self._write("\n")


class ChatSession:
    """The interactive loop of ``python -m pyllama_ernie chat``."""

    def __init__(self, model: Any, args: argparse.Namespace, chat_template: str | None,
                 stdin: TextIO, stdout: TextIO, stderr: TextIO) -> None:
        self.model = model
        self.args = args
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.gen_kwargs: dict[str, Any] = {
            "max_tokens": args.max_tokens, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
            "min_p": args.min_p, "repeat_penalty": args.repeat_penalty, "stop": args.stop or None,
            "enable_thinking": args.think, "chat_template": chat_template,
        }
        self.history: list[dict[str, Any]] = []
        self.images: list[str] = []
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.args.system}] if self.args.system else []
        self.images = []

    def note(self, text: str) -> None:
        print(text, file=self.stderr, flush=True)

    def run(self) -> int:
        tty = self.stdin.isatty()
        if tty:
            self.note(f"chatting with {self.model.path.name}; /help lists the commands, /exit quits")
        interrupted = False  # the last thing was a Ctrl-C (at the prompt, or cancelling an answer)
        while True:
            try:
                if tty:
                    self.stderr.write("> ")
                    self.stderr.flush()
                line = self.stdin.readline()
                if not line:  # end of input
                    if tty:
                        self.note("")
                    return 0
                interrupted = False
                text = line.rstrip("\r\n")
                if not text.strip():
                    continue
                if text.startswith("/"):
                    code = self.command(text.strip())
                    if code is not None:
                        return code
                    continue
                interrupted = self.answer(text)
            except KeyboardInterrupt:  # at the prompt (an answer handles its own)
                if interrupted:
                    self.note("")
                    return 130
                interrupted = True
                self.note("\n(Ctrl-C again or /exit to quit)")

    def command(self, text: str) -> int | None:
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return 0
        if name == "/help":
            self.note(CHAT_HELP)
        elif name == "/reset":
            self.reset()
            self.note("(conversation cleared)")
        elif name == "/image":
            self.attach(arg)
        else:
            self.note(f"error: unknown command {name!r}; /help lists the commands")
        return None

    def attach(self, arg: str) -> None:
        if self.model.projector is None:
            self.note("error: /image needs a vision model started with --mmproj (its projector file)")
            return
        if len(arg) >= 2 and arg[0] == arg[-1] and arg[0] in "\"'":
            arg = arg[1:-1]
        if not arg:
            self.note("error: usage: /image PATH")
            return
        path = os.path.abspath(os.path.expanduser(arg))
        if not os.path.isfile(path):
            self.note(f"error: no such image file: {arg}")
            return
        from .images import load_image

        try:
            load_image(path)  # catch unreadable files now, not at the next message
        except (ValueError, OSError) as e:
            self.note(f"error: {one_line(e)}")
            return
        self.images.append(path)
        n = len(self.images)
        self.note(f"(image attached: {os.path.basename(path)}; {n} for the next message)")

    def answer(self, text: str) -> bool:
        """Answer one user message; returns whether it was cancelled with Ctrl-C."""
        from .errors import DecodeError, ErnieError

        content: Any = text
        if self.images:
            content = [{"type": "image", "image": p} for p in self.images] + [{"type": "text", "text": text}]
        user = {"role": "user", "content": content}
        messages = self.history + [user]
        cancel = threading.Event()
        items: queue.Queue[tuple[str, Any]] = queue.Queue()

        def work() -> None:
            try:
                for chunk in self.model.create_chat_completion(messages, stream=True, cancel=cancel,
                                                               **self.gen_kwargs):
                    items.put(("chunk", chunk))
            except Exception as e:  # noqa: BLE001 - handed to the main thread, which decides
                items.put(("error", e))
            items.put(("done", None))

        def stop_answer(*_: Any) -> None:  # Ctrl-C: the worker ends within a token
            cancel.set()
            self.model.cancel()

        # While the answer runs, Ctrl-C calls stop_answer instead of raising KeyboardInterrupt,
        # which could land anywhere in this loop (inside the queue's lock, or in an except clause).
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, stop_answer) if main else None
        printer = _AnswerPrinter(self.stdout, self.args.think is True)
        worker = threading.Thread(target=work, name="pyllama-ernie-chat", daemon=True)
        finish: str | None = None
        usage: dict[str, Any] = {}
        error: BaseException | None = None
        started = False  # the answer began (its first chunk came)
        try:
            worker.start()
            while True:
                try:
                    kind, item = items.get(timeout=0.25)
                except queue.Empty:
                    continue
                except KeyboardInterrupt:  # not from the main thread, or a handler of another signal
                    stop_answer()
                    continue
                if kind == "done":
                    break
                if kind == "error":
                    error = item
                    continue
                started = True
                choice = item["choices"][0]
                delta = choice.get("delta") or {}
                printer.reasoning(delta.get("reasoning_content") or "")
                printer.answer(delta.get("content") or "")
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
                    usage = item.get("usage") or {}
            worker.join()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        if started:
            printer.end()
        if error is not None and self.images:
            self.images = []  # an image may be what failed
            self.note("(the attached images were dropped; /image attaches them again)")
        if error is not None:
            if cancel.is_set() and isinstance(error, DecodeError):
                self.note("(cancelled)")
                return True
            if isinstance(error, (ErnieError, OSError, ValueError)):
                self.note(f"error: {one_line(error)}")
                if isinstance(error, DecodeError):
                    self.note("(/reset starts a new conversation)")
                return cancel.is_set()
            raise error
        self.history += [user, {"role": "assistant", "content": "".join(printer.content)}]
        self.images = []
        if finish == "cancelled" or cancel.is_set():
            self.note("(cancelled)")
            return True
        if finish == "length":
            if usage.get("completion_tokens", 0) >= self.args.max_tokens:
                self.note(f"(the answer reached the -n limit of {self.args.max_tokens} tokens)")
            else:
                self.note("(the context is full; /reset starts a new conversation)")
        return False
