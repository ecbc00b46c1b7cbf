"""Compression inside llama.cpp's cache: the right rows move, per head, and decoding goes on."""
import ctypes

import numpy as np
import pytest

from conftest import NodeCapture, snapkv_attention
from triattention_gguf._lib import lib, llama_cpp_bindings as ll
from triattention_gguf.calibrate import compute_centers, default_text
from triattention_gguf.compression import (CompressionError, cache_rows, compress, compressed_layers, configure,
                                          head_positions, last_kept, stats)
from triattention_gguf.modelinfo import facts_of, loaded_model, model_context, open_gguf, tokenize

BUDGET, DIVIDE, UBATCH = 64, 32, 32
N_PROMPT = BUDGET + DIVIDE  # fills the cache up to the trigger, not past it


@pytest.fixture(scope="module")
def smollm2_centres(smollm2_path):
    return compute_centers(smollm2_path, max_tokens=256, n_threads=2, progress=False)


def decode(ctx, tokens) -> None:
    for start in range(0, len(tokens), UBATCH):
        chunk = tokens[start:start + UBATCH]
        arr = (ll.llama_token * len(chunk))(*chunk)  # must outlive llama_decode: the batch points into it
        assert ll.llama_decode(ctx, ll.llama_batch_get_one(arr, len(chunk))) == 0


def open_ctx(model, flash_attn: bool, n_ctx: int = 256, **overrides):
    fa = ll.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
    return model_context(model, n_ctx=n_ctx, n_threads=2, n_ubatch=UBATCH, flash_attn_type=fa, **overrides)


CACHES = {  # flash attention, K type, V type: quantized V needs flash attention (V in rows)
    "v-transposed": (False, ll.GGML_TYPE_F16, ll.GGML_TYPE_F16),
    "v-rows": (True, ll.GGML_TYPE_F16, ll.GGML_TYPE_F16),
    "q8_0-k-q4_0-v": (True, ll.GGML_TYPE_Q8_0, ll.GGML_TYPE_Q4_0),
}


@pytest.mark.parametrize("select", ["per-layer-head", "per-head"])
@pytest.mark.parametrize("cache", list(CACHES))
@pytest.mark.parametrize("method", ["tri", "knorm", "streaming", "random", "snapkv"])
def test_compaction_moves_each_heads_kept_rows(method, cache, select, smollm2_path, smollm2_centres):
    flash_attn, type_k, type_v = CACHES[cache]
    with loaded_model(smollm2_path) as model:
        facts = facts_of(smollm2_path, open_gguf(smollm2_path), model)
        hd, hkv = facts.head_dim, facts.n_head_kv
        with open_ctx(model, flash_attn, type_k=type_k, type_v=type_v) as ctx:
            configure(ctx, method, BUDGET, DIVIDE, select, centers=smollm2_centres if method == "tri" else None)
            decode(ctx, tokenize(model, default_text()[:4000])[:N_PROMPT])
            assert stats(ctx)["compressions"] == 0
            before = [cache_rows(ctx, il, hkv * hd, hkv * hd) for il in range(facts.n_layer)]
            compress(ctx)
            kept = last_kept(ctx, hkv, BUDGET)  # [group, head, budget]: a group per layer, or one
            assert kept.shape[0] == (facts.n_layer if select == "per-layer-head" else 1)
            mem = ll.llama_get_memory(ctx)
            assert ll.llama_memory_seq_pos_max(mem, 0) == N_PROMPT - 1  # the next position follows the newest
            assert stats(ctx)["cells_evicted"] == N_PROMPT - BUDGET
            for row in kept.reshape(-1, BUDGET):
                assert N_PROMPT - 1 in row  # newest token kept in every head of every layer
                assert len(set(row)) == BUDGET
                # kept front cells stay in place: only the kept cells behind the budget move
                stays = np.isin(np.arange(BUDGET), row)
                assert np.array_equal(row[stays], np.arange(BUDGET)[stays])
                assert np.all(row[~stays] >= BUDGET)
            if method == "streaming":
                expected = np.r_[0:4, N_PROMPT - BUDGET + 4:N_PROMPT]
                assert all(np.array_equal(np.sort(row), expected) for row in kept.reshape(-1, BUDGET))
            for il in range(facts.n_layer):
                k_after, v_after = cache_rows(ctx, il, hkv * hd, hkv * hd)
                assert k_after.shape[0] == BUDGET
                k_before, v_before = before[il]
                layer_kept = kept[il % kept.shape[0]]
                for hk in range(hkv):
                    cols = slice(hk * hd, (hk + 1) * hd)
                    assert np.array_equal(k_after[:, cols], k_before[layer_kept[hk], cols]), (il, hk)
                    assert np.array_equal(v_after[:, cols], v_before[layer_kept[hk], cols]), (il, hk)
            positions = head_positions(ctx)
            assert np.array_equal(positions, kept)  # positions 0 .. N_PROMPT - 1 sat in cells 0 .. N_PROMPT - 1
            if method in ("tri", "knorm", "snapkv"):  # scores differ between heads, so do the kept sets
                assert any(not np.array_equal(kept[0][0], kept[0][hk]) for hk in range(1, hkv))
                if select == "per-layer-head":  # and between layers
                    assert any(not np.array_equal(kept[0], kept[il]) for il in range(1, facts.n_layer))


def test_shared_selection_keeps_one_set(smollm2_path, smollm2_centres):
    with loaded_model(smollm2_path) as model, open_ctx(model, False) as ctx:
        configure(ctx, "tri", BUDGET, DIVIDE, select="shared", centers=smollm2_centres)
        decode(ctx, tokenize(model, default_text()[:4000])[:N_PROMPT])
        compress(ctx)
        kept = last_kept(ctx, 3, BUDGET)
        assert kept.shape[0] == 1
        assert np.array_equal(kept[0][0], kept[0][1]) and np.array_equal(kept[0][0], kept[0][2])


def test_bad_parameters_are_refused(smollm2_path):
    with loaded_model(smollm2_path) as model, open_ctx(model, False) as ctx:
        with pytest.raises(CompressionError, match="must fit in the 256 cells"):
            configure(ctx, "streaming", 512, DIVIDE)
        with pytest.raises(CompressionError, match="needs the query centres"):
            configure(ctx, "tri", BUDGET, DIVIDE)
        with pytest.raises(CompressionError, match="unknown kv_compress 'snap'"):
            configure(ctx, "snap", BUDGET, DIVIDE)
        with pytest.raises(CompressionError, match="kv_budget must be at least 5"):
            configure(ctx, "knorm", 2, DIVIDE)
        params = lib.triattention_default_params()  # the C API checks on its own
        params.method, params.budget = 3, 2
        assert lib.triattention_set_params(ctx, params) == -1
        assert "budget >= 5" in lib.triattention_last_error().decode()
        params.budget, params.keep_recent = BUDGET, BUDGET + 1
        assert lib.triattention_set_params(ctx, params) == -1
        assert f"keep_recent {BUDGET + 1} must be in [0, budget {BUDGET}]" in lib.triattention_last_error().decode()
        params.keep_recent, params.horizon = 0, 0
        assert lib.triattention_set_params(ctx, params) == -1
        assert "horizon 0 must be in [1, 65536]" in lib.triattention_last_error().decode()
        with pytest.raises(CompressionError, match="kv_horizon must be between 1 and 65536 tokens"):
            configure(ctx, "knorm", BUDGET, DIVIDE, horizon=1 << 17)
        with pytest.raises(CompressionError, match="kv_horizon is tri's; kv_compress 'knorm' has no predicted"):
            configure(ctx, "knorm", BUDGET, DIVIDE, horizon=4)
        for bad in (-0.1, 1.5, float("nan")):
            params.horizon, params.min_concentration = 65536, bad
            assert lib.triattention_set_params(ctx, params) == -1
            assert "min_concentration" in lib.triattention_last_error().decode()
            assert "must be in [0, 1]" in lib.triattention_last_error().decode()
            with pytest.raises(CompressionError, match="kv_min_concentration must be between 0 and 1"):
                configure(ctx, "tri", BUDGET, DIVIDE, min_concentration=bad)
        with pytest.raises(CompressionError, match="kv_min_concentration is tri's; kv_compress 'knorm' has no"):
            configure(ctx, "knorm", BUDGET, DIVIDE, min_concentration=0.5)


def _distinct_ngram_ratio(tokens, n=4):
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


def _greedy(model, ctx, prompt, n_new):
    decode(ctx, prompt)
    vocab = ll.llama_model_get_vocab(model)
    n_vocab = ll.llama_vocab_n_tokens(vocab)
    out, used = [], []
    for _ in range(n_new):
        logits = np.ctypeslib.as_array(ll.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
        token = int(np.argmax(logits))
        out.append(token)
        decode(ctx, [token])
        used.append(ll.llama_memory_seq_pos_max(ll.llama_get_memory(ctx), 0))
    return out, used


def test_long_generation_stays_within_the_physical_cache(smollm2_path, smollm2_centres):
    budget, divide, n_new = 256, 64, 900
    physical = budget + divide + UBATCH
    prompt_text = "Write a long story about a lighthouse keeper and the sea, chapter by chapter.\n\nChapter 1\n"
    with loaded_model(smollm2_path) as model:
        prompt = tokenize(model, prompt_text)
        with open_ctx(model, False, n_ctx=physical) as ctx:
            configure(ctx, "tri", budget, divide, centers=smollm2_centres)
            assert ll.llama_n_ctx(ctx) < len(prompt) + n_new  # the generation outgrows the physical cache
            tri, positions = _greedy(model, ctx, prompt, n_new)
            s = stats(ctx)
            cells = ll.llama_memory_seq_pos_max(ll.llama_get_memory(ctx), 0)
        with open_ctx(model, False, n_ctx=len(prompt) + n_new + UBATCH) as ctx:
            full, _ = _greedy(model, ctx, prompt, n_new)
    assert positions == list(range(len(prompt), len(prompt) + n_new))  # positions continue past n_ctx
    assert cells == len(prompt) + n_new - 1
    assert s["compressions"] >= (len(prompt) + n_new - physical) // divide
    # coherent text: repetition no worse than a small margin below the full cache's
    assert _distinct_ngram_ratio(tri) >= 0.8 * _distinct_ngram_ratio(full), (
        _distinct_ngram_ratio(tri), _distinct_ngram_ratio(full))


@pytest.fixture(scope="module")
def gemma3_centres(gemma3_path):
    return compute_centers(gemma3_path, max_tokens=256, n_threads=2, progress=False)


# (layers checked, cells): Gemma 3's cache of full-attention layers is compressed (every 6th layer);
# its window cache (n_swa 512) must hold a window and a ubatch, so its context has more cells
ATTENTION_MODELS = {"smollm2": ((0, 13, 29), 256), "gemma3": ((5, 11, 17), 768)}


@pytest.mark.parametrize("flash_attn", [False, True], ids=["v-transposed", "v-rows"])
@pytest.mark.parametrize("name", list(ATTENTION_MODELS))
def test_next_token_attends_exactly_to_the_kept_keys(name, flash_attn, request):
    path, centres = request.getfixturevalue(f"{name}_path"), request.getfixturevalue(f"{name}_centres")
    layers, n_ctx = ATTENTION_MODELS[name]
    capture = NodeCapture([f"Qcur-{il}:ROPE" for il in layers] + [f"kqv_out-{il}:CONT" for il in layers]
                          + [f"kqv_out-{il}:RESHAPE" for il in layers])
    with loaded_model(path) as model:
        facts = facts_of(path, open_gguf(path), model)
        hd, h, hkv = facts.head_dim, facts.n_head, facts.n_head_kv
        with open_ctx(model, flash_attn, n_ctx=n_ctx, cb_eval=capture.callback) as ctx:
            assert set(layers) <= set(compressed_layers(ctx))
            configure(ctx, "tri", BUDGET, DIVIDE, centers=centres)
            tokens = tokenize(model, default_text()[:4000])
            decode(ctx, tokens[:N_PROMPT])
            compress(ctx)
            kept = last_kept(ctx, hkv, BUDGET)[0]
            assert hkv == 1 or any(not np.array_equal(kept[0], kept[k]) for k in range(1, hkv))  # truly per head
            capture.data.clear()
            decode(ctx, [tokens[N_PROMPT]])  # lands in cell BUDGET, at position N_PROMPT
            assert ll.llama_memory_seq_pos_max(ll.llama_get_memory(ctx), 0) == N_PROMPT
            for il in layers:
                k, v = (a.astype(np.float64) for a in cache_rows(ctx, il, hkv * hd, hkv * hd))
                assert k.shape[0] == BUDGET + 1
                q = capture.data[f"Qcur-{il}:ROPE"].reshape(h, hd).astype(np.float64)
                out = next(capture.data[key] for key in (f"kqv_out-{il}:CONT", f"kqv_out-{il}:RESHAPE")
                           if key in capture.data).reshape(h, hd)
                for head in range(h):
                    cols = slice((head // (h // hkv)) * hd, (head // (h // hkv) + 1) * hd)
                    logits = k[:, cols] @ q[head] / np.sqrt(hd)  # every cell: the kept keys and the new one
                    p = np.exp(logits - logits.max())
                    expected = (p / p.sum()) @ v[:, cols]
                    # CPU flash attention rounds Q to f16: about 0.5% of the output's scale
                    tol = (1e-2 if flash_attn else 2e-3) * np.abs(expected).max() + 1e-4
                    np.testing.assert_allclose(out[head], expected, rtol=0, atol=tol, err_msg=f"layer {il} head {head}")


def snapkv_reference(queries, qpos, keys, kpos, h, hkv, hd):
    """algorithm.md §6 in numpy, [n_head_kv, n_cells]: snapkv's attention (conftest.snapkv_attention)
    summed over layers; the window itself is kept."""
    total = sum(snapkv_attention(q, qpos, k, kpos, h, hkv, hd) for q, k in zip(queries, keys))
    total[kpos >= qpos[0]] = np.inf
    total[kpos < 0] = -np.inf
    return total


def test_snapkv_keeps_the_keys_its_window_attends_to(smollm2_path):
    """Twice: from a prompt, then after a compaction left the cells out of position order. The
    context's own eval callback (capturing the window's queries here) still sees its nodes."""
    window = 8
    with loaded_model(smollm2_path) as model:
        facts = facts_of(smollm2_path, open_gguf(smollm2_path), model)
        hd, h, hkv, n_layer = facts.head_dim, facts.n_head, facts.n_head_kv, facts.n_layer
        tokens = tokenize(model, default_text()[:4000])
        capture = NodeCapture([f"Qcur-{il}:ROPE" for il in range(n_layer)])
        with open_ctx(model, False, cb_eval=capture.callback) as ctx:
            configure(ctx, "snapkv", BUDGET, DIVIDE, "per-head")
            front = np.zeros((hkv, 0), dtype=int)  # positions of the compacted cells
            for end, fed in ((N_PROMPT, tokens[:N_PROMPT]), (N_PROMPT + DIVIDE, tokens[N_PROMPT:N_PROMPT + DIVIDE])):
                decode(ctx, fed)  # the last ubatch holds the window
                queries = [capture.data[f"Qcur-{il}:ROPE"].reshape(-1, h, hd)[-window:].astype(np.float64)
                           for il in range(n_layer)]
                keys = [cache_rows(ctx, il, hkv * hd, hkv * hd)[0].astype(np.float64) for il in range(n_layer)]
                # llama.cpp put the new tokens in the last cells (its slot search goes on from where
                # it left off); cells between them and the compacted ones are empty
                kpos = np.full((hkv, len(keys[0])), -1)
                kpos[:, :front.shape[1]] = front
                kpos[:, len(keys[0]) - len(fed):] = np.arange(end - len(fed), end)
                total = snapkv_reference(queries, np.arange(end - window, end), keys, kpos, h, hkv, hd)
                compress(ctx)
                kept = last_kept(ctx, hkv, BUDGET)[0]
                for hk in range(hkv):
                    expected = set(np.argsort(-total[hk], kind="stable")[:BUDGET])
                    assert len(expected & set(kept[hk])) >= BUDGET - 1, (end, hk)  # float32 vs 64: a near-tie
                front = head_positions(ctx)[0]
                assert any(np.any(np.diff(front[hk]) < 0) for hk in range(hkv))  # cells out of position order
            configure(ctx, "streaming", BUDGET, DIVIDE)  # gives the context its own callback back alone
            capture.data.clear()
            decode(ctx, tokens[N_PROMPT + DIVIDE:N_PROMPT + DIVIDE + 1])
            assert len(capture.data) == n_layer


def test_a_cut_inside_the_compressed_history_keeps_the_older_cells(smollm2_path):
    with loaded_model(smollm2_path) as model, open_ctx(model, False) as ctx:
        configure(ctx, "streaming", BUDGET, DIVIDE)
        tokens = tokenize(model, default_text()[:4000])
        decode(ctx, tokens[:N_PROMPT])
        compress(ctx)  # keeps positions 0-3 and N_PROMPT - BUDGET + 4 onwards
        mem = ll.llama_get_memory(ctx)
        assert lib.triattention_cells_before(ctx, 20) == 4
        assert ll.llama_memory_seq_rm(mem, 0, 20, -1)
        # positions 4-19 were evicted: the newest kept cell stands in for position 19, so that
        # llama.cpp accepts the sequence continuing at 20 (given explicitly, as llama-cpp-python does)
        batch = ll.llama_batch_init(2, 0, 1)
        for i in range(2):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tokens[20 + i], 20 + i, 1, i == 1
            batch.seq_id[i][0] = 0
        batch.n_tokens = 2
        rc = ll.llama_decode(ctx, batch)
        ll.llama_batch_free(batch)
        assert rc == 0
        assert ll.llama_memory_seq_pos_max(mem, 0) == 21
        assert lib.triattention_get_cache_info(ctx).cells_used == 6
        assert stats(ctx)["compressed_upto"] == 19  # the cut history is held, compressed
        decode(ctx, tokens[22:22 + BUDGET + DIVIDE])  # and compresses again from there
        assert stats(ctx)["compressions"] == 2
        assert ll.llama_memory_seq_pos_max(mem, 0) == 22 + BUDGET + DIVIDE - 1


def test_prompt_many_times_the_cache_is_read_in_chunks(smollm2_path):
    with loaded_model(smollm2_path) as model:
        prompt = tokenize(model, default_text()[:20000])[:1300]
        with open_ctx(model, False, n_ctx=BUDGET + DIVIDE + UBATCH) as ctx:
            configure(ctx, "knorm", BUDGET, DIVIDE)
            assert len(prompt) > 5 * ll.llama_n_ctx(ctx)  # llama.cpp pads n_ctx to 256 cells
            spans = []
            for start in range(0, len(prompt), UBATCH):  # any chunk that did not fit would fail to decode
                decode(ctx, prompt[start:start + UBATCH])
                spans.append(lib.triattention_get_cache_info(ctx).cells_span)
            assert ll.llama_memory_seq_pos_max(ll.llama_get_memory(ctx), 0) == len(prompt) - 1
            # cells stay packed: each chunk goes into the first free cells after a compaction, so
            # attention never reads past budget + divide_length cells (not up to the cache's 256)
            assert max(spans) == BUDGET + DIVIDE
            assert stats(ctx)["compressions"] >= (len(prompt) - BUDGET) // (DIVIDE + UBATCH)


def test_a_batch_larger_than_a_ubatch_is_refused_once_compressing(smollm2_path):
    with loaded_model(smollm2_path) as model:
        prompt = tokenize(model, default_text()[:4000])
        with open_ctx(model, False, n_batch=256) as ctx:
            configure(ctx, "streaming", BUDGET, DIVIDE)
            decode(ctx, prompt[:N_PROMPT])
            arr = (ll.llama_token * 64)(*prompt[N_PROMPT:N_PROMPT + 64])
            assert ll.llama_decode(ctx, ll.llama_batch_get_one(arr, 64)) == -1
            assert ll.llama_memory_seq_pos_max(ll.llama_get_memory(ctx), 0) == N_PROMPT - 1  # nothing lost


def test_sliding_window_model_compresses_its_full_attention_layers(gemma3_path):
    """Gemma 3: llama.cpp's two-part cache; compaction moves rows in the full-attention part only."""
    with loaded_model(gemma3_path) as model:
        facts = facts_of(gemma3_path, open_gguf(gemma3_path), model)
        hd, hkv = facts.head_dim, facts.n_head_kv
        with model_context(model, n_ctx=512, n_threads=2, n_ubatch=UBATCH) as ctx:
            # the window cache is sized from n_ctx as well, and must hold n_swa + n_ubatch cells
            with pytest.raises(CompressionError, match="sliding-window cache has 512 cells; it needs n_swa "
                                                       "\\+ n_ubatch = 544: make the context at least"):
                configure(ctx, "knorm", BUDGET, DIVIDE)
        with open_ctx(model, False, n_ctx=768) as ctx:
            layers = compressed_layers(ctx)
            assert layers == [il for il in range(facts.n_layer) if il % 6 == 5]
            with pytest.raises(CompressionError, match="layer 0 is not in the compressed cache.*sliding-window"):
                cache_rows(ctx, 0, hkv * hd, hkv * hd)
            configure(ctx, "knorm", BUDGET, DIVIDE)
            decode(ctx, tokenize(model, default_text()[:4000])[:N_PROMPT])
            before = {il: cache_rows(ctx, il, hkv * hd, hkv * hd) for il in layers}
            compress(ctx)
            kept = last_kept(ctx, hkv, BUDGET)
            info = lib.triattention_get_cache_info(ctx)
            assert info.cells_used == BUDGET and info.cells_capacity == 768 and info.swa_cells_capacity == 768
            assert ll.llama_memory_seq_pos_max(ll.llama_get_memory(ctx), 0) == N_PROMPT - 1
            assert kept.shape[0] == len(layers)  # per-layer-head: each full-attention layer its own
            for li, il in enumerate(layers):
                k_after, v_after = cache_rows(ctx, il, hkv * hd, hkv * hd)
                assert np.array_equal(k_after[:, :hd], before[il][0][kept[li][0], :hd]), il
                assert np.array_equal(v_after[:, :hd], before[il][1][kept[li][0], :hd]), il


def test_recurrent_model_is_refused_by_name(mamba_path):
    from triattention_gguf import Llama
    from triattention_gguf.modelinfo import ModelFileError

    with loaded_model(mamba_path) as model, model_context(model, n_ctx=128, n_threads=2) as ctx:
        with pytest.raises(CompressionError, match="architecture 'mamba'.*recurrent or hybrid cache.*cannot be compressed"):
            configure(ctx, "knorm", 32, 16)
        with pytest.raises(CompressionError, match="no KV cache of attention layers"):
            cache_rows(ctx, 0, 16, 16)
    with pytest.raises(ModelFileError, match="architecture 'mamba' has no attention heads"):
        Llama(mamba_path, kv_compress="streaming", verbose=False)


def test_non_finite_scores_never_evict_the_newest_token(smollm2_path, smollm2_centres):
    """Centres of 1e30 make every tri score non-finite: the order stays defined, the newest token
    is kept in every head and decoding goes on."""
    import dataclasses

    absurd = dataclasses.replace(smollm2_centres, **{name: getattr(smollm2_centres, name) * np.float32(1e30) for name in (
        "q_mean", "q_abs_mean", "cluster_mean", "cluster_abs_mean")})
    with loaded_model(smollm2_path) as model, open_ctx(model, False) as ctx:
        configure(ctx, "tri", BUDGET, DIVIDE, centers=absurd)
        tokens = tokenize(model, default_text()[:4000])
        decode(ctx, tokens[:N_PROMPT])
        compress(ctx)
        kept = last_kept(ctx, 3, BUDGET).reshape(-1, BUDGET)
        assert all(N_PROMPT - 1 in row and len(set(row)) == BUDGET for row in kept)
        decode(ctx, tokens[N_PROMPT:N_PROMPT + 3 * DIVIDE])  # more compressions, each decode succeeds
        assert stats(ctx)["compressions"] >= 3
        assert ll.llama_memory_seq_pos_max(ll.llama_get_memory(ctx), 0) == N_PROMPT + 3 * DIVIDE - 1


def test_query_clusters_are_checked_against_the_model(smollm2_path, smollm2_centres):
    """The C API refuses clusters before their centres, a count outside [1, 64], and arrays of
    another size, with a message that says which."""
    f32p = ctypes.POINTER(ctypes.c_float)
    with loaded_model(smollm2_path) as model, open_ctx(model, False) as ctx:
        values = np.zeros(30 * 9 * 2 * 32, dtype=np.float32)
        ptr = values.ctypes.data_as(f32p)

        def refused(n_clusters, n, message):
            assert lib.triattention_set_clusters(ctx, ptr, ptr, ptr, n_clusters, n) == -1
            assert message in lib.triattention_last_error().decode()

        refused(2, values.size, "set the centres (triattention_set_centers) before their clusters")
        configure(ctx, "tri", BUDGET, DIVIDE, centers=smollm2_centres)
        refused(0, 0, "n_clusters 0 must be in [1, 64]")
        refused(65, values.size, "n_clusters 65 must be in [1, 64]")
        refused(3, values.size, f"clusters have {values.size} entries; this model needs n_layer * n_head * "
                                f"n_clusters * head_dim/2 = {30 * 9 * 3 * 32}")
        assert lib.triattention_set_clusters(ctx, ptr, ptr, ptr, 2, values.size) == 0


def test_a_model_whose_every_layer_slides_is_refused_by_name(gemma3_path, tmp_path):
    """Gemma 3 marked sliding-window in all 18 layers: llama.cpp's full-attention cache is empty."""
    import gguf
    from conftest import rewritten_copy

    path = tmp_path / "all-sliding.gguf"
    rewritten_copy(gemma3_path, path, {"gemma3.attention.sliding_window_pattern": (
        [True] * 18, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.BOOL)})
    with loaded_model(path) as model, model_context(model, n_ctx=1024, n_threads=2) as ctx:
        with pytest.raises(CompressionError, match="architecture 'gemma3' has no KV cache of full-attention layers"):
            configure(ctx, "knorm", BUDGET, DIVIDE)


def test_a_cut_under_per_layer_head_keeps_each_rows_tokens_before_it(smollm2_path, smollm2_centres):
    """Every (layer, head) row keeps its own tokens, so after a cut into the last 20 tokens most cells
    hold some later token in some row. The next decode compacts each row's tokens before the cut
    into as many cells as the row with the fewest has (what cells_before predicted), rows intact."""
    with loaded_model(smollm2_path) as model:
        facts = facts_of(smollm2_path, open_gguf(smollm2_path), model)
        hd, hkv = facts.head_dim, facts.n_head_kv
        with open_ctx(model, False) as ctx:
            configure(ctx, "tri", BUDGET, DIVIDE, centers=smollm2_centres)
            tokens = tokenize(model, default_text()[:4000])
            decode(ctx, tokens[:N_PROMPT])
            compress(ctx)
            held = head_positions(ctx)  # [layer, head, cell]
            cut = N_PROMPT - 20
            rows = {(il, hk, p): (k[c, hk * hd:(hk + 1) * hd], v[c, hk * hd:(hk + 1) * hd])
                    for il, (k, v) in enumerate(cache_rows(ctx, il, hkv * hd, hkv * hd) for il in range(facts.n_layer))
                    for hk in range(hkv) for c, p in enumerate(held[il, hk])}
            expected = int((held < cut).sum(axis=2).min())
            assert lib.triattention_cells_before(ctx, cut) == expected
            assert expected > (lib.triattention_get_cache_info(ctx).cells_used - 20) // 2
            mem = ll.llama_get_memory(ctx)
            assert ll.llama_memory_seq_rm(mem, 0, cut, -1)
            assert ll.llama_memory_seq_pos_max(mem, 0) < cut - 1  # llama.cpp dropped most cells
            batch = ll.llama_batch_init(1, 0, 1)
            batch.token[0], batch.pos[0], batch.n_seq_id[0], batch.logits[0] = tokens[cut], cut, 1, True
            batch.seq_id[0][0] = 0
            batch.n_tokens = 1
            rc = ll.llama_decode(ctx, batch)
            ll.llama_batch_free(batch)
            assert rc == 0
            assert ll.llama_memory_seq_pos_max(mem, 0) == cut
            assert stats(ctx)["compressions"] == 1  # a repair is no compression
            after = head_positions(ctx)
            assert after.shape == (facts.n_layer, hkv, expected)
            assert np.all(after < cut) and np.all(after >= 0)
            for il in range(facts.n_layer):
                k, v = cache_rows(ctx, il, hkv * hd, hkv * hd)
                assert k.shape[0] == expected + 1  # and the new token
                for hk in range(hkv):
                    assert len(set(after[il, hk])) == expected
                    for c, p in enumerate(after[il, hk]):
                        old_k, old_v = rows[(il, hk, p)]
                        assert np.array_equal(k[c, hk * hd:(hk + 1) * hd], old_k), (il, hk, p)
                        assert np.array_equal(v[c, hk * hd:(hk + 1) * hd], old_v), (il, hk, p)


def test_per_layer_records_need_per_layer_head_selection(smollm2_path, smollm2_centres):
    with loaded_model(smollm2_path) as model, open_ctx(model, False) as ctx:
        configure(ctx, "tri", BUDGET, DIVIDE, centers=smollm2_centres)
        decode(ctx, tokenize(model, default_text()[:4000])[:N_PROMPT])
        compress(ctx)
        size = lib.triattention_records_size(ctx)
        import ctypes

        records = ctypes.create_string_buffer(size)
        lib.triattention_records_get(ctx, records, size)
        with pytest.raises(CompressionError, match="per-layer-head compaction records: clear it before choosing "
                                                   "select mode per-head"):
            configure(ctx, "tri", BUDGET, DIVIDE, "per-head", centers=smollm2_centres)
        ll.llama_memory_clear(ll.llama_get_memory(ctx), True)
        configure(ctx, "tri", BUDGET, DIVIDE, "per-head", centers=smollm2_centres)  # a cleared cache may switch
        assert lib.triattention_records_set(ctx, records.raw, size) == -1
        assert "come from select mode per-layer-head" in lib.triattention_last_error().decode()


def test_a_kept_prefix_is_never_evicted(smollm2_path, smollm2_centres):
    from triattention_gguf.compression import keep_prefix

    with loaded_model(smollm2_path) as model, open_ctx(model, False) as ctx:
        configure(ctx, "tri", BUDGET, DIVIDE, centers=smollm2_centres)
        with pytest.raises(CompressionError, match="kept prefix of 64 tokens does not fit in budget 64"):
            keep_prefix(ctx, BUDGET)
        keep_prefix(ctx, 40)
        decode(ctx, tokenize(model, default_text()[:8000])[:N_PROMPT + 4 * DIVIDE])
        assert stats(ctx)["compressions"] >= 4
        held = head_positions(ctx)
        assert all(set(range(40)) <= set(row) for row in held.reshape(-1, held.shape[-1]))
        with pytest.raises(CompressionError, match="kept prefix of 40 tokens does not fit in budget 32 beside the 1 "):
            configure(ctx, "tri", 32, DIVIDE, centers=smollm2_centres)
        with pytest.raises(CompressionError, match="kept prefix of 40 tokens does not fit in budget 64 beside the 32 "):
            configure(ctx, "tri", BUDGET, DIVIDE, centers=smollm2_centres, keep_recent=32)


@pytest.mark.parametrize("select", ["per-layer-head", "per-head"])
def test_the_kept_recent_tokens_are_never_evicted_and_the_rest_goes_by_score(smollm2_path, smollm2_centres, select):
    recent = 16
    with loaded_model(smollm2_path) as model, open_ctx(model, False) as ctx:
        with pytest.raises(CompressionError, match="kv_keep_recent must be between 0 and kv_budget 64"):
            configure(ctx, "tri", BUDGET, DIVIDE, select, centers=smollm2_centres, keep_recent=BUDGET + 1)
        tokens = tokenize(model, default_text()[:8000])[:N_PROMPT + 3 * DIVIDE]
        configure(ctx, "tri", BUDGET, DIVIDE, select, centers=smollm2_centres, keep_recent=recent)
        decode(ctx, tokens)
        assert stats(ctx)["compressions"] >= 3
        held = head_positions(ctx).reshape(-1, BUDGET)
        newest = stats(ctx)["compressed_upto"]
        assert all(set(range(newest - recent + 1, newest + 1)) <= set(row) for row in held)
        # scores chose the rest: the rows differ among themselves and hold older tokens than the window
        assert len({tuple(sorted(row)) for row in held}) > 1 and held.min() < newest - BUDGET
