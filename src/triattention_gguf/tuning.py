"""`triattention-gguf tune`: choose tri's default settings for one model by measuring them.

Each candidate of methods.TUNED_SPECS is paired against the reference's settings ("tri", the
first) with the eval's measure (evaluation.py: KL to the full cache at the positions after the
first compression) on text that calibration and the evals of BENCHMARKS.md do not read: a
teacher-forced window of it, and the model's own greedy explanations of passages of it (the
paper's setting), each at 1/8 and 1/4 of its length. A candidate replaces the reference only when
its KL pooled over those four cells is lower, the 95% block-bootstrap interval of the difference
below 0, and no cell's interval lies above 0. The choice is stored with the centres, where Llama
and serve take their defaults from (README.md, "Tuned defaults").
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from triattention_gguf.calibrate import default_text
from triattention_gguf.centers import load_centers
from triattention_gguf.evaluation import chat_tokens, fidelity, generated, kl_after_compression, paired_kl
from triattention_gguf.harness import Config, configs_for, parse_budgets
from triattention_gguf.methods import TUNED_SPECS
from triattention_gguf.modelinfo import detokenize, model_with_facts, tokenize
from triattention_gguf.paired import block_bootstrap_ci, block_ids

REFERENCE = TUNED_SPECS[0]
# of calibrate.default_text(): after the 32,768 tokens embed-centers reads by default and the
# held-out text that BENCHMARKS.md's evals read (from character 200,000 on, about 115,000 characters)
TUNING_TEXT = slice(400_000, None)
BUDGETS = ("1/8", "1/4")
PASSAGE_TOKENS = 300
ASK = "Explain this part of Python's documentation step by step, with an example for each point:\n\n"


@dataclass
class Cell:
    """One setting at one budget: each spec's mean KL after the first compression, and each
    candidate's paired difference to the reference (mean, 95% interval)."""
    setting: str  # "text" or "generate"
    budget: int
    kl: dict[str, float]
    vs_reference: dict[str, tuple[float, float, float]]


@dataclass
class Tuning:
    cells: list[Cell]
    pooled: dict[str, tuple[float, float, float]]  # candidate -> difference to the reference over every cell
    choice: str

    def table(self) -> str:
        """The cells and the pooled difference as a markdown table."""
        candidates = list(self.pooled)
        head = ["setting", "budget", REFERENCE, *candidates, *(f"{c} - {REFERENCE} [95%]" for c in candidates)]
        rows = [head, ["---"] * len(head)]
        rows += [[cell.setting, str(cell.budget), *(f"{cell.kl[s]:.4f}" for s in [REFERENCE, *candidates]),
                  *(_interval(cell.vs_reference[c]) for c in candidates)] for cell in self.cells]
        rows.append(["pooled", "", *[""] * (1 + len(candidates)), *(_interval(self.pooled[c]) for c in candidates)])
        return "\n".join("| " + " | ".join(row) + " |" for row in rows) + f"\n\nchosen: {self.choice}\n"


def _interval(ci: tuple[float, float, float]) -> str:
    return f"{ci[0]:+.4f} [{ci[1]:+.4f}, {ci[2]:+.4f}]"


def choose(cells: list[Cell], pooled: dict[str, tuple[float, float, float]]) -> str:
    """The candidate with the lowest pooled difference among those that keep clearly more of the
    model (pooled interval below 0) and clearly less in no cell; else the reference."""
    clear = [c for c, (_, _, high) in pooled.items()
             if high < 0 and all(cell.vs_reference[c][1] <= 0 for cell in cells)]
    return min(clear, key=lambda c: pooled[c][0]) if clear else REFERENCE


def tuning_sequences(model, text: str, n_tokens: int, prompts: int) -> tuple[list[int], list[list[int]]]:
    """A window of n_tokens of text, and `prompts` requests to explain the passages that follow it
    (in the model's chat template, else as plain text)."""
    tokens = tokenize(model, text)
    need = n_tokens + prompts * PASSAGE_TOKENS
    if len(tokens) < need:
        raise ValueError(f"the tuning text has {len(tokens)} tokens; --tokens {n_tokens} and --prompts {prompts} "
                         f"need {need} (pass a longer --text, or fewer)")
    requests = []
    for i in range(prompts):
        passage = detokenize(model, tokens[n_tokens + i * PASSAGE_TOKENS:n_tokens + (i + 1) * PASSAGE_TOKENS])
        try:
            requests.append(chat_tokens(model, [{"role": "user", "content": ASK + passage}], "tune"))
        except ValueError:  # no chat template: the request as plain text
            requests.append(tokenize(model, ASK + passage + "\n\n"))
    return tokens[:n_tokens], requests


def tune(model_path: str, text: str | None = None, n_tokens: int = 2048, prompts: int = 4, generate: int = 256,
         divide_length: int = 128, chunk: int = 32, n_threads: int | None = None, progress: bool = True) -> Tuning:
    """Measure every spec of TUNED_SPECS on the model (its centres needed) and choose one."""
    text = default_text()[TUNING_TEXT] if text is None else text
    cells, diffs = [], {spec: [] for spec in TUNED_SPECS[1:]}
    with model_with_facts(model_path) as (model, facts):
        load_centers(facts)  # a clear error before any work when there are none
        window, requests = tuning_sequences(model, text, n_tokens, prompts)
        settings = [("text", [(window, 1)], len(window)),
                    ("generate", generated(model, facts, requests, generate, chunk, n_threads, progress), generate)]
        first_block = 0
        for setting, sequences, length in settings:
            budgets = parse_budgets(list(BUDGETS), length)
            configs = configs_for(list(TUNED_SPECS), budgets, divide_length)
            traces, scored = fidelity(model, facts, sequences, configs, divide_length, chunk, n_threads,
                                      progress=progress)
            # one block index per run of positions, shared by the budgets: a resampled block takes
            # every budget's differences there (they were measured on the same tokens)
            blocks = first_block + block_ids(np.concatenate(scored.segment), np.concatenate(scored.position),
                                             divide_length)
            first_block = int(blocks.max()) + 1
            for budget in budgets:
                labels = {spec: Config.parse(spec, budget).label for spec in TUNED_SPECS}
                kl, vs = {}, {}
                for spec, label in labels.items():
                    mean = kl_after_compression(traces[label])
                    kl[spec] = float("nan") if mean is None else mean
                    if spec != REFERENCE:
                        diff, both = paired_kl(traces, label, labels[REFERENCE])
                        diffs[spec].append((diff, blocks[both]))
                        vs[spec] = block_bootstrap_ci(diff, np.unique(blocks[both], return_inverse=True)[1])
                cells.append(Cell(setting, budget, kl, vs))
    pooled = {}
    for spec, parts in diffs.items():
        values, where = (np.concatenate(p) for p in zip(*parts))
        pooled[spec] = block_bootstrap_ci(values, np.unique(where, return_inverse=True)[1])
    return Tuning(cells, pooled, choose(cells, pooled))
