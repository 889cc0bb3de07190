"""A scripted three-turn conversation about images, showing the prompt and image caches at work.

Run (with pyllama_ernie installed; in a source checkout built in place, prefix PYTHONPATH=.)::

    python examples/multi_turn_chat.py MODEL.gguf MMPROJ.gguf IMAGE [IMAGE2]

Turn 1 shows IMAGE and asks for a description, turn 2 asks a text-only follow-up, turn 3
shows IMAGE2 (or IMAGE again when no second image is given) and asks for a comparison.
Every turn sends the whole conversation, as an OpenAI-style client would; after each
answer the script prints ``usage``:

* ``prompt_tokens_evaluated``: prompt positions actually run through the model. From turn
  2 on, the conversation so far is still in the context's KV cache, so only the new part
  is evaluated; ``cached_tokens`` (``usage["prompt_tokens_details"]["cached_tokens"]``)
  is the rest.
* ``images_encoded``: images that went through the vision encoder. An image seen before
  (same pixels) comes from the model's feature cache: turn 2 and, without IMAGE2, turn 3
  encode nothing.

``--chat-template FILE`` (alias ``--chat-template-file``, as in ``python -m pyllama_ernie
chat``) replaces the chat template stored in the GGUF, e.g. for the tiny test models of
``examples/make_tiny_models.py``, whose template takes no image parts. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys

import pyllama_ernie as pe


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="A three-turn image conversation that prints cache statistics.")
    ap.add_argument("model", help="the language model .gguf")
    ap.add_argument("mmproj", help="the vision projector (mmproj) .gguf")
    ap.add_argument("image", help="the first image")
    ap.add_argument("image2", nargs="?", help="a second image for turn 3 (default: the first again)")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--n-ctx", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--chat-template", "--chat-template-file", metavar="FILE",
                    help="a jinja chat template to use instead of the GGUF's")
    args = ap.parse_args(argv)

    template = open(args.chat_template, encoding="utf-8").read() if args.chat_template else None
    second = args.image2 or args.image
    turns = [
        [{"type": "image", "image": args.image}, {"type": "text", "text": "Describe this picture."}],
        "Which colours stand out?",
        [{"type": "image", "image": second}, {"type": "text", "text": "How does this picture compare with the first?"}],
    ]
    messages: list[dict] = [{"role": "system", "content": "You are a careful assistant who describes pictures."}]
    try:
        with pe.Model(args.model, mmproj_path=args.mmproj, n_ctx=args.n_ctx, n_threads=args.threads,
                      n_gpu_layers=args.n_gpu_layers) as model:
            for i, content in enumerate(turns, 1):
                messages.append({"role": "user", "content": content})
                r = model.create_chat_completion(messages, max_tokens=args.max_tokens,
                                                 temperature=args.temperature, chat_template=template)
                msg = r["choices"][0]["message"]
                question = content if isinstance(content, str) else content[-1]["text"]
                print(f"=== turn {i}: {question}")
                if msg.get("reasoning_content"):
                    print(f"[reasoning] {msg['reasoning_content'].strip()}")
                print(msg["content"].strip())
                u = r["usage"]
                print(f"--- finish_reason={r['choices'][0]['finish_reason']} prompt_tokens={u['prompt_tokens']} "
                      f"prompt_tokens_evaluated={u['prompt_tokens_evaluated']} "
                      f"cached_tokens={u['prompt_tokens_details']['cached_tokens']} "
                      f"images_encoded={u['images_encoded']} completion_tokens={u['completion_tokens']}")
                # the history keeps the answer, not the reasoning (as ERNIE's template expects)
                messages.append({"role": "assistant", "content": msg["content"]})
    except (pe.ErnieError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
