"""Statistics of paired per-position measures: block-bootstrap confidence intervals, and which
positions copy a phrase from far back.

Per-position KL is heavy-tailed and neighbouring positions share a cache state, so a mean
difference between two methods gets its interval from a bootstrap over blocks of consecutive
positions, not over positions.
"""
from __future__ import annotations

import numpy as np


def block_ids(segments: np.ndarray, positions: np.ndarray, block: int) -> np.ndarray:
    """A block index per measured position: consecutive runs of `block` positions of one segment
    (a window of text, a prompt's generation) form a block; blocks never span segments."""
    keys = segments.astype(np.int64) * (1 << 32) + positions.astype(np.int64) // block
    return np.unique(keys, return_inverse=True)[1]


def block_bootstrap_ci(values: np.ndarray, blocks: np.ndarray, level: float = 0.95, resamples: int = 2000,
                       seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean of values and its percentile interval from resampling whole
    blocks with replacement (blocks: an index per value, as block_ids gives)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    n_blocks = int(blocks.max()) + 1
    sums = np.bincount(blocks, weights=values, minlength=n_blocks)
    counts = np.bincount(blocks, minlength=n_blocks).astype(np.float64)
    draws = np.random.default_rng(seed).integers(0, n_blocks, size=(resamples, n_blocks))
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(values.mean()), float(low), float(high)


def far_copies(tokens: list[int] | np.ndarray, distance: int, n: int = 4) -> np.ndarray:
    """[len(tokens) - 1] bool: whether the token predicted at each position (tokens[t + 1]) ends
    an n-gram whose last earlier occurrence ended more than `distance` tokens before it: a phrase
    the model can only copy from a key that far back."""
    tokens = list(tokens)
    out = np.zeros(max(0, len(tokens) - 1), dtype=bool)
    last_end: dict[tuple, int] = {}
    for end in range(n - 1, len(tokens)):
        gram = tuple(tokens[end - n + 1:end + 1])
        previous = last_end.get(gram)
        if previous is not None and end - previous > distance:
            out[end - 1] = True
        last_end[gram] = end
    return out
