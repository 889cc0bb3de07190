"""Plain text completion with an ERNIE 4.5 text model: generate, stream and logits.

Run (with pyllama_ernie installed; in a source checkout built in place, prefix PYTHONPATH=.)::

    python examples/text_completion.py MODEL.gguf "The capital of France is"
    python examples/text_completion.py MODEL.gguf "Once upon a time" --max-tokens 64 --temperature 0.8 --seed 42

The script

1. completes the prompt with ``Model.generate`` (greedy unless ``--temperature`` is set)
   and prints the text, ``finish_reason`` and the speed;
2. completes it again with ``Model.stream``, printing pieces as they come;
3. prints the five most likely next tokens after the prompt from ``Model.logits``.

The prompt is raw text (no chat template): this is a base-model completion. For chat,
see ``Model.create_chat_completion`` and the other examples. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import pyllama_ernie as pe


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="generate / stream / logits with an ERNIE 4.5 text model")
    ap.add_argument("model", help="the model .gguf")
    ap.add_argument("prompt", help="the text to complete")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--seed", type=int, default=None, help="sampling seed (with --temperature > 0)")
    ap.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    args = ap.parse_args(argv)

    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed, stop=args.stop or None)
    try:
        with pe.Model(args.model, n_ctx=args.n_ctx, n_threads=args.threads, n_gpu_layers=args.n_gpu_layers) as model:
            print(f"model: {model.description}, {model.n_layer} layers, context {model.n_ctx} "
                  f"(trained {model.n_ctx_train})")

            # 1. the whole completion at once
            c = model.generate(args.prompt, **sampling)
            t = c.timings
            print(f"\n[generate] {args.prompt}{c.text}")
            print(f"  finish_reason={c.finish_reason} stop={c.stop!r} prompt_tokens={c.prompt_tokens} "
                  f"completion_tokens={c.completion_tokens} ({t.prompt_tokens_per_second:.0f} prompt tok/s, "
                  f"{t.tokens_per_second:.0f} tok/s)")

            # 2. the same, piece by piece (pieces never split a UTF-8 character)
            print(f"\n[stream] {args.prompt}", end="", flush=True)
            for piece in model.stream(args.prompt, **sampling):
                print(piece, end="", flush=True)
            print()

            # 3. what the model expects right after the prompt
            logits = model.logits(args.prompt)  # (n_prompt_tokens, n_vocab); row i predicts token i + 1
            last = logits[-1].astype(np.float64)
            probs = np.exp(last - last.max())
            probs /= probs.sum()
            print("\n[logits] most likely next tokens:")
            for tok in np.argsort(-probs)[:5]:
                piece = model.token_to_piece(int(tok)).decode("utf-8", "replace")
                print(f"  {int(tok):6d} {piece!r:20} p={probs[tok]:.3f}")
    except (pe.ErnieError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
