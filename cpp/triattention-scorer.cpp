// The scorers without a graph of their own (streaming, random), knorm, and what scorers share.
#include "triattention-scorer.h"

#include "llama-model.h"

#include <numeric>
#include <random>

// One set per candidate group, value(position) for each held token, 0 for an empty cell.
template <typename F>
static void per_position(const triattention_candidates & c, triattention_scores & out, F && value) {
    out.n_sets = c.n_groups;
    out.v.assign(c.pos.size(), 0.0f);
    for (size_t i = 0; i < c.pos.size(); ++i) {
        if (c.pos[i] >= 0) {
            out.v[i] = value(c.pos[i]);
        }
    }
}

void triattention_recency_scores(const triattention_candidates & c, triattention_scores & out) {
    per_position(c, out, [](llama_pos p) {
        return p < TRIATTENTION_N_SINKS ? 1e29f : (float) p;  // sinks above every position
    });
}

namespace {

// StreamingLLM: the attention sinks and the most recent tokens.
class streaming_scorer : public triattention_scorer {
public:
    bool score(llama_context *, llama_kv_cache *, const triattention_candidates & c, triattention_scores & out) override {
        triattention_recency_scores(c, out);
        return true;
    }
};

// Uniform random eviction, seeded: the floor any method should clear.
class random_scorer : public triattention_scorer {
public:
    explicit random_scorer(uint32_t seed) : rng(seed) {}

    bool score(llama_context *, llama_kv_cache *, const triattention_candidates & c, triattention_scores & out) override {
        std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
        per_position(c, out, [&](llama_pos) { return uniform(rng); });
        return true;
    }

private:
    std::mt19937 rng;
};

// Keep the keys with the smallest L2 norm (rotation-invariant), per layer.
class knorm_scorer : public triattention_scorer {
public:
    bool score(llama_context * ctx, llama_kv_cache * kv, const triattention_candidates & c,
               triattention_scores & out) override {
        const llama_hparams & hp = ctx->get_model().hparams;
        ggml_context_ptr g = triattention_graph_context(TRIATTENTION_MAX_NODE);
        ggml_cgraph * gf = ggml_new_graph_custom(g.get(), TRIATTENTION_MAX_NODE, false);
        std::vector<ggml_tensor *> outputs;
        for (uint32_t il : kv->get_layer_ids()) {
            ggml_tensor * keys = ggml_cast(g.get(), triattention_keys(g.get(), kv, hp, (int) il, c.n_kv), GGML_TYPE_F32);
            ggml_tensor * norm = ggml_sqrt(g.get(), ggml_sum_rows(g.get(), ggml_sqr(g.get(), keys)));
            triattention_add_layer_output(g.get(), gf, outputs, ggml_scale(g.get(), ggml_cont(g.get(),
                ggml_transpose(g.get(), ggml_reshape_2d(g.get(), norm, c.n_head_kv, c.n_kv))), -1.0f));
        }
        return triattention_run_layers(ctx, gf, outputs, [] {}, out);
    }
};

}  // namespace

std::unique_ptr<triattention_scorer> triattention_make_scorer(llama_context * ctx, const triattention_params & params,
                                                             const triattention_centres & centres) {
    switch (params.method) {
        case TRIATTENTION_METHOD_TRI:
            return triattention_tri_scorer(ctx, centres, params.horizon, params.min_concentration);
        case TRIATTENTION_METHOD_STREAMING: return std::make_unique<streaming_scorer>();
        case TRIATTENTION_METHOD_KNORM:     return std::make_unique<knorm_scorer>();
        case TRIATTENTION_METHOD_RANDOM:    return std::make_unique<random_scorer>(params.seed);
        case TRIATTENTION_METHOD_SNAPKV: {
            std::vector<int32_t> every(triattention_kv_cache(ctx)->get_layer_ids().size());
            std::iota(every.begin(), every.end(), 0);
            return triattention_snapkv_scorer(ctx, every);
        }
        default:                            return nullptr;
    }
}
