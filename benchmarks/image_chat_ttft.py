"""Time to first token of an image chat: turn 1 (image encoded, whole prompt evaluated) vs turn 2.

    python benchmarks/image_chat_ttft.py MODEL.gguf MMPROJ.gguf IMAGE [-r 5] [--chat-template FILE]

Turn 2 repeats turn 1's messages plus the answer and a new question: the image
comes from the feature cache and the shared prefix from the KV cache, so only
the new tokens are evaluated. Prints the median (min..max) of each turn's time
to the first streamed piece, the ratio, and the usage counters of the last run.
Compare figures only within one run: these machines are noisy.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


def first_piece_ms(model, messages, **kw):
    t0 = time.perf_counter()
    ttft = None
    usage = None
    for chunk in model.create_chat_completion(messages, stream=True, temperature=0, **kw):
        delta = chunk["choices"][0]["delta"]
        if ttft is None and (delta.get("content") or delta.get("reasoning_content")):
            ttft = (time.perf_counter() - t0) * 1e3
        usage = chunk.get("usage", usage)
    return ttft if ttft is not None else (time.perf_counter() - t0) * 1e3, usage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("mmproj")
    ap.add_argument("image")
    ap.add_argument("-r", "--repetitions", type=int, default=5)
    ap.add_argument("-n", "--max-tokens", type=int, default=8)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--chat-template", type=Path, default=None, help="a template file instead of the GGUF's")
    args = ap.parse_args()

    from pyllama_ernie import Model

    template = args.chat_template.read_text() if args.chat_template else None
    turn1 = [{"role": "user", "content": [{"type": "image", "image": args.image},
                                          {"type": "text", "text": "Describe the picture."}]}]
    kw = dict(max_tokens=args.max_tokens, chat_template=template)
    t1, t2 = [], []
    with Model(args.model, mmproj_path=args.mmproj, n_ctx=4096, n_threads=args.threads) as m:
        for _ in range(args.repetitions):
            m.ctx.reset()
            m.media_cache_clear()
            ms1, u1 = first_piece_ms(m, turn1, **kw)
            answer = m.create_chat_completion(turn1, temperature=0, **kw)["choices"][0]["message"]["content"]
            turn2 = turn1 + [{"role": "assistant", "content": answer},
                             {"role": "user", "content": "What colours does it have?"}]
            ms2, u2 = first_piece_ms(m, turn2, **kw)
            t1.append(ms1)
            t2.append(ms2)

    def fmt(xs):
        return f"{statistics.median(xs):9.1f} ms  ({min(xs):.1f} .. {max(xs):.1f})"

    print(f"turn 1 time to first token: {fmt(t1)}  prompt {u1['prompt_tokens']} tokens, "
          f"evaluated {u1['prompt_tokens_evaluated']}, images encoded {u1['images_encoded']}")
    print(f"turn 2 time to first token: {fmt(t2)}  prompt {u2['prompt_tokens']} tokens, "
          f"evaluated {u2['prompt_tokens_evaluated']}, images encoded {u2['images_encoded']}")
    print(f"turn 2 / turn 1: {statistics.median(t2) / statistics.median(t1):.3f}")


if __name__ == "__main__":
    main()
