// CPU implementation of GGML_OP_TRIATTN_SCORE: threads split the cells; each cached key
// row is converted to f32 once and scored against every query head of its GQA group.
#include "triattn-score-cpu.h"
#include "triattn-hadamard.h"
#include "triattn-pairs.h"

#include "ggml.h"
#include "ggml-cpu.h"
#include "vec.h"

#include <cmath>
#include <vector>

void ggml_compute_forward_triattn_score(const ggml_compute_params * params, ggml_tensor * dst) {
    const ggml_tensor * k = dst->src[0];
    const ggml_tensor * q = dst->src[1];
    const ggml_tensor * w = dst->src[2];

    const bool neox     = ggml_get_op_params_i32(dst, 0) != 0;
    const int  n_rot    = ggml_get_op_params_i32(dst, 1);
    const bool hadamard = ggml_get_op_params_i32(dst, 2) != 0;

    const int     head_dim  = (int) k->ne[0];
    const int     n_pairs   = head_dim / 2;
    const int64_t n_head_kv = k->ne[1];
    const int64_t n_kv      = k->ne[2];
    const int64_t n_head    = q->ne[1];
    const int64_t n_gqa     = n_head / n_head_kv;

    const ggml_to_float_t to_float = ggml_get_type_traits(k->type)->to_float;

    const int64_t per_thread = (n_kv + params->nth - 1) / params->nth;
    const int64_t c0 = per_thread * params->ith;
    const int64_t c1 = std::min(n_kv, c0 + per_thread);

    std::vector<float> key(head_dim);
    std::vector<float> norms(n_pairs);
    float * out = (float *) dst->data;

    for (int64_t c = c0; c < c1; ++c) {
        for (int64_t hk = 0; hk < n_head_kv; ++hk) {
            const char * row = (const char *) k->data + c * k->nb[2] + hk * k->nb[1];
            switch (k->type) {
                case GGML_TYPE_F32: std::copy((const float *) row, (const float *) row + head_dim, key.begin()); break;
                case GGML_TYPE_F16: ggml_cpu_fp16_to_fp32((const ggml_fp16_t *) row, key.data(), head_dim); break;
                default:            to_float(row, key.data(), head_dim); break;
            }
            if (hadamard) {
                triattn_fwht(key.data(), head_dim);
            }
            for (int f = 0; f < n_pairs; ++f) {
                int re, im;
                triattn_pair_dims(f, neox, n_rot, &re, &im);
                norms[f] = std::sqrt(key[re] * key[re] + key[im] * key[im]);
            }
            for (int64_t h = hk * n_gqa; h < (hk + 1) * n_gqa; ++h) {
                const float * qh = (const float *) ((const char *) q->data + h * q->nb[1]);
                const float * wh = (const float *) ((const char *) w->data + h * w->nb[1]);
                float trig, norm;
                ggml_vec_dot_f32(head_dim, &trig, 0, key.data(), 0, qh, 0, 1);
                ggml_vec_dot_f32(n_pairs, &norm, 0, norms.data(), 0, wh, 0, 1);
                out[h * n_kv + c] = trig + norm;
            }
        }
    }
}
