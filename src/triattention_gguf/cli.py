"""The `triattention-gguf` command line."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


class UsageError(Exception):
    """Bad input from the user: printed as one clear line, exit status 2."""


def _quiet_llama(verbose: bool) -> None:
    import llama_cpp._logger

    llama_cpp._logger.set_verbose(verbose)


def _demo_model() -> Path:
    """The SmolLM2 test model with centres, made once beside the cached download."""
    from triattention_gguf.calibrate import compute_centers
    from triattention_gguf.centers import rewrite_model
    from triattention_gguf.testmodels import model_path

    source = model_path()
    centred = source.with_name(source.stem + ".triattention.gguf")
    if not centred.exists():
        print(f"embedding TriAttention centres into {centred} (once) ...", flush=True)
        rewrite_model(source, compute_centers(source, max_tokens=8192), centred)
    return centred


def _demo(args: argparse.Namespace) -> int:
    from triattention_gguf import Llama

    _quiet_llama(False)
    path = Path(args.model) if args.model else _demo_model()
    prompt = ("<|im_start|>user\nExplain in detail, with examples, how a CPU cache works: lines, associativity, "
              "replacement policies, write policies and coherence.<|im_end|>\n<|im_start|>assistant\n")
    runs = {}
    for method in ("none", "tri"):
        llm = Llama(model_path=str(path), n_ctx=args.n_ctx, n_threads=args.threads, seed=0, verbose=False,
                    kv_compress=method, kv_budget=args.kv_budget, kv_divide_length=64, n_ubatch=128)
        tokens, start = [], time.perf_counter()
        for token in llm.generate(llm.tokenize(prompt.encode(), special=True), temp=0.0):
            tokens.append(token)
            if len(tokens) == args.max_tokens:
                break
        seconds = time.perf_counter() - start
        runs[method] = (tokens, seconds, llm.kv_stats(), llm.detokenize(tokens).decode(errors="replace"))
    print(f"model: {path}\n\n--- kv_compress='tri', kv_budget={args.kv_budget}: the end of the text ---")
    print("..." + runs["tri"][3][-600:])
    print(f"\n{'':6} {'tokens/s':>9} {'KV cells':>9} {'KV MiB':>8} {'compressions':>13}")
    for method, (tokens, seconds, kv, _) in runs.items():
        print(f"{method:6} {len(tokens) / seconds:9.1f} {kv['cells_capacity']:9d} {kv['kv_bytes'] / 2**20:8.1f} "
              f"{kv['compressions']:13d}")
    full, tri = runs["none"][2], runs["tri"][2]
    same = next((i for i, (a, b) in enumerate(zip(runs["none"][0], runs["tri"][0])) if a != b), None)
    print(f"\nKV memory: {full['kv_bytes'] / tri['kv_bytes']:.1f}x less allocated than the full cache of "
          f"n_ctx={args.n_ctx}, {tri['kv_bytes_full'] / tri['kv_bytes']:.1f}x less than a full cache of "
          f"this conversation's {tri['logical_pos']} tokens")
    print("greedy output identical to the full cache" if same is None else
          f"first token that differs from the full cache: #{same} of {args.max_tokens}")
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

    demo = sub.add_parser("demo", help="a long generation with and without compression, side by side")
    demo.add_argument("--model", help="GGUF file with centres (default: the SmolLM2-135M test model, fetched "
                                      "and calibrated if needed)")
    demo.add_argument("--max-tokens", type=_positive, default=1024)
    demo.add_argument("--n-ctx", type=_positive, default=8192)
    demo.add_argument("--kv-budget", type=_positive, default=256)
    demo.add_argument("--threads", type=_positive, default=os.cpu_count())
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
