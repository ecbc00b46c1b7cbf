// TriAttention KV-cache compression for llama.cpp: the additive C API.
// Everything here is new API next to llama.h; no existing struct changes layout,
// so llama-cpp-python's bindings stay valid.
#pragma once

#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

// Version of this C API; bumped when a declaration here changes.
#define TRIATTENTION_API_VERSION 7
#define TRIATTENTION_MAX_CLUSTERS 64    // query clusters per head (triattention_set_clusters) at most
#define TRIATTENTION_MAX_HORIZON 65536  // the reference's largest future offset, 2^16: the default horizon

LLAMA_API int32_t triattention_api_version(void);

//
// Model facts the Python side cannot get from llama.h
//

LLAMA_API int32_t triattention_model_head_dim(const struct llama_model * model);  // per attention head (keys)
LLAMA_API int32_t triattention_model_n_rot(const struct llama_model * model);     // rotated dims of a head

// Angular frequency (radians per position) of every rotary pair of layer il, as the
// context's RoPE applies it (freq_base, freq_scale, YaRN mixing, rope_freqs factors).
// Writes head_dim/2 floats; pairs beyond n_rot/2 are not rotated and get 0.
// Returns 0, or -1 when il is out of range or the model has no RoPE.
LLAMA_API int32_t triattention_rope_omega(const struct llama_context * ctx, int32_t il, float * omega);

//
// Calibration: pre-RoPE query statistics, accumulated from the graph during llama_decode
//

struct triattention_calib;

// keep_last: also keep the last ubatch's pre- and post-RoPE queries of every layer (for tests).
LLAMA_API struct triattention_calib * triattention_calib_init(const struct llama_model * model, bool keep_last);
LLAMA_API void triattention_calib_free(struct triattention_calib * calib);

// Set these as cb_eval / cb_eval_user_data in llama_context_params.
LLAMA_API ggml_backend_sched_eval_callback triattention_calib_callback(void);

// Tokens accumulated so far (counted on layer 0); 0 before the first decode.
LLAMA_API int64_t triattention_calib_n_tokens(const struct triattention_calib * calib);

// First error seen by the callback (empty when none): the graph did not look as expected.
LLAMA_API const char * triattention_calib_error(const struct triattention_calib * calib);

// Per (layer, query head, pair), laid out [layer][head][pair], n_layer*n_head*head_dim/2 each:
// the complex mean of the pre-RoPE query and the mean of its magnitude.
LLAMA_API void triattention_calib_get(const struct triattention_calib * calib,
                                      float * q_mean_real, float * q_mean_imag, float * q_abs_mean);

// With keep_last: copy layer il's last captured queries, [token][head][head_dim] floats,
// into out (capacity n_max floats). Returns the number of tokens, or -1.
LLAMA_API int32_t triattention_calib_last(const struct triattention_calib * calib, int32_t il,
                                          bool post_rope, float * out, int64_t n_max);

//
// Scoring the cached keys
//

// Run the TriAttention scoring op (ggml_triattn_score) on layer il of the cache's stream of
// sequence 0, on the backend that holds the cache, with the given virtual queries
// q [n_head][head_dim] and norm weights w [n_head][head_dim/2] (unrotated basis).
// Cells [0, n_cells) are scored, n_cells = one past the last used cell; needs n_cells <= n_max.
// Writes scores [n_head][n_cells]; when not NULL, the cached keys as stored, converted to f32,
// [n_cells][n_head_kv*head_dim], and the cells' positions [n_cells] (-1 for an empty cell).
// Returns n_cells, or a negative value on error (see triattention_last_error).
LLAMA_API int32_t triattention_score_layer(struct llama_context * ctx, int32_t il, const float * q, const float * w,
                                           float * scores, float * keys, int32_t * pos, int32_t n_max);

// The cached K and V of layer il in cells [0, n_cells) of sequence 0's stream, converted to f32:
// k [n_cells][n_head_kv*head_dim] as stored (rotation included), v [n_cells][n_head_kv*head_dim_v]
// (un-transposed). Returns n_cells, or -1.
LLAMA_API int32_t triattention_cache_rows(struct llama_context * ctx, int32_t il, float * k, float * v, int32_t n_max);

// Whether the cache stores keys Walsh-Hadamard rotated (llama.cpp does so for quantized K types).
LLAMA_API bool triattention_cache_k_rotated(const struct llama_context * ctx);

//
// Compression of a context's KV cache
//

enum triattention_method {
    TRIATTENTION_METHOD_NONE      = 0,  // full cache
    TRIATTENTION_METHOD_TRI       = 1,  // TriAttention (needs centres)
    TRIATTENTION_METHOD_STREAMING = 2,  // 4 attention sinks + the most recent tokens
    TRIATTENTION_METHOD_KNORM     = 3,  // keep the keys with the smallest L2 norm
    TRIATTENTION_METHOD_RANDOM    = 4,  // uniform random eviction (seeded)
    TRIATTENTION_METHOD_SNAPKV    = 5,  // attention of the last 8 queries, max-pooled (kernel 7)
};

enum triattention_select {
    TRIATTENTION_SELECT_PER_HEAD       = 0,  // a kept set per KV head, shared by the layers (scores averaged)
    TRIATTENTION_SELECT_SHARED         = 1,  // one kept set for all heads and layers
    TRIATTENTION_SELECT_PER_LAYER_HEAD = 2,  // a kept set per (layer, KV head) from that layer's scores
};

struct triattention_params {
    int32_t  method;         // enum triattention_method
    int32_t  budget;         // cells kept per sequence after a compression
    int32_t  divide_length;  // compress when budget + divide_length cells are reached
    int32_t  select;         // enum triattention_select
    uint32_t seed;           // for TRIATTENTION_METHOD_RANDOM
    int32_t  keep_recent;    // the newest keep_recent tokens are never evicted (0: the method alone decides)
    int32_t  horizon;        // TRI: the virtual queries average the future offsets 1, 2, 4, ... up to this
                             // (the reference: 65536); a short one favours what the next queries need
    float    min_concentration;  // TRI: a (layer, KV head) whose query heads' mean calibrated concentration
                                 // R is below this is scored by recency (the attention sinks first) plus the
                                 // attention its latest 8 queries gave (snapkv's), each z-scored; the queries
                                 // of those layers are captured with the context's eval callback (0, the
                                 // default: none, as the reference)
};

struct triattention_stats {
    int64_t   compressions;
    int64_t   cells_evicted;
    double    seconds;         // wall time spent compressing
    llama_pos compressed_upto; // newest position at the last compression, -1 when none: a prefix of
                               // the history shorter than this is no longer held exactly
};

// Of the cache that compression works on: the context's KV cache, or for a sliding-window model
// (llama.cpp's two-part iSWA cache) the part of its full-attention layers.
struct triattention_cache_info {
    int32_t cells_used;          // of sequence 0's stream
    int32_t cells_span;          // one past its last used cell: the cells attention reads (before padding)
    int32_t cells_capacity;      // physical cells
    int64_t bytes;               // K and V of every layer in it, allocated
    int32_t swa_cells_capacity;  // the sliding-window part's cells (llama.cpp's own), 0 without one
    int64_t swa_bytes;           // and its K and V, allocated
};

LLAMA_API struct triattention_params triattention_default_params(void);

LLAMA_API struct triattention_cache_info triattention_get_cache_info(const struct llama_context * ctx);

// The model layers whose cache is compressed (every layer, or a sliding-window model's
// full-attention layers), ascending: writes at most n_max, returns how many there are.
LLAMA_API int32_t triattention_cache_layers(const struct llama_context * ctx, int32_t * layers, int32_t n_max);

// What cutting sequence 0 at pos keeps: the tokens below pos that every KV head (of every layer
// under per-layer-head selection) can keep, the fewest any of them holds. The next decode after
// such a cut compacts each head's tokens before the cut into that many cells.
LLAMA_API int32_t triattention_cells_before(const struct llama_context * ctx, llama_pos pos);

// Validates and sets the parameters (method NONE turns compression off). The context must
// hold a single sequence; budget + divide_length + n_ubatch must fit in its cells.
// Returns 0, or -1 (see triattention_last_error).
LLAMA_API int32_t triattention_set_params(struct llama_context * ctx, struct triattention_params params);

// The query centres, [n_layer][n_head][head_dim/2] each (as stored in the GGUF metadata). Set
// while method TRI is on, they choose its spread heads anew (min_concentration).
LLAMA_API int32_t triattention_set_centers(struct llama_context * ctx, const float * q_mean_real,
                                           const float * q_mean_imag, const float * q_abs_mean, int64_t n);

// The query clusters, [n_layer][n_head][n_clusters][head_dim/2] each: tri scores the keys against
// one virtual query per cluster and keeps a key's best (without clusters: the centres, one per head).
LLAMA_API int32_t triattention_set_clusters(struct llama_context * ctx, const float * q_mean_real,
                                            const float * q_mean_imag, const float * q_abs_mean, int32_t n_clusters,
                                            int64_t n);

// Compress sequence 0 to the budget now (when it holds more cells). Returns 0 or -1.
LLAMA_API int32_t triattention_compress(struct llama_context * ctx);

LLAMA_API struct triattention_stats triattention_get_stats(const struct llama_context * ctx);

// Positions [0, n) are never evicted (a prompt kept whole, as the reference does); 0 for none.
// n and the kept recent tokens (at least the newest one) must fit in the budget. Returns 0 or -1.
LLAMA_API int32_t triattention_set_keep_prefix(struct llama_context * ctx, llama_pos n);

// The cells that the last compression kept, [group][n_head_kv][budget] as cell indices before it,
// with one group per compressed layer under TRIATTENTION_SELECT_PER_LAYER_HEAD, else one.
// Returns the number written, or -1 when there was no compression.
LLAMA_API int32_t triattention_last_kept(const struct llama_context * ctx, int32_t * cells, int32_t n_max);

// What compaction recorded about the cells (each head's token positions), which a saved llama
// state needs beside it to continue exactly: its size, a copy of it, and restoring it.
LLAMA_API size_t  triattention_records_size(const struct llama_context * ctx);
LLAMA_API size_t  triattention_records_get(const struct llama_context * ctx, uint8_t * dst, size_t size);
LLAMA_API int32_t triattention_records_set(struct llama_context * ctx, const uint8_t * src, size_t size);

// The last error of this thread's TriAttention call, "" when none.
LLAMA_API const char * triattention_last_error(void);

#ifdef __cplusplus
}
#endif
