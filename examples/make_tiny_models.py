"""Write tiny random-weight models, two test images and a chat template, to try the examples offline.

Run::

    python examples/make_tiny_models.py OUTDIR

writes into OUTDIR (made if missing):

* ``text.gguf``: a tiny ``ernie4_5`` text model (its GGUF has a text-only chat template);
* ``vl.gguf`` + ``mmproj.gguf``: a tiny ERNIE-4.5-VL language model and its vision projector;
* ``a.png``, ``b.png``: two small random images (84x56 and 56x84 pixels: 6 image tokens each);
* ``vl_template.jinja``: a chat template with ERNIE-4.5-VL's structure that takes image parts
  (``Picture N:<|IMAGE_START|>...<|IMAGE_END|>``, thinking prefill), for ``--chat-template``.

The weights are random, so the models write gibberish; they exercise every code path in a
second. For example::

    python examples/describe_image.py OUTDIR/vl.gguf OUTDIR/mmproj.gguf OUTDIR/a.png \\
        --chat-template OUTDIR/vl_template.jinja --max-tokens 16 --n-ctx 1024

Needs only numpy, gguf and Pillow (no torch, no download).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from pyllama_ernie.convert.synthetic import VL_CHAT_TEMPLATE as VL_TEMPLATE
from pyllama_ernie.convert.synthetic import write_tiny_gguf, write_tiny_mmproj


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write tiny random models and test images for the examples.")
    ap.add_argument("outdir", type=Path)
    args = ap.parse_args(argv)
    out: Path = args.outdir
    out.mkdir(parents=True, exist_ok=True)

    from PIL import Image

    written = [
        write_tiny_gguf("ernie4_5", out / "text.gguf"),
        write_tiny_gguf("ernie4_5-vl-moe", out / "vl.gguf"),
        write_tiny_mmproj(out / "mmproj.gguf", n_embd_text=64),  # the tiny VL model's width
    ]
    rng = np.random.default_rng(0)
    for name, (h, w) in (("a.png", (56, 84)), ("b.png", (84, 56))):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(out / name)
        written.append(out / name)
    (out / "vl_template.jinja").write_text(VL_TEMPLATE, encoding="utf-8")
    written.append(out / "vl_template.jinja")
    for p in written:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
