"""`triattention-gguf eval`: what compression costs in quality, against the full cache of the same run.

- fidelity: the text is fed in chunks (no larger than divide_length, so compression happens
  as it would while decoding); every position's next-token distribution is compared with
  the full cache's: KL(full || method), top-1 agreement, and the perplexity of both.
- recall: at checkpoints, the share of the full-cache attention of the next chunk's queries
  (every compressed layer and query head) that falls on the keys the compressed cache still holds.
- retrieval: a pass key placed early in a long text, asked for at the end; and a number the
  model wrote itself at the start, asked for after a long text.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from triattention_gguf.calibrate import default_text, last_queries, query_capture
from triattention_gguf.compression import cache_rows, compressed_layers
from triattention_gguf.harness import FULL, Config, Runner, configs_for, parse_budgets, runners
from triattention_gguf.modelinfo import ModelFacts, detokenize, model_with_facts, tokenize


@dataclass
class Totals:
    kl: float = 0.0
    top1: int = 0
    nll: float = 0.0
    positions: int = 0
    recall: float = 0.0
    recall_points: int = 0


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def _held(runner: Runner, facts: ModelFacts, start: int) -> np.ndarray:
    """[query head, key] whether runner's cache holds each key before `start`."""
    upto = runner.stats()["compressed_upto"]
    gqa = facts.n_head // facts.n_head_kv
    held = np.zeros((facts.n_head, start), dtype=bool)
    for hk, positions in enumerate(runner.kept_positions()):
        held[hk * gqa:(hk + 1) * gqa, positions[positions < start]] = True
    held[:, upto + 1:start] = True  # read since the last compression: held as they are
    return held


def _recall(full: Runner, calib, facts: ModelFacts, start: int, n: int, others: list[Runner]) -> list[float]:
    """Per runner, the share of the full-cache attention that the queries of the chunk at
    [start, start + n) give keys before `start` which lands on keys the runner's cache holds
    (mean over layers, query heads and queries)."""
    hd, h, hkv = facts.head_dim, facts.n_head, facts.n_head_kv
    held = [_held(r, facts, start) for r in others]
    causal = np.arange(start + n)[None, :] > (start + np.arange(n))[:, None]
    shares = np.zeros(len(others))
    layers = compressed_layers(full.ctx)  # a sliding-window model's window layers are llama.cpp's own
    for il in layers:
        q = last_queries(calib, facts, il, True, n)  # [n, h, hd]
        k = cache_rows(full.ctx, il, hkv * hd, hkv * hd)[0].reshape(-1, hkv, hd)[:, np.arange(h) // (h // hkv)]
        logits = np.einsum("qhd,khd->hqk", q, k) / np.float32(np.sqrt(hd))
        logits[:, causal] = -np.inf
        p = np.exp(logits - logits.max(-1, keepdims=True))
        old = p[:, :, :start]
        mass = np.maximum(old.sum(-1), 1e-30)
        for i, mask in enumerate(held):
            shares[i] += ((old * mask[:, None, :]).sum(-1) / mass).mean()
    return list(shares / len(layers))


def fidelity(model, facts: ModelFacts, tokens: list[int], configs: list[Config], divide_length: int, chunk: int,
             n_threads: int | None, recall_checkpoints: int = 4, progress: bool = True) -> dict[str, dict]:
    """Teacher-forced comparison of every config with the full cache on tokens."""
    n_chunks = (len(tokens) - 1 + chunk - 1) // chunk
    checkpoints = {n_chunks * (i + 1) // (recall_checkpoints + 1) for i in range(recall_checkpoints)}
    totals = {FULL: Totals(), **{c.label: Totals() for c in configs}}
    with query_capture(model, keep_last=True) as (calib, feed), \
            runners(model, facts, configs, len(tokens), divide_length, chunk, n_threads, **feed) as group:
        full, others = group[0], group[1:]
        for index in tqdm(range(n_chunks), desc=f"eval {len(configs)} configs", unit="chunk", disable=not progress):
            start = index * chunk
            piece = tokens[start:start + chunk]
            targets = np.array(tokens[start + 1:start + 1 + len(piece)])
            lp_full = _log_softmax(full.decode(piece))[:len(targets)]
            p_full = np.exp(lp_full)
            for runner in group:
                t = totals[runner.config.label]
                lp = lp_full if runner is full else _log_softmax(runner.decode(piece))[:len(targets)]
                t.kl += float((p_full * (lp_full - lp)).sum())
                t.top1 += int((lp.argmax(1) == lp_full.argmax(1)).sum())
                t.nll -= float(lp[np.arange(len(targets)), targets].sum())
                t.positions += len(targets)
            if index in checkpoints and start > 0:
                for runner, share in zip(others, _recall(full, calib, facts, start, len(piece), others)):
                    totals[runner.config.label].recall += share
                    totals[runner.config.label].recall_points += 1
        compressions = {r.config.label: r.stats()["compressions"] for r in others}
    return {label: {"kl": t.kl / t.positions, "top1": t.top1 / t.positions,
                    "ppl": float(np.exp(t.nll / t.positions)),
                    "recall": t.recall / t.recall_points if t.recall_points else 1.0,
                    "compressions": compressions.get(label, 0)}
            for label, t in totals.items()}


def _needle_prompts(model, filler: list[int], context: int, trials: int) -> list[tuple[list[int], str]]:
    """(prompt, answer): a pass key at a depth in filler text of `context` tokens, asked for at the end."""
    rng = random.Random(0)
    intro = tokenize(model, "There is a pass key hidden inside a lot of irrelevant text. Find it and remember it.\n\n")
    question = tokenize(model, "\n\nWhat is the pass key? The pass key is")
    out = []
    for i in range(trials):
        key = str(rng.randrange(10000, 99999))
        needle = tokenize(model, f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n")
        room = context - len(intro) - len(needle) - len(question) - 8
        depth = room * (i + 1) // (trials + 2)
        body = filler[i * 997:i * 997 + room]
        out.append((intro + body[:depth] + needle + body[depth:] + question, key))
    return out


def retrieval(model, facts: ModelFacts, configs: list[Config], context: int, divide_length: int, chunk: int,
              n_threads: int | None, trials: int = 3, progress: bool = True) -> dict[str, dict]:
    """Accuracy per config on pass keys and on a number the model states itself, then is asked for."""
    filler = tokenize(model, default_text())
    prompts = _needle_prompts(model, filler, context, trials)
    own_intro = tokenize(model, "Write down a five-digit number and remember it.\nMy number is ")
    own_question = tokenize(model, "\n\nWhat was the five-digit number written at the start? The number was ")
    scores = {}
    with runners(model, facts, configs, context + 64, divide_length, chunk, n_threads) as group:
        for runner in tqdm(group, desc="retrieval", unit="config", disable=not progress):
            passkey = own = 0
            for i, (prompt, key) in enumerate(prompts):
                runner.reset()
                runner.feed(prompt)
                passkey += key in detokenize(model, runner.greedy(8))
                runner.reset()
                runner.feed(own_intro)
                stated = re.search(r"\d{3,}", detokenize(model, runner.greedy(8)))
                body = filler[5000 + i * 991:5000 + i * 991 + context - len(own_intro) - len(own_question) - 24]
                runner.feed(body + own_question)
                own += bool(stated) and stated.group(0) in detokenize(model, runner.greedy(8))
            scores[runner.config.label] = {"passkey": passkey / trials, "own_output": own / trials}
    return scores


def evaluate(model_path: str, methods: list[str], budget_specs: list[str], text: str, n_tokens: int,
             divide_length: int = 128, chunk: int = 32, retrieval_tokens: int = 2048, retrieval_trials: int = 3,
             recall_checkpoints: int = 4, n_threads: int | None = None, progress: bool = True) -> list[dict]:
    """One row per method x budget (and one for the full cache) on one model."""
    with model_with_facts(model_path) as (model, facts):
        tokens = tokenize(model, text)[:min(n_tokens, facts.n_ctx_train)]
        if len(tokens) < 2 * chunk:
            raise ValueError(f"the text has {len(tokens)} tokens; eval needs at least {2 * chunk}")
        budgets = parse_budgets(budget_specs, len(tokens))
        configs = configs_for(methods, budgets, divide_length)
        quality = fidelity(model, facts, tokens, configs, divide_length, chunk, n_threads, recall_checkpoints, progress)
        retrieval_context = min(retrieval_tokens, facts.n_ctx_train)
        found = (retrieval(model, facts, [c for c in configs if c.budget < retrieval_context], retrieval_context,
                           divide_length, chunk, n_threads, retrieval_trials, progress) if retrieval_trials else {})
    rows = []
    for config in [Config(FULL)] + configs:
        q, r = quality[config.label], found.get(config.label, {})
        rows.append({"model": Path(model_path).name, "method": config.method, "budget": config.budget or len(tokens),
                     "fraction": round((config.budget or len(tokens)) / len(tokens), 4), "tokens": len(tokens),
                     "kl": q["kl"], "top1": q["top1"], "ppl": q["ppl"], "ppl_full": quality[FULL]["ppl"],
                     "recall": q["recall"], "compressions": q["compressions"],
                     "passkey": r.get("passkey"), "own_output": r.get("own_output")})
    return rows
