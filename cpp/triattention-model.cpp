// Model facts and RoPE frequencies, read from llama.cpp's own hyperparameters.
#include "triattention.h"

#include "llama-context.h"
#include "llama-model.h"

#include "ggml-backend.h"

#include <cmath>
#include <vector>

int32_t triattention_api_version(void) {
    return TRIATTENTION_API_VERSION;
}

int32_t triattention_model_head_dim(const llama_model * model) {
    return (int32_t) model->hparams.n_embd_head_k();
}

int32_t triattention_model_n_rot(const llama_model * model) {
    return (int32_t) model->hparams.n_rot();
}

// Mirrors ggml's rope_cache_init + rope_yarn (ggml-cpu/ops.cpp): the angle of pair i at
// position p is p * omega_i, so the frequency is the angle at p = 1.
int32_t triattention_rope_omega(const llama_context * ctx, int32_t il, float * omega) {
    const llama_model   & model   = ctx->get_model();
    const llama_hparams & hparams = model.hparams;
    const llama_cparams & cparams = ctx->get_cparams();
    if (il < 0 || il >= (int32_t) hparams.n_layer() || hparams.rope_type == LLAMA_ROPE_TYPE_NONE) {
        return -1;
    }
    const int   n_dims     = (int) hparams.n_rot(il);
    const int   head_dim   = (int) hparams.n_embd_head_k(il);
    const float freq_base  = model.get_rope_freq_base(cparams, il);
    const float freq_scale = model.get_rope_freq_scale(cparams, il);
    const float ext_factor = cparams.yarn_ext_factor;

    float corr_dims[2];
    ggml_rope_yarn_corr_dims(n_dims, cparams.n_ctx_orig_yarn, freq_base, cparams.yarn_beta_fast,
                             cparams.yarn_beta_slow, corr_dims);

    std::vector<float> factors;
    if (const ggml_tensor * t = model.get_rope_factors(cparams, il)) {
        factors.resize(ggml_nelements(t));
        ggml_backend_tensor_get(t, factors.data(), 0, ggml_nbytes(t));
    }

    for (int i = 0; i < head_dim / 2; ++i) {
        if (i >= n_dims / 2) {
            omega[i] = 0.0f;
            continue;
        }
        const double ff      = factors.empty() ? 1.0 : factors[i];
        const double extrap  = std::pow((double) freq_base, -2.0 * i / n_dims) / ff;
        double       theta   = freq_scale * extrap;
        if (ext_factor != 0.0f) {
            const double y    = (i - corr_dims[0]) / std::max(0.001f, corr_dims[1] - corr_dims[0]);
            const double ramp = (1.0 - std::min(1.0, std::max(0.0, y))) * ext_factor;
            theta = theta * (1.0 - ramp) + extrap * ramp;
        }
        omega[i] = (float) theta;
    }
    return 0;
}
