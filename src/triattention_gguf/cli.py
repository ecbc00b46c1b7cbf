"""The `triattention-gguf` command line."""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

from triattention_gguf.methods import DEFAULT_CLUSTERS, DEFAULT_SELECT, MAX_HORIZON, MIN_CONCENTRATION, SELECT_MODES


class UsageError(Exception):
    """Bad input from the user: printed as one clear line, exit status 2."""


def _quiet_llama(verbose: bool) -> None:
    import llama_cpp._logger

    llama_cpp._logger.set_verbose(verbose)


def _demo_model() -> Path:
    """The SmolLM2 test model with centres, made once beside the cached download."""
    from triattention_gguf.calibrate import compute_centers
    from triattention_gguf.centers import read_centers, rewrite_model
    from triattention_gguf.testmodels import model_path

    source = model_path()
    centred = source.with_name(source.stem + ".triattention.gguf")
    # a copy from a release with another default cluster count is made again
    if not centred.exists() or read_centers(centred).n_clusters != DEFAULT_CLUSTERS:
        print(f"embedding TriAttention centres into {centred} (once) ...", flush=True)
        rewrite_model(source, compute_centers(source, max_tokens=8192), centred)
    return centred


def _demo(args: argparse.Namespace) -> int:
    from tqdm import tqdm

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
        with tqdm(total=args.max_tokens, desc=f"generating, kv_compress={method!r}", unit="token") as bar:
            for token in llm.generate(llm.tokenize(prompt.encode(), special=True), temp=0.0):
                tokens.append(token)
                bar.update()
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


def _remove_stale_copies(model: str) -> None:
    from triattention_gguf.centers import remove_stale_copies

    for tmp in remove_stale_copies(model):
        print(f"removed {tmp}: a temporary copy left by an interrupted run", file=sys.stderr)


def _embed_centers(args: argparse.Namespace) -> int:
    from triattention_gguf.calibrate import compute_centers, read_texts
    from triattention_gguf.centers import CentersError, read_centers, rewrite_model, validate
    from triattention_gguf.inspection import concentration_lines
    from triattention_gguf.modelinfo import read_facts

    _quiet_llama(args.verbose)
    _remove_stale_copies(args.model)
    facts = read_facts(args.model)
    existing = None if args.force else read_centers(args.model)  # --force replaces even malformed ones
    if existing is not None:
        try:
            validate(existing, facts)
        except CentersError as err:
            raise UsageError(f"{err} (or pass --force)") from err
        if args.output is None:
            print(f"{args.model} already has TriAttention centres ({existing.calibration_tokens} tokens, "
                  f"query clusters per head: {existing.n_clusters}); "
                  "nothing to do (--force recomputes them)")
            return 0
        rewrite_model(args.model, existing, args.output)
        print(f"wrote {args.output} with the existing centres of {args.model}")
        return 0
    text = read_texts(args.text) if args.text else None
    start = time.perf_counter()
    centers = compute_centers(args.model, text, max_tokens=args.tokens, n_threads=args.threads,
                              progress=not args.quiet, clusters=args.clusters)
    seconds = time.perf_counter() - start
    out = rewrite_model(args.model, centers, args.output)
    print(f"calibrated {facts.arch} ({facts.n_layer} layers x {facts.n_head} heads, query clusters per head: "
          f"{centers.n_clusters}) on {centers.calibration_tokens} tokens in {seconds:.1f} s; centres written to {out}")
    print("\n".join(concentration_lines(centers)[:1]))
    return 0


def _tune(args: argparse.Namespace) -> int:
    import dataclasses

    from triattention_gguf.calibrate import read_texts
    from triattention_gguf.centers import check_writable, load_centers, rewrite_model
    from triattention_gguf.modelinfo import read_facts
    from triattention_gguf.tuning import tune

    _quiet_llama(args.verbose)
    _remove_stale_copies(args.model)
    # before any measuring: a file without centres, or a destination that cannot be written, is refused
    centres = load_centers(read_facts(args.model))
    check_writable(args.output or args.model)
    text = read_texts(args.text) if args.text else None
    start = time.perf_counter()
    try:
        tuning = tune(args.model, text, args.tokens, args.prompts, args.generate, n_threads=args.threads,
                      progress=not args.quiet)
    except ValueError as err:
        raise UsageError(str(err)) from err
    print(tuning.table())
    out = rewrite_model(args.model, dataclasses.replace(centres, tuned=tuning.choice), args.output)
    print(f"measured in {time.perf_counter() - start:.0f} s; tri's default settings for this model "
          f"({tuning.choice}) written to {out}; Llama and serve use them unless given others")
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
    from triattention_gguf.centers import has_centers, rewrite_model
    from triattention_gguf.modelinfo import loaded_model

    _quiet_llama(args.verbose)
    _remove_stale_copies(args.model)
    with loaded_model(args.model):  # never copy a model that llama.cpp would refuse
        pass
    if not has_centers(args.model):  # malformed centres are stripped too: that is their fix
        print(f"{args.model} has no TriAttention centres; nothing to do")
        return 0
    out = rewrite_model(args.model, None, args.output)
    print(f"removed the TriAttention centres; wrote {out}")
    return 0


def _fill_defaults(args: argparse.Namespace, quick: dict, full: dict) -> None:
    """Options left unset take their --quick or their full-run value."""
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def _report(args: argparse.Namespace, name: str, rows: list[dict], columns: list[str], plot_rows: list[dict],
            x: str, panels: list[tuple[str, str]], line_key: str = "method") -> None:
    """name.json, name.md and name.png in --out; the table and where they went on stdout."""
    from triattention_gguf.report import markdown_table, plot_lines, write_outputs

    out = write_outputs(args.out, name, rows, columns, {"command": name, "args": vars(args) | {"func": None}})
    plot_lines(out / f"{name}.png", plot_rows, x, panels, line_key=line_key)
    print(markdown_table(rows, columns))
    print(f"written: {out / f'{name}.md'}, {out / f'{name}.json'}, {out / f'{name}.png'}")


SERVE_COLUMNS = ["model", "server", "prompt_tokens", "read", "read_first", "read_later_max", "seconds", "seconds_first",
                 "seconds_later_median", "cache_entries", "entry_mib", "slot_kv_mib"]
RESTART_COLUMNS = ["model", "server", "first_prompt", "first_read", "first_seconds", "entry_mib", "after_restart_prompt",
                   "after_restart_read", "after_restart_seconds"]
EVAL_COLUMNS = ["model", "setting", "method", "budget", "fraction", "kl", "kl_compressed", "vs", "d_kl", "d_lo", "d_hi",
                "vs_select", "ds_kl", "ds_lo", "ds_hi",
                "kl_far", "kl_near", "far_share", "top1", "top1_compressed", "first_diff", "ppl", "ppl_full", "recall",
                "passkey", "own_output", "compressions", "prompts_kept"]


def _eval(args: argparse.Namespace) -> int:
    from triattention_gguf.calibrate import default_text, read_texts
    from triattention_gguf.evaluation import evaluate

    _quiet_llama(args.verbose)
    _fill_defaults(args, dict(tokens=1024, budgets="1/4,256", retrieval_tokens=768, retrieval_trials=1,
                              recall_checkpoints=2, tasks=2),
                   dict(tokens=8192, budgets="1/4,1/8", retrieval_tokens=2048, retrieval_trials=3,
                        recall_checkpoints=4, tasks=0))
    if args.chunk > args.divide_length:
        raise UsageError(f"--chunk {args.chunk} is larger than --divide-length {args.divide_length}: compression "
                         "would not happen as it does while decoding")
    text = read_texts(args.text) if args.text else default_text()
    rows = []
    try:
        for model in args.model:
            rows += evaluate(model, args.methods.split(","), args.budgets.split(","), text, args.tokens,
                             args.divide_length, args.chunk, args.retrieval_tokens, args.retrieval_trials,
                             args.recall_checkpoints, args.threads, progress=not args.quiet, windows=args.windows,
                             generate=args.generate, tasks=args.tasks)
    except ValueError as err:
        raise UsageError(str(err)) from err
    _report(args, "eval", rows, EVAL_COLUMNS, [r for r in rows if r["method"] != "none"], "budget",
            [("kl", "mean KL(full || method)"), ("top1", "top-1 agreement"), ("recall", "attention recall")])
    return 0


BENCH_COLUMNS = ["model", "method", "budget", "length", "prefill_tps", "decode_tps_min", "decode_tps_median",
                 "decode_vs_full", "compressions", "compress_ms", "compress_share", "kv_bytes", "kv_vs_full", "rss_mib"]


def _bench(args: argparse.Namespace) -> int:
    from triattention_gguf.benchmark import bench
    from triattention_gguf.calibrate import default_text, read_texts
    from triattention_gguf.harness import Config

    _quiet_llama(args.verbose)
    _fill_defaults(args, dict(lengths="1024,2048", budgets="256,512", rounds=2, decode_tokens=16),
                   dict(lengths="2048,8192,16384,32768", budgets="512,1024,2048", rounds=3, decode_tokens=32))
    try:
        lengths = [int(x) for x in args.lengths.split(",")]
        budgets = [int(x) for x in args.budgets.split(",")]
    except ValueError as err:
        raise UsageError(f"--lengths and --budgets take comma-separated numbers of tokens: {err}") from err
    text = read_texts(args.text) if args.text else default_text()
    rows = []
    for model in args.model:
        rows += bench(model, args.methods.split(","), budgets, lengths, text, args.divide_length, args.decode_tokens,
                      args.rounds, args.threads, progress=not args.quiet)
    # one line per configuration: the full cache's row carries the length as its budget
    plot_rows = [{**row, "config": Config.parse(row["method"], row["budget"]).label} for row in rows]
    _report(args, "bench", rows, BENCH_COLUMNS, plot_rows, "length",
            [("decode_tps_median", "decode tokens/s (median)"), ("kv_bytes", "KV bytes allocated")], line_key="config")
    return 0


def _bench_serve(args: argparse.Namespace) -> int:
    from triattention_gguf.calibrate import default_text, read_texts
    from triattention_gguf.report import markdown_table, write_outputs
    from triattention_gguf.serve_bench import bench_serve

    if not Path(args.model).is_file():
        raise UsageError(f"{args.model}: no such model file")
    text = read_texts(args.text) if args.text else default_text()
    rows = bench_serve(args.model, text, args.system_tokens, args.conversations, args.turns, args.max_tokens,
                       args.kv_budget, args.n_ctx, args.restart_tokens, args.threads, Path(args.out))
    out = write_outputs(args.out, "bench-serve", rows, SERVE_COLUMNS,
                        {"command": "bench-serve", "args": vars(args) | {"func": None}})
    tables = markdown_table([r for r in rows if r["case"] == "agents"], SERVE_COLUMNS)
    restarts = [r for r in rows if r["case"] == "restart"]
    if restarts:
        tables += "\n" + markdown_table(restarts, RESTART_COLUMNS)
    (out / "bench-serve.md").write_text(tables)
    print(tables + f"written: {out / 'bench-serve.md'}, {out / 'bench-serve.json'}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from triattention_gguf.engine import ServeConfig
    from triattention_gguf.server import create_app

    _quiet_llama(args.verbose)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not Path(args.model).is_file():
        raise UsageError(f"{args.model}: no such model file")
    config = ServeConfig(model=args.model, alias=args.alias, kv_compress=args.kv_compress, kv_budget=args.kv_budget,
                         kv_divide_length=args.kv_divide_length, kv_select=args.kv_select,
                         kv_keep_prompt=args.kv_keep_prompt, kv_keep_recent=args.kv_keep_recent,
                         kv_horizon=args.kv_horizon, kv_min_concentration=args.kv_min_concentration,
                         n_ctx=args.n_ctx, n_gpu_layers=args.n_gpu_layers,
                         threads=args.threads, chat_format=args.chat_format, api_key=args.api_key,
                         parallel=args.parallel, cache_ram=args.cache_ram, cache_dir=args.cache_dir,
                         cache_dir_max=args.cache_dir_max)
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, not {text}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, not {text}")
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
    embed.add_argument("--clusters", type=_positive, default=DEFAULT_CLUSTERS,
                       help=f"query clusters per head, each a virtual query of tri (default {DEFAULT_CLUSTERS}; 1 is the "
                            "centre alone, as the paper: a compression about 1.2x faster that keeps less on "
                            "long text: README, 'Query clusters')")
    embed.add_argument("--threads", type=_positive, default=None)
    embed.add_argument("--force", action="store_true", help="recompute centres that are already present")
    embed.add_argument("--quiet", action="store_true", help="no progress bar")
    embed.add_argument("--verbose", action="store_true", help="show llama.cpp's log")
    embed.set_defaults(func=_embed_centers)

    tuner = sub.add_parser("tune", help="measure tri's candidate settings on a model with centres and store the "
                                        "one that keeps the most of it as its default")
    tuner.add_argument("model", help="GGUF model file with centres (updated in place unless -o is given)")
    tuner.add_argument("-o", "--output", help="write the result to this file instead")
    tuner.add_argument("--text", action="append", help="tuning text file (repeatable; default: a part of Python's "
                                                       "documentation that calibration and the evals do not read)")
    tuner.add_argument("--tokens", type=_positive, default=2048, help="teacher-forced window of the text (default 2048)")
    tuner.add_argument("--prompts", type=_positive, default=4,
                       help="passages of the text that the model explains itself (default 4)")
    tuner.add_argument("--generate", type=_positive, default=256, help="tokens generated per passage (default 256)")
    tuner.add_argument("--threads", type=_positive, default=None)
    tuner.add_argument("--quiet", action="store_true", help="no progress bars")
    tuner.add_argument("--verbose", action="store_true", help="show llama.cpp's log")
    tuner.set_defaults(func=_tune)

    inspect = sub.add_parser("inspect", help="model facts, centre status and head concentration")
    inspect.add_argument("model")
    inspect.add_argument("--plot", help="draw the R distribution to this PNG file")
    inspect.add_argument("--verbose", action="store_true", help="show llama.cpp's log")
    inspect.set_defaults(func=_inspect)

    def measure_options(p: argparse.ArgumentParser, name: str, quick: str) -> None:
        p.add_argument("model", nargs="+", help="GGUF model file(s); tri needs centres (embed-centers)")
        p.add_argument("--text", action="append", help="text file (repeatable; default: Python's documentation)")
        p.add_argument("--divide-length", type=_positive, default=128)
        p.add_argument("--threads", type=_positive, default=None)
        p.add_argument("--out", default=f"{name}-results", help=f"folder for {name}.md, {name}.json, {name}.png")
        p.add_argument("--quick", action="store_true", help=f"a CI-sized run ({quick})")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.add_argument("--verbose", action="store_true", help="show llama.cpp's log")

    ev = sub.add_parser("eval", help="quality under compression against the full cache: KL, top-1, perplexity, "
                                     "attention recall, retrieval; table, JSON and plot")
    measure_options(ev, "eval", "1024 tokens, budgets 1/4 and 256")
    ev.add_argument("--methods", default="none,tri,streaming,knorm,random,snapkv",
                    help="method specs name[/select][+recent[N]][+prompt][+horizonN][+concR]: tri/per-head is tri "
                         "with per-head selection, tri+recent never evicts the newest quarter of the budget (tri+recent8 "
                         "an eighth), snapkv+prompt keeps the prompt, tri+horizon4 predicts 4 tokens ahead, "
                         "tri+conc0.72 scores heads with concentration below 0.72 by recency and observed attention "
                         "(default: none,tri,streaming,knorm,random,snapkv)")
    ev.add_argument("--budgets", default=None, help="cells (1024) or fractions of the text (1/4), comma-separated "
                                                     "(default 1/4,1/8)")
    ev.add_argument("--windows", type=_positive, default=1, help="windows of --tokens tokens at different offsets "
                                                                  "of the text, pooled (default 1)")
    ev.add_argument("--generate", type=_positive, default=0, metavar="N",
                    help="the paper's setting: the shipped task set's prompts, each followed by N tokens the full "
                         "cache generates; scored on those, budgets as fractions of N, every method also with "
                         "its prompt kept")
    ev.add_argument("--tasks", type=int, default=None, help="with --generate: the first this many prompts "
                                                            "(default all 24)")
    ev.add_argument("--tokens", type=_positive, default=None, help="tokens of text to evaluate (default 8192)")
    ev.add_argument("--chunk", type=_positive, default=32, help="tokens fed at a time (<= divide-length)")
    ev.add_argument("--retrieval-tokens", type=_positive, default=None, help="context of retrieval prompts (default 2048)")
    ev.add_argument("--retrieval-trials", type=_non_negative, default=None,
                    help="prompts per retrieval task, 0 for none (default 3)")
    ev.add_argument("--recall-checkpoints", type=_non_negative, default=None,
                    help="chunks where recall is measured, 0 for none (default 4)")
    ev.set_defaults(func=_eval)

    be = sub.add_parser("bench", help="decode and prefill speed, compression time and memory of every method "
                                      "next to the full cache; table, JSON and plot")
    measure_options(be, "bench", "lengths 1024 and 2048, budgets 256 and 512")
    be.add_argument("--methods", default="tri,streaming,knorm,random,snapkv", help="compared with the full cache")
    be.add_argument("--budgets", default=None, help="comma-separated cells (default 512,1024,2048)")
    be.add_argument("--lengths", default=None, help="logical lengths in tokens (default 2048,8192,16384,32768, "
                                                     "up to the model's trained context)")
    be.add_argument("--decode-tokens", type=_positive, default=None, help="tokens per decode round (default 32)")
    be.add_argument("--rounds", type=_positive, default=None, help="interleaved decode rounds (default 3)")
    be.set_defaults(func=_bench)

    bs = sub.add_parser("bench-serve", help="agent traffic against real servers: conversations sharing a long system "
                                            "prompt, tri and the full cache, one slot with the prompt cache and one "
                                            "slot each; and a restart on --cache-dir")
    bs.add_argument("model", help="GGUF model file with centres (embed-centers)")
    bs.add_argument("--text", action="append", help="text of the system prompts (default: Python's documentation)")
    bs.add_argument("--system-tokens", type=_positive, default=6000, help="shared system prompt (default 6000)")
    bs.add_argument("--conversations", type=_positive, default=4)
    bs.add_argument("--turns", type=_positive, default=5)
    bs.add_argument("--max-tokens", type=_positive, default=32, help="tokens per answer (default 32)")
    bs.add_argument("--kv-budget", type=_positive, default=2048)
    bs.add_argument("--n-ctx", type=_positive, default=16384)
    bs.add_argument("--restart-tokens", type=int, default=12000, help="first prompt of the restart case, 0: skip it")
    bs.add_argument("--threads", type=_positive, default=None)
    bs.add_argument("--out", default="bench-serve-results")
    bs.set_defaults(func=_bench_serve)

    serve = sub.add_parser("serve", help="an OpenAI-compatible server (chat, completions, tools, streaming) over "
                                         "a compressed cache")
    serve.add_argument("model", help="GGUF model file (tri needs centres: embed-centers)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--kv-compress", default="tri", help="tri (default), none, streaming, knorm, random, snapkv")
    serve.add_argument("--kv-budget", type=_positive, default=4096, help="KV cells kept per head (default 4096)")
    serve.add_argument("--kv-divide-length", type=_positive, default=128)
    serve.add_argument("--kv-select", default=DEFAULT_SELECT, choices=list(SELECT_MODES),
                       help=f"which cells each KV head keeps (default {DEFAULT_SELECT}: per layer)")
    serve.add_argument("--kv-keep-prompt", action="store_true",
                       help="never evict a request's prompt while it fits in the budget (longer: compressed, "
                            "with a warning in the log)")
    tuned = "the model's tuned setting (triattention-gguf tune), else "
    serve.add_argument("--kv-keep-recent", type=_non_negative, default=None,
                       help=f"never evict the newest N tokens; the method chooses the rest of the budget (default: "
                            f"{tuned}0)")
    serve.add_argument("--kv-horizon", type=_positive, default=None, metavar="TOKENS",
                       help=f"tri predicts the queries up to this many tokens ahead (default: {tuned}{MAX_HORIZON}, "
                            "the reference's; 4 kept more of the full model in generation, see BENCHMARKS.md)")
    serve.add_argument("--kv-min-concentration", type=_fraction, default=None, metavar="R",
                       help=f"tri scores heads whose calibrated concentration is below R by recency and observed attention "
                            f"(default: {tuned}{MIN_CONCENTRATION:g}, none, as the reference; see BENCHMARKS.md)")
    serve.add_argument("--n-ctx", type=int, default=0, help="longest conversation in tokens (default: the model's "
                                                             "trained context)")
    serve.add_argument("--parallel", type=_positive, default=1,
                       help="slots: conversations held at once, each in a compressed cache of its own (default 1)")
    serve.add_argument("--cache-ram", type=_non_negative, default=2048, metavar="MiB",
                       help="host memory for the states of displaced conversations, restored by common prefix "
                            "(default 2048; 0: none)")
    serve.add_argument("--cache-dir", default=None, help="also keep conversations here, so that a restarted server "
                                                         "(or another on the same model and settings) resumes warm")
    serve.add_argument("--cache-dir-max", type=_positive, default=16384, metavar="MiB",
                       help="size bound of --cache-dir, oldest entries evicted first (default 16384)")
    serve.add_argument("--n-gpu-layers", type=int, default=0)
    serve.add_argument("--threads", type=_positive, default=None)
    serve.add_argument("--chat-format", default=None, help="llama-cpp-python chat format (default: the model's "
                                                           "own template)")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (all but /health)")
    serve.add_argument("--alias", default=None, help="model name for clients (default: the file name)")
    serve.add_argument("--verbose", action="store_true", help="llama.cpp's and uvicorn's logs")
    serve.set_defaults(func=_serve)

    strip = sub.add_parser("strip-centers", help="remove the centres from a GGUF file")
    strip.add_argument("model")
    strip.add_argument("-o", "--output", help="write the result to this file instead of in place")
    strip.add_argument("--verbose", action="store_true", help="show llama.cpp's log")
    strip.set_defaults(func=_strip_centers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from triattention_gguf.calibrate import CalibrationError
    from triattention_gguf.centers import CentersError
    from triattention_gguf.compression import CompressionError
    from triattention_gguf.modelinfo import ModelFileError

    try:
        return args.func(args)
    except (UsageError, ModelFileError, CentersError, CalibrationError, CompressionError) as err:
        if getattr(args, "verbose", False):
            traceback.print_exc()
        print(f"triattention-gguf {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
