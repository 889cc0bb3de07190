"""Command line for the converter: ``convert HF_DIR -o OUT.gguf --outtype f16``.

For an ERNIE 4.5 VL checkpoint the vision encoder is written too, as an mmproj file beside
the model (``mmproj-OUT.gguf``), or at ``--mmproj PATH``; ``--no-mmproj`` skips it.

``main(argv)`` returns the exit status: 0 done, 1 conversion failed (one-line
message on stderr), 2 bad usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from . import OUTTYPES, ConversionError, convert_checkpoint

__all__ = ["build_parser", "main"]


def build_parser(prog: str = "python -m pyllama_ernie convert") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=prog,
        description="Convert a Hugging Face ERNIE 4.5 checkpoint (safetensors) to a GGUF file; "
                    "for ERNIE 4.5 VL, also its vision encoder to an mmproj GGUF file.",
    )
    ap.add_argument("hf_dir", type=Path, help="folder with config.json, *.safetensors and the tokenizer files")
    ap.add_argument(
        "-o", "--outfile", type=Path, default=None,
        help="output .gguf file (default: <folder name>-<outtype>.gguf in the current folder)",
    )
    ap.add_argument(
        "--outtype", default="f16", type=str.lower, choices=list(OUTTYPES),
        help="tensor type (norms, routers and biases stay f32); default f16",
    )
    mm = ap.add_mutually_exclusive_group()
    mm.add_argument(
        "--mmproj", type=Path, default=None, metavar="MMPROJ.gguf",
        help="VL models: where to write the vision encoder (default: mmproj-<output file name> beside it)",
    )
    mm.add_argument("--no-mmproj", action="store_true", help="VL models: write the language model only")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    return ap


class _Progress:
    """A one-line progress bar per output file on a terminal; silent otherwise."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.tty = stream.isatty()
        self.last = 0.0

    def __call__(self, done: int, total: int, name: str) -> None:
        if not self.tty:
            return
        now = time.monotonic()
        if done < total and now - self.last < 0.1:
            return
        self.last = now
        width = 30
        fill = width * done // max(total, 1)
        label = "mmproj" if name.startswith(("v.", "mm.")) else "model "  # mmproj tensors: v.* and mm.*
        self.stream.write(f"\r{label} [{'#' * fill}{'.' * (width - fill)}] {done}/{total} {name[:40]:<40}")
        if done == total:
            self.stream.write("\n")
        self.stream.flush()


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2)
        return int(e.code or 0)
    out = args.outfile or Path(f"{args.hf_dir.resolve().name}-{args.outtype}.gguf")
    mmproj = False if args.no_mmproj else args.mmproj
    logging.getLogger("gguf").setLevel(logging.WARNING)
    progress = None if args.quiet else _Progress(sys.stderr)
    try:
        paths = convert_checkpoint(args.hf_dir, out, args.outtype, progress=progress, mmproj_path=mmproj)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; no file written", file=sys.stderr)
        return 130
    for path in paths:
        if path is not None:
            size = path.stat().st_size
            print(f"wrote {path} ({size / 2**20:.1f} MiB, {args.outtype})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
