"""The `triattention-gguf` command line."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


class UsageError(Exception):
    """Bad input from the user: printed as one clear line, exit status 2."""


def _quiet_llama(verbose: bool) -> None:
    import llama_cpp._logger

    llama_cpp._logger.set_verbose(verbose)


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


def _embed_centers(args: argparse.Namespace) -> int:
    from triattention_gguf.calibrate import compute_centers, read_texts
    from triattention_gguf.centers import CentersError, read_centers, rewrite_model, validate
    from triattention_gguf.inspection import concentration_lines
    from triattention_gguf.modelinfo import read_facts

    _quiet_llama(args.verbose)
    facts = read_facts(args.model)
    existing = read_centers(args.model)
    if existing is not None and not args.force:
        try:
            validate(existing, facts)
        except CentersError as err:
            raise UsageError(f"{err} (or pass --force)") from err
        if args.output is None:
            print(f"{args.model} already has TriAttention centres ({existing.calibration_tokens} tokens); "
                  "nothing to do (--force recomputes them)")
            return 0
        rewrite_model(args.model, existing, args.output)
        print(f"wrote {args.output} with the existing centres of {args.model}")
        return 0
    text = read_texts(args.text) if args.text else None
    start = time.perf_counter()
    centers = compute_centers(args.model, text, max_tokens=args.tokens, n_threads=args.threads,
                              progress=not args.quiet)
    seconds = time.perf_counter() - start
    out = rewrite_model(args.model, centers, args.output)
    print(f"calibrated {facts.arch} ({facts.n_layer} layers x {facts.n_head} heads) on "
          f"{centers.calibration_tokens} tokens in {seconds:.1f} s; centres written to {out}")
    print("\n".join(concentration_lines(centers)[:1]))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from triattention_gguf.inspection import plot, report

    _quiet_llama(args.verbose)
    text, centers = report(args.model)
    print(text)
    if args.plot:
        if centers is None:
            raise UsageError(f"--plot needs centres; run `triattention-gguf embed-centers {args.model}` first")
        plot(centers, Path(args.model).name, args.plot)
        print(f"plot written to {args.plot}")
    return 0


def _strip_centers(args: argparse.Namespace) -> int:
    from triattention_gguf.centers import read_centers, rewrite_model

    if read_centers(args.model) is None:
        print(f"{args.model} has no TriAttention centres; nothing to do")
        return 0
    out = rewrite_model(args.model, None, args.output)
    print(f"removed the TriAttention centres; wrote {out}")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="triattention-gguf", description="TriAttention KV-cache compression for GGUF models")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="generate with the bundled default model")
    demo.add_argument("--model", help="GGUF file (default: the SmolLM2-135M test model, fetched if needed)")
    demo.add_argument("--max-tokens", type=_positive, default=256)
    demo.add_argument("--n-ctx", type=_positive, default=4096)
    demo.add_argument("--threads", type=_positive, default=None)
    demo.set_defaults(func=_demo)

    embed = sub.add_parser("embed-centers", help="calibrate a model and store its query centres in the GGUF file")
    embed.add_argument("model", help="GGUF model file (updated in place unless -o is given)")
    embed.add_argument("-o", "--output", help="write the result to this file instead")
    embed.add_argument("--text", action="append", help="calibration text file (repeatable; default: Python's documentation)")
    embed.add_argument("--tokens", type=_positive, default=32768, help="calibration tokens at most (default 32768)")
    embed.add_argument("--threads", type=_positive, default=None)
    embed.add_argument("--force", action="store_true", help="recompute centres that are already present")
    embed.add_argument("--quiet", action="store_true", help="no progress bar")
    embed.add_argument("--verbose", action="store_true", help="show llama.cpp's log")
    embed.set_defaults(func=_embed_centers)

    inspect = sub.add_parser("inspect", help="model facts, centre status and head concentration")
    inspect.add_argument("model")
    inspect.add_argument("--plot", help="draw the R distribution to this PNG file")
    inspect.add_argument("--verbose", action="store_true", help="show llama.cpp's log")
    inspect.set_defaults(func=_inspect)

    strip = sub.add_parser("strip-centers", help="remove the centres from a GGUF file")
    strip.add_argument("model")
    strip.add_argument("-o", "--output", help="write the result to this file instead of in place")
    strip.set_defaults(func=_strip_centers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from triattention_gguf.calibrate import CalibrationError
    from triattention_gguf.centers import CentersError
    from triattention_gguf.modelinfo import ModelFileError

    try:
        return args.func(args)
    except (UsageError, ModelFileError, CentersError, CalibrationError) as err:
        print(f"triattention-gguf {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
