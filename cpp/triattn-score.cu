// CUDA implementation of GGML_OP_TRIATTN_SCORE: the cached keys are converted to f32 with
// ggml's own dequantizers, then one block scores one cell for every query head.
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
