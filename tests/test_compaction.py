"""Compression inside llama.cpp's cache: the right rows move, per head, and decoding goes on."""
import numpy as np
import pytest

from triattention_gguf._lib import llama_cpp_bindings as ll
from triattention_gguf.calibrate import compute_centers, default_text
from triattention_gguf.compression import CompressionError, cache_rows, compress, configure, last_kept, stats
from triattention_gguf.modelinfo import facts_of, loaded_model, model_context, open_gguf

BUDGET, DIVIDE, UBATCH = 64, 32, 32
N_PROMPT = BUDGET + DIVIDE  # fills the cache up to the trigger, not past it


@pytest.fixture(scope="module")
def smollm2_centres(smollm2_path):
    return compute_centers(smollm2_path, max_tokens=256, n_threads=2, progress=False)


def tokenize(model, text: str) -> list[int]:
    data = text.encode()
    buf = (ll.llama_token * (len(data) + 8))()
    n = ll.llama_tokenize(ll.llama_model_get_vocab(model), data, len(data), buf, len(buf), False, False)
    return list(buf[:n])


def decode(ctx, tokens) -> None:
    for start in range(0, len(tokens), UBATCH):
        chunk = tokens[start:start + UBATCH]
        arr = (ll.llama_token * len(chunk))(*chunk)  # must outlive llama_decode: the batch points into it
        assert ll.llama_decode(ctx, ll.llama_batch_get_one(arr, len(chunk))) == 0


def open_ctx(model, flash_attn: bool, n_ctx: int = 256, **overrides):
    fa = ll.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
    return model_context(model, n_ctx=n_ctx, n_threads=2, n_ubatch=UBATCH, flash_attn_type=fa, **overrides)


@pytest.mark.parametrize("flash_attn", [False, True], ids=["v-transposed", "v-rows"])
@pytest.mark.parametrize("method", ["tri", "knorm", "streaming", "random"])
def test_compaction_moves_each_heads_kept_rows(method, flash_attn, smollm2_path, smollm2_centres):
    with loaded_model(smollm2_path) as model:
        facts = facts_of(smollm2_path, open_gguf(smollm2_path), model)
        hd, hkv = facts.head_dim, facts.n_head_kv
        with open_ctx(model, flash_attn) as ctx:
            configure(ctx, method, BUDGET, DIVIDE, centers=smollm2_centres if method == "tri" else None)
            decode(ctx, tokenize(model, default_text()[:4000])[:N_PROMPT])
            assert stats(ctx)["compressions"] == 0
            before = [cache_rows(ctx, il, hkv * hd, hkv * hd) for il in range(facts.n_layer)]
            compress(ctx)
            kept = last_kept(ctx, hkv, BUDGET)
            mem = ll.llama_get_memory(ctx)
            assert ll.llama_memory_seq_pos_max(mem, 0) == N_PROMPT - 1  # the next position follows the newest
            assert stats(ctx)["cells_evicted"] == N_PROMPT - BUDGET
            for hk in range(hkv):
                assert kept[hk][-1] == N_PROMPT - 1  # newest token kept in every head
                assert len(set(kept[hk])) == BUDGET and np.all(np.diff(kept[hk]) > 0)
            if method == "streaming":
                expected = np.r_[0:4, N_PROMPT - BUDGET + 4:N_PROMPT]
                assert all(np.array_equal(kept[hk], expected) for hk in range(hkv))
            for il in range(facts.n_layer):
                k_after, v_after = cache_rows(ctx, il, hkv * hd, hkv * hd)
                assert k_after.shape[0] == BUDGET
                k_before, v_before = before[il]
                for hk in range(hkv):
                    cols = slice(hk * hd, (hk + 1) * hd)
                    assert np.array_equal(k_after[:, cols], k_before[kept[hk], cols]), (il, hk)
                    assert np.array_equal(v_after[:, cols], v_before[kept[hk], cols]), (il, hk)
            if method in ("tri", "knorm"):  # scores differ between heads, so do the kept sets
                assert any(not np.array_equal(kept[0], kept[hk]) for hk in range(1, hkv))


def test_shared_selection_keeps_one_set(smollm2_path, smollm2_centres):
    with loaded_model(smollm2_path) as model, open_ctx(model, False) as ctx:
        configure(ctx, "tri", BUDGET, DIVIDE, select="shared", centers=smollm2_centres)
        decode(ctx, tokenize(model, default_text()[:4000])[:N_PROMPT])
        compress(ctx)
        kept = last_kept(ctx, 3, BUDGET)
        assert np.array_equal(kept[0], kept[1]) and np.array_equal(kept[0], kept[2])


def test_bad_parameters_are_refused(smollm2_path):
    with loaded_model(smollm2_path) as model, open_ctx(model, False) as ctx:
        with pytest.raises(CompressionError, match="must fit in the 256 cells"):
            configure(ctx, "streaming", 512, DIVIDE)
        with pytest.raises(CompressionError, match="needs the query centres"):
            configure(ctx, "tri", BUDGET, DIVIDE)
        with pytest.raises(CompressionError, match="unknown kv_compress method 'snap'"):
            configure(ctx, "snap", BUDGET, DIVIDE)
        with pytest.raises(CompressionError, match="budget >= 5"):
            configure(ctx, "knorm", 2, DIVIDE)


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
