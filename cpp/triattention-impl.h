// Internal helpers shared by the TriAttention sources inside libllama.
#pragma once

#include "llama-context.h"
#include "llama-kv-cache.h"

#include "ggml-cpp.h"

#include <string>
#include <vector>

// Whether a graph node is a layer's query RoPE ("Qcur-<il>"): its output is the post-RoPE query,
// its src[0] the query fed to RoPE. triattention_layer_of gives <il> (-1 if the name has none).
bool triattention_is_query_rope(const ggml_tensor * t);
int  triattention_layer_of(const char * name);

// Records the message for triattention_last_error and returns -1.
int32_t triattention_fail(const std::string & message);

void triattention_clear_error();

// The KV cache that compression works on: the context's llama_kv_cache, or the full-attention
// part of a sliding-window model's two-part cache (llama_kv_cache_iswa); nullptr for recurrent or
// hybrid memory. Its layers are kv->get_layer_ids().
llama_kv_cache * triattention_kv_cache(const llama_context * ctx);

// The sliding-window part of a two-part cache, left to llama.cpp; nullptr for other memory.
llama_kv_cache * triattention_swa_cache(const llama_context * ctx);

// Runs graphs on the backends that hold a context's cache: one scheduler over every device
// with KV layers, plus the CPU. Created on first use, kept with the context.
struct triattention_runner {
    std::vector<ggml_backend_ptr> backends;
    ggml_backend_sched_ptr        sched;

    explicit triattention_runner(const llama_context * ctx);

    // Allocates gf, calls set_inputs, computes. Returns false on failure.
    template <typename F>
    bool run(ggml_cgraph * gf, F && set_inputs) {
        ggml_backend_sched_reset(sched.get());
        if (!ggml_backend_sched_alloc_graph(sched.get(), gf)) {
            return false;
        }
        set_inputs();
        return ggml_backend_sched_graph_compute(sched.get(), gf) == GGML_STATUS_SUCCESS;
    }
};

triattention_runner & triattention_runner_of(const llama_context * ctx);

// Layer il's cached keys as [head_dim, n_head_kv, n_cells] (cells [0, n_cells) of the first stream).
ggml_tensor * triattention_keys(ggml_context * g, const llama_kv_cache * kv, const llama_hparams & hp, int il,
                                int64_t n_cells);

// The scoring op over those keys, with the model's pair layout and the cache's K rotation.
ggml_tensor * triattention_score_keys(ggml_context * g, const llama_kv_cache * kv, const llama_hparams & hp, int il,
                                      ggml_tensor * keys, ggml_tensor * q, ggml_tensor * w);

constexpr int TRIATTENTION_MAX_NODE = 16384;  // nodes of a scoring or compaction graph

// A graph context for at most n_nodes nodes (tensors are not allocated).
ggml_context_ptr triattention_graph_context(size_t n_nodes);
