// CPU implementations of GGML_OP_TRIATTN_SCORE and GGML_OP_TRIATTN_ZMAX (see ggml.h).
#pragma once

#include "ggml-cpu-impl.h"

#ifdef __cplusplus
extern "C" {
#endif

void ggml_compute_forward_triattn_score(const struct ggml_compute_params * params, struct ggml_tensor * dst);
void ggml_compute_forward_triattn_zmax(const struct ggml_compute_params * params, struct ggml_tensor * dst);

#ifdef __cplusplus
}
#endif
