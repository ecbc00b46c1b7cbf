"""triattention_gguf.Llama: the llama-cpp-python drop-in with a compressed cache."""
import llama_cpp
import numpy as np
import pytest
from conftest import centred_copy, rewritten_copy

from triattention_gguf import Llama
from triattention_gguf._lib import lib, llama_cpp_bindings as ll
from triattention_gguf.methods import METHODS
from triattention_gguf.centers import CentersError
from triattention_gguf.compression import CompressionError

PROMPT = "<|im_start|>user\nTell me about the history of lighthouses.<|im_end|>\n<|im_start|>assistant\n"
COMPRESSING = [m for m in METHODS if m != "none"]
SMALL = dict(n_ctx=2048, n_threads=2, verbose=False, n_ubatch=64)


@pytest.fixture(scope="module")
def centred(smollm2_centred):
    return smollm2_centred


def greedy(llm, prompt=PROMPT, n=48):
    return llm(prompt, max_tokens=n, temperature=0.0)["choices"][0]["text"]


def test_none_is_stock_behaviour(centred):
    assert greedy(Llama(centred, **SMALL)) == greedy(llama_cpp.Llama(centred, **SMALL))


@pytest.mark.parametrize("method", COMPRESSING)
def test_budget_above_the_text_changes_nothing(method, centred):
    llm = Llama(centred, kv_compress=method, kv_budget=1024, kv_divide_length=64, **SMALL)
    assert greedy(llm) == greedy(Llama(centred, **SMALL))
    assert llm.kv_stats()["compressions"] == 0


@pytest.mark.parametrize("method", COMPRESSING)
def test_compressed_generation_is_bounded_and_reports_its_memory(method, centred):
    llm = Llama(centred, kv_compress=method, kv_budget=64, kv_divide_length=32, **SMALL)
    text = greedy(llm, n=300)
    kv = llm.kv_stats()
    assert len(text) > 200 and kv["compressions"] >= 5
    assert kv["cells_used"] <= 64 + 32 + 64 and kv["cells_capacity"] == 256  # llama.cpp pads to 256 cells
    assert kv["logical_pos"] > kv["cells_capacity"]
    assert kv["kv_bytes_full"] > kv["kv_bytes"]
    assert llm.n_ctx() == 2048  # n_ctx keeps its meaning: the longest conversation


@pytest.mark.parametrize("n_ubatch, cells", [(None, 2560), (512, 2816)])
def test_default_ubatch_fills_llama_cpps_cell_pages(n_ubatch, cells, centred):
    """budget + divide_length + 512 = 2688 cells would be rounded up to 2816 by llama.cpp; the
    default ubatch (384) makes the cache 2560 cells, while an explicit n_ubatch is honoured."""
    extra = {} if n_ubatch is None else {"n_ubatch": n_ubatch}
    llm = Llama(centred, kv_compress="tri", kv_budget=2048, kv_divide_length=128, n_ctx=8192, verbose=False, **extra)
    assert llm.kv_stats()["cells_capacity"] == cells
    assert llm.n_ctx() == 8192


def _count_evals(llm):
    counted = []
    original = llm.eval

    def counting(tokens):
        counted.append(len(tokens))
        return original(tokens)

    llm.eval = counting
    return counted


def test_reuse_after_compression_only_when_the_history_is_extended(centred):
    llm = Llama(centred, kv_compress="tri", kv_budget=64, kv_divide_length=32, **SMALL)
    first = llm.tokenize(PROMPT.encode(), special=True)
    out = list(_take(llm.generate(first, temp=0.0), 150))
    assert llm.kv_stats()["compressions"] > 0
    history = first + out[:-1]  # what the cache holds: the last sampled token is not decoded yet
    counted = _count_evals(llm)
    extended = history + llm.tokenize(b" And then?")
    cont = list(_take(llm.generate(extended, temp=0.0), 8))
    assert counted[0] == len(extended) - len(history)  # only the new part is read (then one per new token)

    counted.clear()
    diverging = first[:-3] + llm.tokenize(b" Briefly.")
    again = list(_take(llm.generate(diverging, temp=0.0), 8))
    assert counted[0] == len(diverging)  # a shorter prefix is not held exactly: read it all again
    fresh = Llama(centred, kv_compress="tri", kv_budget=64, kv_divide_length=32, **SMALL)
    assert again == list(_take(fresh.generate(diverging, temp=0.0), 8))
    assert cont  # the extended turn produced tokens


QUESTIONS = ["Name three famous lighthouses.", "Which of them is the oldest?", "How did its light work?",
             "Who kept it?", "What was a keeper's day like?", "Summarise our conversation in one sentence."]


def test_multi_turn_chat_reads_only_each_new_turn(centred):
    """Each turn of a chat whose history outgrows the cache many times reads only what is new,
    and its answer equals a fresh instance fed the same logical history without any reuse."""
    kw = dict(kv_compress="tri", kv_budget=96, kv_divide_length=32, **SMALL)
    llm = Llama(centred, **kw)
    calls = []  # (tokens held before the call, tokens read)
    original = llm.eval
    llm.eval = lambda tokens: (calls.append((llm.n_tokens, list(tokens))), original(tokens))[1]
    from triattention_gguf.calibrate import default_text

    system = "You are a helpful assistant. Reference notes:\n" + default_text()[:1500]
    messages = [{"role": "system", "content": system}]
    for question in QUESTIONS:
        messages.append({"role": "user", "content": question})
        start, history = len(calls), llm.n_tokens
        reply = llm.create_chat_completion(messages, max_tokens=64, temperature=0.0)
        answer = reply["choices"][0]["message"]["content"]
        assert answer.strip()
        messages.append({"role": "assistant", "content": answer})
        held, prompt_part = calls[start]
        assert held + len(prompt_part) == reply["usage"]["prompt_tokens"]
        # later turns keep the history; at most the previous answer (64 tokens), which the
        # template may tokenize differently from the sampled tokens, is read again
        assert history == 0 or held >= history - 64, (question, history, held)
    assert llm.kv_stats()["compressions"] >= 3
    assert llm.kv_stats()["logical_pos"] > 3 * llm.kv_stats()["cells_capacity"]

    fresh = Llama(centred, **kw)
    for held, tokens in calls[:start]:
        if fresh.n_tokens > held:  # the chat dropped a re-tokenized tail here
            assert fresh._ctx.kv_cache_seq_rm(-1, held, -1)
            fresh.n_tokens = held
        fresh.eval(tokens)
    assert fresh.n_tokens == calls[start][0]
    fed_back = [tokens[0] for _, tokens in calls[start + 1:]]  # the last turn's sampled tokens
    assert fed_back == list(_take(fresh.generate(calls[start][1], reset=False, temp=0.0), len(fed_back)))


def _take(gen, n):
    for i, token in enumerate(gen):
        if i == n:
            return
        yield token


def test_tri_without_centres_names_the_command(smollm2_path):
    with pytest.raises(CentersError, match="triattention-gguf embed-centers"):
        Llama(smollm2_path, kv_compress="tri", **SMALL)


def test_an_error_is_not_drowned_in_llama_cpps_log(smollm2_path):
    import subprocess
    import sys

    code = f"from triattention_gguf import Llama; Llama({smollm2_path!r}, kv_compress='tri', verbose=False)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "triattention-gguf embed-centers" in result.stderr
    assert "llama_model_loader" not in result.stderr and "print_info" not in result.stderr


def test_bad_arguments(centred):
    with pytest.raises(CompressionError, match="unknown kv_compress 'snap'"):
        Llama(centred, kv_compress="snap", **SMALL)
    with pytest.raises(CompressionError, match="unknown kv_select"):
        Llama(centred, kv_compress="tri", kv_select="sometimes", **SMALL)
    with pytest.raises(CompressionError, match="kv_budget must be at least 5"):
        Llama(centred, kv_compress="tri", kv_budget=1, **SMALL)
    with pytest.raises(CompressionError, match="kv_horizon must be between 1 and 65536 tokens"):
        Llama(centred, kv_compress="tri", kv_horizon=0, **SMALL)
    with pytest.raises(CompressionError, match=r"kv_min_concentration must be between 0 and 1 \(got 72\)"):
        Llama(centred, kv_compress="tri", kv_min_concentration=72, **SMALL)


def test_the_horizon_reaches_the_engine(centred):
    """tri with kv_horizon=4 keeps other tokens than with the reference's horizon (identical
    otherwise: the engine is deterministic), and a saved state records which it was."""
    from triattention_gguf.compression import head_positions

    def held(horizon):
        llm = Llama(centred, kv_compress="tri", kv_budget=64, kv_divide_length=32, kv_horizon=horizon, **SMALL)
        greedy(llm, n=200)
        assert llm.kv_stats()["compressions"] >= 3 and llm.state_identity()["kv_horizon"] == horizon
        return head_positions(llm._ctx.ctx)

    default = held(65536)
    assert np.array_equal(default, held(65536)) and not np.array_equal(default, held(4))


def test_spread_heads_follow_recency_and_their_observed_attention(centred):
    """kv_min_concentration reaches the engine per (layer, KV head): at the first compression (the
    same cache for every setting) the heads below 0.72 (SmolLM2's centres have some) hold what they
    hold when every head is below (1.0), the others what tri's centres choose (0: the default, the
    reference). With 1.0 no head holds what the centres choose, and not every head holds
    streaming's set (the observed attention counts: the exact scores are test_score_op's). A saved
    state records which setting it was."""
    from triattention_gguf.calibrate import default_text
    from triattention_gguf.centers import load_centers
    from triattention_gguf.compression import head_positions
    from triattention_gguf.modelinfo import read_facts

    def held(method, **kw):
        """Each (layer, KV head)'s held positions, sorted, after the first compression."""
        llm = Llama(centred, kv_compress=method, kv_budget=64, kv_divide_length=32, **kw, **SMALL)
        tokens = llm.tokenize(default_text()[:4000].encode())
        for start in range(0, len(tokens), 32):
            llm.eval(tokens[start:start + 32])
            if llm.kv_stats()["compressions"]:
                break
        assert llm.kv_stats()["compressions"] == 1
        if method == "tri":
            assert llm.state_identity()["kv_min_concentration"] == kw.get("kv_min_concentration", 0.0)
        return np.sort(head_positions(llm._ctx.ctx), axis=-1)

    streaming, every, none, some = (held("streaming"), held("tri", kv_min_concentration=1.0), held("tri"),
                                    held("tri", kv_min_concentration=0.72))
    spread = load_centers(read_facts(centred)).kv_head_concentration() < 0.72  # [layer, KV head]
    assert 0 < spread.sum() < spread.size
    assert np.array_equal(some[spread], every[spread]) and np.array_equal(some[~spread], none[~spread])
    assert not (every == none).all(axis=-1).any()
    assert not (every == streaming).all(axis=-1).all()


def test_teacher_forced_eval_fills_every_logical_position(centred):
    from triattention_gguf.calibrate import default_text

    kw = dict(SMALL, logits_all=True)
    llm = Llama(centred, kv_compress="tri", kv_budget=64, kv_divide_length=32, **kw)
    tokens = llm.tokenize(default_text()[:8000].encode())[:600]
    for start in range(0, len(tokens), 32):  # chunks no larger than divide_length: as in decoding
        llm.eval(tokens[start:start + 32])
    assert llm.n_tokens == len(tokens) and llm.kv_stats()["compressions"] > 0
    full = llama_cpp.Llama(centred, **kw)
    full.eval(tokens)
    # identical until the first compression, then close but no longer equal
    first = 64 + 32
    assert (llm.scores[:first] == full.scores[:first]).all()
    assert not (llm.scores[first:len(tokens)] == full.scores[first:len(tokens)]).all()
    agree = (llm.scores[:len(tokens)].argmax(1) == full.scores[:len(tokens)].argmax(1)).mean()
    assert agree > 0.6, agree


def test_state_round_trip_continues_identically(centred):
    llm = Llama(centred, kv_compress="tri", kv_budget=64, kv_divide_length=32, **SMALL)
    greedy(llm, n=150)
    assert llm.kv_stats()["compressions"] > 0
    state = llm.save_state()
    history = list(llm._input_ids)
    a = list(_take(llm.generate(history, temp=0.0), 100))
    llm.load_state(state)
    b = list(_take(llm.generate(history, temp=0.0), 100))
    assert a == b


def test_a_kept_prompt_stays_and_a_long_one_is_compressed_with_a_warning(centred, caplog):
    from triattention_gguf.compression import head_positions

    llm = Llama(centred, kv_compress="tri", kv_budget=64, kv_divide_length=32, kv_keep_prompt=True, **SMALL)
    prompt = llm.tokenize(PROMPT.encode())
    assert len(prompt) < 64
    list(_take(llm.generate(prompt, temp=0.0), 200))
    assert llm.kv_stats()["compressions"] >= 4
    rows = head_positions(llm._ctx.ctx).reshape(-1, 64)
    assert all(set(range(len(prompt))) <= set(row) for row in rows)  # every layer's every head
    long_prompt = llm.tokenize((PROMPT * 8).encode())
    assert len(long_prompt) >= 64
    with caplog.at_level("WARNING", logger="triattention_gguf.llama"):
        list(_take(llm.generate(long_prompt, temp=0.0), 8))
    assert f"the prompt has {len(long_prompt)} tokens, more than kv_budget 64" in caplog.text
    rows = head_positions(llm._ctx.ctx).reshape(-1, 64)
    assert not all(set(range(len(prompt))) <= set(row) for row in rows)  # compressed like the rest


@pytest.fixture(scope="module")
def qwen_centred(qwen_path, tmp_path_factory):
    return centred_copy(qwen_path, tmp_path_factory.mktemp("qwen") / "qwen.gguf", 256)


@pytest.mark.parametrize("method", COMPRESSING)
def test_qwen_every_method_stays_within_its_cells(method, qwen_centred):
    llm = Llama(qwen_centred, kv_compress=method, kv_budget=32, kv_divide_length=16, n_ctx=1024, n_threads=2,
                verbose=False, n_ubatch=32)
    out = llm("def fibonacci(n):", max_tokens=100, temperature=0.0)
    kv = llm.kv_stats()
    assert out["usage"]["completion_tokens"] == 100 or out["choices"][0]["finish_reason"] == "stop"
    assert kv["compressions"] >= 1 and kv["cells_used"] <= 32 + 16 + 32
    assert kv["logical_pos"] == out["usage"]["total_tokens"] - 1  # the last sampled token is not decoded


@pytest.fixture(scope="module")
def gemma3_centred(gemma3_path, tmp_path_factory):
    return centred_copy(gemma3_path, tmp_path_factory.mktemp("gemma3") / "gemma3.gguf", 256)


GEMMA_PROMPT = "<start_of_turn>user\nWrite a long story about a lighthouse keeper.<end_of_turn>\n<start_of_turn>model\n"


def test_sliding_window_model_generates_within_its_cells(gemma3_centred):
    """Gemma 3: the full-attention layers' cache is compressed and bounded, llama.cpp keeps the
    sliding-window layers in a window-sized cache of their own, and positions go past both."""
    llm = Llama(gemma3_centred, kv_compress="tri", kv_budget=128, kv_divide_length=32, n_ctx=4096, n_threads=2,
                n_ubatch=64, verbose=False)
    out = llm(GEMMA_PROMPT, max_tokens=1000, temperature=0.0)
    kv = llm.kv_stats()
    assert out["usage"]["completion_tokens"] == 1000
    # llama.cpp sizes both parts from n_ctx: the window part needs n_swa (512) + n_ubatch cells
    assert kv["cells_capacity"] == kv["swa_cells_capacity"] == 768
    assert kv["cells_used"] <= 128 + 32 + 64 and kv["compressions"] >= 20
    assert kv["logical_pos"] == out["usage"]["total_tokens"] - 1 > kv["cells_capacity"]
    assert kv["kv_bytes"] == lib.triattention_get_cache_info(llm._ctx.ctx).bytes + kv["swa_kv_bytes"]
    assert kv["kv_bytes_full"] > kv["kv_bytes"]


def test_a_cut_older_than_the_window_is_read_again(gemma3_path):
    """A cut is served only while the window cache still holds the n_swa tokens before it;
    otherwise the prompt is read again, and the answer equals a fresh instance's."""
    # a long divide_length: the compressed history alone would serve any cut past budget + divide_length
    kw = dict(kv_compress="streaming", kv_budget=64, kv_divide_length=700, n_ctx=4096, n_threads=2, n_ubatch=64,
              verbose=False)
    llm = Llama(gemma3_path, **kw)
    first = llm.tokenize(GEMMA_PROMPT.encode(), special=True)
    history = first + list(_take(llm.generate(first, temp=0.0), 1600))[:-1]
    from triattention_gguf.compression import stats

    assert stats(llm._ctx.ctx)["compressed_upto"] > 900 > 64 + 700
    assert ll.llama_memory_seq_pos_min(ll.llama_get_memory(llm._ctx.ctx), 0) > 900 - 512  # the window moved on
    near = history[:-20] + llm.tokenize(b" The end.")  # cut 20 tokens back: served
    list(_take(llm.generate(near, temp=0.0), 4))
    assert llm.prompt_reuse()["reused"] == len(history) - 20
    far = history[:900] + llm.tokenize(b" The end.")  # its window is gone: read from the start
    again = list(_take(llm.generate(far, temp=0.0), 8))
    assert llm.prompt_reuse()["reused"] == 0
    assert again == list(_take(Llama(gemma3_path, **kw).generate(far, temp=0.0), 8))


def test_a_state_file_resumes_in_another_instance(centred, tmp_path):
    from triattention_gguf.state_file import StateFileError

    kw = dict(kv_compress="tri", kv_budget=64, kv_divide_length=32, **SMALL)
    llm = Llama(centred, **kw)
    greedy(llm, n=150)
    assert llm.kv_stats()["compressions"] > 0
    path = tmp_path / "conversation.state"
    llm.save_state_file(path)
    history = list(llm._input_ids)
    expected = list(_take(llm.generate(history, temp=0.0), 60))

    other = Llama(centred, **kw)
    other.load_state_file(path)
    assert list(_take(other.generate(history, temp=0.0), 60)) == expected
    assert other.prompt_reuse()["reused"] == len(history) - 1  # only the last token again, for its logits

    with pytest.raises(StateFileError, match="saved with kv_budget = 64; this Llama has 96"):
        Llama(centred, **{**kw, "kv_budget": 96}).load_state_file(path)
    data = path.read_bytes()
    (tmp_path / "cut.state").write_bytes(data[:-100])
    flipped = bytearray(data)
    flipped[-5000] ^= 0xFF
    (tmp_path / "flipped.state").write_bytes(bytes(flipped))
    for name in ("cut.state", "flipped.state"):
        with pytest.raises(StateFileError, match="truncated or corrupt"):
            other.load_state_file(tmp_path / name)
    (tmp_path / "text.state").write_text("hello")
    with pytest.raises(StateFileError, match="not a triattention-gguf state file"):
        other.load_state_file(tmp_path / "text.state")
    with pytest.raises(FileNotFoundError):
        llm.save_state_file(tmp_path / "missing-dir" / "x.state")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conversation.state", "cut.state", "flipped.state",
                                                          "text.state"]  # no temporary left behind


def test_a_state_file_needs_the_same_query_clusters(centred, tmp_path):
    """A state is restored where tri would score alike: the centres and their query clusters. One
    cluster is the centre itself, so a version 1 file (no clusters stored) restores it too."""
    import gguf
    from triattention_gguf.state_file import StateFileError

    reader = gguf.GGUFReader(centred)
    assert reader.get_field("triattention.clusters").contents() > 1
    v1, one = tmp_path / "v1.gguf", tmp_path / "one.gguf"
    centre_keys = ("q_mean_real", "q_mean_imag", "q_abs_mean")
    rewritten_copy(centred, v1, {"triattention.version": (1, gguf.GGUFValueType.UINT32, None),
                                 **{f"triattention.{k}": (None, None, None)
                                    for k in ("clusters", *(f"cluster.{k}" for k in centre_keys))}})
    the_centre = {f"triattention.cluster.{k}": (reader.get_field(f"triattention.{k}").contents(),
                                                gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.FLOAT32)
                  for k in centre_keys}
    rewritten_copy(centred, one, {"triattention.clusters": (1, gguf.GGUFValueType.UINT32, None), **the_centre})

    kw = dict(kv_compress="tri", kv_budget=64, kv_divide_length=32, **SMALL)
    llm = Llama(str(one), **kw)
    greedy(llm, n=120)
    path = tmp_path / "conversation.state"
    llm.save_state_file(path)
    Llama(str(v1), **kw).load_state_file(path)
    with pytest.raises(StateFileError, match="centres"):
        Llama(centred, **kw).load_state_file(path)


def test_conversations_on_one_model_keep_caches_of_their_own(centred):
    kw = dict(kv_compress="tri", kv_budget=64, kv_divide_length=32, **SMALL)
    llm = Llama(centred, **kw)
    first = llm.conversation
    a = greedy(llm, n=120)
    history = list(llm._input_ids)
    other = llm.new_conversation()
    llm.use(other)
    assert llm.n_tokens == 0 and llm.kv_stats()["cells_used"] == 0  # a cache of its own, empty
    b = greedy(llm, prompt=PROMPT.replace("lighthouses", "bridges"), n=120)
    assert llm.kv_stats()["compressions"] > 0 and b != a
    llm.use(first)  # the first conversation goes on where it was, from its context's own last logits
    assert list(llm._input_ids) == history
    going_on = list(_take(llm.generate(history, temp=0.0), 40))
    assert llm.prompt_reuse()["reused"] == len(history)
    alone = Llama(centred, **kw)
    assert greedy(alone, n=120) == a
    assert list(_take(alone.generate(history, temp=0.0), 40)) == going_on


def test_a_saved_state_holds_the_cache_not_a_logits_buffer(centred):
    llm = Llama(centred, kv_compress="tri", kv_budget=64, kv_divide_length=32, **SMALL)
    greedy(llm, n=150)
    state = llm.save_state()
    kv = llm.kv_stats()
    assert state.scores.size == 0 and len(state.input_ids) == state.n_tokens == kv["logical_pos"]
    # the used cells' K and V, the last token's logits and llama.cpp's small extras; not the allocated cache
    used = kv["kv_bytes"] * kv["cells_used"] / kv["cells_capacity"]
    assert used < len(state.llama_state) < used + 4 * llm.n_vocab() + 65536
