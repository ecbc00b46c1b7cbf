// CUDA implementations of GGML_OP_TRIATTN_SCORE and GGML_OP_TRIATTN_ZMAX (see ggml.h).
#pragma once

#include "ggml-cuda/common.cuh"

bool ggml_cuda_triattn_score_supported(const ggml_tensor * op);

void ggml_cuda_op_triattn_score(ggml_backend_cuda_context & ctx, ggml_tensor * dst);

void ggml_cuda_op_triattn_zmax(ggml_backend_cuda_context & ctx, ggml_tensor * dst);
