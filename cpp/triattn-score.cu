// CUDA implementations of GGML_OP_TRIATTN_SCORE: the cached keys are converted to f32 with
// ggml's own dequantizers, then one block scores one cell for every query head; and of
// GGML_OP_TRIATTN_ZMAX: one block per row for its statistics, then one thread per cell and group.
#include "triattn-score.cuh"
#include "triattn-pairs.h"

#include "ggml-cuda/convert.cuh"

#define TRIATTN_BLOCK 128

bool ggml_cuda_triattn_score_supported(const ggml_tensor * op) {
    const ggml_tensor * k = op->src[0];
    return ggml_is_contiguous(k) && (k->type == GGML_TYPE_F32 || ggml_get_to_fp32_cuda(k->type) != nullptr);
}

// keys: [n_kv][n_head_kv][head_dim] f32; out: [n_head][n_kv]
static __global__ void triattn_score_kernel(
        const float * __restrict__ keys, const float * __restrict__ q, const float * __restrict__ w,
        float * __restrict__ out, const int head_dim, const int n_head_kv, const int n_head, const int n_kv,
        const bool neox, const int n_rot, const bool hadamard) {
    extern __shared__ float smem[];
    const int c        = blockIdx.x;
    const int row_len  = n_head_kv * head_dim;
    const int n_pairs  = head_dim / 2;
    float * key   = smem;            // [n_head_kv][head_dim]
    float * norms = smem + row_len;  // [n_head_kv][n_pairs]

    for (int i = threadIdx.x; i < row_len; i += blockDim.x) {
        key[i] = keys[(int64_t) c * row_len + i];
    }
    __syncthreads();

    if (hadamard) {  // orthonormal Walsh-Hadamard per head, Sylvester order
        for (int len = 1; len < head_dim; len <<= 1) {
            for (int b = threadIdx.x; b < n_head_kv * n_pairs; b += blockDim.x) {
                const int hk = b / n_pairs;
                const int t  = b % n_pairs;
                const int j  = (t / len) * (len << 1) + (t % len);
                float * x = key + hk * head_dim;
                const float u = x[j];
                const float v = x[j + len];
                x[j]       = u + v;
                x[j + len] = u - v;
            }
            __syncthreads();
        }
        const float scale = rsqrtf((float) head_dim);
        for (int i = threadIdx.x; i < row_len; i += blockDim.x) {
            key[i] *= scale;
        }
        __syncthreads();
    }

    for (int b = threadIdx.x; b < n_head_kv * n_pairs; b += blockDim.x) {
        const int hk = b / n_pairs;
        const int f  = b % n_pairs;
        int re, im;
        triattn_pair_dims(f, neox, n_rot, &re, &im);
        const float * x = key + hk * head_dim;
        norms[b] = sqrtf(x[re] * x[re] + x[im] * x[im]);
    }
    __syncthreads();

    const int warp    = threadIdx.x / WARP_SIZE;
    const int lane    = threadIdx.x % WARP_SIZE;
    const int n_warps = blockDim.x / WARP_SIZE;
    const int n_gqa   = n_head / n_head_kv;
    for (int h = warp; h < n_head; h += n_warps) {
        const int hk = h / n_gqa;
        float s = 0.0f;
        for (int i = lane; i < head_dim; i += WARP_SIZE) {
            s += key[hk * head_dim + i] * q[h * head_dim + i];
        }
        for (int f = lane; f < n_pairs; f += WARP_SIZE) {
            s += w[h * n_pairs + f] * norms[hk * n_pairs + f];
        }
        s = warp_reduce_sum(s);
        if (lane == 0) {
            out[(int64_t) h * n_kv + c] = s;
        }
    }
}

void ggml_cuda_op_triattn_score(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const ggml_tensor * k = dst->src[0];
    const ggml_tensor * q = dst->src[1];
    const ggml_tensor * w = dst->src[2];
    GGML_ASSERT(ggml_cuda_triattn_score_supported(dst));

    const int head_dim  = (int) k->ne[0];
    const int n_head_kv = (int) k->ne[1];
    const int n_kv      = (int) k->ne[2];
    const int n_head    = (int) q->ne[1];
    if (n_kv == 0) {
        return;
    }
    cudaStream_t stream = ctx.stream();

    const float * keys = (const float *) k->data;
    ggml_cuda_pool_alloc<float> converted(ctx.pool());
    if (k->type != GGML_TYPE_F32) {
        converted.alloc(ggml_nelements(k));
        ggml_get_to_fp32_cuda(k->type)(k->data, converted.get(), ggml_nelements(k), stream);
        keys = converted.get();
    }

    const size_t smem = (size_t) n_head_kv * (head_dim + head_dim / 2) * sizeof(float);
    triattn_score_kernel<<<n_kv, TRIATTN_BLOCK, smem, stream>>>(
        keys, (const float *) q->data, (const float *) w->data, (float *) dst->data,
        head_dim, n_head_kv, n_head, n_kv,
        ggml_get_op_params_i32(dst, 0) != 0, ggml_get_op_params_i32(dst, 1), ggml_get_op_params_i32(dst, 2) != 0);
    CUDA_CHECK(cudaGetLastError());
}

#define TRIATTN_ZMAX_BLOCK 256

// The sum of x over the block, in every thread; shared holds one float per warp.
static __device__ float triattn_block_sum(float x, float * shared) {
    const int warp = threadIdx.x / WARP_SIZE;
    const int lane = threadIdx.x % WARP_SIZE;
    x = warp_reduce_sum(x);
    if (lane == 0) {
        shared[warp] = x;
    }
    __syncthreads();
    x = lane < (int) (blockDim.x / WARP_SIZE) ? shared[lane] : 0.0f;
    x = warp_reduce_sum(x);
    __syncthreads();  // shared is reused by the next call
    return x;
}

// s: [n_rows][n_kv]; stats: [row] mean, std + eps over the valid cells (products with valid, as the
// CPU's)
static __global__ void triattn_zstats_kernel(const float * __restrict__ s, const float * __restrict__ valid,
                                             float * __restrict__ stats, const int n_kv) {
    __shared__ float shared[TRIATTN_ZMAX_BLOCK / WARP_SIZE];
    const float * row = s + (int64_t) blockIdx.x * n_kv;
    float sum = 0.0f, n = 0.0f;
    for (int c = threadIdx.x; c < n_kv; c += blockDim.x) {
        sum += row[c] * valid[c];
        n   += valid[c] * valid[c];
    }
    sum = triattn_block_sum(sum, shared);
    n   = fmaxf(triattn_block_sum(n, shared), 1.0f);
    const float mean = sum / n;
    float sum_sq = 0.0f;
    for (int c = threadIdx.x; c < n_kv; c += blockDim.x) {
        const float d = (row[c] - mean) * valid[c];
        sum_sq += d * d;
    }
    sum_sq = triattn_block_sum(sum_sq, shared);
    if (threadIdx.x == 0) {
        stats[2 * blockIdx.x]     = mean;
        stats[2 * blockIdx.x + 1] = sqrtf(sum_sq / n) + 1e-6f;
    }
}

// out: [n_out][n_kv], the maximum of the z-scores over each group's n_group rows; 0 for an empty cell
static __global__ void triattn_zmax_kernel(const float * __restrict__ s, const float * __restrict__ valid,
                                           const float * __restrict__ stats, float * __restrict__ out,
                                           const int n_kv, const int n_group, const int n_out) {
    const int64_t i = (int64_t) blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (int64_t) n_kv * n_out) {
        return;
    }
    const int c = (int) (i % n_kv);
    const int g = (int) (i / n_kv);
    float m = -FLT_MAX;
    for (int r = g * n_group; r < (g + 1) * n_group; ++r) {
        const float z = (s[(int64_t) r * n_kv + c] - stats[2 * r]) / stats[2 * r + 1];
        m = z > m ? z : m;  // NaN never wins, as in a max pool
    }
    out[i] = valid[c] != 0.0f ? m : 0.0f;
}

void ggml_cuda_op_triattn_zmax(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const ggml_tensor * s     = dst->src[0];
    const ggml_tensor * valid = dst->src[1];
    const int n_kv    = (int) s->ne[0];
    const int n_rows  = (int) s->ne[1];
    const int n_group = ggml_get_op_params_i32(dst, 0);
    const int n_out   = n_rows / n_group;
    if (n_kv == 0) {
        return;
    }
    cudaStream_t stream = ctx.stream();
    ggml_cuda_pool_alloc<float> stats(ctx.pool(), 2 * (size_t) n_rows);
    triattn_zstats_kernel<<<n_rows, TRIATTN_ZMAX_BLOCK, 0, stream>>>(
        (const float *) s->data, (const float *) valid->data, stats.get(), n_kv);
    const int64_t n = (int64_t) n_kv * n_out;
    triattn_zmax_kernel<<<(n + TRIATTN_ZMAX_BLOCK - 1) / TRIATTN_ZMAX_BLOCK, TRIATTN_ZMAX_BLOCK, 0, stream>>>(
        (const float *) s->data, (const float *) valid->data, stats.get(), (float *) dst->data, n_kv, n_group, n_out);
    CUDA_CHECK(cudaGetLastError());
}
