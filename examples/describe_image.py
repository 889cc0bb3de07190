"""Describe one image with an ERNIE-4.5-VL model, streaming the answer as it is written.

Run (with pyllama_ernie installed; in a source checkout built in place, prefix PYTHONPATH=.)::

    python examples/describe_image.py MODEL.gguf MMPROJ.gguf IMAGE
    python examples/describe_image.py MODEL.gguf MMPROJ.gguf photo.jpg --question "How many people are there?"
    python examples/describe_image.py MODEL.gguf MMPROJ.gguf photo.jpg --think      # show the reasoning too

MODEL.gguf is the language model, MMPROJ.gguf its vision projector (``python -m
pyllama_ernie convert`` writes both for an ERNIE-4.5-VL checkpoint). The answer is
streamed with ``Model.create_chat_completion(..., stream=True)``; text the model writes
inside ``<think>...</think>`` arrives as ``reasoning_content`` and is printed under a
``[reasoning]`` header, the answer under ``[answer]``.

``--chat-template FILE`` (alias ``--chat-template-file``, as in ``python -m pyllama_ernie
chat``) replaces the chat template stored in the GGUF, e.g. for the tiny test models of
``examples/make_tiny_models.py``, whose template takes no image parts. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys

import pyllama_ernie as pe


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Describe an image with ERNIE-4.5-VL (streamed).")
    ap.add_argument("model", help="the language model .gguf")
    ap.add_argument("mmproj", help="the vision projector (mmproj) .gguf")
    ap.add_argument("image", help="an image file (PNG, JPEG, WebP, ...)")
    ap.add_argument("--question", default="Describe this image.", help="what to ask about the image")
    ap.add_argument("--think", action="store_true", help="ask the model to reason first (enable_thinking=True)")
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--temperature", type=float, default=0.2)
    ap.add_argument("--n-ctx", type=int, default=8192, help="context window (image tokens count too)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--n-gpu-layers", type=int, default=0, help="-1 offloads every layer (GPU builds)")
    ap.add_argument("--chat-template", "--chat-template-file", metavar="FILE",
                    help="a jinja chat template to use instead of the GGUF's")
    args = ap.parse_args(argv)

    template = open(args.chat_template, encoding="utf-8").read() if args.chat_template else None
    messages = [{
        "role": "user",
        "content": [
            {"type": "image", "image": args.image},  # a path; bytes, PIL images and arrays work too
            {"type": "text", "text": args.question},
        ],
    }]
    try:
        with pe.Model(args.model, mmproj_path=args.mmproj, n_ctx=args.n_ctx, n_threads=args.threads,
                      n_gpu_layers=args.n_gpu_layers) as model:
            field = None  # which part of the answer is being printed
            final = None
            for chunk in model.create_chat_completion(
                    messages, stream=True, max_tokens=args.max_tokens, temperature=args.temperature,
                    enable_thinking=True if args.think else None, chat_template=template):
                choice = chunk["choices"][0]
                for name, label in (("reasoning_content", "[reasoning]"), ("content", "[answer]")):
                    text = choice["delta"].get(name)
                    if text:
                        if field != name:
                            print(("\n" if field else "") + label)
                            field = name
                        print(text, end="", flush=True)
                if choice["finish_reason"] is not None:
                    final = chunk
            print()
            assert final is not None  # the last chunk carries finish_reason and usage
            u = final["usage"]
            print(f"-- finish_reason={final['choices'][0]['finish_reason']} prompt_tokens={u['prompt_tokens']} "
                  f"completion_tokens={u['completion_tokens']} images_encoded={u['images_encoded']}",
                  file=sys.stderr)
    except (pe.ErnieError, OSError, ValueError) as e:  # ImageError and PromptTooLongError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
