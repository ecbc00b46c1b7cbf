// ggml_triattn_score and ggml_triattn_zmax: the graph constructors of the TriAttention ops
// (declared in ggml.h by patches/0001; CPU in triattn-score-cpu.cpp, CUDA in triattn-score.cu).
#include "ggml.h"
#include "ggml-impl.h"

struct ggml_tensor * ggml_triattn_score(
        struct ggml_context * ctx,
        struct ggml_tensor  * k,
        struct ggml_tensor  * q,
        struct ggml_tensor  * w,
        bool                  neox,
        int                   n_rot,
        bool                  hadamard) {
    const int64_t head_dim = k->ne[0];
    GGML_ASSERT(q->type == GGML_TYPE_F32 && w->type == GGML_TYPE_F32);
    GGML_ASSERT(q->ne[0] == head_dim && head_dim % 2 == 0);
    GGML_ASSERT(q->ne[1] % k->ne[1] == 0);  // whole GQA groups
    GGML_ASSERT(w->ne[0] == head_dim / 2 && w->ne[1] == q->ne[1]);
    GGML_ASSERT(n_rot > 0 && n_rot <= head_dim && n_rot % 2 == 0);
    GGML_ASSERT(!hadamard || (head_dim & (head_dim - 1)) == 0);
    GGML_ASSERT(k->ne[3] == 1 && ggml_is_contiguous(q) && ggml_is_contiguous(w));
    GGML_ASSERT(k->nb[0] == ggml_type_size(k->type) && head_dim % ggml_blck_size(k->type) == 0);  // whole blocks per head

    struct ggml_tensor * result = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, k->ne[2], q->ne[1]);

    const int32_t params[] = { neox ? 1 : 0, n_rot, hadamard ? 1 : 0 };
    ggml_set_op_params(result, params, sizeof(params));

    result->op     = GGML_OP_TRIATTN_SCORE;
    result->src[0] = k;
    result->src[1] = q;
    result->src[2] = w;

    return result;
}

struct ggml_tensor * ggml_triattn_zmax(
        struct ggml_context * ctx,
        struct ggml_tensor  * s,
        struct ggml_tensor  * valid,
        int                   n_group) {
    GGML_ASSERT(s->type == GGML_TYPE_F32 && valid->type == GGML_TYPE_F32);
    GGML_ASSERT(ggml_is_contiguous(s) && ggml_is_contiguous(valid));
    GGML_ASSERT(s->ne[2] == 1 && s->ne[3] == 1 && ggml_nelements(valid) == s->ne[0]);
    GGML_ASSERT(n_group > 0 && s->ne[1] % n_group == 0);

    struct ggml_tensor * result = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, s->ne[0], s->ne[1] / n_group);

    const int32_t params[] = { n_group };
    ggml_set_op_params(result, params, sizeof(params));

    result->op     = GGML_OP_TRIATTN_ZMAX;
    result->src[0] = s;
    result->src[1] = valid;

    return result;
}
