// SnapKV: the attention that the last SNAP_WINDOW queries give each key, max-pooled over
// SNAP_POOL neighbouring tokens and summed over each GQA group; the window itself is kept. The
// post-RoPE queries are captured from the graph by an eval callback as the tokens are decoded.
#include "triattention-scorer.h"
#include "triattn-hadamard.h"

#include "llama-model.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace {

constexpr int   SNAP_WINDOW = 8;       // the last queries whose attention scores the keys
constexpr int   SNAP_POOL   = 7;       // max-pooling kernel over neighbouring tokens
constexpr float MASKED      = -1e30f;  // finite: a row with no visible key stays a (uniform) distribution, not NaN

// One layer's score [n_kv, n_head_kv]: the attention of the window's queries q [head_dim, n_head,
// n_win] (causal mask [n_kv, n_win, 1, n_head_kv], one per KV head), summed over the window,
// max-pooled over neighbouring tokens, summed over each GQA group. A compaction leaves cells out of
// position order: `order` [n_kv, n_head] lists each head's cells oldest first and `rank` is its
// inverse, so the pooling runs over neighbouring positions.
ggml_tensor * snapkv_layer(ggml_context * g, ggml_tensor * keys, ggml_tensor * q, ggml_tensor * mask, float scale,
                           ggml_tensor * order, ggml_tensor * rank) {
    const int64_t n_kv = keys->ne[2], n_head_kv = keys->ne[1], n_head = q->ne[1], n_win = q->ne[2];
    const int64_t n_gqa = n_head / n_head_kv;
    ggml_tensor * kq = ggml_mul_mat(g, ggml_permute(g, keys, 0, 2, 1, 3), ggml_permute(g, q, 0, 2, 1, 3));
    // [n_kv, n_win, n_gqa, n_head_kv]: each KV head's mask broadcast over its group
    ggml_tensor * attn = ggml_soft_max_ext(g, ggml_reshape_4d(g, kq, n_kv, n_win, n_gqa, n_head_kv), mask, scale, 0.0f);
    attn = ggml_reshape_3d(g, attn, n_kv, n_win, n_head);
    ggml_tensor * in_cells = ggml_sum_rows(g, ggml_cont(g, ggml_permute(g, attn, 1, 0, 2, 3)));  // [1, n_kv, n_head]
    auto reordered = [&](ggml_tensor * x, ggml_tensor * idx) {
        return ggml_reshape_2d(g, ggml_get_rows(g, ggml_reshape_3d(g, x, 1, n_kv, n_head), idx), n_kv, n_head);
    };
    ggml_tensor * pooled = ggml_pool_1d(g, reordered(in_cells, order), GGML_OP_POOL_MAX, SNAP_POOL, 1, SNAP_POOL / 2);
    pooled = reordered(pooled, rank);
    ggml_tensor * grouped = ggml_cont(g, ggml_permute(g, ggml_reshape_3d(g, pooled, n_kv, n_gqa, n_head_kv), 1, 0, 2, 3));
    return ggml_reshape_2d(g, ggml_sum_rows(g, grouped), n_kv, n_head_kv);
}

// One candidate group's mask [KV head][token][cell] over the window positions wpos, and each query
// head's cells in position order [head][cell] with its inverse, for the KV heads scored (`scored`
// [KV head]; the others' entries are left 0 and never read: tri scores few heads of a layer).
struct group_inputs {
    std::vector<float>   mask;
    std::vector<int32_t> order, rank;

    group_inputs(const triattention_candidates & c, int32_t group, int64_t n_head, const std::vector<llama_pos> & wpos,
                 const std::vector<bool> & scored) {
        const int64_t n_gqa = n_head / c.n_head_kv;
        mask.resize((size_t) c.n_head_kv * wpos.size() * c.n_kv);
        order.resize((size_t) n_head * c.n_kv);
        rank.resize(order.size());
        for (int32_t hk = 0; hk < c.n_head_kv; ++hk) {
            if (!scored[hk]) {
                continue;
            }
            const llama_pos * pos = c.row(group, hk);
            for (size_t j = 0; j < wpos.size(); ++j) {
                float * row = mask.data() + (hk * wpos.size() + j) * c.n_kv;
                for (int32_t i = 0; i < c.n_kv; ++i) {
                    row[i] = pos[i] >= 0 && pos[i] <= wpos[j] ? 0.0f : MASKED;
                }
            }
            int32_t * o = order.data() + hk * n_gqa * c.n_kv;  // the group's first head, copied to the others
            int32_t * r = rank.data() + hk * n_gqa * c.n_kv;
            std::iota(o, o + c.n_kv, 0);
            std::stable_sort(o, o + c.n_kv, [&](int32_t a, int32_t b) { return pos[a] < pos[b]; });
            for (int32_t k = 0; k < c.n_kv; ++k) {
                r[o[k]] = k;
            }
            for (int64_t j = 1; j < n_gqa; ++j) {
                std::copy(o, o + c.n_kv, o + j * c.n_kv);
                std::copy(r, r + c.n_kv, r + j * c.n_kv);
            }
        }
    }
};

class snapkv_scorer : public triattention_observed_attention {
public:
    snapkv_scorer(llama_context * ctx, const std::vector<int32_t> & watch)
        : windows(ctx->get_model().hparams.n_layer()), layers(triattention_kv_cache(ctx)->get_layer_ids()),
          watched(windows.size(), false) {
        for (int32_t li : watch) {
            watched[layers[li]] = true;
        }
        first_watched = layers[watch.front()];
        // observe the watched layers' query nodes, passing every node on to the context's own eval callback
        chained      = ctx->get_cparams().cb_eval;
        chained_data = ctx->get_cparams().cb_eval_user_data;
        ctx->set_eval_callback(observe, this);
    }

    void release(llama_context * ctx) override { ctx->set_eval_callback(chained, chained_data); }

    void on_batch(llama_pos first) override {
        // the batch's tokens follow the captured window only if it continues the sequence
        for (auto & w : windows) {
            if (w.next != first) {
                w = {};
            }
            w.next = first;
        }
    }

    llama_pos keep_from(const triattention_candidates & c) const override {
        return ready(c) ? windows[first_watched].pos.front() : -1;
    }

    bool score(llama_context * ctx, llama_kv_cache * kv, const triattention_candidates & c,
               triattention_scores & out) override {
        if (!ready(c)) {
            // no window captured yet (a state just loaded, a compression asked before any decode):
            // keep the most recent tokens
            triattention_recency_scores(c, out);
            return true;
        }
        std::vector<triattention_heads> all;
        for (int32_t li = 0; li < (int32_t) layers.size(); ++li) {
            all.push_back({ li, 0, c.n_head_kv });
        }
        return score_heads(ctx, kv, c, all, out);
    }

    bool score_heads(llama_context * ctx, llama_kv_cache * kv, const triattention_candidates & c,
                     const std::vector<triattention_heads> & heads, triattention_scores & out) override {
        const llama_hparams & hp = ctx->get_model().hparams;
        const int64_t head_dim = hp.n_embd_head_k(layers[0]), n_head = hp.n_head(layers[0]);
        const int64_t n_gqa = n_head / c.n_head_kv;
        const std::vector<llama_pos> & wpos = windows[first_watched].pos;
        const int64_t n_win = (int64_t) wpos.size();
        const float scale = hp.f_attention_scale == 0.0f ? 1.0f / std::sqrt((float) head_dim) : hp.f_attention_scale;
        // the candidate groups the listed layers read: each its own under per-layer-head selection, else one
        auto group_of = [&](const triattention_heads & run) { return c.n_groups == 1 ? 0 : run.layer; };
        std::vector<int32_t> groups_used;
        for (const triattention_heads & run : heads) {
            if (std::find(groups_used.begin(), groups_used.end(), group_of(run)) == groups_used.end()) {
                groups_used.push_back(group_of(run));
            }
        }

        ggml_context_ptr g = triattention_graph_context(TRIATTENTION_MAX_NODE);
        auto input = [&](ggml_tensor * t) { ggml_set_input(t); return t; };
        // each run's layer's window of queries, every head
        ggml_tensor * q_win = input(ggml_new_tensor_4d(g.get(), GGML_TYPE_F32, head_dim, n_head, n_win, heads.size()));
        const size_t n_used = groups_used.size();
        std::vector<ggml_tensor *> mask(n_used), order(n_used), rank(n_used);
        for (size_t u = 0; u < n_used; ++u) {
            mask[u]  = input(ggml_new_tensor_4d(g.get(), GGML_TYPE_F32, c.n_kv, n_win, 1, c.n_head_kv));
            order[u] = input(ggml_new_tensor_2d(g.get(), GGML_TYPE_I32, c.n_kv, n_head));
            rank[u]  = input(ggml_new_tensor_2d(g.get(), GGML_TYPE_I32, c.n_kv, n_head));
        }
        ggml_cgraph * gf = ggml_new_graph_custom(g.get(), TRIATTENTION_MAX_NODE, false);
        std::vector<ggml_tensor *> outputs;
        for (size_t ri = 0; ri < heads.size(); ++ri) {
            const triattention_heads & run = heads[ri];
            const size_t u = std::find(groups_used.begin(), groups_used.end(), group_of(run)) - groups_used.begin();
            // the run's KV heads and their query heads
            const int64_t n_q = run.count * n_gqa, first_q = run.first * n_gqa;
            ggml_tensor * q = ggml_view_3d(g.get(), q_win, head_dim, n_q, n_win, q_win->nb[1], q_win->nb[2],
                                           ri * q_win->nb[3] + first_q * q_win->nb[1]);
            ggml_tensor * all_keys = triattention_keys(g.get(), kv, hp, (int) layers[run.layer], c.n_kv);
            ggml_tensor * keys = ggml_view_3d(g.get(), all_keys, head_dim, run.count, c.n_kv, all_keys->nb[1],
                                              all_keys->nb[2], run.first * all_keys->nb[1]);
            ggml_tensor * m = ggml_view_4d(g.get(), mask[u], c.n_kv, n_win, 1, run.count, mask[u]->nb[1],
                                           mask[u]->nb[2], mask[u]->nb[3], run.first * mask[u]->nb[3]);
            auto heads_of = [&](ggml_tensor * idx) {
                return ggml_view_2d(g.get(), idx, c.n_kv, n_q, idx->nb[1], first_q * idx->nb[1]);
            };
            triattention_add_layer_output(g.get(), gf, outputs,
                                          snapkv_layer(g.get(), keys, q, m, scale, heads_of(order[u]), heads_of(rank[u])));
        }
        std::vector<float> q;
        for (const triattention_heads & run : heads) {
            const std::vector<float> & wq = windows[layers[run.layer]].q;
            q.insert(q.end(), wq.begin(), wq.end());
        }
        if (kv->get_attn_rot_k()) {  // queries turned like the cached keys
            for (size_t i = 0; i < q.size(); i += head_dim) {
                triattn_fwht(q.data() + i, (int) head_dim);
            }
        }
        std::vector<group_inputs> groups;
        for (int32_t gi : groups_used) {
            std::vector<bool> scored(c.n_head_kv, false);
            for (const triattention_heads & run : heads) {
                if (group_of(run) == gi) {
                    std::fill_n(scored.begin() + run.first, run.count, true);
                }
            }
            groups.emplace_back(c, gi, n_head, wpos, scored);
        }
        return triattention_run_layers(ctx, gf, outputs, [&] {
            ggml_backend_tensor_set(q_win, q.data(), 0, ggml_nbytes(q_win));
            for (size_t u = 0; u < n_used; ++u) {
                ggml_backend_tensor_set(mask[u], groups[u].mask.data(), 0, ggml_nbytes(mask[u]));
                ggml_backend_tensor_set(order[u], groups[u].order.data(), 0, ggml_nbytes(order[u]));
                ggml_backend_tensor_set(rank[u], groups[u].rank.data(), 0, ggml_nbytes(rank[u]));
            }
        }, out);
    }

    // Whether every watched layer captured the same window of queries, all already in the cache.
    bool ready(const triattention_candidates & c) const override {
        const std::vector<llama_pos> & first = windows[first_watched].pos;
        if (first.empty() || first.back() > c.newest) {
            return false;
        }
        return std::all_of(layers.begin(), layers.end(),
                           [&](uint32_t il) { return !watched[il] || windows[il].pos == first; });
    }

private:
    // the post-RoPE queries of the last SNAP_WINDOW tokens decoded, per model layer; `next` is
    // the position the next captured token will have
    struct query_window {
        std::vector<float>     q;    // [token][head][head_dim]
        std::vector<llama_pos> pos;  // [token]
        llama_pos              next = -1;
    };
    std::vector<query_window> windows;
    std::vector<uint32_t> layers;  // the compressed layers
    std::vector<bool> watched;     // per model layer: whether its queries are captured
    uint32_t first_watched = 0;
    ggml_backend_sched_eval_callback chained = nullptr;  // the context's own eval callback
    void * chained_data = nullptr;

    // Keep the last SNAP_WINDOW tokens of layer il's post-RoPE query t.
    void capture(const ggml_tensor * t, int il) {
        if (t->type != GGML_TYPE_F32 || t->nb[0] != sizeof(float)) {
            return;
        }
        query_window & w = windows[il];
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

    // The layer of t when t is a watched layer's post-RoPE query, else -1.
    int watched_layer(const ggml_tensor * t) const {
        if (!triattention_is_query_rope(t)) {
            return -1;
        }
        const int il = triattention_layer_of(t->name);
        return il >= 0 && il < (int) watched.size() && watched[il] ? il : -1;
    }

    // The eval callback: asks for the watched query nodes, and passes every node on to the eval callback
    // the context had before (only those it asks for, and its answer stops the graph as usual).
    static bool observe(ggml_tensor * t, bool ask, void * user_data) {
        auto & self = *static_cast<snapkv_scorer *>(user_data);
        const bool theirs = self.chained != nullptr && self.chained(t, true, self.chained_data);
        const int il = self.watched_layer(t);
        if (ask) {
            return theirs || il >= 0;
        }
        if (il >= 0) {
            self.capture(t, il);
        }
        return theirs ? self.chained(t, false, self.chained_data) : true;
    }
};

}  // namespace

std::unique_ptr<triattention_observed_attention> triattention_snapkv_scorer(llama_context * ctx,
                                                                           const std::vector<int32_t> & watch) {
    return std::make_unique<snapkv_scorer>(ctx, watch);
}
