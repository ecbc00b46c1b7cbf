"""Several KV-cache configurations of one loaded model, fed the same tokens side by side
(the engine behind `eval` and `bench`)."""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import numpy as np

from triattention_gguf._lib import lib, llama_cpp_bindings as ll
from triattention_gguf.centers import Centers, load_centers
from triattention_gguf.compression import (CompressionError, check_arguments, configure, head_positions, keep_prompt,
                                          physical_cells, stats)
from triattention_gguf.methods import DEFAULT_SELECT, MAX_HORIZON, MIN_CONCENTRATION, SELECT_MODES
from triattention_gguf.modelinfo import ModelFacts, model_context

FULL = "none"
KEEP_PROMPT = "+prompt"  # a method spec's suffix: the prompt is never evicted (generate eval)
KEEP_RECENT = "+recent"  # a method spec's suffix, with a number N or not: the newest budget // N tokens
RECENT_SHARE = 4         # (N = RECENT_SHARE without one) are never evicted, e.g. tri+recent, tri+recent8
HORIZON = "+horizon"     # a method spec's suffix with a number: tri's horizon, e.g. tri+horizon4
CONCENTRATION = "+conc"  # a method spec's suffix with a number: tri's min_concentration, e.g. tri+conc0.72


@dataclass(frozen=True)
class Config:
    method: str
    budget: int = 0  # 0 for the full cache
    select: str = DEFAULT_SELECT
    keep_prompt: bool = False
    recent: int = 0  # keep the newest budget // recent tokens (0: none)
    horizon: int = MAX_HORIZON
    min_concentration: float = MIN_CONCENTRATION

    @classmethod
    def parse(cls, spec: str, budget: int = 0) -> "Config":
        """A method spec: name[/select][+recent[N]][+prompt][+horizonN][+concR], e.g. "tri", "tri/per-head",
        "tri+recent", "tri+recent8", "snapkv+prompt", "tri+horizon4", "tri+conc0.72"."""
        name, *suffixes = spec.split("+")
        keep_prompt, recent, horizon, min_concentration = False, 0, MAX_HORIZON, MIN_CONCENTRATION
        for suffix in (f"+{s}" for s in suffixes):
            if match := re.fullmatch(re.escape(KEEP_RECENT) + r"([1-9]\d*)?", suffix):
                recent = int(match.group(1) or RECENT_SHARE)
            elif match := re.fullmatch(re.escape(HORIZON) + r"(\d+)", suffix):
                horizon = int(match.group(1))
            elif match := re.fullmatch(re.escape(CONCENTRATION) + r"(\d+(?:\.\d+)?)", suffix):
                min_concentration = float(match.group(1))
            elif suffix == KEEP_PROMPT:
                keep_prompt = True
            else:
                raise CompressionError(f"unknown suffix {suffix} in {spec!r}; use {KEEP_RECENT}[N], {KEEP_PROMPT}, "
                                       f"{HORIZON}N (tri's horizon in tokens) and/or {CONCENTRATION}R (tri's "
                                       f"min_concentration)")
        method, _, select = name.partition("/")
        if select and select not in SELECT_MODES:
            raise CompressionError(f"unknown select mode {select!r} in {spec!r}; choose one of {', '.join(SELECT_MODES)}")
        return cls(method, budget, select or DEFAULT_SELECT, keep_prompt, recent, horizon, min_concentration)

    @property
    def keep_recent(self) -> int:
        return self.budget // self.recent if self.recent else 0

    @property
    def name(self) -> str:
        """The method spec without the budget."""
        if self.method == FULL:
            return FULL
        select = "" if self.select == DEFAULT_SELECT else f"/{self.select}"
        horizon = "" if self.horizon == MAX_HORIZON else f"{HORIZON}{self.horizon}"
        concentration = ("" if self.min_concentration == MIN_CONCENTRATION
                         else f"{CONCENTRATION}{self.min_concentration:g}")
        recent = "" if not self.recent else KEEP_RECENT if self.recent == RECENT_SHARE else f"{KEEP_RECENT}{self.recent}"
        return f"{self.method}{select}{recent}{KEEP_PROMPT if self.keep_prompt else ''}{horizon}{concentration}"

    @property
    def label(self) -> str:
        return self.name if self.method == FULL else f"{self.name}@{self.budget}"


def tri_defaults(centres: Centers | None, budget: int) -> Config:
    """tri's settings where none are given: those `tune` stored with the centres, else the reference's."""
    return Config.parse(centres.tuned if centres is not None and centres.tuned else "tri", budget)


def parse_budgets(specs: list[str], context: int) -> list[int]:
    """Budgets as absolute cells ("1024") or fractions of the context ("1/4"), below the context."""
    budgets = set()
    for spec in specs:
        match = re.fullmatch(r"\s*(\d+)\s*(?:/\s*(\d+))?\s*", spec)
        if not match or int(match.group(1)) == 0 or (match.group(2) is not None and int(match.group(2)) == 0):
            raise ValueError(f"budget {spec!r} is neither a number of cells (1024) nor a fraction of the context (1/4)")
        n, d = int(match.group(1)), match.group(2)
        budgets.add(context * n // int(d) if d else n)
    return sorted(b for b in budgets if b < context)


def configs_for(methods: list[str], budgets: list[int], divide_length: int) -> list[Config]:
    """One Config per method spec (see Config.parse) and budget, the full cache left out."""
    out = []
    for spec in methods:
        for budget in budgets:
            config = Config.parse(spec, budget)
            if config.method == FULL:
                break
            check_arguments(config.method, budget, divide_length, config.select, config.keep_recent, config.horizon,
                            config.min_concentration)
            out.append(config)
    return out


class Runner:
    """One llama_context of a Config on a shared llama_model*: decodes chunks at explicit
    positions and returns their logits."""

    def __init__(self, stack: contextlib.ExitStack, model, facts: ModelFacts, config: Config, n_ctx: int,
                 divide_length: int, chunk: int, n_threads: int | None, centres: Centers | None, **overrides):
        self.config, self.n_past, self.n_vocab = config, 0, ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(model))
        compressing = config.method != FULL
        physical = physical_cells(config.budget, divide_length, chunk, facts.n_swa) if compressing else n_ctx
        # swa_full=False: a sliding-window model's window cache as llama.cpp sizes it for one sequence, alike
        # for the full cache and the compressed ones (their full-attention parts are what differs)
        overrides.setdefault("swa_full", False)
        self.ctx = stack.enter_context(model_context(model, n_ctx=physical, n_threads=n_threads, n_ubatch=chunk,
                                                     **overrides))
        if compressing:
            configure(self.ctx, config.method, config.budget, divide_length, config.select,
                      centers=centres if config.method == "tri" else None, keep_recent=config.keep_recent,
                      horizon=config.horizon, min_concentration=config.min_concentration)
        self._batch = ll.llama_batch_init(chunk, 0, 1)
        stack.callback(ll.llama_batch_free, self._batch)
        self.chunk = chunk

    def decode(self, tokens: list[int], logits: bool = True) -> np.ndarray | None:
        """Decode tokens (at most one chunk) after those before; their logits [n, n_vocab] when asked
        (else only the last token's logits are computed)."""
        n = len(tokens)
        assert 0 < n <= self.chunk
        b = self._batch
        for i, token in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i] = token, self.n_past + i, 1
            b.seq_id[i][0] = 0
            b.logits[i] = logits or i == n - 1
        b.n_tokens = n
        rc = ll.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"{self.config.label}: llama_decode failed ({rc}): "
                               f"{lib.triattention_last_error().decode()}")
        self.n_past += n
        rows = n if logits else 1
        out = np.ctypeslib.as_array(ll.llama_get_logits(self.ctx), shape=(rows, self.n_vocab))
        return out.copy() if logits else out[-1].copy()

    def feed(self, tokens: list[int]) -> None:
        """Decode tokens in chunks, computing only the last token's logits."""
        for start in range(0, len(tokens), self.chunk):
            self.decode(tokens[start:start + self.chunk], logits=False)

    def greedy(self, n: int, stop=None) -> list[int]:
        """n greedy tokens after what was decoded (the last decode's logits start it), ending
        before the first token for which stop(token) is true."""
        logits = np.ctypeslib.as_array(ll.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))
        out = []
        for _ in range(n):
            token = int(np.argmax(logits))
            if stop is not None and stop(token):
                break
            out.append(token)
            logits = self.decode([token], logits=False)
        return out

    def reset(self) -> None:
        """Empty the cache (compression records included): the next decode starts at position 0."""
        ll.llama_memory_clear(ll.llama_get_memory(self.ctx), True)
        self.n_past = 0

    def stats(self) -> dict:
        s = stats(self.ctx)  # zeros for a context that never compressed
        info = lib.triattention_get_cache_info(self.ctx)
        return {**s, "kv_bytes": info.bytes + info.swa_bytes, "cells_capacity": info.cells_capacity}

    def keep_prompt(self, n: int) -> bool:
        """With a keep_prompt Config, never evict positions [0, n) when they fit in the budget
        (whether they do is returned); else nothing is kept."""
        return self.config.keep_prompt and keep_prompt(self.ctx, n, self.config.budget, self.config.keep_recent)

    def kept_positions(self) -> list[list[np.ndarray]]:
        """Per group (each compressed layer with per-layer-head selection, else one) and KV head,
        the positions that the compacted cells hold (no groups before any compression)."""
        return [[h[h >= 0] for h in group] for group in head_positions(self.ctx)]


@contextlib.contextmanager
def runners(model, facts: ModelFacts, configs: list[Config], n_ctx: int, divide_length: int, chunk: int,
            n_threads: int | None = None, **full_overrides):
    """A full-cache Runner (first; full_overrides set its context parameters) and one per config."""
    centres = load_centers(facts) if any(c.method == "tri" for c in configs) else None
    with contextlib.ExitStack() as stack:
        full = Runner(stack, model, facts, Config(FULL), n_ctx, divide_length, chunk, n_threads, None, **full_overrides)
        yield [full] + [Runner(stack, model, facts, c, n_ctx, divide_length, chunk, n_threads, centres)
                        for c in configs]
