"""``python -m pyllama_ernie``: run, chat, serve, bench, convert, quantize, info, selfcheck, system-info.

Exit codes: 0 success, 1 runtime error (one line on stderr), 2 usage error,
130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from typing import Any, Callable

from .cli_chat import CHAT_HELP, ChatSession, one_line, safe_output

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
    from .values import IMAGE_MARKER, VIDEO_MARKER

    if (n_images or n_videos) and IMAGE_MARKER not in prompt and VIDEO_MARKER not in prompt:
        prompt = VIDEO_MARKER * n_videos + IMAGE_MARKER * n_images + prompt
    return prompt


def _check_files(args: argparse.Namespace) -> None:
    """Fail fast on a missing or broken model or projector file, before the slow load."""
    from .gguf_check import check_gguf_file

    check_gguf_file(args.model, role="model")
    if args.mmproj:
        if not os.path.exists(os.path.expanduser(args.mmproj)):
            raise FileNotFoundError(f"no such projector file (--mmproj): {args.mmproj}")
        check_gguf_file(args.mmproj, role="mmproj")


def _cmd_run(args: argparse.Namespace) -> int:
    from .model import Model

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    safe_output(sys.stdout)
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


def _cmd_chat(args: argparse.Namespace) -> int:
    from .model import Model

    template = None
    if args.chat_template_file:
        with open(args.chat_template_file, encoding="utf-8") as f:
            template = f.read()
    _check_files(args)
    safe_output(sys.stdout)
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
            return ChatSession(model, args, template, sys.stdin, sys.stdout, sys.stderr).run()
        finally:
            logger.setLevel(level)


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        from . import server
    except ImportError as e:  # starlette / uvicorn / httpx are an extra
        raise ValueError(f"serve needs the server extra ({e.name or e} is missing): "
                         "pip install 'pyllama_ernie[server]'") from None
    from .model import Model

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be from 0 to 65535, not {args.port}")
    if args.parallel < 1 or args.max_queue < 0:
        raise ValueError("--parallel must be >= 1 and --max-queue >= 0")
    if args.max_body_mb <= 0:
        raise ValueError("--max-body-mb must be > 0")
    if args.allow_local_media and not os.path.isdir(os.path.expanduser(args.allow_local_media)):
        raise ValueError(f"--allow-local-media: {args.allow_local_media!r} is not a directory")
    _check_files(args)
    if not args.api_key and not server.is_loopback(args.host):
        print(f"warning: serving on {args.host} without an API key: anyone who can reach this port can use the "
              "model; set --api-key (or PYLLAMA_ERNIE_API_KEY)", file=sys.stderr, flush=True)
    safe_output(sys.stdout)
    with Model(args.model, n_ctx=args.n_ctx, n_threads=args.threads, seed=args.seed,
               progress=_progress_bar("loading"), mmproj_path=args.mmproj, n_parallel=args.parallel,
               max_queue=args.max_queue, **_device_kwargs(args)) as model:
        alias = args.model_alias or model.path.name

        def ready(url: str) -> None:
            print(f"listening on {url} (OpenAI base URL {url}/v1, model {alias!r}); Ctrl-C stops", flush=True)

        server.serve(model, host=args.host, port=args.port, ready=ready, alias=alias, api_key=args.api_key,
                     allow_remote_media=args.allow_remote_media, allow_local_media=args.allow_local_media,
                     cors_origins=args.cors_origin or (), max_body_bytes=int(args.max_body_mb * 1024 * 1024))
    print("stopped", file=sys.stderr)
    return 0


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
                                    "stdout through the model's chat template.\n\n" + CHAT_HELP,
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

    _add_serve_parser(sub)

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


def _add_serve_parser(sub: Any) -> None:
    sv = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                        description="Serve a model over an OpenAI-compatible HTTP API: /v1/chat/completions "
                                    "(text and images, streaming), /v1/completions, /v1/models, /health and "
                                    "/metrics. Needs the server extra: pip install 'pyllama_ernie[server]'. "
                                    "See docs/serving.md.")
    sv.add_argument("model", help="the model .gguf file")
    sv.add_argument("--mmproj", default=None, help="the vision projector .gguf of an ERNIE-4.5-VL model")
    sv.add_argument("--host", default="127.0.0.1",
                    help="the address to listen on (default 127.0.0.1: this machine only; for others, set --api-key)")
    sv.add_argument("--port", type=int, default=8080, help="the port (default 8080; 0 picks a free one)")
    sv.add_argument("-np", "--parallel", type=int, default=1,
                    help="requests generated together, continuously batched (default 1)")
    sv.add_argument("--max-queue", type=int, default=64,
                    help="requests that may wait for a free slot; more get 429 (default 64)")
    sv.add_argument("-c", "--ctx-size", "--n-ctx", dest="n_ctx", type=int, default=4096,
                    help="context window of each request in tokens (default 4096)")
    sv.add_argument("-t", "--threads", type=int, default=None)
    sv.add_argument("--seed", type=int, default=None, help="the seed of requests that give none (default random)")
    sv.add_argument("--api-key", default=os.environ.get("PYLLAMA_ERNIE_API_KEY") or None,
                    help="require 'Authorization: Bearer KEY' (default: $PYLLAMA_ERNIE_API_KEY; none: no key)")
    sv.add_argument("--model-alias", default=None, metavar="NAME",
                    help="the model's name in the API (default: the file name)")
    sv.add_argument("--allow-remote-media", action="store_true",
                    help="download http(s) image URLs given in messages (at most 20 MB, 30 s each)")
    sv.add_argument("--allow-local-media", default=None, metavar="DIR",
                    help="let messages name image files (paths or file:// URLs) inside DIR")
    sv.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                    help="allow browser pages from ORIGIN to call the API (repeatable; '*' for any)")
    sv.add_argument("--max-body-mb", type=float, default=32, help="the largest request body in MB (default 32)")
    _add_device_args(sv)
    sv.set_defaults(func=_cmd_serve)


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
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
