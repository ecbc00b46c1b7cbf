// Compression of a context's KV cache: a scorer scores the cached keys (triattention-scorer.h), the
// select mode turns the scores into the cells each KV head keeps (triattention-select.h), and
// compaction moves the kept K and V rows into the front cells with graph ops on the backends that
// hold the cache (triattention-compact.h). Only cell indices visit the host.
#include "triattention.h"
#include "triattention-compact.h"
#include "triattention-hooks.h"
#include "triattention-impl.h"
#include "triattention-records.h"
#include "triattention-scorer.h"
#include "triattention-select.h"

#include "llama-arch.h"
#include "llama-kv-cache-iswa.h"
#include "llama-model.h"

#include "ggml-backend.h"
#include "ggml-cpu.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <unordered_map>

namespace {

struct state {
    explicit state(const llama_context * ctx) : runner(ctx) {}

    triattention_runner  runner;
    triattention_params  params = triattention_default_params();
    triattention_centres centres;
    std::unique_ptr<triattention_scorer> scorer;  // of params.method; null for NONE
    triattention_records records;
    llama_pos            keep_prefix = 0;         // positions below are never evicted
    triattention_stats   stats{0, 0, 0.0, -1};
    std::vector<int32_t> last_kept;               // [group][n_head_kv][budget]

    // the candidate groups the select mode compares: one per compressed layer, or one for all
    int32_t n_groups(const llama_kv_cache * kv) const {
        return params.select == TRIATTENTION_SELECT_PER_LAYER_HEAD ? (int32_t) kv->get_layer_ids().size() : 1;
    }
};

std::mutex g_mutex;
std::unordered_map<const llama_context *, std::unique_ptr<state>> g_states;
thread_local std::string g_error;

state * find_state(const llama_context * ctx) {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_states.find(ctx);
    return it == g_states.end() ? nullptr : it->second.get();
}

state & state_of(const llama_context * ctx) {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto & slot = g_states[ctx];
    if (!slot) {
        slot = std::make_unique<state>(ctx);
    }
    return *slot;
}

const char * SELECT_NAMES[] = { "per-head", "shared", "per-layer-head" };

// a kept prefix of n tokens leaves room in the budget for the kept recent ones, the newest at least
bool prefix_fits(llama_pos n, const triattention_params & params) {
    return (int64_t) n + std::max(params.keep_recent, 1) <= params.budget;
}

std::string prefix_misfit(llama_pos n, const triattention_params & params) {
    return "a kept prefix of " + std::to_string(n) + " tokens does not fit in budget " + std::to_string(params.budget) +
           " beside the " + std::to_string(std::max(params.keep_recent, 1)) + " newest tokens kept";
}

// Positions from here on stay: the newest keep_recent, and whatever the scorer keeps whole (snapkv's window).
llama_pos kept_from(const state & st, const triattention_candidates & c) {
    const llama_pos scorer = st.scorer->keep_from(c);
    const llama_pos recent = st.params.keep_recent > 0 ? c.newest + 1 - st.params.keep_recent : -1;
    return scorer < 0 ? recent : recent < 0 ? scorer : std::min(scorer, recent);
}

// Compresses sequence 0 to the budget when it holds more cells, or repairs a cut inside the
// compacted history (truncation_at): the sequence continues at `next`, and every row keeps the same
// number of its tokens before the cut (the fewest any row holds, at most the budget), chosen by
// the scorer like any compression. A cell's position only masks, so when no cell is left at
// next - 1 the newest one stands in for it: llama.cpp then sees a contiguous sequence.
int32_t compress_now(llama_context * ctx, state & st, llama_pos next) {
    llama_kv_cache * kv = triattention_kv_cache(ctx);
    const int32_t n_head_kv = (int32_t) ctx->get_model().hparams.n_head_kv(kv->get_layer_ids()[0]);
    llama_kv_cells & cells = kv->get_cells_mut(0);
    const auto truncation = st.records.truncation_at(cells, next);
    if (truncation == triattention_records::truncation::cleared) {
        st.records = {};
    }
    const bool cut = truncation == triattention_records::truncation::cut;
    if (!cut && (int32_t) cells.get_used() <= st.params.budget) {
        return 0;
    }
    const auto start = std::chrono::steady_clock::now();
    llama_synchronize(ctx);
    const int32_t n_groups = st.n_groups(kv);  // set_params and records_set keep per-layer records per-layer

    const triattention_candidates c = triattention_gather(st.records, cells, n_head_kv, n_groups, cut ? next : -1);
    const int32_t budget = cut ? std::min(st.params.budget, c.min_row_tokens()) : st.params.budget;
    if (budget == 0) {  // cut before every kept token
        for (int32_t i = 0; i < c.n_kv; ++i) {
            if (!cells.is_empty(i)) {
                cells.rm(i);
            }
        }
        st.records = {};
        return 0;
    }
    triattention_scores scores;
    if (!st.scorer->score(ctx, kv, c, scores)) {
        return -1;
    }
    const std::vector<int32_t> kept = triattention_select(st.params.select, scores, c,
                                                          { st.keep_prefix, kept_from(st, c) }, budget);
    const triattention_moves moves = triattention_fill_holes(kept, (int64_t) n_groups * n_head_kv, budget);
    if (!triattention_compact(ctx, kv, moves, n_groups)) {
        return -1;
    }

    // The cells now: [0, budget) hold seq 0; a cell's position is the newest of its tokens, so
    // every kept key stays visible to later queries and the next position follows the newest.
    triattention_records & rec = st.records;
    rec.n_groups  = n_groups;
    rec.n_head_kv = n_head_kv;
    rec.head_pos.assign((size_t) n_groups * n_head_kv * budget, -1);
    rec.cell_pos.assign(budget, -1);
    for (int64_t r = 0; r < (int64_t) n_groups * n_head_kv; ++r) {
        for (int32_t j = 0; j < budget; ++j) {
            const llama_pos p = c.row(r)[moves.layout[r * budget + j]];
            rec.head_pos[r * budget + j] = p;
            rec.cell_pos[j] = std::max(rec.cell_pos[j], p);
        }
    }
    const int32_t used_before = (int32_t) cells.get_used();
    for (int32_t i = 0; i < c.n_kv; ++i) {
        if (!cells.is_empty(i)) {
            cells.rm(i);
        }
    }
    rec.compressed_upto = c.newest;
    if (cut && c.newest < next - 1) {
        const int32_t newest = (int32_t) (std::find(rec.cell_pos.begin(), rec.cell_pos.end(), c.newest) -
                                          rec.cell_pos.begin());
        rec.cell_pos[newest] = rec.compressed_upto = next - 1;
    }
    for (int32_t j = 0; j < budget; ++j) {
        cells.pos_set(j, rec.cell_pos[j]);
        cells.seq_add(j, 0);
    }
    // llama.cpp's slot search would go on from where the last ubatch ended, leaving a gap that
    // attention then reads over: the next ubatch goes into the first free cells instead
    kv->set_head(0, (uint32_t) budget);
    st.last_kept = moves.layout;
    if (!cut) {  // a repair is no compression of its own
        st.stats.compressions++;
        st.stats.cells_evicted += used_before - budget;
    }
    st.stats.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return 0;
}

}  // namespace

int32_t triattention_fail(const std::string & message) {
    g_error = message;
    return -1;
}

void triattention_clear_error() {
    g_error.clear();
}

const char * triattention_last_error(void) {
    return g_error.c_str();
}

llama_kv_cache * triattention_kv_cache(const llama_context * ctx) {
    llama_memory_i * mem = llama_get_memory(ctx);
    if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(mem)) {
        return iswa->get_base();
    }
    return dynamic_cast<llama_kv_cache *>(mem);
}

llama_kv_cache * triattention_swa_cache(const llama_context * ctx) {
    auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(llama_get_memory(ctx));
    return iswa != nullptr ? iswa->get_swa() : nullptr;
}

triattention_runner::triattention_runner(const llama_context * ctx) {
    // every device that holds part of the cache, then the CPU (ggml's scheduler wants it last)
    std::vector<ggml_backend_dev_t> devices;
    if (const llama_kv_cache * kv = triattention_kv_cache(ctx)) {
        for (uint32_t il : kv->get_layer_ids()) {
            ggml_backend_buffer_t buf = kv->get_k_storage((int32_t) il)->buffer;
            if (!ggml_backend_buffer_is_host(buf)) {
                ggml_backend_dev_t dev = ggml_backend_buft_get_device(ggml_backend_buffer_get_type(buf));
                if (std::find(devices.begin(), devices.end(), dev) == devices.end()) {
                    devices.push_back(dev);
                }
            }
        }
    }
    devices.push_back(ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU));
    std::vector<ggml_backend_t> raw;
    for (ggml_backend_dev_t dev : devices) {
        backends.emplace_back(ggml_backend_dev_init(dev, nullptr));
        raw.push_back(backends.back().get());
    }
    ggml_backend_cpu_set_n_threads(raw.back(), ctx->get_cparams().n_threads);
    sched.reset(ggml_backend_sched_new(raw.data(), nullptr, (int) raw.size(), TRIATTENTION_MAX_NODE, false, false));
}

triattention_runner & triattention_runner_of(const llama_context * ctx) {
    return state_of(ctx).runner;
}

ggml_context_ptr triattention_graph_context(size_t n_nodes) {
    ggml_init_params params = { n_nodes * ggml_tensor_overhead() + ggml_graph_overhead_custom(n_nodes, false),
                                nullptr, true };
    return ggml_context_ptr(ggml_init(params));
}

triattention_params triattention_default_params(void) {
    return { TRIATTENTION_METHOD_NONE, 2048, 128, TRIATTENTION_SELECT_PER_LAYER_HEAD, 0, 0, TRIATTENTION_MAX_HORIZON, 0.0f };
}

// A fresh scorer for st.params: random reseeded, no snapkv window, tri's spread heads from the
// centres set now.
static void renew_scorer(llama_context * ctx, state & st) {
    if (st.scorer) {
        st.scorer->release(ctx);
    }
    st.scorer = triattention_make_scorer(ctx, st.params, st.centres);
}

int32_t triattention_set_params(llama_context * ctx, triattention_params params) {
    triattention_clear_error();
    if (params.method < TRIATTENTION_METHOD_NONE || params.method > TRIATTENTION_METHOD_SNAPKV) {
        return triattention_fail("unknown compression method " + std::to_string(params.method));
    }
    if (params.select < TRIATTENTION_SELECT_PER_HEAD || params.select > TRIATTENTION_SELECT_PER_LAYER_HEAD) {
        return triattention_fail("unknown selection mode " + std::to_string(params.select));
    }
    llama_kv_cache * kv = triattention_kv_cache(ctx);
    if (params.method != TRIATTENTION_METHOD_NONE) {
        const llama_hparams & hp = ctx->get_model().hparams;
        if (kv == nullptr) {
            return triattention_fail(std::string("architecture '") + llm_arch_name(ctx->get_model().arch) +
                                     "' keeps its memory in a recurrent or hybrid cache, not a KV cache of "
                                     "attention layers; it cannot be compressed");
        }
        const std::vector<uint32_t> layers = kv->get_layer_ids();
        if (layers.empty() || std::any_of(layers.begin(), layers.end(), [&](uint32_t il) { return hp.is_swa(il); })) {
            return triattention_fail(std::string("architecture '") + llm_arch_name(ctx->get_model().arch) +
                                     "' has no KV cache of full-attention layers apart from its sliding-window "
                                     "ones; it cannot be compressed");
        }
        if (ctx->get_cparams().n_seq_max != 1) {
            return triattention_fail("compression needs a context with a single sequence (n_seq_max = 1)");
        }
        const llama_kv_cache * swa = triattention_swa_cache(ctx);
        const int64_t swa_need = (int64_t) hp.n_swa + ctx->get_cparams().n_ubatch;
        if (swa != nullptr && swa->get_size() < swa_need) {
            // llama.cpp sizes the window cache from n_ctx too: once the logical length passes the
            // physical one it must hold a whole window and the ubatch being read
            return triattention_fail("the sliding-window cache has " + std::to_string(swa->get_size()) +
                                     " cells; it needs n_swa + n_ubatch = " + std::to_string(swa_need) +
                                     ": make the context at least that many cells");
        }
        const int64_t need = (int64_t) params.budget + params.divide_length + ctx->get_cparams().n_ubatch;
        if (params.budget < TRIATTENTION_N_SINKS + 1 || params.divide_length < 1 || need > kv->get_size()) {
            return triattention_fail("budget " + std::to_string(params.budget) + " + divide_length " +
                                     std::to_string(params.divide_length) + " + n_ubatch must fit in the " +
                                     std::to_string(kv->get_size()) + " cells of the cache (budget >= 5)");
        }
    }
    state & st = state_of(ctx);
    if (params.method == TRIATTENTION_METHOD_TRI && st.centres.q_re.empty()) {
        return triattention_fail("method tri needs the query centres: call triattention_set_centers first");
    }
    if (kv != nullptr && kv->get_cells(0).seq_pos_max(0) < 0) {
        st.records = {};  // an empty cache starts afresh, whatever emptied it
    }
    if (st.records.n_cells() > 0 && st.records.n_groups > 1 && params.select != TRIATTENTION_SELECT_PER_LAYER_HEAD) {
        return triattention_fail("the cache holds per-layer-head compaction records: clear it before choosing "
                                 "select mode " + std::string(SELECT_NAMES[params.select]));
    }
    if (params.keep_recent < 0 || params.keep_recent > params.budget) {
        return triattention_fail("keep_recent " + std::to_string(params.keep_recent) + " must be in [0, budget " +
                                 std::to_string(params.budget) + "]");
    }
    if (params.horizon < 1 || params.horizon > TRIATTENTION_MAX_HORIZON) {
        return triattention_fail("horizon " + std::to_string(params.horizon) + " must be in [1, " +
                                 std::to_string(TRIATTENTION_MAX_HORIZON) + "]");
    }
    if (!(params.min_concentration >= 0.0f && params.min_concentration <= 1.0f)) {  // NaN too
        return triattention_fail("min_concentration " + std::to_string(params.min_concentration) +
                                 " must be in [0, 1]");
    }
    if (params.method != TRIATTENTION_METHOD_NONE && !prefix_fits(st.keep_prefix, params)) {
        return triattention_fail(prefix_misfit(st.keep_prefix, params));
    }
    st.params = params;
    renew_scorer(ctx, st);
    return 0;
}

int32_t triattention_set_centers(llama_context * ctx, const float * q_mean_real, const float * q_mean_imag,
                                 const float * q_abs_mean, int64_t n) {
    triattention_clear_error();
    const llama_hparams & hp = ctx->get_model().hparams;
    const int64_t expected = (int64_t) hp.n_layer() * hp.n_head() * (hp.n_embd_head_k() / 2);
    if (n != expected) {
        return triattention_fail("centres have " + std::to_string(n) + " entries; this model needs n_layer * n_head"
                                 " * head_dim/2 = " + std::to_string(expected));
    }
    state & st = state_of(ctx);
    st.centres.q_re.assign(q_mean_real, q_mean_real + n);
    st.centres.q_im.assign(q_mean_imag, q_mean_imag + n);
    st.centres.q_abs.assign(q_abs_mean, q_abs_mean + n);
    st.centres.n_clusters = 0;  // clusters belong to the centres they were calibrated with
    if (st.params.method == TRIATTENTION_METHOD_TRI) {
        renew_scorer(ctx, st);  // its spread heads come from the centres
    }
    return 0;
}

int32_t triattention_set_clusters(llama_context * ctx, const float * q_mean_real, const float * q_mean_imag,
                                  const float * q_abs_mean, int32_t n_clusters, int64_t n) {
    triattention_clear_error();
    const llama_hparams & hp = ctx->get_model().hparams;
    state & st = state_of(ctx);
    if (st.centres.q_re.empty()) {
        return triattention_fail("set the centres (triattention_set_centers) before their clusters");
    }
    if (n_clusters < 1 || n_clusters > TRIATTENTION_MAX_CLUSTERS) {
        return triattention_fail("n_clusters " + std::to_string(n_clusters) + " must be in [1, " +
                                 std::to_string(TRIATTENTION_MAX_CLUSTERS) + "]");
    }
    const int64_t expected = (int64_t) hp.n_layer() * hp.n_head() * n_clusters * (hp.n_embd_head_k() / 2);
    if (n != expected) {
        return triattention_fail("clusters have " + std::to_string(n) + " entries; this model needs n_layer * n_head"
                                 " * n_clusters * head_dim/2 = " + std::to_string(expected));
    }
    st.centres.cluster_re.assign(q_mean_real, q_mean_real + n);
    st.centres.cluster_im.assign(q_mean_imag, q_mean_imag + n);
    st.centres.cluster_abs.assign(q_abs_mean, q_abs_mean + n);
    st.centres.n_clusters = n_clusters;
    return 0;
}

int32_t triattention_set_keep_prefix(llama_context * ctx, llama_pos n) {
    triattention_clear_error();
    state & st = state_of(ctx);
    if (n < 0 || (st.params.method != TRIATTENTION_METHOD_NONE && !prefix_fits(n, st.params))) {
        return triattention_fail(prefix_misfit(n, st.params));
    }
    st.keep_prefix = n;
    return 0;
}

int32_t triattention_compress(llama_context * ctx) {
    triattention_clear_error();
    state * st = find_state(ctx);
    if (st == nullptr || st->params.method == TRIATTENTION_METHOD_NONE) {
        return triattention_fail("compression is off for this context (triattention_set_params)");
    }
    const llama_kv_cache * kv = triattention_kv_cache(ctx);
    return compress_now(ctx, *st, kv->get_cells(0).seq_pos_max(0) + 1);
}

triattention_stats triattention_get_stats(const llama_context * ctx) {
    const state * st = find_state(ctx);
    if (st == nullptr) {
        return triattention_stats{0, 0, 0.0, -1};
    }
    triattention_stats out = st->stats;
    out.compressed_upto = st->records.compressed_upto;
    return out;
}

int32_t triattention_last_kept(const llama_context * ctx, int32_t * cells, int32_t n_max) {
    const state * st = find_state(ctx);
    if (st == nullptr || st->last_kept.empty() || (int32_t) st->last_kept.size() > n_max) {
        return -1;
    }
    std::copy(st->last_kept.begin(), st->last_kept.end(), cells);
    return (int32_t) st->last_kept.size();
}

int32_t triattention_cells_before(const llama_context * ctx, llama_pos pos) {
    const llama_kv_cache * kv = triattention_kv_cache(ctx);
    if (kv == nullptr) {
        return 0;
    }
    const llama_kv_cells & cells = kv->get_cells(0);
    const state * st = find_state(ctx);
    const triattention_records none;
    const triattention_records & rec = st != nullptr ? st->records : none;
    const triattention_candidates c = triattention_gather(rec, cells, std::max(1, rec.n_head_kv),
                                                          std::max(1, rec.n_groups), pos);
    return c.min_row_tokens();
}

static std::vector<int32_t> records_of(const state * st) {
    return st != nullptr ? st->records.serialize() : triattention_records().serialize();
}

size_t triattention_records_size(const llama_context * ctx) {
    return records_of(find_state(ctx)).size() * sizeof(int32_t);
}

size_t triattention_records_get(const llama_context * ctx, uint8_t * dst, size_t size) {
    const std::vector<int32_t> rec = records_of(find_state(ctx));
    const size_t n = rec.size() * sizeof(int32_t);
    if (n > size) {
        return 0;
    }
    std::memcpy(dst, rec.data(), n);
    return n;
}

int32_t triattention_records_set(llama_context * ctx, const uint8_t * src, size_t size) {
    triattention_clear_error();
    std::vector<int32_t> rec(size / sizeof(int32_t));
    std::memcpy(rec.data(), src, rec.size() * sizeof(int32_t));
    const llama_kv_cache * kv = triattention_kv_cache(ctx);
    const std::vector<uint32_t> layers = kv != nullptr ? kv->get_layer_ids() : std::vector<uint32_t>();
    const int32_t n_head_kv = layers.empty() ? 0 : (int32_t) ctx->get_model().hparams.n_head_kv(layers[0]);
    triattention_records parsed;
    if (size % sizeof(int32_t) != 0 || !parsed.deserialize(rec, n_head_kv, (int32_t) layers.size())) {
        return triattention_fail("the compaction records do not match this model");
    }
    state & st = state_of(ctx);
    if (parsed.n_cells() > 0 && parsed.n_groups > 1 && st.params.select != TRIATTENTION_SELECT_PER_LAYER_HEAD) {
        return triattention_fail("the compaction records come from select mode per-layer-head; this context uses " +
                                 std::string(SELECT_NAMES[st.params.select]));
    }
    st.records = std::move(parsed);
    return 0;
}

int32_t triattention_on_decode(llama_context * ctx, const llama_batch & batch) {
    state * st = find_state(ctx);
    if (st == nullptr || st->params.method == TRIATTENTION_METHOD_NONE) {
        return 0;
    }
    llama_kv_cache * kv = triattention_kv_cache(ctx);
    llama_kv_cells & cells = kv->get_cells_mut(0);
    const llama_pos first = batch.pos && batch.n_tokens > 0 ? batch.pos[0] : cells.seq_pos_max(0) + 1;
    if (st->records.truncation_at(cells, first) != triattention_records::truncation::none &&
        compress_now(ctx, *st, first) != 0) {
        LLAMA_LOG_ERROR("%s: KV compression after a cut failed: %s\n", __func__, g_error.c_str());
        return -1;
    }
    st->scorer->on_batch(first);
    const int32_t limit = st->params.budget + st->params.divide_length;
    if ((int32_t) cells.get_used() + batch.n_tokens <= limit) {
        return 0;
    }
    if ((int64_t) batch.n_tokens > ctx->get_cparams().n_ubatch) {
        LLAMA_LOG_ERROR("%s: with KV compression a batch may hold at most n_ubatch = %u tokens, not %d\n",
                        __func__, ctx->get_cparams().n_ubatch, batch.n_tokens);
        return -1;
    }
    if (compress_now(ctx, *st, first) != 0) {
        LLAMA_LOG_ERROR("%s: KV compression failed: %s\n", __func__, g_error.c_str());
        return -1;
    }
    return 0;
}

void triattention_on_free(llama_context * ctx) {
    std::lock_guard<std::mutex> lock(g_mutex);
    g_states.erase(ctx);
}
