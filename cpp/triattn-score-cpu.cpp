// CPU implementations of GGML_OP_TRIATTN_SCORE and GGML_OP_TRIATTN_ZMAX.
// Scoring: threads split the cells; a tile of cells' keys is converted to f32 features (the key,
// then its pair norms) once, and scored against a KV head's query rows in register blocks: with
// query clusters a KV head has dozens of rows, and one dot product per row was most of the time.
#include "triattn-score-cpu.h"
#include "triattn-hadamard.h"
#include "triattn-pairs.h"

#include "ggml.h"
#include "ggml-cpu.h"
#include "vec.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

constexpr int TILE_CELLS = 4;

struct score_shape {
    int     head_dim, n_feat;  // n_feat: head_dim key dims, then head_dim / 2 pair norms
    int64_t n_head_kv, n_kv, n_gqa;
    int64_t n_block;           // blocks of query rows per KV head
};

// The query rows of each KV head as [KV head][block][feature][ROWS], zero-padded to whole blocks:
// the dims of q, then the pair weights of w.
template <int ROWS>
std::vector<float> pack_queries(const ggml_tensor * q, const ggml_tensor * w, const score_shape & sh) {
    std::vector<float> packed((size_t) sh.n_head_kv * sh.n_block * sh.n_feat * ROWS, 0.0f);
    for (int64_t hk = 0; hk < sh.n_head_kv; ++hk) {
        for (int64_t j = 0; j < sh.n_gqa; ++j) {
            const int64_t h = hk * sh.n_gqa + j;
            const float * qh = (const float *) ((const char *) q->data + h * q->nb[1]);
            const float * wh = (const float *) ((const char *) w->data + h * w->nb[1]);
            float * dst = packed.data() + ((size_t) (hk * sh.n_block + j / ROWS) * sh.n_feat) * ROWS + j % ROWS;
            for (int i = 0; i < sh.n_feat; ++i) {
                dst[(size_t) i * ROWS] = i < sh.head_dim ? qh[i] : wh[i - sh.head_dim];
            }
        }
    }
    return packed;
}

// x = sqrt(x) elementwise, 8 at a time where AVX is: one scalar root per pair was a fifth of the
// scoring time.
void sqrt_in_place(float * x, int n) {
    int i = 0;
#if defined(__AVX2__) && defined(__FMA__)
    for (; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(x + i, _mm256_sqrt_ps(_mm256_loadu_ps(x + i)));
    }
#endif
    for (; i < n; ++i) {
        x[i] = std::sqrt(x[i]);
    }
}

// The features of the key of cell c in KV head hk.
void key_features(const ggml_tensor * k, int64_t c, int64_t hk, bool neox, int n_rot, bool hadamard,
                  const score_shape & sh, float * feat) {
    const char * row = (const char *) k->data + c * k->nb[2] + hk * k->nb[1];
    switch (k->type) {
        case GGML_TYPE_F32: std::copy((const float *) row, (const float *) row + sh.head_dim, feat); break;
        case GGML_TYPE_F16: ggml_cpu_fp16_to_fp32((const ggml_fp16_t *) row, feat, sh.head_dim); break;
        default:            ggml_get_type_traits(k->type)->to_float(row, feat, sh.head_dim); break;
    }
    if (hadamard) {
        triattn_fwht(feat, sh.head_dim);
    }
    float * norms = feat + sh.head_dim;
    for (int f = 0; f < sh.head_dim / 2; ++f) {
        int re, im;
        triattn_pair_dims(f, neox, n_rot, &re, &im);
        norms[f] = feat[re] * feat[re] + feat[im] * feat[im];
    }
    sqrt_in_place(norms, sh.head_dim / 2);
}

// acc[t][j] = sum_i feat[t][i] * p[i][j]: a tile of cells against a block of query rows.
template <int ROWS>
void tile_dot(const float * feat, int n_feat, const float * p, float (*acc)[ROWS]) {
#if defined(__AVX2__) && defined(__FMA__)
    // the accumulators stay in registers: TILE_CELLS x ROWS / 8 of them
    constexpr int NV = ROWS / 8;
    __m256 a[TILE_CELLS][NV];
    for (int t = 0; t < TILE_CELLS; ++t) {
        for (int v = 0; v < NV; ++v) {
            a[t][v] = _mm256_setzero_ps();
        }
    }
    for (int i = 0; i < n_feat; ++i) {
        __m256 pv[NV];
        for (int v = 0; v < NV; ++v) {
            pv[v] = _mm256_loadu_ps(p + (size_t) i * ROWS + 8 * v);
        }
        for (int t = 0; t < TILE_CELLS; ++t) {
            const __m256 x = _mm256_broadcast_ss(feat + (size_t) t * n_feat + i);
            for (int v = 0; v < NV; ++v) {
                a[t][v] = _mm256_fmadd_ps(x, pv[v], a[t][v]);
            }
        }
    }
    for (int t = 0; t < TILE_CELLS; ++t) {
        for (int v = 0; v < NV; ++v) {
            _mm256_storeu_ps(acc[t] + 8 * v, a[t][v]);
        }
    }
#else
    for (int t = 0; t < TILE_CELLS; ++t) {
        std::fill_n(acc[t], ROWS, 0.0f);
        for (int i = 0; i < n_feat; ++i) {
            for (int j = 0; j < ROWS; ++j) {
                acc[t][j] += feat[(size_t) t * n_feat + i] * p[(size_t) i * ROWS + j];
            }
        }
    }
#endif
}

template <int ROWS>
void score_cells(const ggml_compute_params * params, ggml_tensor * dst, score_shape sh) {
    sh.n_block = (sh.n_gqa + ROWS - 1) / ROWS;
    const ggml_tensor * k = dst->src[0];
    const bool neox     = ggml_get_op_params_i32(dst, 0) != 0;
    const int  n_rot    = ggml_get_op_params_i32(dst, 1);
    const bool hadamard = ggml_get_op_params_i32(dst, 2) != 0;

    const std::vector<float> packed = pack_queries<ROWS>(dst->src[1], dst->src[2], sh);
    std::vector<float> feat((size_t) TILE_CELLS * sh.n_feat);
    float * out = (float *) dst->data;

    const int64_t per_thread = (sh.n_kv + params->nth - 1) / params->nth;
    const int64_t c0 = per_thread * params->ith;
    const int64_t c1 = std::min(sh.n_kv, c0 + per_thread);
    for (int64_t c = c0; c < c1; c += TILE_CELLS) {
        const int n_cells = (int) std::min<int64_t>(TILE_CELLS, c1 - c);
        for (int64_t hk = 0; hk < sh.n_head_kv; ++hk) {
            for (int t = 0; t < TILE_CELLS; ++t) {
                if (t < n_cells) {
                    key_features(k, c + t, hk, neox, n_rot, hadamard, sh, feat.data() + (size_t) t * sh.n_feat);
                } else {
                    std::fill_n(feat.data() + (size_t) t * sh.n_feat, sh.n_feat, 0.0f);
                }
            }
            for (int64_t b = 0; b < sh.n_block; ++b) {
                const float * p = packed.data() + (size_t) (hk * sh.n_block + b) * sh.n_feat * ROWS;
                float acc[TILE_CELLS][ROWS];
                tile_dot<ROWS>(feat.data(), sh.n_feat, p, acc);
                const int n_rows = (int) std::min<int64_t>(ROWS, sh.n_gqa - b * ROWS);
                for (int j = 0; j < n_rows; ++j) {
                    float * o = out + (hk * sh.n_gqa + b * ROWS + j) * sh.n_kv + c;
                    for (int t = 0; t < n_cells; ++t) {
                        o[t] = acc[t][j];
                    }
                }
            }
        }
    }
}

}  // namespace

void ggml_compute_forward_triattn_score(const ggml_compute_params * params, ggml_tensor * dst) {
    const ggml_tensor * k = dst->src[0];
    const ggml_tensor * q = dst->src[1];
    score_shape sh;
    sh.head_dim  = (int) k->ne[0];
    sh.n_feat    = sh.head_dim + sh.head_dim / 2;
    sh.n_head_kv = k->ne[1];
    sh.n_kv      = k->ne[2];
    sh.n_gqa     = q->ne[1] / sh.n_head_kv;
    // 8 rows suit the few query heads of a GQA group; the dozens of rows of query clusters take
    // blocks of 16 or 24, whichever pads fewer (a padded row costs as much as a real one: SmolLM2's
    // 24 rows a KV head took 32 in blocks of 16)
    const auto padded = [&](int64_t rows) { return (sh.n_gqa + rows - 1) / rows * rows; };
    if (sh.n_gqa <= 8) {
        score_cells<8>(params, dst, sh);
    } else if (padded(24) < padded(16)) {
        score_cells<24>(params, dst, sh);
    } else {
        score_cells<16>(params, dst, sh);
    }
}

void ggml_compute_forward_triattn_zmax(const ggml_compute_params * params, ggml_tensor * dst) {
    const ggml_tensor * s     = dst->src[0];
    const ggml_tensor * valid = dst->src[1];
    const int64_t n_kv    = s->ne[0];
    const int64_t n_rows  = s->ne[1];
    const int64_t n_group = ggml_get_op_params_i32(dst, 0);
    const float * v = (const float *) valid->data;
    float * stats = (float *) params->wdata;  // [row]: mean, std + eps

    // threads split the rows for their statistics: products with valid, so an empty cell counts for nothing
    std::vector<float> centred(n_kv);
    float n_valid = 0.0f;
    ggml_vec_dot_f32((int) n_kv, &n_valid, 0, v, 0, v, 0, 1);
    for (int64_t r = params->ith; r < n_rows; r += params->nth) {
        const float * row = (const float *) s->data + r * n_kv;
        float sum = 0.0f, sum_sq = 0.0f;
        ggml_vec_dot_f32((int) n_kv, &sum, 0, row, 0, v, 0, 1);
        const float mean = sum / std::max(n_valid, 1.0f);
        for (int64_t c = 0; c < n_kv; ++c) {
            centred[c] = (row[c] - mean) * v[c];
        }
        ggml_vec_dot_f32((int) n_kv, &sum_sq, 0, centred.data(), 0, centred.data(), 0, 1);
        stats[2 * r]     = mean;
        stats[2 * r + 1] = std::sqrt(sum_sq / std::max(n_valid, 1.0f)) + 1e-6f;
    }
    ggml_barrier(params->threadpool);

    // then the cells for the maximum over each group's rows
    const int64_t per_thread = (n_kv + params->nth - 1) / params->nth;
    const int64_t c0 = per_thread * params->ith;
    const int64_t c1 = std::min(n_kv, c0 + per_thread);
    for (int64_t g = 0; g < n_rows / n_group; ++g) {
        float * out = (float *) dst->data + g * n_kv;
        std::fill(out + c0, out + std::max(c0, c1), -FLT_MAX);
        for (int64_t r = g * n_group; r < (g + 1) * n_group; ++r) {
            const float * row = (const float *) s->data + r * n_kv;
            const float mean = stats[2 * r], sd = stats[2 * r + 1];
            for (int64_t c = c0; c < c1; ++c) {
                const float z = (row[c] - mean) / sd;
                out[c] = z > out[c] ? z : out[c];  // NaN never wins, as in a max pool
            }
        }
        for (int64_t c = c0; c < c1; ++c) {
            out[c] = v[c] != 0.0f ? out[c] : 0.0f;
        }
    }
}
