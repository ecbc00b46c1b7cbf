"""The eval's statistics on cases whose answer is known."""
import numpy as np

from triattention_gguf.paired import block_bootstrap_ci, block_ids, far_copies


def ar1(rng, n, phi):
    """A stationary AR(1) series (neighbours correlated like per-position KL under one cache state)."""
    noise = rng.standard_normal(n) * np.sqrt(1 - phi ** 2)
    out = np.empty(n)
    out[0] = rng.standard_normal()
    for i in range(1, n):
        out[i] = phi * out[i - 1] + noise[i]
    return out


def test_a_real_difference_is_found_and_its_size_covered():
    rng = np.random.default_rng(1)
    diff = -0.02 + 0.05 * ar1(rng, 4096, 0.6)
    blocks = block_ids(np.zeros(4096, int), np.arange(4096), 128)
    mean, low, high = block_bootstrap_ci(diff, blocks)
    assert low < -0.02 < high and high < 0  # the true mean inside, 0 excluded
    assert mean == diff.mean()


def test_coverage_is_near_95_percent_where_positions_are_correlated():
    """Over 200 series with true mean 0 the block interval holds 0 about 95% of the time; an
    interval over single positions holds it far less often (it ignores the correlation)."""
    rng = np.random.default_rng(2)
    n, covered_blocks, covered_points = 2048, 0, 0
    for trial in range(200):
        x = ar1(rng, n, 0.8)
        _, lo, hi = block_bootstrap_ci(x, block_ids(np.zeros(n, int), np.arange(n), 128), resamples=500, seed=trial)
        covered_blocks += lo <= 0 <= hi
        _, lo, hi = block_bootstrap_ci(x, np.arange(n), resamples=500, seed=trial)
        covered_points += lo <= 0 <= hi
    assert 0.88 <= covered_blocks / 200 <= 0.99, covered_blocks
    assert covered_points / 200 < 0.75, covered_points


def test_blocks_never_span_segments():
    segments = np.array([0, 0, 0, 1, 1, 1])
    positions = np.array([126, 127, 128, 126, 127, 128])
    assert block_ids(segments, positions, 128).tolist() == [0, 0, 1, 2, 2, 3]


def test_far_copies_marks_a_phrase_last_seen_beyond_the_distance():
    phrase = [7, 8, 9, 10]
    filler = list(range(100, 150))
    tokens = phrase + filler + phrase + [200, 201, 202, 203, 204] + phrase
    far = far_copies(tokens, distance=40)
    second, third = 4 + 50 + 3, 4 + 50 + 4 + 5 + 3  # the positions whose next token ends the phrase again
    assert far[second - 1] and not far[third - 1]  # 54 tokens back: far; 9 back: near
    assert far.sum() == 1 and len(far) == len(tokens) - 1
