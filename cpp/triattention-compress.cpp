// Compression of a context's KV cache: score the cached keys, keep the top `budget` per KV head,
// and move the kept K and V rows behind the front cells into the evicted ones among them, with
// graph ops on the backends that hold the cache. Only cell indices visit the host.
#include "triattention.h"
#include "triattention-hooks.h"
#include "triattention-impl.h"
#include "triattn-hadamard.h"
#include "triattn-pairs.h"

#include "llama-arch.h"
#include "llama-kv-cache-iswa.h"
#include "llama-model.h"

#include "ggml-backend.h"
#include "ggml-cpu.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <cmath>
#include <complex>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <unordered_map>

namespace {

constexpr int   N_SINKS  = 4;      // streaming: attention sinks at the start of the sequence
constexpr int   SNAP_WINDOW = 8;   // snapkv: the last queries whose attention scores the keys
constexpr int   SNAP_POOL   = 7;   // snapkv: max-pooling kernel over neighbouring tokens
constexpr float KEEP     = 1e30f;  // score bonus of the newest token: never evicted
constexpr float EVICTED  = -1e30f; // score of an empty cell
constexpr int   MAX_NODE = 16384;

struct state {
    explicit state(const llama_context * ctx) : runner(ctx) {}

    triattention_runner runner;
    triattention_params params = triattention_default_params();

    // llama.cpp removed compacted cells: the cache was cleared (forget every record), or the
    // sequence was cut by seq_rm and continues at `next`. A cut keeps the cells whose position
    // (the newest of their tokens) is older than the cut, with every head's token in them; their
    // records stay, the freed cells' go. When eviction left no cell at next - 1, the newest kept
    // cell moves there so that llama.cpp sees a contiguous sequence: a cell's position only
    // masks, its keys keep the RoPE of the true positions recorded per head.
    void after_truncation(llama_kv_cells & cells, llama_pos next) {
        const llama_pos last = cells.seq_pos_max(0);
        if (stats.compressed_upto < 0 || last >= stats.compressed_upto) {
            return;
        }
        if (last < 0) {
            head_pos.clear();
            cell_pos.clear();
            stats.compressed_upto = -1;
            return;
        }
        int32_t newest = -1;
        for (int32_t j = 0; j < (int32_t) cell_pos.size(); ++j) {
            if (cells.is_empty(j)) {
                cell_pos[j] = -1;
            } else if (cells.pos_get(j) == last && cell_pos[j] == last) {
                newest = j;
            }
        }
        if (next - 1 > last && next - 1 <= stats.compressed_upto && newest >= 0) {
            cells.rm(newest);
            cells.pos_set(newest, next - 1);
            cells.seq_add(newest, 0);
            cell_pos[newest] = next - 1;
        }
        stats.compressed_upto = cells.seq_pos_max(0);
    }
    std::vector<float>  q_re, q_im, q_abs;  // centres [n_layer][n_head][n_pairs]
    triattention_stats  stats{0, 0, 0.0, -1};
    std::vector<int32_t> last_kept;         // [n_head_kv][budget]
    std::mt19937 rng{0};

    // snapkv: the post-RoPE queries of the last SNAP_WINDOW tokens decoded, per layer, captured
    // by an eval callback; `next` is the position the next captured token will have.
    struct query_window {
        std::vector<float>     q;    // [token][head][head_dim]
        std::vector<llama_pos> pos;  // [token]
        llama_pos              next = -1;
    };
    std::vector<query_window> windows;  // [n_layer]
    ggml_backend_sched_eval_callback chained = nullptr;  // the context's own eval callback
    void * chained_data = nullptr;

    // After a per-head compaction, cell c holds a different token in each KV head: their true
    // positions, [n_head_kv][cell], for the cells that compaction wrote (cell_pos records the
    // position it gave the cell, to notice when llama.cpp has reused the cell since).
    std::vector<std::vector<llama_pos>> head_pos;
    std::vector<llama_pos>              cell_pos;
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

struct layer_shape {
    int64_t head_dim, n_head, n_head_kv, n_rot;
};

layer_shape shape_of(const llama_hparams & hp, int il) {
    return { hp.n_embd_head_k(il), hp.n_head(il), hp.n_head_kv(il), hp.n_rot(il) };
}

// z-score each row (query head) over the valid cells: (s - mean) / (std + eps); empty cells -> 0.
ggml_tensor * znorm(ggml_context * g, ggml_tensor * s, ggml_tensor * valid, float n_valid) {
    ggml_tensor * mean = ggml_scale(g, ggml_sum_rows(g, ggml_mul(g, s, valid)), 1.0f / n_valid);
    ggml_tensor * centred = ggml_mul(g, ggml_sub(g, s, mean), valid);
    ggml_tensor * var = ggml_scale(g, ggml_sum_rows(g, ggml_sqr(g, centred)), 1.0f / n_valid);
    return ggml_div(g, centred, ggml_scale_bias(g, ggml_sqrt(g, var), 1.0f, 1e-6f));
}

// Elementwise max(a, b) = (a + b + |a - b|) / 2, from ops that every backend has.
ggml_tensor * max2(ggml_context * g, ggml_tensor * a, ggml_tensor * b) {
    return ggml_scale(g, ggml_add(g, ggml_add(g, a, b), ggml_abs(g, ggml_sub(g, a, b))), 0.5f);
}

// [n_kv, n_head] -> [n_kv, n_head_kv]: max over the query heads of each GQA group.
ggml_tensor * gqa_max(ggml_context * g, ggml_tensor * z, int64_t n_head_kv) {
    const int64_t n_gqa = z->ne[1] / n_head_kv;
    if (n_gqa == 1) {
        return z;
    }
    auto group = [&](int64_t i) {
        return ggml_cont(g, ggml_view_2d(g, z, z->ne[0], n_head_kv, n_gqa * z->nb[1], i * z->nb[1]));
    };
    ggml_tensor * m = group(0);
    for (int64_t i = 1; i < n_gqa; ++i) {
        m = max2(g, m, group(i));
    }
    return m;
}

// snapkv's score of one layer's keys, [n_kv, n_head_kv]: the attention of the window's queries
// q [head_dim, n_head, n_win] (causal mask [n_kv, n_win, n_head]), summed over the window,
// max-pooled over SNAP_POOL neighbouring tokens, summed over each GQA group. A compaction leaves
// cells out of position order: `order` [n_kv, n_head] lists each head's cells oldest first and
// `rank` is its inverse, so the pooling runs over neighbouring positions.
ggml_tensor * snapkv_layer(ggml_context * g, ggml_tensor * keys, ggml_tensor * q, ggml_tensor * mask, float scale,
                           ggml_tensor * order, ggml_tensor * rank) {
    const int64_t n_kv = keys->ne[2], n_head_kv = keys->ne[1], n_head = q->ne[1], n_win = q->ne[2];
    ggml_tensor * kq = ggml_mul_mat(g, ggml_permute(g, keys, 0, 2, 1, 3), ggml_permute(g, q, 0, 2, 1, 3));
    ggml_tensor * attn = ggml_soft_max_ext(g, kq, mask, scale, 0.0f);  // [n_kv, n_win, n_head]
    ggml_tensor * in_cells = ggml_sum_rows(g, ggml_cont(g, ggml_permute(g, attn, 1, 0, 2, 3)));  // [1, n_kv, n_head]
    auto reordered = [&](ggml_tensor * x, ggml_tensor * idx) {
        return ggml_reshape_2d(g, ggml_get_rows(g, ggml_reshape_3d(g, x, 1, n_kv, n_head), idx), n_kv, n_head);
    };
    ggml_tensor * per_key = reordered(in_cells, order);
    const int half = SNAP_POOL / 2;
    ggml_tensor * padded = ggml_pad_ext(g, per_key, half, half, 0, 0, 0, 0, 0, 0);  // attention >= 0: 0 pads
    auto shifted = [&](int s) { return ggml_view_2d(g, padded, n_kv, n_head, padded->nb[1], s * sizeof(float)); };
    ggml_tensor * pooled = ggml_cont(g, shifted(0));
    for (int s = 1; s < SNAP_POOL; ++s) {
        pooled = max2(g, pooled, ggml_cont(g, shifted(s)));
    }
    pooled = reordered(pooled, rank);
    const int64_t n_gqa = n_head / n_head_kv;
    ggml_tensor * grouped = ggml_cont(g, ggml_permute(g, ggml_reshape_3d(g, pooled, n_kv, n_gqa, n_head_kv), 1, 0, 2, 3));
    return ggml_reshape_2d(g, ggml_sum_rows(g, grouped), n_kv, n_head_kv);
}

// A tensor of another type over the same bytes as storage (for bit-exact row moves).
ggml_tensor * alias(ggml_context * g, ggml_tensor * storage, ggml_type type, int64_t ne0, int64_t ne1) {
    ggml_tensor * t = ggml_new_tensor_2d(g, type, ne0, ne1);
    GGML_ASSERT(ggml_nbytes(t) == ggml_nbytes(storage));
    ggml_backend_tensor_alloc(storage->buffer, t, storage->data);
    return t;
}

struct candidates {
    int32_t n_kv = 0;                          // cells [0, n_kv) are scored
    std::vector<std::vector<llama_pos>> pos;   // [n_head_kv][cell], -1 for empty
    std::vector<float> bonus;                  // [n_head_kv][cell]: newest kept, empty evicted
    std::vector<float> valid;                  // [cell]
    int32_t n_valid = 0;
    llama_pos newest = -1;
};

candidates gather_candidates(const state & st, const llama_kv_cells & cells, int64_t n_head_kv) {
    candidates c;
    c.n_kv = (int32_t) cells.used_max_p1();
    c.pos.assign(n_head_kv, std::vector<llama_pos>(c.n_kv, -1));
    c.valid.assign(c.n_kv, 0.0f);
    for (int32_t i = 0; i < c.n_kv; ++i) {
        if (cells.is_empty(i)) {
            continue;
        }
        const llama_pos p = cells.pos_get(i);
        const bool compacted = i < (int32_t) st.cell_pos.size() && st.cell_pos[i] == p;
        for (int64_t hk = 0; hk < n_head_kv; ++hk) {
            c.pos[hk][i] = compacted ? st.head_pos[hk][i] : p;
            c.newest = std::max(c.newest, c.pos[hk][i]);
        }
        c.valid[i] = 1.0f;
        c.n_valid++;
    }
    c.bonus.assign(n_head_kv * c.n_kv, 0.0f);
    for (int64_t hk = 0; hk < n_head_kv; ++hk) {
        for (int32_t i = 0; i < c.n_kv; ++i) {
            float & b = c.bonus[hk * c.n_kv + i];
            b = c.pos[hk][i] < 0 ? EVICTED : c.pos[hk][i] == c.newest ? KEEP : 0.0f;
        }
    }
    return c;
}

// A non-finite score (infinite weight scales, a RoPE base of 0, absurd centres) would leave the
// sort's order undefined and could evict the newest token. Scores [n_head_kv][n_kv] include the
// bonus; finite ones are clamped so that the bonus still dominates, and a non-finite one becomes
// its cell's bonus: kept for the newest token, evicted for an empty cell, else below every finite score.
void rank_non_finite_last(std::vector<float> & scores, const candidates & c) {
    constexpr float LIMIT = 1e28f;
    for (size_t i = 0; i < scores.size(); ++i) {
        const float bonus = c.bonus[i];
        float & s = scores[i];
        s = std::isfinite(s) ? std::clamp(s - bonus, -LIMIT, LIMIT) + bonus : bonus != 0.0f ? bonus : -10.0f * LIMIT;
    }
}

// Keep the top `budget` of each row of scores [n_rows][n_kv] (host); ties go to the newer token.
std::vector<int32_t> top_per_row(const std::vector<float> & scores, const candidates & c, int64_t n_rows,
                                 int32_t budget) {
    std::vector<int32_t> kept(n_rows * budget);
    std::vector<int32_t> order(c.n_kv);
    for (int64_t r = 0; r < n_rows; ++r) {
        const float * s = scores.data() + r * c.n_kv;
        const auto & pos = c.pos[r % c.pos.size()];
        std::iota(order.begin(), order.end(), 0);
        std::partial_sort(order.begin(), order.begin() + budget, order.end(), [&](int32_t a, int32_t b) {
            return s[a] != s[b] ? s[a] > s[b] : pos[a] > pos[b];
        });
        std::copy(order.begin(), order.begin() + budget, kept.begin() + r * budget);
    }
    return kept;
}

// snapkv's inputs: the captured window queries [n_layer][token][head][head_dim] (turned like the
// cached keys when the cache rotates them), the causal mask [head][token][cell] of the window, and
// each query head's cells in position order [head][cell] with its inverse (see snapkv_layer).
void snapkv_inputs(const state & st, const llama_kv_cache * kv, const std::vector<uint32_t> & layers,
                   const candidates & c, int64_t n_head, int64_t head_dim, std::vector<float> & q,
                   std::vector<float> & mask, std::vector<int32_t> & order, std::vector<int32_t> & rank) {
    const std::vector<llama_pos> & wpos = st.windows[layers[0]].pos;
    q.clear();
    for (uint32_t il : layers) {
        q.insert(q.end(), st.windows[il].q.begin(), st.windows[il].q.end());
    }
    if (kv->get_attn_rot_k()) {
        for (size_t i = 0; i < q.size(); i += head_dim) {
            triattn_fwht(q.data() + i, (int) head_dim);
        }
    }
    const int64_t n_gqa = n_head / (int64_t) c.pos.size();
    mask.assign((size_t) n_head * wpos.size() * c.n_kv, 0.0f);
    for (int64_t h = 0; h < n_head; ++h) {
        const auto & pos = c.pos[h / n_gqa];
        for (size_t j = 0; j < wpos.size(); ++j) {
            float * row = mask.data() + (h * wpos.size() + j) * c.n_kv;
            for (int32_t i = 0; i < c.n_kv; ++i) {
                // finite: a row with no visible key stays a (uniform) distribution, not NaN
                row[i] = pos[i] >= 0 && pos[i] <= wpos[j] ? 0.0f : EVICTED;
            }
        }
    }
    order.resize((size_t) n_head * c.n_kv);
    rank.resize(order.size());
    for (int64_t h = 0; h < n_head; ++h) {
        const auto & pos = c.pos[h / n_gqa];
        int32_t * o = order.data() + h * c.n_kv;
        std::iota(o, o + c.n_kv, 0);
        std::stable_sort(o, o + c.n_kv, [&](int32_t a, int32_t b) { return pos[a] < pos[b]; });
        for (int32_t k = 0; k < c.n_kv; ++k) {
            rank[h * c.n_kv + o[k]] = k;
        }
    }
}

// Whether every layer of the cache captured the same window of queries, all already in the cache.
bool snapkv_window_ready(const state & st, const std::vector<uint32_t> & layers, const candidates & c) {
    if (st.windows.empty()) {
        return false;
    }
    const std::vector<llama_pos> & first = st.windows[layers[0]].pos;
    if (first.empty() || first.back() > c.newest) {
        return false;
    }
    return std::all_of(layers.begin(), layers.end(), [&](uint32_t il) { return st.windows[il].pos == first; });
}

// Device scores [n_head_kv][n_kv] for TRI, KNORM and SNAPKV (one graph over every layer), bonus included.
bool device_scores(llama_context * ctx, state & st, llama_kv_cache * kv, const candidates & c,
                   std::vector<float> & out) {
    const llama_model & model = ctx->get_model();
    const llama_hparams & hp = model.hparams;
    const std::vector<uint32_t> layers = kv->get_layer_ids();  // the compressed (full-attention) layers
    const int n_layer = (int) layers.size();
    const layer_shape s0 = shape_of(hp, layers[0]);
    const bool tri = st.params.method == TRIATTENTION_METHOD_TRI;
    const bool snap = st.params.method == TRIATTENTION_METHOD_SNAPKV;
    const int64_t n_win = snap ? (int64_t) st.windows[layers[0]].pos.size() : 0;

    ggml_context_ptr g = triattention_graph_context(MAX_NODE);
    auto input = [&](ggml_tensor * t) { ggml_set_input(t); return t; };
    ggml_tensor * bonus = input(ggml_new_tensor_2d(g.get(), GGML_TYPE_F32, c.n_kv, s0.n_head_kv));
    // only tri's graph reads these; an input the graph does not use gets no buffer
    ggml_tensor * valid = tri ? input(ggml_new_tensor_2d(g.get(), GGML_TYPE_F32, c.n_kv, 1)) : nullptr;
    ggml_tensor * q_all = tri ? input(ggml_new_tensor_3d(g.get(), GGML_TYPE_F32, s0.head_dim, s0.n_head, n_layer)) : nullptr;
    ggml_tensor * w_all = tri ? input(ggml_new_tensor_3d(g.get(), GGML_TYPE_F32, s0.head_dim / 2, s0.n_head, n_layer)) : nullptr;
    ggml_tensor * q_win = snap ? input(ggml_new_tensor_4d(g.get(), GGML_TYPE_F32, s0.head_dim, s0.n_head, n_win, n_layer)) : nullptr;
    ggml_tensor * mask = snap ? input(ggml_new_tensor_3d(g.get(), GGML_TYPE_F32, c.n_kv, n_win, s0.n_head)) : nullptr;
    ggml_tensor * order = snap ? input(ggml_new_tensor_2d(g.get(), GGML_TYPE_I32, c.n_kv, s0.n_head)) : nullptr;
    ggml_tensor * rank = snap ? input(ggml_new_tensor_2d(g.get(), GGML_TYPE_I32, c.n_kv, s0.n_head)) : nullptr;
    const float kq_scale = hp.f_attention_scale == 0.0f ? 1.0f / std::sqrt((float) s0.head_dim) : hp.f_attention_scale;

    ggml_tensor * acc = nullptr;
    for (int li = 0; li < n_layer; ++li) {
        const int il = (int) layers[li];
        ggml_tensor * kview = triattention_keys(g.get(), kv, hp, il, c.n_kv);
        ggml_tensor * layer;
        if (tri) {
            ggml_tensor * q = ggml_view_2d(g.get(), q_all, s0.head_dim, s0.n_head, q_all->nb[1], li * q_all->nb[2]);
            ggml_tensor * w = ggml_view_2d(g.get(), w_all, s0.head_dim / 2, s0.n_head, w_all->nb[1], li * w_all->nb[2]);
            ggml_tensor * score = triattention_score_keys(g.get(), kv, hp, il, kview, q, w);
            layer = gqa_max(g.get(), znorm(g.get(), score, valid, (float) c.n_valid), s0.n_head_kv);
        } else if (snap) {
            ggml_tensor * q = ggml_view_3d(g.get(), q_win, s0.head_dim, s0.n_head, n_win, q_win->nb[1], q_win->nb[2],
                                           li * q_win->nb[3]);
            layer = snapkv_layer(g.get(), kview, q, mask, kq_scale, order, rank);
        } else {
            // knorm: minus the L2 norm of each key (rotation-invariant), [n_kv, n_head_kv]
            ggml_tensor * norm = ggml_sqrt(g.get(), ggml_sum_rows(g.get(), ggml_sqr(g.get(),
                                  ggml_cast(g.get(), kview, GGML_TYPE_F32))));
            layer = ggml_scale(g.get(), ggml_cont(g.get(), ggml_transpose(g.get(),
                                  ggml_reshape_2d(g.get(), norm, s0.n_head_kv, c.n_kv))), -1.0f);
        }
        acc = acc ? ggml_add(g.get(), acc, layer) : layer;
    }
    ggml_tensor * total = ggml_add(g.get(), ggml_scale(g.get(), acc, 1.0f / n_layer), bonus);
    ggml_set_output(total);
    ggml_cgraph * gf = ggml_new_graph_custom(g.get(), MAX_NODE, false);
    ggml_build_forward_expand(gf, total);

    std::vector<float> q, w, m;
    std::vector<int32_t> by_pos, pos_rank;
    if (snap) {
        snapkv_inputs(st, kv, layers, c, s0.n_head, s0.head_dim, q, m, by_pos, pos_rank);
    }
    if (tri) {
        // virtual queries at t = newest position (algorithm.md §4), in the model's pair layout
        const double t = (double) c.newest;
        const int n_pairs = (int) s0.head_dim / 2;
        const bool neox = hp.rope_type == LLAMA_ROPE_TYPE_NEOX;
        q.assign(ggml_nelements(q_all), 0.0f);
        w.assign(ggml_nelements(w_all), 0.0f);
        std::vector<float> omega(n_pairs);
        for (int li = 0; li < n_layer; ++li) {
            const int il = (int) layers[li];
            // each layer's own frequencies: Gemma 3's global layers use another base than its local ones
            triattention_rope_omega(ctx, il, omega.data());
            for (int f = 0; f < n_pairs; ++f) {
                std::complex<double> mean_offset = 0.0;
                for (int d = 0; d <= 16; ++d) {
                    mean_offset += std::polar(1.0, omega[f] * std::ldexp(1.0, d));
                }
                const std::complex<double> phase = std::polar(1.0, omega[f] * t) * (mean_offset / 17.0);
                int re, im;
                triattn_pair_dims(f, neox, (int) s0.n_rot, &re, &im);
                for (int h = 0; h < s0.n_head; ++h) {
                    const size_t i = ((size_t) il * s0.n_head + h) * n_pairs + f;  // centres: every layer
                    const size_t o = ((size_t) li * s0.n_head + h) * n_pairs + f;  // graph: the cache's layers
                    const std::complex<double> v = std::complex<double>(st.q_re[i], st.q_im[i]) * phase;
                    float * qh = q.data() + ((size_t) li * s0.n_head + h) * s0.head_dim;
                    qh[re] = (float) v.real();
                    qh[im] = (float) v.imag();
                    w[o] = st.q_abs[i] - (float) std::hypot(st.q_re[i], st.q_im[i]);
                }
            }
        }
    }
    const bool ok = st.runner.run(gf, [&] {
        ggml_backend_tensor_set(bonus, c.bonus.data(), 0, ggml_nbytes(bonus));
        if (tri) {
            ggml_backend_tensor_set(valid, c.valid.data(), 0, ggml_nbytes(valid));
            ggml_backend_tensor_set(q_all, q.data(), 0, ggml_nbytes(q_all));
            ggml_backend_tensor_set(w_all, w.data(), 0, ggml_nbytes(w_all));
        }
        if (snap) {
            ggml_backend_tensor_set(q_win, q.data(), 0, ggml_nbytes(q_win));
            ggml_backend_tensor_set(mask, m.data(), 0, ggml_nbytes(mask));
            ggml_backend_tensor_set(order, by_pos.data(), 0, ggml_nbytes(order));
            ggml_backend_tensor_set(rank, pos_rank.data(), 0, ggml_nbytes(rank));
        }
    });
    if (!ok) {
        return false;
    }
    out.resize(ggml_nelements(total));
    ggml_backend_tensor_get(total, out.data(), 0, ggml_nbytes(total));
    return true;
}

// Host scores [n_head_kv][n_kv] for STREAMING and RANDOM (and SNAPKV without a window), bonus included.
std::vector<float> host_scores(state & st, const candidates & c) {
    std::vector<float> s(c.bonus);
    std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
    for (size_t hk = 0; hk < c.pos.size(); ++hk) {
        for (int32_t i = 0; i < c.n_kv; ++i) {
            const llama_pos p = c.pos[hk][i];
            float & v = s[hk * c.n_kv + i];
            if (p >= 0 && v == 0.0f) {
                v = st.params.method == TRIATTENTION_METHOD_RANDOM ? uniform(st.rng)
                  : p < N_SINKS                                   ? KEEP / 2
                                                                  : (float) p;
            }
        }
    }
    return s;
}

// Where each head's kept cells go: those below `budget` stay where they are and those above it
// fill the evicted cells below it, so a compaction moves at most n_kv - budget rows per head.
struct row_moves {
    std::vector<int32_t> layout;  // [n_head_kv][budget]: the candidate cell that cell j now holds
    std::vector<int32_t> src;     // [n_head_kv][n]: the cells moved from
    std::vector<int32_t> dst;     // [n_head_kv][n]: and to; a head with fewer than n moves copies
    int32_t n = 0;                // one of its staying cells onto itself
};

row_moves fill_holes(const std::vector<int32_t> & kept, int64_t n_head_kv, int32_t budget) {
    row_moves m;
    m.layout.assign(n_head_kv * budget, -1);
    std::vector<std::vector<int32_t>> from(n_head_kv), to(n_head_kv);
    for (int64_t hk = 0; hk < n_head_kv; ++hk) {
        int32_t * cell = m.layout.data() + hk * budget;
        for (int32_t j = 0; j < budget; ++j) {
            const int32_t i = kept[hk * budget + j];
            if (i < budget) {
                cell[i] = i;
            } else {
                from[hk].push_back(i);
            }
        }
        for (int32_t j = 0; j < budget; ++j) {
            if (cell[j] < 0) {
                to[hk].push_back(j);
            }
        }
        GGML_ASSERT(from[hk].size() == to[hk].size());
        for (size_t k = 0; k < to[hk].size(); ++k) {
            cell[to[hk][k]] = from[hk][k];
        }
        m.n = std::max(m.n, (int32_t) from[hk].size());
    }
    m.src.resize(n_head_kv * m.n);
    m.dst.resize(n_head_kv * m.n);
    for (int64_t hk = 0; hk < n_head_kv; ++hk) {
        const int32_t * cell = m.layout.data() + hk * budget;
        int32_t stay = 0;
        while ((size_t) m.n > from[hk].size() && cell[stay] != stay) {
            ++stay;  // exists: fewer than `budget` cells moved in
        }
        for (int32_t k = 0; k < m.n; ++k) {
            const bool moves = (size_t) k < from[hk].size();
            m.src[hk * m.n + k] = moves ? from[hk][k] : stay;
            m.dst[hk * m.n + k] = moves ? to[hk][k] : stay;
        }
    }
    return m;
}

// 32-bit words read as pairs of f16 (a view, no conversion): set_rows copies f16 rows bit-exactly.
ggml_tensor * words_as_f16(ggml_context * g, ggml_tensor * words) {
    ggml_tensor * t = ggml_view_3d(g, words, words->ne[0], words->ne[1], words->ne[2], words->nb[1], words->nb[2], 0);
    t->type = GGML_TYPE_F16;
    t->ne[0] *= 2;
    t->nb[0] = sizeof(ggml_fp16_t);
    return t;
}

// Carry out the moves in every layer with graph ops on the cache's backends: rows are gathered
// as 32-bit words (any K/V type, quantized included, bit-exact) and scattered into the holes; a
// transposed V moves element by element in its own type.
bool compact(llama_context * ctx, state & st, llama_kv_cache * kv, const row_moves & m) {
    if (m.n == 0) {
        return true;
    }
    const llama_hparams & hp = ctx->get_model().hparams;
    const std::vector<uint32_t> layers = kv->get_layer_ids();
    const int64_t n_head_kv = hp.n_head_kv(layers[0]);
    const int64_t kv_size = kv->get_size();
    const int64_t head_dim_v = hp.n_embd_head_v(layers[0]);

    ggml_context_ptr g = triattention_graph_context(MAX_NODE);
    auto index = [&](int64_t ne1, int64_t ne2) {
        ggml_tensor * t = ggml_new_tensor_3d(g.get(), GGML_TYPE_I32, m.n, ne1, ne2);
        ggml_set_input(t);
        return t;
    };
    ggml_tensor * src = index(n_head_kv, 1);
    ggml_tensor * dst = index(n_head_kv, 1);
    ggml_tensor * src_el = kv->get_v_trans() ? index(head_dim_v, n_head_kv) : nullptr;
    ggml_tensor * dst_el = kv->get_v_trans() ? index(head_dim_v, n_head_kv) : nullptr;
    ggml_cgraph * gf = ggml_new_graph_custom(g.get(), MAX_NODE, false);

    // `storage` laid out [row of one head][head][cell], viewed as [row][cell][head] in `type`
    auto rows_of = [&](ggml_tensor * storage, int64_t row_bytes, ggml_type type) {
        ggml_tensor * flat = alias(g.get(), storage, type, ggml_nbytes(storage) / ggml_type_size(type), 1);
        return ggml_permute(g.get(), ggml_view_3d(g.get(), flat, row_bytes / ggml_type_size(type), n_head_kv,
                                                   kv_size, row_bytes, storage->nb[1], 0), 0, 2, 1, 3);
    };
    auto move_rows = [&](ggml_tensor * storage, int64_t row_bytes) {
        ggml_tensor * moved = ggml_get_rows(g.get(), rows_of(storage, row_bytes, GGML_TYPE_I32), src);
        ggml_build_forward_expand(gf, ggml_set_rows(g.get(), rows_of(storage, row_bytes, GGML_TYPE_F16),
                                                    words_as_f16(g.get(), moved), dst));
    };
    // a transposed V: [cell] runs per (head, dimension); one-element rows
    auto move_elements = [&](ggml_tensor * storage) {
        const size_t es = ggml_type_size(storage->type);
        ggml_tensor * cells = ggml_view_4d(g.get(), storage, 1, kv_size, head_dim_v, n_head_kv, es, kv_size * es,
                                           head_dim_v * kv_size * es, 0);
        ggml_build_forward_expand(gf, ggml_set_rows(g.get(), cells, ggml_get_rows(g.get(), cells, src_el), dst_el));
    };

    for (uint32_t il : layers) {
        ggml_tensor * k = kv->get_k_storage(il);
        ggml_tensor * v = kv->get_v_storage(il);
        const int64_t k_row = ggml_row_size(k->type, hp.n_embd_head_k(il));
        const int64_t v_row = ggml_row_size(v->type, hp.n_embd_head_v(il));
        if (k_row % 4 != 0 || (!kv->get_v_trans() && v_row % 4 != 0)) {
            triattention_fail("a head's cached row is not a whole number of 32-bit words");
            return false;
        }
        if (hp.n_embd_head_v(il) != head_dim_v || hp.n_head_kv(il) != n_head_kv) {
            triattention_fail("layers differ in KV head count or V head size");
            return false;
        }
        move_rows(k, k_row);
        if (kv->get_v_trans()) {
            move_elements(v);
        } else {
            move_rows(v, v_row);
        }
    }
    return st.runner.run(gf, [&] {
        ggml_backend_tensor_set(src, m.src.data(), 0, ggml_nbytes(src));
        ggml_backend_tensor_set(dst, m.dst.data(), 0, ggml_nbytes(dst));
        if (src_el != nullptr) {
            std::vector<int32_t> s(ggml_nelements(src_el)), d(s.size());
            for (int64_t hk = 0; hk < n_head_kv; ++hk) {
                for (int64_t e = 0; e < head_dim_v; ++e) {
                    std::copy_n(m.src.begin() + hk * m.n, m.n, s.begin() + (hk * head_dim_v + e) * m.n);
                    std::copy_n(m.dst.begin() + hk * m.n, m.n, d.begin() + (hk * head_dim_v + e) * m.n);
                }
            }
            ggml_backend_tensor_set(src_el, s.data(), 0, ggml_nbytes(src_el));
            ggml_backend_tensor_set(dst_el, d.data(), 0, ggml_nbytes(dst_el));
        }
    });
}

// Keep the last SNAP_WINDOW tokens of a layer's post-RoPE query t.
void snapkv_capture(state & st, const ggml_tensor * t) {
    const int il = triattention_layer_of(t->name);
    if (il < 0 || il >= (int) st.windows.size() || t->type != GGML_TYPE_F32 || t->nb[0] != sizeof(float)) {
        return;
    }
    state::query_window & w = st.windows[il];
    const int64_t head_dim = t->ne[0], n_head = t->ne[1], n_tokens = t->ne[2];
    for (int64_t tok = std::max<int64_t>(0, n_tokens - SNAP_WINDOW); tok < n_tokens; ++tok) {
        const size_t at = w.q.size();
        w.q.resize(at + n_head * head_dim);
        for (int64_t h = 0; h < n_head; ++h) {
            ggml_backend_tensor_get(t, w.q.data() + at + h * head_dim, h * t->nb[1] + tok * t->nb[2],
                                    head_dim * sizeof(float));
        }
        w.pos.push_back(w.next + (llama_pos) tok);
    }
    w.next += (llama_pos) n_tokens;
    if (w.pos.size() > SNAP_WINDOW) {
        const size_t drop = w.pos.size() - SNAP_WINDOW;
        w.pos.erase(w.pos.begin(), w.pos.begin() + drop);
        w.q.erase(w.q.begin(), w.q.begin() + drop * n_head * head_dim);
    }
}

// snapkv's eval callback: asks for the query nodes, and passes every node on to the eval callback
// the context had before (only those it asks for, and its answer stops the graph as usual).
bool snapkv_observe(ggml_tensor * t, bool ask, void * user_data) {
    auto & st = *static_cast<state *>(user_data);
    const bool theirs = st.chained != nullptr && st.chained(t, true, st.chained_data);
    const bool ours = triattention_is_query_rope(t);
    if (ask) {
        return theirs || ours;
    }
    if (ours) {
        snapkv_capture(st, t);
    }
    return theirs ? st.chained(t, false, st.chained_data) : true;
}

int32_t compress_now(llama_context * ctx, state & st) {
    llama_kv_cache * kv = triattention_kv_cache(ctx);
    const std::vector<uint32_t> layers = kv->get_layer_ids();
    const int64_t n_head_kv = ctx->get_model().hparams.n_head_kv(layers[0]);
    const int32_t budget = st.params.budget;
    llama_kv_cells & cells = kv->get_cells_mut(0);
    if ((int32_t) cells.get_used() <= budget) {
        return 0;
    }
    const auto start = std::chrono::steady_clock::now();
    llama_synchronize(ctx);
    st.after_truncation(cells, cells.seq_pos_max(0) + 1);

    candidates c = gather_candidates(st, cells, n_head_kv);
    const triattention_method method = (triattention_method) st.params.method;
    // snapkv keeps its observation window; with no window captured yet (a state just loaded,
    // a compression asked before any decode) it falls back to keeping the most recent tokens
    const bool snap_ready = method == TRIATTENTION_METHOD_SNAPKV && snapkv_window_ready(st, layers, c);
    if (snap_ready) {
        for (int64_t hk = 0; hk < n_head_kv; ++hk) {
            for (int32_t i = 0; i < c.n_kv; ++i) {
                if (c.pos[hk][i] >= st.windows[layers[0]].pos.front()) {
                    c.bonus[hk * c.n_kv + i] = KEEP;
                }
            }
        }
    }
    std::vector<float> scores;
    if (method == TRIATTENTION_METHOD_TRI || method == TRIATTENTION_METHOD_KNORM || snap_ready) {
        if (!device_scores(ctx, st, kv, c, scores)) {
            return triattention_fail("the scoring graph failed");
        }
    } else {
        scores = host_scores(st, c);
    }
    rank_non_finite_last(scores, c);
    std::vector<int32_t> kept;
    if (st.params.select == TRIATTENTION_SELECT_SHARED) {
        std::vector<float> mean(c.n_kv, 0.0f);
        for (int64_t hk = 0; hk < n_head_kv; ++hk) {
            for (int32_t i = 0; i < c.n_kv; ++i) {
                mean[i] += scores[hk * c.n_kv + i] / (float) n_head_kv;
            }
        }
        const std::vector<int32_t> one = top_per_row(mean, c, 1, budget);
        for (int64_t hk = 0; hk < n_head_kv; ++hk) {
            kept.insert(kept.end(), one.begin(), one.end());
        }
    } else {
        kept = top_per_row(scores, c, n_head_kv, budget);
    }
    row_moves moves = fill_holes(kept, n_head_kv, budget);
    if (!compact(ctx, st, kv, moves)) {
        return triattention_fail(std::string("the compaction graph failed") +
                                 (g_error.empty() ? "" : ": " + g_error));
    }

    // The cells now: [0, budget) hold seq 0; a cell's position is the newest of its tokens, so
    // every kept key stays visible to later queries and the next position follows the newest.
    std::vector<std::vector<llama_pos>> head_pos(n_head_kv, std::vector<llama_pos>(budget));
    std::vector<llama_pos> cell_pos(budget, -1);
    for (int64_t hk = 0; hk < n_head_kv; ++hk) {
        for (int32_t j = 0; j < budget; ++j) {
            head_pos[hk][j] = c.pos[hk][moves.layout[hk * budget + j]];
            cell_pos[j] = std::max(cell_pos[j], head_pos[hk][j]);
        }
    }
    const int32_t used_before = (int32_t) cells.get_used();
    for (int32_t i = 0; i < c.n_kv; ++i) {
        if (!cells.is_empty(i)) {
            cells.rm(i);
        }
    }
    for (int32_t j = 0; j < budget; ++j) {
        cells.pos_set(j, cell_pos[j]);
        cells.seq_add(j, 0);
    }
    // llama.cpp's slot search would go on from where the last ubatch ended, leaving a gap that
    // attention then reads over: the next ubatch goes into the first free cells instead
    kv->set_head(0, (uint32_t) budget);
    st.head_pos = std::move(head_pos);
    st.cell_pos = std::move(cell_pos);
    st.last_kept = std::move(moves.layout);
    st.stats.compressed_upto = c.newest;
    st.stats.compressions++;
    st.stats.cells_evicted += used_before - budget;
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
    sched.reset(ggml_backend_sched_new(raw.data(), nullptr, (int) raw.size(), MAX_NODE, false, false));
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
    return { TRIATTENTION_METHOD_NONE, 2048, 128, TRIATTENTION_SELECT_PER_HEAD, 0 };
}

int32_t triattention_set_params(llama_context * ctx, triattention_params params) {
    triattention_clear_error();
    if (params.method < TRIATTENTION_METHOD_NONE || params.method > TRIATTENTION_METHOD_SNAPKV) {
        return triattention_fail("unknown compression method " + std::to_string(params.method));
    }
    if (params.select != TRIATTENTION_SELECT_PER_HEAD && params.select != TRIATTENTION_SELECT_SHARED) {
        return triattention_fail("unknown selection mode " + std::to_string(params.select));
    }
    if (params.method != TRIATTENTION_METHOD_NONE) {
        const llama_kv_cache * kv = triattention_kv_cache(ctx);
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
        if (params.budget < N_SINKS + 1 || params.divide_length < 1 || need > kv->get_size()) {
            return triattention_fail("budget " + std::to_string(params.budget) + " + divide_length " +
                                     std::to_string(params.divide_length) + " + n_ubatch must fit in the " +
                                     std::to_string(kv->get_size()) + " cells of the cache (budget >= 5)");
        }
    }
    state & st = state_of(ctx);
    if (params.method == TRIATTENTION_METHOD_TRI && st.q_re.empty()) {
        return triattention_fail("method tri needs the query centres: call triattention_set_centers first");
    }
    const ggml_backend_sched_eval_callback own = ctx->get_cparams().cb_eval;
    if (params.method == TRIATTENTION_METHOD_SNAPKV) {
        if (own != snapkv_observe) {
            st.chained = own;
            st.chained_data = ctx->get_cparams().cb_eval_user_data;
        }
        st.windows.assign(ctx->get_model().hparams.n_layer(), {});
        ctx->set_eval_callback(snapkv_observe, &st);
    } else if (own == snapkv_observe) {
        st.windows.clear();
        ctx->set_eval_callback(st.chained, st.chained_data);
        st.chained = nullptr;
        st.chained_data = nullptr;
    }
    st.params = params;
    st.rng.seed(params.seed);
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
    st.q_re.assign(q_mean_real, q_mean_real + n);
    st.q_im.assign(q_mean_imag, q_mean_imag + n);
    st.q_abs.assign(q_abs_mean, q_abs_mean + n);
    return 0;
}

int32_t triattention_compress(llama_context * ctx) {
    triattention_clear_error();
    state * st = find_state(ctx);
    if (st == nullptr || st->params.method == TRIATTENTION_METHOD_NONE) {
        return triattention_fail("compression is off for this context (triattention_set_params)");
    }
    return compress_now(ctx, *st);
}

triattention_stats triattention_get_stats(const llama_context * ctx) {
    const state * st = find_state(ctx);
    return st ? st->stats : triattention_stats{0, 0, 0.0, -1};
}

int32_t triattention_last_kept(const llama_context * ctx, int32_t * cells, int32_t n_max) {
    const state * st = find_state(ctx);
    if (st == nullptr || st->last_kept.empty() || (int32_t) st->last_kept.size() > n_max) {
        return -1;
    }
    std::copy(st->last_kept.begin(), st->last_kept.end(), cells);
    return (int32_t) st->last_kept.size();
}

// KV heads of the compressed layers (0 without a cache to compress)
static int64_t cache_n_head_kv(const llama_context * ctx) {
    const llama_kv_cache * kv = triattention_kv_cache(ctx);
    const std::vector<uint32_t> layers = kv != nullptr ? kv->get_layer_ids() : std::vector<uint32_t>();
    return layers.empty() ? 0 : ctx->get_model().hparams.n_head_kv(layers[0]);
}

// records: int32 n_head_kv, n_cells, compressed_upto; cell_pos[n_cells]; head_pos[n_head_kv][n_cells]
static std::vector<int32_t> records_of(const state * st) {
    std::vector<int32_t> out = { 0, 0, -1 };
    if (st != nullptr && !st->cell_pos.empty()) {
        out = { (int32_t) st->head_pos.size(), (int32_t) st->cell_pos.size(), st->stats.compressed_upto };
        out.insert(out.end(), st->cell_pos.begin(), st->cell_pos.end());
        for (const auto & row : st->head_pos) {
            out.insert(out.end(), row.begin(), row.end());
        }
    }
    return out;
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
    const size_t n_head_kv = rec.size() >= 3 ? (size_t) rec[0] : 0;
    const size_t n_cells   = rec.size() >= 3 ? (size_t) rec[1] : 0;
    if (rec.size() < 3 || size % sizeof(int32_t) != 0 || rec.size() != 3 + n_cells * (1 + n_head_kv) ||
        (n_cells > 0 && n_head_kv != cache_n_head_kv(ctx))) {
        return triattention_fail("the compaction records do not match this model");
    }
    state & st = state_of(ctx);
    st.stats.compressed_upto = rec[2];
    st.cell_pos.assign(rec.begin() + 3, rec.begin() + 3 + n_cells);
    st.head_pos.assign(n_head_kv, {});
    for (size_t hk = 0; hk < n_head_kv; ++hk) {
        const auto first = rec.begin() + 3 + n_cells * (1 + hk);
        st.head_pos[hk].assign(first, first + n_cells);
    }
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
    st->after_truncation(cells, first);
    if (st->params.method == TRIATTENTION_METHOD_SNAPKV) {
        // the batch's tokens follow the captured window only if it continues the sequence
        for (auto & w : st->windows) {
            if (w.next != first) {
                w = {};
            }
            w.next = first;
        }
    }
    const int32_t limit = st->params.budget + st->params.divide_length;
    if ((int32_t) cells.get_used() + batch.n_tokens <= limit) {
        return 0;
    }
    if ((int64_t) batch.n_tokens > ctx->get_cparams().n_ubatch) {
        LLAMA_LOG_ERROR("%s: with KV compression a batch may hold at most n_ubatch = %u tokens, not %d\n",
                        __func__, ctx->get_cparams().n_ubatch, batch.n_tokens);
        return -1;
    }
    if (compress_now(ctx, *st) != 0) {
        LLAMA_LOG_ERROR("%s: KV compression failed: %s\n", __func__, g_error.c_str());
        return -1;
    }
    return 0;
}

void triattention_on_free(llama_context * ctx) {
    std::lock_guard<std::mutex> lock(g_mutex);
    g_states.erase(ctx);
}
