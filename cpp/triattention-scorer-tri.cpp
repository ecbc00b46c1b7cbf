// TriAttention (algorithm.md §4): every cached key scored by the ggml op against one virtual query
// per (layer, query head) built from the calibrated centres at the next token's position, z-scored
// over the cells per query head, max over each GQA group.
#include "triattention-scorer.h"
#include "triattn-pairs.h"

#include "llama-model.h"

#include <cmath>
#include <complex>

namespace {

// z-score each row (query head) over the valid cells: (s - mean) / (std + eps); empty cells -> 0.
ggml_tensor * znorm(ggml_context * g, ggml_tensor * s, ggml_tensor * valid, float n_valid) {
    ggml_tensor * mean = ggml_scale(g, ggml_sum_rows(g, ggml_mul(g, s, valid)), 1.0f / n_valid);
    ggml_tensor * centred = ggml_mul(g, ggml_sub(g, s, mean), valid);
    ggml_tensor * var = ggml_scale(g, ggml_sum_rows(g, ggml_sqr(g, centred)), 1.0f / n_valid);
    return ggml_div(g, centred, ggml_scale_bias(g, ggml_sqrt(g, var), 1.0f, 1e-6f));
}

class tri_scorer : public triattention_scorer {
public:
    tri_scorer(const triattention_centres & centres, int32_t horizon) : centres(centres), horizon(horizon) {}

    bool score(llama_context * ctx, llama_kv_cache * kv, const triattention_candidates & c,
               triattention_scores & out) override {
        const llama_hparams & hp = ctx->get_model().hparams;
        const std::vector<uint32_t> layers = kv->get_layer_ids();
        const int n_layer = (int) layers.size();
        const int64_t head_dim = hp.n_embd_head_k(layers[0]), n_head = hp.n_head(layers[0]);

        ggml_context_ptr g = triattention_graph_context(TRIATTENTION_MAX_NODE);
        auto input = [&](ggml_tensor * t) { ggml_set_input(t); return t; };
        ggml_tensor * valid = input(ggml_new_tensor_2d(g.get(), GGML_TYPE_F32, c.n_kv, 1));
        ggml_tensor * q_all = input(ggml_new_tensor_3d(g.get(), GGML_TYPE_F32, head_dim, n_head, n_layer));
        ggml_tensor * w_all = input(ggml_new_tensor_3d(g.get(), GGML_TYPE_F32, head_dim / 2, n_head, n_layer));
        ggml_cgraph * gf = ggml_new_graph_custom(g.get(), TRIATTENTION_MAX_NODE, false);
        std::vector<ggml_tensor *> outputs;
        for (int li = 0; li < n_layer; ++li) {
            const int il = (int) layers[li];
            ggml_tensor * q = ggml_view_2d(g.get(), q_all, head_dim, n_head, q_all->nb[1], li * q_all->nb[2]);
            ggml_tensor * w = ggml_view_2d(g.get(), w_all, head_dim / 2, n_head, w_all->nb[1], li * w_all->nb[2]);
            ggml_tensor * keys = triattention_keys(g.get(), kv, hp, il, c.n_kv);
            ggml_tensor * s = triattention_score_keys(g.get(), kv, hp, il, keys, q, w);
            triattention_add_layer_output(g.get(), gf, outputs, triattention_gqa_max(g.get(),
                                          znorm(g.get(), s, valid, (float) c.n_valid), c.n_head_kv));
        }
        std::vector<float> q, w;
        virtual_queries(ctx, layers, c.newest + 1, head_dim, n_head, q, w);
        return triattention_run_layers(ctx, gf, outputs, [&] {
            ggml_backend_tensor_set(valid, c.valid.data(), 0, ggml_nbytes(valid));
            ggml_backend_tensor_set(q_all, q.data(), 0, ggml_nbytes(q_all));
            ggml_backend_tensor_set(w_all, w.data(), 0, ggml_nbytes(w_all));
        }, out);
    }

private:
    const triattention_centres & centres;
    const int32_t horizon;

    // The virtual queries at position t, q [layer][head][head_dim] in the model's pair layout, and
    // the norm weights w [layer][head][pair], for the cache's layers: each with its own
    // frequencies (Gemma 3's global layers use another RoPE base than its local ones).
    void virtual_queries(llama_context * ctx, const std::vector<uint32_t> & layers, llama_pos t, int64_t head_dim,
                         int64_t n_head, std::vector<float> & q, std::vector<float> & w) const {
        const llama_hparams & hp = ctx->get_model().hparams;
        const int n_pairs = (int) head_dim / 2;
        const bool neox = hp.rope_type == LLAMA_ROPE_TYPE_NEOX;
        q.assign(layers.size() * n_head * head_dim, 0.0f);
        w.assign(layers.size() * n_head * n_pairs, 0.0f);
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
                for (int h = 0; h < n_head; ++h) {
                    const size_t i = ((size_t) il * n_head + h) * n_pairs + f;  // centres: every layer
                    const size_t o = (li * n_head + h) * n_pairs + f;          // graph: the cache's layers
                    const std::complex<double> v = std::complex<double>(centres.q_re[i], centres.q_im[i]) * phase;
                    float * qh = q.data() + (li * n_head + h) * head_dim;
                    qh[re] = (float) v.real();
                    qh[im] = (float) v.imag();
                    w[o] = centres.q_abs[i] - (float) std::hypot(centres.q_re[i], centres.q_im[i]);
                }
            }
        }
    }
};

}  // namespace

std::unique_ptr<triattention_scorer> triattention_tri_scorer(const triattention_centres & centres, int32_t horizon) {
    return std::make_unique<tri_scorer>(centres, horizon);
}
