"""`triattention-gguf eval`: what compression costs in quality, against the full cache of the same run.

- fidelity (teacher-forced): sequences are fed in chunks (no larger than divide_length, so
  compression happens as it would while decoding); every scored position's next-token
  distribution is compared with the full cache's: KL(full || method), top-1 agreement, and the
  perplexity of both. The sequences are windows of a text (`windows`), or in the paper's setting
  (`generate`) a task set's prompts followed by what the full cache generated for them greedily,
  scored on the generated positions only.
- each method's mean difference in KL to the best baseline at its budget, over the positions
  after the first compression, with a block-bootstrap 95% interval (paired.py); KL split by
  positions that copy a phrase from more than a budget back.
- recall: at checkpoints, the share of the full-cache attention of the next chunk's queries
  (every compressed layer and query head) that falls on the keys the compressed cache still holds.
- retrieval: a pass key placed early in a long text, asked for at the end; and a number the
  model wrote itself at the start, asked for after a long text.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import itertools
import json
import random
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
from tqdm import tqdm

from triattention_gguf._lib import llama_cpp_bindings as ll
from triattention_gguf.calibrate import default_text, last_queries, query_capture
from triattention_gguf.compression import cache_rows, compressed_layers
from triattention_gguf.harness import FULL, KEEP_PROMPT, Config, Runner, configs_for, parse_budgets, runners
from triattention_gguf.modelinfo import ModelFacts, detokenize, model_with_facts, tokenize
from triattention_gguf.paired import block_bootstrap_ci, block_ids, far_copies

BASELINES = ("streaming", "knorm", "random", "snapkv")


@dataclass
class Trace:
    """One config's measures at every scored position, in the order they were scored."""
    kl: list = field(default_factory=list)
    top1: list = field(default_factory=list)          # its argmax equals the full cache's
    follows: list = field(default_factory=list)       # its argmax equals the token that follows
    nll: list = field(default_factory=list)
    compressed: list = field(default_factory=list)    # after its first compression in the sequence
    recall: list = field(default_factory=list)
    compressions: int = 0
    prompts_kept: int = 0                             # sequences whose prompt a keep_prompt config kept

    def add(self, **columns) -> None:
        for name, values in columns.items():
            getattr(self, name).append(np.asarray(values))

    def array(self, name: str) -> np.ndarray:
        parts = getattr(self, name)
        return np.concatenate(parts) if parts else np.zeros(0)


@dataclass
class Scored:
    """Where the scored positions come from: segment (sequence) and position of each, the tokens
    of every segment, and the first scored position of each."""
    segment: list = field(default_factory=list)
    position: list = field(default_factory=list)
    tokens: list = field(default_factory=list)
    start: list = field(default_factory=list)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def _held(runner: Runner, facts: ModelFacts, start: int) -> list[np.ndarray]:
    """Per group of the runner's records, [query head, key]: whether its cache holds each key before `start`."""
    upto = runner.stats()["compressed_upto"]
    gqa = facts.n_head // facts.n_head_kv
    out = []
    for group in runner.kept_positions() or [[]]:
        held = np.zeros((facts.n_head, start), dtype=bool)
        for hk, positions in enumerate(group):
            held[hk * gqa:(hk + 1) * gqa, positions[positions < start]] = True
        held[:, upto + 1:start] = True  # read since the last compression: held as they are
        out.append(held)
    return out


def _recall(full: Runner, calib, facts: ModelFacts, start: int, n: int, others: list[Runner]) -> list[float]:
    """Per runner, the share of the full-cache attention that the queries of the chunk at
    [start, start + n) give keys before `start` which lands on keys the runner's cache holds
    (mean over layers, query heads and queries)."""
    hd, h, hkv = facts.head_dim, facts.n_head, facts.n_head_kv
    held = [_held(r, facts, start) for r in others]
    causal = np.arange(start + n)[None, :] > (start + np.arange(n))[:, None]
    shares = np.zeros(len(others))
    layers = compressed_layers(full.ctx)  # a sliding-window model's window layers are llama.cpp's own
    for li, il in enumerate(layers):
        q = last_queries(calib, facts, il, True, n)  # [n, h, hd]
        k = cache_rows(full.ctx, il, hkv * hd, hkv * hd)[0].reshape(-1, hkv, hd)[:, np.arange(h) // (h // hkv)]
        logits = np.einsum("qhd,khd->hqk", q, k) / np.float32(np.sqrt(hd))
        logits[:, causal] = -np.inf
        p = np.exp(logits - logits.max(-1, keepdims=True))
        old = p[:, :, :start]
        mass = np.maximum(old.sum(-1), 1e-30)
        for i, groups in enumerate(held):
            mask = groups[li % len(groups)]
            shares[i] += ((old * mask[:, None, :]).sum(-1) / mass).mean()
    return list(shares / len(layers))


def _read(group: list[Runner], tokens: list[int], score_from: int, chunk: int, traces: dict[str, Trace],
          recall_at: set[int] = frozenset(), calib=None, facts: ModelFacts | None = None) -> None:
    """Feed tokens to every runner from an empty cache, and add the measures of positions
    score_from .. len(tokens) - 2 (each predicting the next token) to traces."""
    full, others = group[0], group[1:]
    for runner in group:
        runner.reset()
    before = {runner.config.label: runner.stats()["compressions"] for runner in group}
    n_chunks = (len(tokens) - 1 + chunk - 1) // chunk
    for index in range(n_chunks):
        start = index * chunk
        piece = tokens[start:start + chunk]
        targets = np.array(tokens[start + 1:start + 1 + len(piece)])
        lo = max(0, score_from - start)
        if lo >= len(targets):
            for runner in group:
                runner.decode(piece, logits=False)
            continue
        lp_full = _log_softmax(full.decode(piece)[lo:len(targets)])
        p_full, best = np.exp(lp_full), lp_full.argmax(1)
        for runner in group:
            lp = lp_full if runner is full else _log_softmax(runner.decode(piece)[lo:len(targets)])
            traces[runner.config.label].add(
                kl=(p_full * (lp_full - lp)).sum(1), top1=lp.argmax(1) == best, follows=lp.argmax(1) == targets[lo:],
                nll=-lp[np.arange(len(lp)), targets[lo:]],
                compressed=np.full(len(lp), runner.stats()["compressions"] > before[runner.config.label]))
        if index in recall_at and start > 0:
            traces[full.config.label].add(recall=[1.0])  # it holds every key
            for runner, share in zip(others, _recall(full, calib, facts, start, len(piece), others)):
                traces[runner.config.label].add(recall=[share])


def fidelity(model, facts: ModelFacts, sequences: list[tuple[list[int], int]], configs: list[Config],
             divide_length: int, chunk: int, n_threads: int | None, recall_checkpoints: int = 0,
             progress: bool = True) -> tuple[dict[str, Trace], Scored]:
    """Teacher-forced comparison of every config with the full cache on each (tokens, n_prompt)
    sequence, scored on the positions that predict tokens[n_prompt:] (a keep_prompt config keeps
    tokens[:n_prompt]); with recall_checkpoints, attention recall at that many chunks of each."""
    n_ctx = max(len(tokens) for tokens, _ in sequences)
    traces = {FULL: Trace(), **{c.label: Trace() for c in configs}}
    scored = Scored()
    capture = query_capture(model, keep_last=True) if recall_checkpoints else contextlib.nullcontext((None, {}))
    with capture as (calib, feed), \
            runners(model, facts, configs, n_ctx, divide_length, chunk, n_threads, **feed) as group:
        for segment, (tokens, n_prompt) in enumerate(tqdm(sequences, desc=f"eval {len(configs)} configs",
                                                           unit="sequence", disable=not progress)):
            n_chunks = (len(tokens) - 1 + chunk - 1) // chunk
            recall_at = {n_chunks * (i + 1) // (recall_checkpoints + 1) for i in range(recall_checkpoints)}
            for runner in group[1:]:
                traces[runner.config.label].prompts_kept += runner.keep_prompt(n_prompt)
            score_from = n_prompt - 1
            _read(group, tokens, score_from, chunk, traces, recall_at, calib, facts)
            n = len(tokens) - 1 - score_from
            scored.segment.append(np.full(n, segment))
            scored.position.append(np.arange(score_from, len(tokens) - 1))
            scored.tokens.append(tokens)
            scored.start.append(score_from)
        for runner in group:
            traces[runner.config.label].compressions = runner.stats()["compressions"]
    return traces, scored


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def kl_after_compression(trace: Trace) -> float | None:
    """Mean KL at the positions after the trace's first compression; None when it never compressed."""
    return _mean(trace.array("kl")[trace.array("compressed").astype(bool)])


def _kl_after(trace: Trace) -> float:
    """kl_after_compression; infinite for a config that never compressed (never the best)."""
    kl = kl_after_compression(trace)
    return float("inf") if kl is None else kl


def paired_kl(traces: dict[str, Trace], label: str, other: str) -> tuple[np.ndarray, np.ndarray]:
    """KL of label minus other's at the positions after both compressed, and the mask of those positions."""
    both = traces[label].array("compressed").astype(bool) & traces[other].array("compressed").astype(bool)
    return traces[label].array("kl")[both] - traces[other].array("kl")[both], both


# tri's settings that `vs_select` puts back at their defaults, in the order tried: the one named
# last in a method spec first
_SETTINGS = ("min_concentration", "horizon", "select")


def _nearest_default(config: Config, traces: dict[str, Trace]) -> Config | None:
    """The config of the run that is config with as few of its settings as possible back at
    their defaults: tri+horizon4+conc0.72 pairs with tri+horizon4 when that ran, else with
    tri+conc0.72, else with tri; None when none of them ran."""
    default = Config(config.method)
    changed = [name for name in _SETTINGS if getattr(config, name) != getattr(default, name)]
    for n in range(1, len(changed) + 1):
        for names in itertools.combinations(changed, n):
            candidate = dataclasses.replace(config, **{name: getattr(default, name) for name in names})
            if candidate.label in traces:
                return candidate
    return None


def summarize(traces: dict[str, Trace], scored: Scored, configs: list[Config], block: int) -> dict[str, dict]:
    """Per config label: means over every scored position and over those after the first
    compression, KL split by far copies, and against the best baseline at its budget (and, for
    tri with a setting off its default, against the nearest config in the run with it back at the
    default) the paired mean difference of KL after the first compression with its 95%
    block-bootstrap interval (against the best baseline also per sequence: window or prompt)."""
    segments, positions = np.concatenate(scored.segment), np.concatenate(scored.position)
    blocks = block_ids(segments, positions, block)

    far_masks: dict[int, np.ndarray] = {}  # per budget: every config at one budget shares it

    def far_mask(budget: int) -> np.ndarray:
        if budget not in far_masks:
            far_masks[budget] = np.concatenate([far_copies(tokens, budget)[start:]
                                                for tokens, start in zip(scored.tokens, scored.start)])
        return far_masks[budget]

    def after(label: str) -> np.ndarray:
        return traces[label].array("compressed").astype(bool)

    def paired(label: str, other: str) -> tuple[float, float, float, list[float]]:
        """KL of label minus other's, over positions after both compressed: mean, 95% interval, and
        the mean per sequence (the pooled mean's parts: whether windows or prompts disagree)."""
        diff, both = paired_kl(traces, label, other)
        by_sequence = [float(diff[segments[both] == s].mean()) for s in np.unique(segments[both])]
        return *block_bootstrap_ci(diff, np.unique(blocks[both], return_inverse=True)[1]), by_sequence

    out = {}
    for config in [Config(FULL)] + configs:
        t = traces[config.label]
        kl, compressed, follows = t.array("kl"), after(config.label), t.array("follows").astype(bool)
        firsts = [np.argmin(f) if not f.all() else len(f) for f in np.split(follows, np.cumsum(
            [len(s) for s in scored.segment])[:-1])]
        row = {"kl": float(kl.mean()), "kl_compressed": _mean(kl[compressed]), "top1": float(t.array("top1").mean()),
               "top1_compressed": _mean(t.array("top1")[compressed]), "ppl": float(np.exp(t.array("nll").mean())),
               "recall": _mean(t.array("recall")), "first_diff": float(np.mean(firsts)),
               "compressions": t.compressions, "prompts_kept": t.prompts_kept}
        if config.method != FULL:
            far = far_mask(config.budget)
            row.update(kl_far=_mean(kl[compressed & far]), kl_near=_mean(kl[compressed & ~far]),
                       far_share=_mean(far[compressed].astype(float)))
            rivals = [c for c in configs if c.method in BASELINES and c.budget == config.budget
                      and c.keep_prompt == config.keep_prompt and c != config]
            if rivals:
                best = min(rivals, key=lambda c: _kl_after(traces[c.label]))
                d, lo, hi, by_sequence = paired(config.label, best.label)
                row.update(vs=best.name, d_kl=d, d_lo=lo, d_hi=hi, d_by_sequence=by_sequence)  # the list: JSON only
            reference = _nearest_default(config, traces)
            if reference is not None:  # select modes, horizons, ... side by side
                d, lo, hi, _ = paired(config.label, reference.label)
                row.update(vs_select=reference.name, ds_kl=d, ds_lo=lo, ds_hi=hi)
        out[config.label] = row
    return out


def task_prompts(model, limit: int = 0) -> list[tuple[str, list[int]]]:
    """(kind, tokens) of the shipped task set's prompts (data/generate_tasks.json: step-by-step
    reasoning, code, long explanations, multi-turn chats) in the model's chat template."""
    tasks = json.loads(resources.files("triattention_gguf").joinpath("data/generate_tasks.json").read_text())
    return [(task["kind"], chat_tokens(model, task["messages"], "--generate")) for task in tasks[:limit or None]]


def chat_tokens(model, messages: list[dict], needed_by: str) -> list[int]:
    """The tokens of messages ({"role", "content"}) in the model's chat template, ready for the
    assistant's answer; a ValueError naming needed_by when the model has no template llama.cpp knows."""
    template = ll.llama_model_chat_template(model, None)
    if not template:
        raise ValueError(f"the model has no chat template; {needed_by} needs one to write its prompts")
    array = (ll.llama_chat_message * len(messages))(
        *[ll.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in messages])
    size = ll.llama_chat_apply_template(template, array, len(messages), True, None, 0)
    buf = ctypes.create_string_buffer(size + 1)
    if size < 0 or ll.llama_chat_apply_template(template, array, len(messages), True, buf, size + 1) != size:
        raise ValueError(f"llama.cpp does not know the model's chat template; {needed_by} needs one it knows")
    return tokenize(model, buf.raw[:size].decode("utf-8"), special=True)


def generated(model, facts: ModelFacts, prompts: list[list[int]], n: int, chunk: int, n_threads: int | None,
              progress: bool = True) -> list[tuple[list[int], int]]:
    """(prompt + up to n tokens the full cache generates greedily, stopping at an end of generation;
    len(prompt)) per prompt."""
    vocab = ll.llama_model_get_vocab(model)
    out = []
    with runners(model, facts, [], max(map(len, prompts)) + n + 1, chunk, chunk, n_threads) as (full,):
        for prompt in tqdm(prompts, desc=f"generate {n} tokens", unit="prompt", disable=not progress):
            full.reset()
            full.feed(prompt)
            out.append((prompt + full.greedy(n, stop=lambda token: ll.llama_vocab_is_eog(vocab, token)), len(prompt)))
    return out


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


def text_windows(tokens: list[int], n: int, windows: int) -> list[list[int]]:
    """`windows` windows of n tokens: apart when the text is long enough, else evenly spread."""
    if windows * n <= len(tokens):
        return [tokens[i * n:(i + 1) * n] for i in range(windows)]
    starts = np.linspace(0, len(tokens) - n, windows).astype(int) if windows > 1 else [0]
    return [tokens[s:s + n] for s in starts]


def evaluate(model_path: str, methods: list[str], budget_specs: list[str], text: str, n_tokens: int,
             divide_length: int = 128, chunk: int = 32, retrieval_tokens: int = 2048, retrieval_trials: int = 3,
             recall_checkpoints: int = 4, n_threads: int | None = None, progress: bool = True, windows: int = 1,
             generate: int = 0, tasks: int = 0) -> list[dict]:
    """One row per method x budget (and one for the full cache) on one model: on `windows` windows
    of n_tokens of text, or with generate > 0 on the task set's prompts and the generate tokens the
    full cache writes after each (budgets are then fractions of `generate`; every method is also
    run with its prompt kept)."""
    with model_with_facts(model_path) as (model, facts):
        if generate:
            prompts = task_prompts(model, tasks)
            sequences = generated(model, facts, [p for _, p in prompts], generate, chunk, n_threads, progress)
            budgets = parse_budgets(budget_specs, generate)
            methods = methods + [m + KEEP_PROMPT for m in methods if Config.parse(m).method != FULL
                                 and not m.endswith(KEEP_PROMPT)]
            recall_checkpoints = retrieval_trials = 0
        else:
            n = min(n_tokens, facts.n_ctx_train)
            pieces = text_windows(tokenize(model, text), n, windows)
            if len(pieces[0]) < 2 * chunk:
                raise ValueError(f"the text has {len(pieces[0])} tokens; eval needs at least {2 * chunk}")
            sequences = [(piece, 1) for piece in pieces]
            budgets = parse_budgets(budget_specs, len(pieces[0]))
        configs = configs_for(methods, budgets, divide_length)
        traces, scored = fidelity(model, facts, sequences, configs, divide_length, chunk, n_threads,
                                  recall_checkpoints, progress)
        quality = summarize(traces, scored, configs, divide_length)
        retrieval_context = min(retrieval_tokens, facts.n_ctx_train)
        found = (retrieval(model, facts, [c for c in configs if c.budget < retrieval_context], retrieval_context,
                           divide_length, chunk, n_threads, retrieval_trials, progress) if retrieval_trials else {})
    length = generate or len(sequences[0][0])
    rows = []
    for config in [Config(FULL)] + configs:
        q, r = quality[config.label], found.get(config.label, {})
        if not generate:  # a text is no greedy trajectory: its first difference means nothing
            q = {**q, "first_diff": None, "prompts_kept": None}
        budget = config.budget or length
        rows.append({"model": Path(model_path).name, "setting": f"generate {generate}" if generate else "text",
                     "method": config.name, "budget": budget, "fraction": round(budget / length, 4),
                     "sequences": len(sequences), "positions": len(np.concatenate(scored.position)),
                     **q, "ppl_full": quality[FULL]["ppl"],
                     "passkey": r.get("passkey"), "own_output": r.get("own_output")})
    return rows
