"""The ggml scoring op against a numpy reference of algorithm.md §4 on the same cached keys.

The reference does what the op avoids: it undoes RoPE on every key and evaluates the
trigonometric series at each future offset explicitly.
"""
import dataclasses

import numpy as np
import pytest

from conftest import NodeCapture, snapkv_attention
from triattention_gguf._lib import lib, llama_cpp_bindings as ll
from triattention_gguf.calibrate import compute_centers, default_text
from triattention_gguf.modelinfo import facts_of, loaded_model, model_context, open_gguf, rope_omega, tokenize
from triattention_gguf.scoring import OFFSETS, future_offsets, score_cache_layer, virtual_queries

N_PROMPT = 300
K_TYPES = {"f16": ll.GGML_TYPE_F16, "q8_0": ll.GGML_TYPE_Q8_0, "q4_0": ll.GGML_TYPE_Q4_0}


def hadamard(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def as_pairs(x: np.ndarray, rope_type: str) -> np.ndarray:
    half = x.shape[-1] // 2
    return x[..., :half] + 1j * x[..., half:] if rope_type == "neox" else x[..., 0::2] + 1j * x[..., 1::2]


def reference_scores(keys, pos, t, centres, omega_l, il, cluster, rotated):
    """keys [n, n_head_kv, d] as stored; returns [n_head, n] scores against each head's cluster."""
    k = keys.astype(np.float64)
    if rotated:
        k = k @ hadamard(k.shape[-1])  # symmetric and its own inverse
    k_post = as_pairs(k, centres.rope_type)                              # [n, hkv, F]
    k_pre = k_post * np.exp(-1j * omega_l[None, None, :] * pos[:, None, None])
    gqa = centres.n_head // centres.n_head_kv
    qbar = centres.cluster_mean[il, :, cluster].astype(np.complex128)    # [H, F]
    k_pre_h = np.repeat(k_pre, gqa, axis=1)                              # [n, H, F]
    dist = (t - pos)[:, None, None, None] + OFFSETS[None, None, None, :]  # [n, 1, 1, D]
    series = qbar[None, :, :, None] * np.conj(k_pre_h)[..., None] * np.exp(1j * omega_l[None, None, :, None] * dist)
    s_trig = series.real.sum(axis=2).mean(axis=-1)                       # [n, H]
    weight = centres.cluster_abs_mean[il, :, cluster] - np.abs(qbar)
    s_norm = (weight[None] * np.abs(np.repeat(k_post, gqa, axis=1))).sum(-1)
    return (s_trig + s_norm).T


@pytest.fixture(scope="module")
def centres_of(smollm2_path, qwen_path, gemma3_path):
    # clusters that give the op each shape of its blocks of query rows: a KV head's rows are its query
    # heads times the clusters, SmolLM2 3 x 4 = 12 (a block of 16, padded), Qwen2.5 7 x 5 = 35 (three
    # of 16, padded), Gemma 3 4 x 6 = 24 (one of 24)
    models = {"smollm2": (smollm2_path, 4), "qwen": (qwen_path, 5), "gemma3": (gemma3_path, 6)}
    return {name: (path, compute_centers(path, max_tokens=256, n_threads=2, progress=False, clusters=clusters))
            for name, (path, clusters) in models.items()}


@pytest.mark.parametrize("k_type", K_TYPES)
@pytest.mark.parametrize("model", ["smollm2", "qwen"])
def test_op_matches_numpy_reference(model, k_type, centres_of):
    path, centres = centres_of[model]
    with loaded_model(path) as mdl:
        facts = facts_of(path, open_gguf(path), mdl)
        with model_context(mdl, n_ctx=512, n_threads=2, type_k=K_TYPES[k_type]) as ctx:
            assert lib.triattention_cache_k_rotated(ctx) == (k_type != "f16")
            tokens = tokenize(mdl, default_text()[:6000])[:N_PROMPT]
            assert ll.llama_decode(ctx, ll.llama_batch_get_one((ll.llama_token * len(tokens))(*tokens), len(tokens))) == 0
            omega = rope_omega(ctx, facts.n_layer, facts.head_dim)
            t = len(tokens) - 1 + 5000  # a compression point past the prompt: phases must be right far out
            q, w = by_cluster(centres, *virtual_queries(centres, omega, t))
            assert centres.n_clusters > 1
            for il, cluster in ((0, 0), (facts.n_layer // 2, centres.n_clusters - 1), (facts.n_layer - 1, 1)):
                scores, keys, pos = score_cache_layer(ctx, il, q[il, :, cluster], w[il, :, cluster], facts.n_head_kv)
                assert scores.shape == (facts.n_head, len(tokens))
                np.testing.assert_array_equal(pos, np.arange(len(tokens)))
                ref = reference_scores(keys, pos, t, centres, omega[il].astype(np.float64), il, cluster,
                                       k_type != "f16")
                scale = np.abs(ref).max()
                np.testing.assert_allclose(scores, ref, rtol=0, atol=2e-5 * scale,
                                           err_msg=f"layer {il}, scale {scale:.3g}")
                assert np.std(scores) > 1e-3 * scale  # not a constant


def by_cluster(centres, q: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """virtual_queries' rows [layer][head * cluster] as [layer][head][cluster]."""
    split = lambda a: a.reshape(centres.n_layer, centres.n_head, centres.n_clusters, -1)  # noqa: E731
    return split(q), split(w)


def z_scored(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(-1, keepdims=True)) / (x.std(-1, keepdims=True) + 1e-6)


def z_scored_valid(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """z-scored over the valid cells (the last axis); -inf at the others, which are never kept."""
    z = np.full(x.shape, -np.inf)
    z[..., valid] = z_scored(x[..., valid])
    return z


@pytest.mark.parametrize("select, horizon, spread, one_cluster, holes", [
    ("per-layer-head", 65536, False, False, False), ("per-head", 65536, False, False, False),
    ("per-layer-head", 4, False, False, False), ("per-layer-head", 65536, True, False, False),
    ("per-head", 65536, True, False, False), ("per-layer-head", 65536, False, True, False),
    ("per-layer-head", 65536, False, False, True), ("per-head", 65536, True, False, True)])
@pytest.mark.parametrize("model", ["qwen", "gemma3"])
def test_engine_keeps_the_top_budget_of_algorithm_md(model, select, horizon, spread, one_cluster, holes, centres_of):
    """The kept sets equal a numpy aggregation of the op's scores (algorithm.md §4) with virtual
    queries at the next token's position, one per (layer, query head, query cluster): z-score per
    virtual query, max over each KV head's (its GQA group's clusters; one_cluster: the centres of a
    version 1 file, one per head), then
    per-layer-head: each layer's own; per-head: the mean over the compressed layers (Gemma 3: its
    full-attention layers, each with its own RoPE frequencies). Newest kept, top-B per row. A horizon
    of 4 averages the virtual queries over the future offsets 1, 2, 4 only. A KV head whose query
    heads' mean concentration is below min_concentration scores by z-scored recency (the attention
    sinks first) plus the z-scored attention of the last 8 queries (snapkv's, per layer, from the
    queries the context's own eval callback sees too): `spread` sets min_concentration to the median
    head's, so that half the heads do; without, 0 (the reference: none does). `holes` empties 10
    cells inside the history first: the statistics are over the cells that hold a token, and an
    empty cell is never kept. 123 tokens leave each thread's share of the cells a part tile of the
    op's 4."""
    from triattention_gguf.compression import cache_rows, compress, compressed_layers, configure, last_kept

    path, centres = centres_of[model]
    if one_cluster:
        centres = dataclasses.replace(centres, cluster_mean=None, cluster_abs_mean=None)
    budget = 64
    concentration = centres.kv_head_concentration()
    min_concentration = float(np.median(concentration)) if spread else 0.0
    is_spread = concentration < min_concentration
    with loaded_model(path) as mdl:
        facts = facts_of(path, open_gguf(path), mdl)
        capture = NodeCapture([f"Qcur-{il}:ROPE" for il in range(facts.n_layer)])
        with model_context(mdl, n_ctx=768, n_threads=2, n_ubatch=128, cb_eval=capture.callback) as ctx:
            configure(ctx, "tri", budget, 64, select, centers=centres, horizon=horizon,
                      min_concentration=min_concentration)
            tokens = tokenize(mdl, default_text()[:6000])[:123]
            arr = (ll.llama_token * len(tokens))(*tokens)
            assert ll.llama_decode(ctx, ll.llama_batch_get_one(arr, len(tokens))) == 0
            if holes:
                assert ll.llama_memory_seq_rm(ll.llama_get_memory(ctx), 0, 40, 50)
            omega = rope_omega(ctx, facts.n_layer, facts.head_dim)
            # the next token's position
            q, w = by_cluster(centres, *virtual_queries(centres, omega, len(tokens), future_offsets(horizon)))
            gqa = facts.n_head // facts.n_head_kv
            per_layer = []
            layers = compressed_layers(ctx)
            for il in layers:
                scored = [score_cache_layer(ctx, il, q[il, :, k], w[il, :, k], facts.n_head_kv)
                          for k in range(centres.n_clusters)]
                pos = scored[0][2]
                valid = pos >= 0
                assert valid.sum() == len(tokens) - 10 * holes
                recency = z_scored_valid(np.where(pos < 4, len(tokens), pos).astype(float), valid)
                s = np.stack([x[0] for x in scored], axis=1).astype(np.float64)  # [head, cluster, cell]
                z = z_scored_valid(s, valid).reshape(facts.n_head_kv, gqa * centres.n_clusters, -1).max(axis=1)
                if is_spread[il].any():
                    window = np.arange(len(tokens) - 8, len(tokens))
                    queries = capture.data[f"Qcur-{il}:ROPE"].reshape(-1, facts.n_head, facts.head_dim)[-8:]
                    width = facts.n_head_kv * facts.head_dim
                    keys = cache_rows(ctx, il, width, width)[0].astype(np.float64)
                    attention = snapkv_attention(queries.astype(np.float64), window, keys,
                                                 np.broadcast_to(pos, (facts.n_head_kv, len(pos))), facts.n_head,
                                                 facts.n_head_kv, facts.head_dim)
                    z[is_spread[il]] = recency + z_scored_valid(attention, valid)[is_spread[il]]
                per_layer.append(z)
            total = np.array(per_layer) if select == "per-layer-head" else np.mean(per_layer, axis=0)[None]
            total[:, :, -1] = np.inf  # the newest token
            compress(ctx)
            kept = last_kept(ctx, facts.n_head_kv, budget)
    assert kept.shape == total.shape[:2] + (budget,)
    assert is_spread[layers].any() == spread
    for group in range(kept.shape[0]):
        for hk in range(facts.n_head_kv):
            expected = set(np.argsort(-total[group, hk], kind="stable")[:budget])
            overlap = len(expected & set(kept[group, hk]))
            assert overlap >= budget - 1, (group, hk, overlap)  # float32 vs float64 may swap one near-tie


def test_centres_set_after_the_parameters_choose_the_spread_heads(centres_of):
    """tri's spread heads come from the centres set last. Centres whose every head has R = 1 (each
    E|q_f| set to |E q_f|) have no spread head at 0.7: set after parameters chosen with SmolLM2's
    own centres (which have some), the kept sets are those of the concentrated centres from the start,
    and the other way round those of SmolLM2's own."""
    from triattention_gguf.compression import compress, configure, last_kept, set_centers

    path, own = centres_of["smollm2"]
    concentrated = dataclasses.replace(own, q_abs_mean=np.abs(own.q_mean), cluster_mean=None, cluster_abs_mean=None)
    own = dataclasses.replace(own, cluster_mean=None, cluster_abs_mean=None)  # set_centers sets both
    assert (own.kv_head_concentration() < 0.7).any() and not (concentrated.kv_head_concentration() < 0.7).any()
    budget = 64
    with loaded_model(path) as mdl:
        facts = facts_of(path, open_gguf(path), mdl)
        tokens = tokenize(mdl, default_text()[:6000])[:160]

        def kept(first, then=None):
            with model_context(mdl, n_ctx=512, n_threads=2, n_ubatch=32) as ctx:
                configure(ctx, "tri", budget, 32, centers=first, min_concentration=0.7)
                if then is not None:
                    set_centers(ctx, then)
                for start in range(0, len(tokens), 32):  # 8 queries observed before the compression
                    chunk = tokens[start:start + 32]
                    assert ll.llama_decode(ctx, ll.llama_batch_get_one((ll.llama_token * len(chunk))(*chunk),
                                                                       len(chunk))) == 0
                compress(ctx)
                return last_kept(ctx, facts.n_head_kv, budget)

        by_own, by_concentrated = kept(own), kept(concentrated)
        assert not np.array_equal(by_own, by_concentrated)
        assert np.array_equal(kept(own, then=concentrated), by_concentrated)
        assert np.array_equal(kept(concentrated, then=own), by_own)
