"""Calibration through the real graph: centres and RoPE frequencies checked against numpy."""
import numpy as np
import pytest

from triattention_gguf import calibrate
from triattention_gguf._lib import llama_cpp_bindings as ll
from triattention_gguf.calibrate import calibration_run, compute_centers, default_text, kmeans_labels
from triattention_gguf.modelinfo import rope_omega
from triattention_gguf.scoring import pairs_to_real, real_to_pairs

N_TOKENS = 192


def _as_pairs(x: np.ndarray, rope_type: str) -> np.ndarray:
    """[..., head_dim] real -> [..., head_dim/2] complex, the model's rotary pairing."""
    half = x.shape[-1] // 2
    if rope_type == "neox":
        return x[..., :half] + 1j * x[..., half:]
    return x[..., 0::2] + 1j * x[..., 1::2]


def _run_one_chunk(path, **overrides):
    run_cm = calibration_run(path, n_ctx=N_TOKENS, keep_last=True, n_threads=2, **overrides)
    run = run_cm.__enter__()
    tokens = run.tokenize(default_text()[20000:40000])[:N_TOKENS]
    run.decode(tokens)
    return run_cm, run


@pytest.mark.parametrize("model", ["smollm2_path", "qwen_path", "gemma3_path"])
def test_centres_match_numpy_recomputation(model, request):
    run_cm, run = _run_one_chunk(request.getfixturevalue(model))
    try:
        facts = run.facts
        q_mean, q_abs_mean = run.statistics()
        assert run.n_tokens() == N_TOKENS
        for il in range(facts.n_layer):
            q = run.last_queries(il, post_rope=False).astype(np.float64)
            assert q.shape == (N_TOKENS, facts.n_head, facts.head_dim)
            z = _as_pairs(q, facts.rope_type)
            # float64 accumulation on both sides; stored as float32
            np.testing.assert_allclose(q_mean[il], z.mean(axis=0), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(q_abs_mean[il], np.abs(z).mean(axis=0), rtol=1e-5, atol=1e-5)
    finally:
        run_cm.__exit__(None, None, None)


ROPE_CASES = {
    "smollm2-norm": ("smollm2_path", {}),
    "qwen-neox": ("qwen_path", {}),
    # local layers (0, 9) at base 10^4, a global one (17) at 10^6: each layer its own frequencies
    "gemma3-sliding-window": ("gemma3_path", {}),
    "smollm2-linear-scale": ("smollm2_path", {"rope_freq_scale": 0.5}),
    "smollm2-yarn": ("smollm2_path", {"rope_scaling_type": ll.LLAMA_ROPE_SCALING_TYPE_YARN, "rope_freq_scale": 0.25,
                                      "yarn_ext_factor": 1.0, "yarn_orig_ctx": 2048}),
}


@pytest.mark.parametrize("case", ROPE_CASES)
def test_omega_reproduces_llama_rope(case, request):
    fixture, overrides = ROPE_CASES[case]
    run_cm, run = _run_one_chunk(request.getfixturevalue(fixture), **overrides)
    try:
        facts = run.facts
        omega = rope_omega(run.ctx, facts.n_layer, facts.head_dim).astype(np.float64)
        assert facts.n_swa == 0 or not np.allclose(omega[0], omega[-1])
        positions = np.arange(N_TOKENS, dtype=np.float64)[:, None, None]
        for il in (0, facts.n_layer // 2, facts.n_layer - 1):
            pre = _as_pairs(run.last_queries(il, post_rope=False).astype(np.float64), facts.rope_type)
            post = _as_pairs(run.last_queries(il, post_rope=True).astype(np.float64), facts.rope_type)
            rotated = pre * np.exp(1j * omega[il][None, None, :] * positions)
            # YaRN also scales magnitudes (mscale); the angle is what omega must get right.
            scale = np.abs(post).sum() / np.abs(rotated).sum()
            big = np.abs(pre) > 1e-2 * np.abs(pre).max()
            phase_error = np.abs(np.angle(post[big] * np.conj(rotated[big])))
            assert phase_error.max() < 2e-3, f"layer {il}: max phase error {phase_error.max():.2e} rad"
            np.testing.assert_allclose(np.abs(post), scale * np.abs(rotated), rtol=1e-3, atol=1e-3 * np.abs(pre).max())
            if "yarn" not in case and "scale" not in case:
                assert scale == pytest.approx(1.0, abs=1e-4)
    finally:
        run_cm.__exit__(None, None, None)


def test_scaled_rope_changes_omega(smollm2_path):
    """The scaling cases above are not vacuous: the context's scaling shows in omega."""
    runs = {}
    for name in ("smollm2-norm", "smollm2-linear-scale", "smollm2-yarn"):
        with calibration_run(smollm2_path, n_ctx=64, n_threads=1, **ROPE_CASES[name][1]) as run:
            runs[name] = rope_omega(run.ctx, run.facts.n_layer, run.facts.head_dim)[0]
    np.testing.assert_allclose(runs["smollm2-linear-scale"], 0.5 * runs["smollm2-norm"], rtol=1e-6)
    yarn = runs["smollm2-yarn"] / runs["smollm2-norm"]
    assert yarn[0] == pytest.approx(1.0) and yarn[-1] == pytest.approx(0.25)  # extrapolated .. interpolated


def test_kmeans_finds_separated_clusters():
    """Three heads, each with four blobs far apart: every blob becomes one cluster."""
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 4, size=(3, 400))
    centres = rng.normal(scale=20.0, size=(3, 4, 8))
    x = (centres[np.arange(3)[:, None], truth] + rng.normal(size=(3, 400, 8))).astype(np.float32)
    labels = kmeans_labels(x, 4, np.random.default_rng(0))
    for head in range(3):
        pairs = set(zip(truth[head].tolist(), labels[head].tolist()))
        assert len(pairs) == 4, f"head {head}: {sorted(pairs)}"  # a one-to-one map between blobs and clusters


def test_clusters_are_the_statistics_of_the_sampled_queries(smollm2_path, monkeypatch):
    """Each cluster's mean pair and mean pair magnitude, recomputed in numpy from the queries of
    every third token (captured in a run of their own, chunk by chunk), clustered as compute_centers does."""
    monkeypatch.setattr(calibrate, "CLUSTER_TOKENS", 100)  # 300 tokens: a sample of every third
    text, n_tokens, chunk, k = default_text()[20000:40000], 300, 128, 4
    centres = compute_centers(smollm2_path, text, max_tokens=n_tokens, chunk=chunk, n_threads=2, progress=False,
                              clusters=k)
    assert centres.cluster_mean.shape == (30, 9, k, 32) and centres.n_clusters == k
    with calibration_run(smollm2_path, n_ctx=chunk, keep_last=True, n_threads=2) as run:
        facts = run.facts
        tokens = run.tokenize(text)[:n_tokens]
        sampled = [[] for _ in range(facts.n_layer)]
        for start in range(0, n_tokens, chunk):
            run.decode(tokens[start:start + chunk])
            for il in range(facts.n_layer):
                queries = run.last_queries(il, post_rope=False)
                sampled[il] += [queries[i - start] for i in range(start, start + len(queries)) if i % 3 == 0]
    rng = np.random.default_rng(0)
    for il in range(facts.n_layer):
        x = np.array(sampled[il]).transpose(1, 0, 2)  # [head, token, head_dim]
        assert x.shape[1] == 100
        labels = kmeans_labels(np.ascontiguousarray(x), k, rng)
        z = _as_pairs(x.astype(np.float64), facts.rope_type)
        for h in range(facts.n_head):
            for c in range(k):
                members = z[h, labels[h] == c]
                assert len(members) > 0
                np.testing.assert_allclose(centres.cluster_mean[il, h, c], members.mean(0), rtol=1e-4, atol=1e-4)
                np.testing.assert_allclose(centres.cluster_abs_mean[il, h, c], np.abs(members).mean(0),
                                           rtol=1e-4, atol=1e-4)
    # the clusters split the heads' queries: each is more concentrated than its head
    assert np.median(centres.cluster_concentration()) > np.median(centres.head_concentration()) + 0.05


@pytest.mark.parametrize("rope_type", ["norm", "neox"])
@pytest.mark.parametrize("n_rot", [8, 4])
def test_real_to_pairs_inverts_pairs_to_real(rope_type, n_rot):
    """Partial rotary (n_rot < head_dim) included: the unrotated tail pairs are adjacent."""
    x = np.random.default_rng(0).normal(size=(3, 8))
    z = real_to_pairs(x, rope_type, n_rot)
    assert z.shape == (3, 4)
    np.testing.assert_array_equal(pairs_to_real(z, rope_type, n_rot), x)
    if n_rot == 8:  # full rotary: the pairing of the graph's rope (the tests above)
        np.testing.assert_array_equal(z, _as_pairs(x, rope_type))
