"""``python -m pyllama_ernie``: run, convert, quantize, info, selfcheck.

Exit codes: 0 success, 1 runtime error (one line on stderr), 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, List, Optional

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


def _cmd_run(args: argparse.Namespace) -> int:
    from .model import Model

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    images, videos = args.image or [], args.video or []
    if (images or videos) and not args.mmproj:
        raise ValueError("--image and --video need --mmproj (the model's vision projector file)")
    prompt = _media_prompt(prompt, len(images), len(videos))
    with Model(args.model, n_ctx=args.n_ctx, n_threads=args.threads, n_gpu_layers=args.n_gpu_layers,
               seed=args.seed, progress=_progress_bar("loading"), mmproj_path=args.mmproj) as model:
        for piece in model.stream(prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                                  repeat_penalty=args.repeat_penalty, stop=args.stop or None,
                                  images=images, videos=videos):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
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


def _cmd_system(args: argparse.Namespace) -> int:
    from .system import system_info

    print(json.dumps(system_info(), indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m pyllama_ernie", description="Run ERNIE 4.5 models from GGUF files.")
    ap.add_argument("--log-level", default=None, help="show llama.cpp logs at this level (DEBUG, INFO, WARNING, ...)")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    r = sub.add_parser("run", help="generate from a prompt, streaming to stdout")
    r.add_argument("model", help="the model .gguf file")
    r.add_argument("prompt", nargs="?", help="the prompt (default: read stdin)")
    r.add_argument("-n", "--max-tokens", type=int, default=256)
    r.add_argument("--temperature", type=float, default=0.8)
    r.add_argument("--top-k", type=int, default=40)
    r.add_argument("--top-p", type=float, default=0.95)
    r.add_argument("--min-p", type=float, default=0.05)
    r.add_argument("--repeat-penalty", type=float, default=1.0)
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--stop", action="append", help="stop string (repeatable)")
    r.add_argument("-c", "--n-ctx", type=int, default=4096)
    r.add_argument("-t", "--threads", type=int, default=None)
    r.add_argument("-ngl", "--n-gpu-layers", type=int, default=0)
    r.add_argument("--mmproj", default=None, help="the vision projector .gguf of an ERNIE-4.5-VL model")
    r.add_argument("--image", action="append", metavar="PATH",
                   help="an image (repeatable); placed at the prompt's image markers, else before the prompt")
    r.add_argument("--video", action="append", nargs="+", metavar="FRAME",
                   help="a video as its frame image files (repeatable)")
    r.set_defaults(func=_cmd_run)

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


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["convert"]:  # the converter has its own parser (and --help)
        from .convert.cli import main as convert_main

        return convert_main(argv[1:])
    args = build_parser().parse_args(argv)
    from . import errors
    from ._lib import set_log_level

    if args.log_level:
        set_log_level(args.log_level)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (errors.ErnieError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
