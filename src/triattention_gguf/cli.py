"""The `triattention-gguf` command line."""
from __future__ import annotations

import argparse
import sys
import time


def _demo(args: argparse.Namespace) -> int:
    from triattention_gguf import Llama
    from triattention_gguf.testmodels import model_path

    path = args.model or model_path()
    llm = Llama(model_path=str(path), n_ctx=args.n_ctx, n_threads=args.threads, seed=0, verbose=False)
    messages = [{"role": "user", "content": "Explain in a few paragraphs how a CPU cache works."}]
    start = time.perf_counter()
    out = llm.create_chat_completion(messages, max_tokens=args.max_tokens, temperature=0.0)
    seconds = time.perf_counter() - start
    usage = out["usage"]
    print(out["choices"][0]["message"]["content"])
    print(f"\nmodel: {path}")
    print(f"{usage['completion_tokens']} tokens in {seconds:.2f} s "
          f"({usage['completion_tokens'] / seconds:.1f} tokens/s), prompt {usage['prompt_tokens']} tokens")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="triattention-gguf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="generate with the bundled default model")
    demo.add_argument("--model", help="GGUF file (default: the SmolLM2-135M test model, fetched if needed)")
    demo.add_argument("--max-tokens", type=int, default=256)
    demo.add_argument("--n-ctx", type=int, default=4096)
    demo.add_argument("--threads", type=int, default=None)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
