// Scoring a layer of a live KV cache with the ggml op, on the backend that holds the cache.
#include "triattention.h"

#include "llama-context.h"
#include "llama-kv-cache.h"
#include "llama-model.h"

#include "ggml-cpp.h"

#include <string>

static thread_local std::string g_last_error;

const char * triattention_last_error(void) {
    return g_last_error.c_str();
}

static int32_t fail(const std::string & message) {
    g_last_error = message;
    return -1;
}

static llama_kv_cache * kv_cache_of(const llama_context * ctx) {
    return dynamic_cast<llama_kv_cache *>(llama_get_memory(ctx));
}

bool triattention_cache_k_rotated(const llama_context * ctx) {
    const llama_kv_cache * kv = kv_cache_of(ctx);
    return kv != nullptr && kv->get_attn_rot_k();
}

int32_t triattention_score_layer(llama_context * ctx, int32_t il, const float * q, const float * w,
                                 float * scores, float * keys, int32_t * pos, int32_t n_max) {
    g_last_error.clear();
    llama_kv_cache * kv = kv_cache_of(ctx);
    if (kv == nullptr) {
        return fail("the context's memory is not a plain llama_kv_cache");
    }
    const llama_hparams & hp = ctx->get_model().hparams;
    if (il < 0 || il >= (int32_t) hp.n_layer()) {
        return fail("layer out of range");
    }
    const llama_kv_cells & cells = kv->get_cells(0);
    const int32_t n_cells = (int32_t) cells.used_max_p1();
    if (n_cells > n_max) {
        return fail("n_max is smaller than the number of cells");
    }
    if (n_cells == 0) {
        return 0;
    }
    ggml_tensor * k_store = kv->get_k_storage(il);
    const int64_t head_dim  = hp.n_embd_head_k(il);
    const int64_t n_head_kv = hp.n_head_kv(il);
    const int64_t n_head    = hp.n_head(il);

    ggml_init_params params = { 8 * ggml_tensor_overhead() + ggml_graph_overhead(), nullptr, true };
    ggml_context_ptr gctx(ggml_init(params));
    ggml_tensor * k_view = ggml_view_3d(gctx.get(), k_store, head_dim, n_head_kv, n_cells,
                                        ggml_row_size(k_store->type, head_dim), k_store->nb[1], 0);
    ggml_tensor * q_in = ggml_new_tensor_2d(gctx.get(), GGML_TYPE_F32, head_dim, n_head);
    ggml_tensor * w_in = ggml_new_tensor_2d(gctx.get(), GGML_TYPE_F32, head_dim / 2, n_head);
    ggml_set_input(q_in);
    ggml_set_input(w_in);
    ggml_tensor * out = ggml_triattn_score(gctx.get(), k_view, q_in, w_in, hp.rope_type == LLAMA_ROPE_TYPE_NEOX,
                                           (int) hp.n_rot(il), kv->get_attn_rot_k());
    ggml_set_output(out);
    ggml_cgraph * gf = ggml_new_graph(gctx.get());
    ggml_build_forward_expand(gf, out);
    ggml_tensor * keys_f32 = nullptr;
    if (keys != nullptr) {
        keys_f32 = ggml_cast(gctx.get(), k_view, GGML_TYPE_F32);
        ggml_set_output(keys_f32);
        ggml_build_forward_expand(gf, keys_f32);
    }

    // A backend of the device whose buffer holds this layer's keys (host buffers have no device).
    ggml_backend_dev_t dev = ggml_backend_buffer_is_host(k_store->buffer)
        ? ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)
        : ggml_backend_buft_get_device(ggml_backend_buffer_get_type(k_store->buffer));
    ggml_backend_ptr backend(ggml_backend_dev_init(dev, nullptr));
    if (!backend) {
        return fail(std::string("could not start a backend on ") + ggml_backend_dev_name(dev));
    }
    ggml_gallocr_ptr alloc(ggml_gallocr_new(ggml_backend_get_default_buffer_type(backend.get())));
    if (!ggml_gallocr_alloc_graph(alloc.get(), gf)) {
        return fail("could not allocate the scoring graph");
    }
    ggml_backend_tensor_set(q_in, q, 0, ggml_nbytes(q_in));
    ggml_backend_tensor_set(w_in, w, 0, ggml_nbytes(w_in));
    if (ggml_backend_graph_compute(backend.get(), gf) != GGML_STATUS_SUCCESS) {
        return fail("the scoring graph failed to compute");
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
