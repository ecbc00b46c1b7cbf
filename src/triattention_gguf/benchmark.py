"""`triattention-gguf bench`: speed and memory of every method next to the full cache, in one process.

For each logical length, every configuration reads the same text (prefill tokens/s, with
compression between chunks), then all of them decode in interleaved rounds (so a noisy
machine slows them alike): decode tokens/s min and median, time per compression and its
share of decode time, KV bytes allocated, and the resident memory each context added.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from pathlib import Path

from tqdm import tqdm

from triattention_gguf.centers import Centers, load_centers
from triattention_gguf.compression import prompt_ubatch
from triattention_gguf.harness import FULL, Config, Runner, configs_for
from triattention_gguf.modelinfo import ModelFacts, model_with_facts, tokenize

PREFILL_CHUNK = 512  # the full cache reads prompts in llama.cpp's default ubatch


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _prefill(runner: Runner, tokens: list[int]) -> float:
    start = time.perf_counter()
    runner.feed(tokens)
    return len(tokens) / (time.perf_counter() - start)


def bench_length(model, facts: ModelFacts, centres: Centers | None, text_tokens: list[int], length: int,
                 configs: list[Config], divide_length: int, decode_tokens: int, rounds: int, n_threads: int | None,
                 progress: bool) -> list[dict]:
    """Rows for every config (and the full cache) at one logical length."""
    tokens = (text_tokens * (length // len(text_tokens) + 1))[:length]
    rows, decode = {}, {}
    with contextlib.ExitStack() as stack:
        group = []
        for config in tqdm([Config(FULL)] + configs, desc=f"prefill {length}", unit="config", disable=not progress):
            rss = _rss_bytes()
            chunk = PREFILL_CHUNK if config.method == FULL else prompt_ubatch(config.budget, divide_length)
            runner = Runner(stack, model, facts, config, length + decode_tokens * rounds + 1, divide_length, chunk,
                            n_threads, centres)
            prefill = _prefill(runner, tokens)
            s = runner.stats()
            rows[config.label] = {"method": config.name, "budget": config.budget or length, "length": length,
                                  "prefill_tps": prefill, "kv_bytes": s["kv_bytes"],
                                  "rss_mib": (_rss_bytes() - rss) / 2**20, "compressions": s["compressions"]}
            decode[config.label] = []
            group.append((runner, s["compress_seconds"]))
        for _ in tqdm(range(rounds), desc=f"decode {length}", unit="round", disable=not progress):
            for runner, _ in group:
                start = time.perf_counter()
                runner.greedy(decode_tokens)
                decode[runner.config.label].append(time.perf_counter() - start)
        for runner, prefill_seconds in group:
            s, row = runner.stats(), rows[runner.config.label]
            seconds = decode[runner.config.label]
            row.update(decode_tps_min=decode_tokens / max(seconds), decode_tps_median=decode_tokens / statistics.median(seconds),
                       compress_ms=1000 * s["compress_seconds"] / s["compressions"] if s["compressions"] else None,
                       compress_share=(s["compress_seconds"] - prefill_seconds) / sum(seconds),
                       compressions=s["compressions"])
    full = rows[FULL]
    for row in rows.values():
        row["decode_vs_full"] = row["decode_tps_median"] / full["decode_tps_median"]
        row["kv_vs_full"] = full["kv_bytes"] / row["kv_bytes"]
    return list(rows.values())


def bench(model_path: str, methods: list[str], budgets: list[int], lengths: list[int], text: str,
          divide_length: int = 128, decode_tokens: int = 32, rounds: int = 3, n_threads: int | None = None,
          progress: bool = True) -> list[dict]:
    """Rows for every length (up to the model's trained context) x config on one model."""
    with model_with_facts(model_path) as (model, facts):
        centres = load_centers(facts) if any(Config.parse(m).method == "tri" for m in methods) else None
        text_tokens = tokenize(model, text)
        rows = []
        for length in sorted(n for n in lengths if n <= facts.n_ctx_train):
            configs = configs_for(methods, [b for b in budgets if b < length], divide_length)
            rows += bench_length(model, facts, centres, text_tokens, length, configs, divide_length, decode_tokens,
                                 rounds, n_threads, progress)
    return [{"model": Path(model_path).name, **row} for row in rows]
