// Scoring one layer of a live KV cache with the ggml op (for tests and diagnostics).
#include "triattention.h"
#include "triattention-impl.h"

#include "llama-model.h"

#include <algorithm>

// K and V of every layer of one cache, allocated
static int64_t cache_bytes(const llama_kv_cache * kv) {
    int64_t bytes = 0;
    for (uint32_t il : kv->get_layer_ids()) {
        bytes += ggml_nbytes(kv->get_k_storage((int32_t) il)) + ggml_nbytes(kv->get_v_storage((int32_t) il));
    }
    return bytes;
}

triattention_cache_info triattention_get_cache_info(const llama_context * ctx) {
    triattention_cache_info info{0, 0, 0, 0, 0, 0};
    if (const llama_kv_cache * kv = triattention_kv_cache(ctx)) {
        info.cells_used     = (int32_t) kv->get_cells(0).get_used();
        info.cells_span     = (int32_t) kv->get_cells(0).used_max_p1();
        info.cells_capacity = (int32_t) kv->get_size();
        info.bytes          = cache_bytes(kv);
    }
    if (const llama_kv_cache * swa = triattention_swa_cache(ctx)) {
        info.swa_cells_capacity = (int32_t) swa->get_size();
        info.swa_bytes          = cache_bytes(swa);
    }
    return info;
}

int32_t triattention_cache_layers(const llama_context * ctx, int32_t * layers, int32_t n_max) {
    const llama_kv_cache * kv = triattention_kv_cache(ctx);
    if (kv == nullptr) {
        return 0;
    }
    const std::vector<uint32_t> ids = kv->get_layer_ids();
    for (int32_t i = 0; i < (int32_t) ids.size() && i < n_max; ++i) {
        layers[i] = (int32_t) ids[i];
    }
    return (int32_t) ids.size();
}

ggml_tensor * triattention_keys(ggml_context * g, const llama_kv_cache * kv, const llama_hparams & hp, int il,
                                int64_t n_cells) {
    ggml_tensor * k = kv->get_k_storage(il);
    const int64_t head_dim = hp.n_embd_head_k(il);
    return ggml_view_3d(g, k, head_dim, hp.n_head_kv(il), n_cells, ggml_row_size(k->type, head_dim), k->nb[1], 0);
}

ggml_tensor * triattention_score_keys(ggml_context * g, const llama_kv_cache * kv, const llama_hparams & hp, int il,
                                      ggml_tensor * keys, ggml_tensor * q, ggml_tensor * w) {
    return ggml_triattn_score(g, keys, q, w, hp.rope_type == LLAMA_ROPE_TYPE_NEOX, (int) hp.n_rot(il),
                              kv->get_attn_rot_k());
}

bool triattention_cache_k_rotated(const llama_context * ctx) {
    const llama_kv_cache * kv = triattention_kv_cache(ctx);
    return kv != nullptr && kv->get_attn_rot_k();
}

// The cache and the number of cells [0, n_cells) of sequence 0's stream to read from layer il;
// returns -1 on bad arguments, 0 when there is nothing to read, else n_cells.
static int32_t cells_to_read(llama_context * ctx, int32_t il, int32_t n_max, llama_kv_cache ** kv_out) {
    triattention_clear_error();
    llama_kv_cache * kv = triattention_kv_cache(ctx);
    if (kv == nullptr) {
        return triattention_fail("the context has no KV cache of attention layers (recurrent or hybrid memory)");
    }
    const std::vector<uint32_t> layers = kv->get_layer_ids();
    if (std::find(layers.begin(), layers.end(), (uint32_t) il) == layers.end()) {
        return triattention_fail("layer " + std::to_string(il) + " is not in the compressed cache "
                                 "(out of range, or a sliding-window layer)");
    }
    const int32_t n_cells = (int32_t) kv->get_cells(0).used_max_p1();
    if (n_cells > n_max) {
        return triattention_fail("n_max is smaller than the number of cells");
    }
    llama_synchronize(ctx);
    *kv_out = kv;
    return n_cells;
}

int32_t triattention_score_layer(llama_context * ctx, int32_t il, const float * q, const float * w,
                                 float * scores, float * keys, int32_t * pos, int32_t n_max) {
    llama_kv_cache * kv = nullptr;
    const int32_t n_cells = cells_to_read(ctx, il, n_max, &kv);
    if (n_cells <= 0) {
        return n_cells;
    }
    const llama_hparams & hp = ctx->get_model().hparams;
    const llama_kv_cells & cells = kv->get_cells(0);
    const int64_t head_dim = hp.n_embd_head_k(il);
    const int64_t n_head   = hp.n_head(il);

    ggml_context_ptr g = triattention_graph_context(16);
    ggml_tensor * k_view = triattention_keys(g.get(), kv, hp, il, n_cells);
    ggml_tensor * q_in = ggml_new_tensor_2d(g.get(), GGML_TYPE_F32, head_dim, n_head);
    ggml_tensor * w_in = ggml_new_tensor_2d(g.get(), GGML_TYPE_F32, head_dim / 2, n_head);
    ggml_set_input(q_in);
    ggml_set_input(w_in);
    ggml_tensor * out = triattention_score_keys(g.get(), kv, hp, il, k_view, q_in, w_in);
    ggml_set_output(out);
    ggml_cgraph * gf = ggml_new_graph_custom(g.get(), 16, false);
    ggml_build_forward_expand(gf, out);
    ggml_tensor * keys_f32 = nullptr;
    if (keys != nullptr) {
        keys_f32 = ggml_cast(g.get(), k_view, GGML_TYPE_F32);
        ggml_set_output(keys_f32);
        ggml_build_forward_expand(gf, keys_f32);
    }
    const bool ok = triattention_runner_of(ctx).run(gf, [&] {
        ggml_backend_tensor_set(q_in, q, 0, ggml_nbytes(q_in));
        ggml_backend_tensor_set(w_in, w, 0, ggml_nbytes(w_in));
    });
    if (!ok) {
        return triattention_fail("the scoring graph failed to compute");
    }
    ggml_backend_tensor_get(out, scores, 0, ggml_nbytes(out));
    if (keys_f32 != nullptr) {
        ggml_backend_tensor_get(keys_f32, keys, 0, ggml_nbytes(keys_f32));
    }
    if (pos != nullptr) {
        for (int32_t i = 0; i < n_cells; ++i) {
            pos[i] = cells.is_empty(i) ? -1 : cells.pos_get(i);
        }
    }
    return n_cells;
}

int32_t triattention_cache_rows(llama_context * ctx, int32_t il, float * k, float * v, int32_t n_max) {
    llama_kv_cache * kv = nullptr;
    const int32_t n_cells = cells_to_read(ctx, il, n_max, &kv);
    if (n_cells <= 0) {
        return n_cells;
    }
    ggml_tensor * ks = kv->get_k_storage(il);
    ggml_tensor * vs = kv->get_v_storage(il);
    ggml_context_ptr g = triattention_graph_context(16);
    ggml_tensor * k_rows = ggml_cast(g.get(), ggml_view_2d(g.get(), ks, ks->ne[0], n_cells, ks->nb[1], 0), GGML_TYPE_F32);
    ggml_tensor * v_view = kv->get_v_trans()
        // transposed V: each dimension is a run of kv_size cells
        ? ggml_cont(g.get(), ggml_transpose(g.get(), ggml_view_2d(g.get(), vs, n_cells, vs->ne[0],
                                                                   kv->get_size() * ggml_type_size(vs->type), 0)))
        : ggml_view_2d(g.get(), vs, vs->ne[0], n_cells, vs->nb[1], 0);
    ggml_tensor * v_rows = ggml_cast(g.get(), v_view, GGML_TYPE_F32);
    ggml_set_output(k_rows);
    ggml_set_output(v_rows);
    ggml_cgraph * gf = ggml_new_graph_custom(g.get(), 16, false);
    ggml_build_forward_expand(gf, k_rows);
    ggml_build_forward_expand(gf, v_rows);
    if (!triattention_runner_of(ctx).run(gf, [] {})) {
        return triattention_fail("the read graph failed to compute");
    }
    ggml_backend_tensor_get(k_rows, k, 0, ggml_nbytes(k_rows));
    ggml_backend_tensor_get(v_rows, v, 0, ggml_nbytes(v_rows));
    return n_cells;
}
