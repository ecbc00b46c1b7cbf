// Calibration: the centre of the pre-RoPE queries, per (layer, query head, rotary pair).
//
// The eval callback watches every node named "Qcur*". A query ROPE node ("Qcur-<il>") names
// its input as src[0]; that input was computed (and copied here) before the ROPE ran, so the
// copy is exactly the query fed to RoPE, even when the allocator lets RoPE work in place.
#include "triattention.h"
#include "triattention-impl.h"
#include "triattn-pairs.h"

#include "llama-model.h"

#include "ggml-backend.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

struct triattention_captured {
    std::vector<float> data;  // [token][head][head_dim]
    int64_t            n_tokens = 0;
};
using captured = triattention_captured;

struct triattention_calib {
    int32_t n_layer;
    int32_t n_head;
    int32_t head_dim;
    int32_t n_rot;
    bool    neox;
    bool    keep_last;

    std::vector<double> sum_re, sum_im, sum_abs;  // [layer][head][pair]
    std::vector<int64_t> n_tokens;                // per layer

    std::map<const ggml_tensor *, captured> pending;  // "Qcur*" nodes of the current graph
    std::vector<captured> last_pre, last_post;        // per layer, with keep_last
    std::string error;

    int pairs() const { return head_dim / 2; }
};

int triattention_layer_of(const char * name) {
    const char * dash = std::strrchr(name, '-');
    return dash ? std::atoi(dash + 1) : -1;
}

bool triattention_is_query_rope(const ggml_tensor * t) {
    return t->op == GGML_OP_ROPE && std::strncmp(t->name, "Qcur-", 5) == 0;
}

// Copy a [head_dim, n_head, n_tokens] f32 tensor (possibly a strided view) to host, packed.
static bool copy_queries(const ggml_tensor * t, captured & out) {
    if (t->type != GGML_TYPE_F32 || t->nb[0] != sizeof(float)) {
        return false;
    }
    const int64_t row = t->ne[0];
    const int64_t n_rows_per_token = t->ne[1];
    out.n_tokens = t->ne[2] * t->ne[3];
    out.data.resize(row * n_rows_per_token * out.n_tokens);
    if (ggml_is_contiguous(t)) {
        ggml_backend_tensor_get(t, out.data.data(), 0, ggml_nbytes(t));
        return true;
    }
    float * dst = out.data.data();
    for (int64_t i3 = 0; i3 < t->ne[3]; ++i3) {
        for (int64_t i2 = 0; i2 < t->ne[2]; ++i2) {
            for (int64_t i1 = 0; i1 < t->ne[1]; ++i1, dst += row) {
                ggml_backend_tensor_get(t, dst, i1 * t->nb[1] + i2 * t->nb[2] + i3 * t->nb[3], row * sizeof(float));
            }
        }
    }
    return true;
}

static void accumulate(triattention_calib & c, int il, const captured & q) {
    const int F = c.pairs();
    for (int64_t tok = 0; tok < q.n_tokens; ++tok) {
        for (int h = 0; h < c.n_head; ++h) {
            const float * x = q.data.data() + (tok * c.n_head + h) * c.head_dim;
            double * re_acc  = c.sum_re.data()  + ((size_t) il * c.n_head + h) * F;
            double * im_acc  = c.sum_im.data()  + ((size_t) il * c.n_head + h) * F;
            double * abs_acc = c.sum_abs.data() + ((size_t) il * c.n_head + h) * F;
            for (int f = 0; f < F; ++f) {
                int i_re, i_im;
                triattn_pair_dims(f, c.neox, c.n_rot, &i_re, &i_im);
                const double re = x[i_re];
                const double im = x[i_im];
                re_acc[f]  += re;
                im_acc[f]  += im;
                abs_acc[f] += std::sqrt(re * re + im * im);
            }
        }
    }
    c.n_tokens[il] += q.n_tokens;
}

static bool calib_callback(ggml_tensor * t, bool ask, void * user_data) {
    auto & c = *static_cast<triattention_calib *>(user_data);
    if (std::strncmp(t->name, "Qcur", 4) != 0) {
        return false;
    }
    if (!triattention_is_query_rope(t)) {
        // A candidate input of the query RoPE: copy it once it is computed.
        if (!ask) {
            captured & slot = c.pending[t];
            if (!copy_queries(t, slot)) {
                c.pending.erase(t);
            }
        }
        return true;
    }
    const int il = triattention_layer_of(t->name);
    if (ask) {
        auto it = c.pending.find(t->src[0]);
        if (il < 0 || il >= c.n_layer) {
            c.error = std::string("query RoPE node with an unexpected name: ") + t->name;
        } else if (it == c.pending.end() || it->second.n_tokens == 0) {
            c.error = std::string("the input of ") + t->name + " (" + t->src[0]->name +
                      ") was not captured as a float32 query";
        } else if (t->src[0]->ne[0] != c.head_dim || t->src[0]->ne[1] != c.n_head) {
            c.error = std::string(t->name) + " does not have head_dim x n_head = " + std::to_string(c.head_dim) +
                      " x " + std::to_string(c.n_head);
        } else {
            accumulate(c, il, it->second);
            if (c.keep_last) {
                c.last_pre[il] = std::move(it->second);
            }
        }
        c.pending.clear();
        return c.keep_last;
    }
    copy_queries(t, c.last_post[il]);
    return true;
}

triattention_calib * triattention_calib_init(const llama_model * model, bool keep_last) {
    const llama_hparams & hp = model->hparams;
    if (hp.rope_type == LLAMA_ROPE_TYPE_NONE) {
        return nullptr;
    }
    auto * c = new triattention_calib;
    c->n_layer   = (int32_t) hp.n_layer();
    c->n_head    = (int32_t) hp.n_head();
    c->head_dim  = (int32_t) hp.n_embd_head_k();
    c->n_rot     = (int32_t) hp.n_rot();
    c->neox      = hp.rope_type == LLAMA_ROPE_TYPE_NEOX;
    c->keep_last = keep_last;
    const size_t n = (size_t) c->n_layer * c->n_head * c->pairs();
    c->sum_re.assign(n, 0.0);
    c->sum_im.assign(n, 0.0);
    c->sum_abs.assign(n, 0.0);
    c->n_tokens.assign(c->n_layer, 0);
    c->last_pre.resize(c->n_layer);
    c->last_post.resize(c->n_layer);
    return c;
}

void triattention_calib_free(triattention_calib * calib) {
    delete calib;
}

ggml_backend_sched_eval_callback triattention_calib_callback(void) {
    return calib_callback;
}

int64_t triattention_calib_n_tokens(const triattention_calib * calib) {
    return calib->n_tokens[0];
}

const char * triattention_calib_error(const triattention_calib * calib) {
    return calib->error.c_str();
}

void triattention_calib_get(const triattention_calib * c, float * q_mean_real, float * q_mean_imag, float * q_abs_mean) {
    const int F = c->pairs();
    for (int il = 0; il < c->n_layer; ++il) {
        const double n = c->n_tokens[il] > 0 ? (double) c->n_tokens[il] : 1.0;
        for (size_t i = (size_t) il * c->n_head * F; i < (size_t) (il + 1) * c->n_head * F; ++i) {
            q_mean_real[i] = (float) (c->sum_re[i] / n);
            q_mean_imag[i] = (float) (c->sum_im[i] / n);
            q_abs_mean[i]  = (float) (c->sum_abs[i] / n);
        }
    }
}

int32_t triattention_calib_last(const triattention_calib * c, int32_t il, bool post_rope, float * out, int64_t n_max) {
    if (!c->keep_last || il < 0 || il >= c->n_layer) {
        return -1;
    }
    const captured & q = post_rope ? c->last_post[il] : c->last_pre[il];
    if ((int64_t) q.data.size() > n_max) {
        return -1;
    }
    std::memcpy(out, q.data.data(), q.data.size() * sizeof(float));
    return (int32_t) q.n_tokens;
}
