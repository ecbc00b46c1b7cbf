// The compression methods as scorers behind one interface (one class per method, the way kvpress
// has one press per method). A scorer only scores; the select mode turns scores into kept sets
// (triattention-select.h) and compaction moves the rows (triattention-compact.h).
#pragma once

#include "triattention.h"
#include "triattention-impl.h"
#include "triattention-records.h"

#include <memory>
#include <vector>

// Scores of the candidate cells, higher keeps: [set][KV head][cell], with one set per compressed
// layer for a scorer that reads each layer's cache, else one per candidate group.
struct triattention_scores {
    std::vector<float> v;
    int32_t n_sets = 0;
};

// The query centres, [n_layer][n_head][head_dim/2] each (every layer of the model).
struct triattention_centres {
    std::vector<float> q_re, q_im, q_abs;                  // [layer][head][pair]
    std::vector<float> cluster_re, cluster_im, cluster_abs;  // [layer][head][cluster][pair]
    int32_t            n_clusters = 0;                       // 0: none set, the centres are the virtual queries
};

class triattention_scorer {
public:
    virtual ~triattention_scorer() = default;

    // Scores the candidates of the cache kv of ctx. Returns false (with triattention_fail) on failure.
    virtual bool score(llama_context * ctx, llama_kv_cache * kv, const triattention_candidates & c,
                       triattention_scores & out) = 0;

    // Every token from this position on is kept (snapkv's observation window); -1 for none.
    virtual llama_pos keep_from(const triattention_candidates &) const { return -1; }

    // A batch starting at position `first` is about to be decoded.
    virtual void on_batch(llama_pos first) { (void) first; }

    // The scorer is about to be replaced: undo what it set on the context.
    virtual void release(llama_context * ctx) { (void) ctx; }
};

// KV heads [first, first + count) of a compressed layer (an index into the cache's layers).
struct triattention_heads {
    int32_t layer, first, count;
};

// The attention that the latest queries, observed as they are decoded, gave the cells (snapkv's
// scores): for snapkv, and for tri's spread heads.
class triattention_observed_attention : public triattention_scorer {
public:
    // Whether a window of queries, all already in the cache, was captured.
    virtual bool ready(const triattention_candidates & c) const = 0;

    // Once ready: the scores of the listed runs of heads, [run][its KV heads][cell] in that order,
    // one set per run.
    virtual bool score_heads(llama_context * ctx, llama_kv_cache * kv, const triattention_candidates & c,
                             const std::vector<triattention_heads> & heads, triattention_scores & out) = 0;
};

// The scorer of params.method (not NONE); centres must outlive it (TRI reads them at every compression).
std::unique_ptr<triattention_scorer> triattention_make_scorer(llama_context * ctx, const triattention_params & params,
                                                             const triattention_centres & centres);

// The scorers with a source file of their own.
std::unique_ptr<triattention_scorer> triattention_tri_scorer(llama_context * ctx, const triattention_centres & centres,
                                                            int32_t horizon, float min_concentration);
// snapkv's scorer, capturing the queries of the listed compressed layers (indices into the cache's
// layers, at least one): every one for snapkv, only those with a spread head for tri.
std::unique_ptr<triattention_observed_attention> triattention_snapkv_scorer(llama_context * ctx,
                                                                           const std::vector<int32_t> & watch);

//
// Helpers for scorers that build a graph over the cache's layers
//

constexpr int TRIATTENTION_N_SINKS  = 4;  // streaming: attention sinks at the start of the sequence

// Computes gf on the cache's backends (set_inputs fills its inputs), then reads per_layer, each
// [n_kv, n_head_kv] f32 (or a run of fewer heads), into out as one set each, in order.
template <typename F>
bool triattention_run_layers(const llama_context * ctx, ggml_cgraph * gf, const std::vector<ggml_tensor *> & per_layer,
                             F && set_inputs, triattention_scores & out) {
    if (!triattention_runner_of(ctx).run(gf, set_inputs)) {
        triattention_fail("the scoring graph failed");
        return false;
    }
    out.v.clear();
    out.n_sets = (int32_t) per_layer.size();
    for (ggml_tensor * t : per_layer) {
        out.v.resize(out.v.size() + ggml_nelements(t));
        ggml_backend_tensor_get(t, out.v.data() + out.v.size() - ggml_nelements(t), 0, ggml_nbytes(t));
    }
    return true;
}

// Streaming's scores, one set per candidate group: the attention sinks, then the newer the better.
void triattention_recency_scores(const triattention_candidates & c, triattention_scores & out);

// Marks t (made contiguous: a view is no output of its own) as a graph output and adds it to the list.
inline void triattention_add_layer_output(ggml_context * g, ggml_cgraph * gf, std::vector<ggml_tensor *> & outputs,
                                          ggml_tensor * t) {
    if (t->view_src != nullptr) {
        t = ggml_cont(g, t);
    }
    ggml_set_output(t);
    ggml_build_forward_expand(gf, t);
    outputs.push_back(t);
}
