"""``python -m pyllama_ernie``: run, chat, bench, convert, quantize, info, selfcheck, system-info.

Exit codes: 0 success, 1 runtime error (one line on stderr), 2 usage error,
130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import signal
import sys
import threading
from typing import Any, Callable, TextIO

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # usage errors: exit 2, one line
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _progress_bar(label: str) -> Callable[[float], bool]:
    """A one-line progress bar on stderr (only when stderr is a terminal)."""
    tty = sys.stderr.isatty()
    last = [-1]

    def update(frac: float) -> bool:
        pct = int(frac * 100)
        if tty and pct != last[0]:
            last[0] = pct
            filled = pct * 30 // 100
            sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (30 - filled)}] {pct:3d}%")
            if pct >= 100:
                sys.stderr.write("\n")
            sys.stderr.flush()
        return True

    return update


def _media_prompt(prompt: str, n_images: int, n_videos: int) -> str:
    """Put markers for the given images and videos first, unless the prompt already places them."""
    from .multimodal import IMAGE_MARKER, VIDEO_MARKER

    if (n_images or n_videos) and IMAGE_MARKER not in prompt and VIDEO_MARKER not in prompt:
        prompt = VIDEO_MARKER * n_videos + IMAGE_MARKER * n_images + prompt
    return prompt


def _check_files(args: argparse.Namespace) -> None:
    """Fail fast on a missing or broken model or projector file, before the slow load."""
    from .model import check_gguf_file

    check_gguf_file(args.model, role="model")
    if args.mmproj:
        if not os.path.exists(os.path.expanduser(args.mmproj)):
            raise FileNotFoundError(f"no such projector file (--mmproj): {args.mmproj}")
        check_gguf_file(args.mmproj, role="mmproj")


def _cmd_run(args: argparse.Namespace) -> int:
    from .model import Model

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    _safe_output(sys.stdout)
    images, videos = args.image or [], args.video or []
    if (images or videos) and not args.mmproj:
        raise ValueError("--image and --video need --mmproj (the model's vision projector file)")
    _check_files(args)
    prompt = _media_prompt(prompt, len(images), len(videos))
    with Model(args.model, n_ctx=args.n_ctx, n_threads=args.threads, seed=args.seed,
               progress=_progress_bar("loading"), mmproj_path=args.mmproj, **_device_kwargs(args)) as model:
        for piece in model.stream(prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                                  repeat_penalty=args.repeat_penalty, stop=args.stop or None,
                                  images=images, videos=videos):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


# --- chat ----------------------------------------------------------------------------------------

_CHAT_HELP = """commands:
  /image PATH  attach an image to your next message (needs --mmproj)
  /reset       forget the conversation and the attached images
  /help        show this help
  /exit        quit (also end of input, Ctrl-D)
Ctrl-C stops an answer; Ctrl-C twice at the prompt quits."""


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _safe_output(stream: TextIO) -> None:
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


class _ChatSession:
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
            self.note(_CHAT_HELP)
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
            self.note(f"error: {_one_line(e)}")
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
                self.note(f"error: {_one_line(error)}")
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


def _cmd_chat(args: argparse.Namespace) -> int:
    from .model import Model

    template = None
    if args.chat_template_file:
        with open(args.chat_template_file, encoding="utf-8") as f:
            template = f.read()
    _check_files(args)
    _safe_output(sys.stdout)
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C is how a chat stops an answer and exits; a process started with SIGINT ignored
        # (a background job of a script) inherits that, and Ctrl-C / kill -INT would do nothing.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    with Model(args.model, n_ctx=args.n_ctx, n_threads=args.threads, seed=args.seed,
               progress=_progress_bar("loading"), mmproj_path=args.mmproj, **_device_kwargs(args)) as model:
        if template is None and not model.chat_template:
            raise ValueError(f"this model has no chat template ({args.model}); "
                             "give one with --chat-template-file, or use 'run'")
        from ._lib import logger

        level = logger.level
        if not args.log_level:
            # llama.cpp's log lines (e.g. about a cancelled decode) would land in the conversation;
            # its errors still reach the user, as the one-line errors of the turns that failed
            logger.setLevel(logging.CRITICAL)
        try:
            return _ChatSession(model, args, template, sys.stdin, sys.stdout, sys.stderr).run()
        finally:
            logger.setLevel(level)


def _cmd_info(args: argparse.Namespace) -> int:
    from .info import gguf_summary

    summary = gguf_summary(args.model)
    if args.json:
        print(json.dumps(summary, indent=1, default=str))
    else:
        for k, v in summary.items():
            print(f"{k:24s} {v}")
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from .quantize import quantize

    quantize(args.input, args.output, args.type, n_threads=args.threads)
    print(f"wrote {args.output}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .convert.cli import main as convert_main

    return convert_main(args.convert_args)


def _cmd_selfcheck(args: argparse.Namespace) -> int:
    from .selfcheck import run_selfcheck

    return 0 if run_selfcheck(verbose=args.verbose) else 1


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    if args.image and not args.mmproj:
        raise ValueError("--image needs --mmproj (the model's vision projector file)")
    _check_files(args)
    log = (lambda msg: print(f"bench: {msg}", file=sys.stderr, flush=True)) if not args.quiet else None
    result = run_bench(args.model, mmproj_path=args.mmproj, images=args.image, n_threads=args.threads,
                       repetitions=args.repetitions, n_prompt=args.n_prompt, n_gen=args.n_gen, log=log,
                       **_device_kwargs(args))
    if args.json:
        print(json.dumps(result.to_dict(), indent=1, default=str))
    else:
        print(result.format())
    return 0


def _cmd_system(args: argparse.Namespace) -> int:
    from .system import system_info

    print(json.dumps(system_info(), indent=1))
    return 0


def _add_generation_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("-n", "--max-tokens", type=int, default=max_tokens,
                   help=f"the most tokens of an answer (default {max_tokens})")
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding (default 0.8)")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("-c", "--n-ctx", type=int, default=4096, help="context size in tokens (default 4096)")
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("--mmproj", default=None, help="the vision projector .gguf of an ERNIE-4.5-VL model")
    _add_device_args(p)


def _add_device_args(p: argparse.ArgumentParser) -> None:
    from .offload import SPLIT_MODES

    g = p.add_argument_group("devices (GPU builds)")
    g.add_argument("-ngl", "--n-gpu-layers", type=int, default=0, help="layers on the GPU (-1 = all; default 0)")
    g.add_argument("--main-gpu", type=int, default=0, help="the GPU index for the model (split mode none) or "
                                                           "for intermediate results (default 0)")
    g.add_argument("--tensor-split", type=_floats, default=None, metavar="P0,P1,...",
                   help="proportions of the model per GPU, e.g. 3,1")
    g.add_argument("--split-mode", choices=list(SPLIT_MODES), default="layer",
                   help="how to spread the model over several GPUs (default layer)")
    g.add_argument("--cpu-moe", action="store_true", help="keep all MoE expert weights in CPU memory")
    g.add_argument("--n-cpu-moe", type=int, default=None, metavar="N",
                   help="keep the MoE expert weights of the first N layers in CPU memory")
    g.add_argument("--flash-attn", action=argparse.BooleanOptionalAction, default=None,
                   help="force flash attention on or off (default: llama.cpp decides)")
    g.add_argument("--mmproj-offload", action=argparse.BooleanOptionalAction, default=None,
                   help="run the vision encoder on the GPU (default: when layers are offloaded)")


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.replace("/", ",").split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, not {text!r}") from None


def _device_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The Model keyword arguments of the device options."""
    if args.cpu_moe and args.n_cpu_moe is not None:
        raise ValueError("--cpu-moe and --n-cpu-moe exclude each other")
    return dict(n_gpu_layers=args.n_gpu_layers, main_gpu=args.main_gpu, tensor_split=args.tensor_split,
                split_mode=args.split_mode, cpu_moe=True if args.cpu_moe else (args.n_cpu_moe or 0),
                flash_attn=args.flash_attn, mmproj_gpu=args.mmproj_offload)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m pyllama_ernie", description="Run ERNIE 4.5 models from GGUF files.")
    ap.add_argument("--log-level", default=None, help="show llama.cpp logs at this level (DEBUG, INFO, WARNING, ...)")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    r = sub.add_parser("run", help="generate from a prompt, streaming to stdout")
    r.add_argument("model", help="the model .gguf file")
    r.add_argument("prompt", nargs="?", help="the prompt (default: read stdin)")
    _add_generation_args(r, max_tokens=256)
    r.add_argument("--image", action="append", metavar="PATH",
                   help="an image (repeatable); placed at the prompt's image markers, else before the prompt")
    r.add_argument("--video", action="append", nargs="+", metavar="FRAME",
                   help="a video as its frame image files (repeatable)")
    r.set_defaults(func=_cmd_run)

    ch = sub.add_parser("chat", help="chat with a model interactively (lines from stdin, answers on stdout)",
                        description="Chat with a model: each line of stdin is a user message, answered on\n"
                                    "stdout through the model's chat template.\n\n" + _CHAT_HELP,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ch.add_argument("model", help="the model .gguf file")
    ch.add_argument("--system", default=None, metavar="TEXT", help="a system message opening the conversation")
    ch.add_argument("--think", action=argparse.BooleanOptionalAction, default=None,
                    help="turn the template's thinking on (and print the reasoning between [thinking] lines) "
                         "or off (default: the template's default)")
    ch.add_argument("--chat-template-file", default=None, metavar="FILE",
                    help="a Jinja chat template to use instead of the model's")
    _add_generation_args(ch, max_tokens=512)
    ch.set_defaults(func=_cmd_chat)

    b = sub.add_parser("bench", help="measure prompt processing, generation, image encoding, memory and bandwidth",
                       description="Measure a model: prompt processing (tok/s), generation (tok/s), the host time "
                                   "per token, image encoding and time to first token (with --mmproj), peak "
                                   "memory, and the machine's read bandwidth in the same run. Figures are the "
                                   "median (min..max) of the repetitions.")
    b.add_argument("model", help="the model .gguf file")
    b.add_argument("--mmproj", default=None, help="the vision projector .gguf (adds image encode and ttft)")
    b.add_argument("--image", action="append", metavar="PATH",
                   help="an image to encode (repeatable; default: synthetic 448x448 and 896x896)")
    b.add_argument("-r", "--repetitions", type=int, default=5)
    b.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt tokens (default 512)")
    b.add_argument("-n", "--n-gen", type=int, default=128, help="generated tokens (default 128)")
    b.add_argument("-t", "--threads", type=int, default=None)
    _add_device_args(b)
    b.add_argument("--json", action="store_true", help="print the results as JSON")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    b.set_defaults(func=_cmd_bench)

    c = sub.add_parser("convert", help="convert a Hugging Face checkpoint to GGUF", add_help=False)
    c.add_argument("convert_args", nargs=argparse.REMAINDER)
    c.set_defaults(func=_cmd_convert)

    q = sub.add_parser("quantize", help="quantize a GGUF file (Q8_0, Q4_K_M, Q5_K_M, ...)")
    q.add_argument("input")
    q.add_argument("output")
    from .quantize import QUANT_TYPES

    q.add_argument("type", type=str.upper, choices=list(QUANT_TYPES), metavar="TYPE",
                   help=f"target type: {', '.join(QUANT_TYPES)}")
    q.add_argument("-t", "--threads", type=int, default=0)
    q.set_defaults(func=_cmd_quantize)

    i = sub.add_parser("info", help="summarise a GGUF file's metadata")
    i.add_argument("model")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_cmd_info)

    s = sub.add_parser("selfcheck", help="check that the install works (tiny models, no download)")
    s.add_argument("-v", "--verbose", action="store_true")
    s.set_defaults(func=_cmd_selfcheck)

    y = sub.add_parser("system-info", help="print the build and system information as JSON")
    y.set_defaults(func=_cmd_system)
    return ap


def _split_global(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the --log-level value, the arguments from the subcommand on)."""
    level, i = None, 0
    while i < len(argv):
        if argv[i] == "--log-level" and i + 1 < len(argv):
            level, i = argv[i + 1], i + 2
        elif argv[i].startswith("--log-level="):
            level, i = argv[i].partition("=")[2], i + 1
        else:
            break
    return level, argv[i:]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    level, rest = _split_global(argv)
    if rest[:1] == ["convert"]:  # the converter has its own parser (and --help)
        from .convert.cli import main as convert_main

        func: Callable[[], Any] = lambda: convert_main(rest[1:])
    else:
        args = build_parser().parse_args(argv)
        level = args.log_level
        func = lambda: args.func(args)
    from . import errors
    from ._lib import set_log_level

    try:
        if level:
            set_log_level(level)
        return int(func() or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (errors.ErnieError, OSError, ValueError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
