// TriAttention (algorithm.md §4): every cached key scored by the ggml op against one virtual query
// per (layer, query head, query cluster) built from the calibrated centres at the next token's
// position, z-scored over the cells per virtual query, max over each KV head's virtual queries
// (its GQA group's heads and their clusters). A (layer, KV head) whose queries are spread out
// (calibrated concentration below min_concentration; by default none, as the reference) is scored
// by recency plus the attention its latest queries gave (snapkv's), each z-scored, instead: the
// centres predict little there (BENCHMARKS.md, "Spread heads" and "Observed spread heads").
#include "triattention-scorer.h"
#include "triattn-pairs.h"

#include "llama-model.h"

#include <algorithm>
#include <cmath>
#include <complex>

namespace {

class tri_scorer : public triattention_scorer {
public:
    tri_scorer(llama_context * ctx, const triattention_centres & centres, int32_t horizon, float min_concentration)
        : centres(centres), horizon(horizon), spread(spread_heads(ctx, centres, min_concentration)),
          observer(spread.empty() ? nullptr : triattention_snapkv_scorer(ctx, layers_of(spread))) {}

    void on_batch(llama_pos first) override {
        if (observer) {
            observer->on_batch(first);
        }
    }

    void release(llama_context * ctx) override {
        if (observer) {
            observer->release(ctx);
        }
    }

    bool score(llama_context * ctx, llama_kv_cache * kv, const triattention_candidates & c,
               triattention_scores & out) override {
        const llama_hparams & hp = ctx->get_model().hparams;
        const std::vector<uint32_t> layers = kv->get_layer_ids();
        const int n_layer = (int) layers.size();
        const int64_t head_dim = hp.n_embd_head_k(layers[0]), n_head = hp.n_head(layers[0]);
        const int64_t n_virtual = virtual_per_layer(n_head);

        ggml_context_ptr g = triattention_graph_context(TRIATTENTION_MAX_NODE);
        auto input = [&](ggml_tensor * t) { ggml_set_input(t); return t; };
        ggml_tensor * valid = input(ggml_new_tensor_2d(g.get(), GGML_TYPE_F32, c.n_kv, 1));
        ggml_tensor * q_all = input(ggml_new_tensor_3d(g.get(), GGML_TYPE_F32, head_dim, n_virtual, n_layer));
        ggml_tensor * w_all = input(ggml_new_tensor_3d(g.get(), GGML_TYPE_F32, head_dim / 2, n_virtual, n_layer));
        ggml_cgraph * gf = ggml_new_graph_custom(g.get(), TRIATTENTION_MAX_NODE, false);
        std::vector<ggml_tensor *> outputs;
        for (int li = 0; li < n_layer; ++li) {
            const int il = (int) layers[li];
            ggml_tensor * q = ggml_view_2d(g.get(), q_all, head_dim, n_virtual, q_all->nb[1], li * q_all->nb[2]);
            ggml_tensor * w = ggml_view_2d(g.get(), w_all, head_dim / 2, n_virtual, w_all->nb[1], li * w_all->nb[2]);
            ggml_tensor * keys = triattention_keys(g.get(), kv, hp, il, c.n_kv);
            ggml_tensor * s = triattention_score_keys(g.get(), kv, hp, il, keys, q, w);
            triattention_add_layer_output(g.get(), gf, outputs,
                                          ggml_triattn_zmax(g.get(), s, valid, (int) (n_virtual / c.n_head_kv)));
        }
        std::vector<float> q, w;
        virtual_queries(ctx, layers, c.newest + 1, head_dim, n_head, q, w);
        if (!triattention_run_layers(ctx, gf, outputs, [&] {
                ggml_backend_tensor_set(valid, c.valid.data(), 0, ggml_nbytes(valid));
                ggml_backend_tensor_set(q_all, q.data(), 0, ggml_nbytes(q_all));
                ggml_backend_tensor_set(w_all, w.data(), 0, ggml_nbytes(w_all));
            }, out)) {
            return false;
        }
        return spread.empty() || score_spread_rows(ctx, kv, c, out);
    }

private:
    const triattention_centres & centres;
    const int32_t horizon;
    // the spread heads, as runs of consecutive KV heads, from the centres set when the scorer was
    // made (setting others makes a new scorer); none when min_concentration is 0
    const std::vector<triattention_heads> spread;
    // their observed attention (the eval callback that captures their layers' queries); null without
    const std::unique_ptr<triattention_observed_attention> observer;

    // Overwrites the spread rows of out with z-scored recency, plus, once queries were observed, the
    // z-scored attention they gave.
    bool score_spread_rows(llama_context * ctx, llama_kv_cache * kv, const triattention_candidates & c,
                           triattention_scores & out) {
        triattention_scores observed;
        const bool have_observed = observer->ready(c);
        if (have_observed && !observer->score_heads(ctx, kv, c, spread, observed)) {
            return false;
        }
        size_t observed_row = 0;  // the runs' rows, in order
        for (const triattention_heads & run : spread) {
            for (int32_t hk = run.first; hk < run.first + run.count; ++hk, ++observed_row) {
                float * row = out.v.data() + ((size_t) run.layer * c.n_head_kv + hk) * c.n_kv;
                const llama_pos * pos = c.row(c.n_groups == 1 ? 0 : run.layer, hk);
                recency_row(pos, c, row);
                if (have_observed) {
                    float * seen = observed.v.data() + observed_row * c.n_kv;
                    zscore_row(pos, c, seen);
                    for (int32_t i = 0; i < c.n_kv; ++i) {
                        row[i] += seen[i];
                    }
                }
            }
        }
        return true;
    }

    // The KV heads of the cache's layers whose query heads have a mean concentration
    // R = sum_f |E q_f| / sum_f E|q_f| below min_concentration, as runs of consecutive heads.
    static std::vector<triattention_heads> spread_heads(llama_context * ctx, const triattention_centres & centres,
                                                        float min_concentration) {
        const llama_hparams & hp = ctx->get_model().hparams;
        const std::vector<uint32_t> layers = triattention_kv_cache(ctx)->get_layer_ids();
        const int64_t n_head = hp.n_head(layers[0]), n_head_kv = hp.n_head_kv(layers[0]);
        const int64_t n_gqa = n_head / n_head_kv, n_pairs = hp.n_embd_head_k(layers[0]) / 2;
        std::vector<triattention_heads> runs;
        for (int32_t li = 0; li < (int32_t) layers.size(); ++li) {
            for (int32_t hk = 0; hk < (int32_t) n_head_kv; ++hk) {
                double r = 0.0;
                for (int64_t h = hk * n_gqa; h < (hk + 1) * n_gqa; ++h) {
                    double centre = 0.0, magnitude = 0.0;
                    for (int64_t f = 0; f < n_pairs; ++f) {
                        const size_t i = ((size_t) layers[li] * n_head + h) * n_pairs + f;
                        centre += std::hypot(centres.q_re[i], centres.q_im[i]);
                        magnitude += centres.q_abs[i];
                    }
                    r += magnitude > 0.0 ? centre / magnitude : 0.0;
                }
                if (r / (double) n_gqa >= (double) min_concentration) {
                    continue;
                }
                if (!runs.empty() && runs.back().layer == li && runs.back().first + runs.back().count == hk) {
                    runs.back().count++;
                } else {
                    runs.push_back({ li, hk, 1 });
                }
            }
        }
        return runs;
    }

    static std::vector<int32_t> layers_of(const std::vector<triattention_heads> & runs) {
        std::vector<int32_t> layers;
        for (const triattention_heads & run : runs) {
            if (layers.empty() || layers.back() != run.layer) {
                layers.push_back(run.layer);
            }
        }
        return layers;
    }

    // Z-scores a row over the cells it holds (0 for an empty one), on the scale of the z-scored rows
    // beside it, which the per-head and shared modes average it with.
    static void zscore_row(const llama_pos * pos, const triattention_candidates & c, float * row) {
        double n = 0.0, sum = 0.0, sum_sq = 0.0;
        for (int32_t i = 0; i < c.n_kv; ++i) {
            if (pos[i] >= 0) {
                n += 1.0;
                sum += row[i];
                sum_sq += (double) row[i] * row[i];
            }
        }
        const double mean = sum / std::max(n, 1.0);
        const double sd = std::sqrt(std::max(0.0, sum_sq / std::max(n, 1.0) - mean * mean));
        for (int32_t i = 0; i < c.n_kv; ++i) {
            row[i] = pos[i] < 0 ? 0.0f : (float) ((row[i] - mean) / (sd + 1e-6));
        }
    }

    // A row's z-scored recency: the sinks first, then the newer the higher.
    static void recency_row(const llama_pos * pos, const triattention_candidates & c, float * row) {
        for (int32_t i = 0; i < c.n_kv; ++i) {
            row[i] = pos[i] < TRIATTENTION_N_SINKS ? (float) c.newest + 1.0f : (float) pos[i];
        }
        zscore_row(pos, c, row);
    }

    // Rows of the virtual queries of a layer, [head][cluster]; without clusters one per head.
    int64_t virtual_per_layer(int64_t n_head) const { return n_head * std::max(centres.n_clusters, 1); }

    // The virtual queries at position t, q [layer][head][cluster][head_dim] in the model's pair layout,
    // and the norm weights w [layer][head][cluster][pair], for the cache's layers: each with its own
    // frequencies (Gemma 3's global layers use another RoPE base than its local ones). Without
    // clusters, the centre is the one virtual query of its head.
    void virtual_queries(llama_context * ctx, const std::vector<uint32_t> & layers, llama_pos t, int64_t head_dim,
                         int64_t n_head, std::vector<float> & q, std::vector<float> & w) const {
        const llama_hparams & hp = ctx->get_model().hparams;
        const int n_pairs = (int) head_dim / 2;
        const bool neox = hp.rope_type == LLAMA_ROPE_TYPE_NEOX;
        const bool clustered = centres.n_clusters > 0;
        const int64_t n_virtual = virtual_per_layer(n_head);
        const std::vector<float> & c_re = clustered ? centres.cluster_re : centres.q_re;
        const std::vector<float> & c_im = clustered ? centres.cluster_im : centres.q_im;
        const std::vector<float> & c_abs = clustered ? centres.cluster_abs : centres.q_abs;
        q.assign(layers.size() * n_virtual * head_dim, 0.0f);
        w.assign(layers.size() * n_virtual * n_pairs, 0.0f);
        std::vector<float> omega(n_pairs);
        for (size_t li = 0; li < layers.size(); ++li) {
            const int il = (int) layers[li];
            triattention_rope_omega(ctx, il, omega.data());
            for (int f = 0; f < n_pairs; ++f) {
                std::complex<double> mean_offset = 0.0;  // over the future offsets 1, 2, 4, ... <= horizon
                int n_offsets = 0;
                for (int32_t delta = 1; delta <= horizon; delta *= 2, ++n_offsets) {
                    mean_offset += std::polar(1.0, omega[f] * (double) delta);
                }
                const std::complex<double> phase =
                    std::polar(1.0, omega[f] * (double) t) * (mean_offset / (double) n_offsets);
                int re, im;
                triattn_pair_dims(f, neox, (int) hp.n_rot(il), &re, &im);
                for (int64_t v = 0; v < n_virtual; ++v) {
                    const size_t i = ((size_t) il * n_virtual + v) * n_pairs + f;  // centres: every layer
                    const size_t o = (li * n_virtual + v) * n_pairs + f;          // graph: the cache's layers
                    const std::complex<double> rotated = std::complex<double>(c_re[i], c_im[i]) * phase;
                    float * qv = q.data() + (li * n_virtual + v) * head_dim;
                    qv[re] = (float) rotated.real();
                    qv[im] = (float) rotated.imag();
                    w[o] = c_abs[i] - (float) std::hypot(c_re[i], c_im[i]);
                }
            }
        }
    }
};

}  // namespace

std::unique_ptr<triattention_scorer> triattention_tri_scorer(llama_context * ctx, const triattention_centres & centres,
                                                            int32_t horizon, float min_concentration) {
    return std::make_unique<tri_scorer>(ctx, centres, horizon, min_concentration);
}
