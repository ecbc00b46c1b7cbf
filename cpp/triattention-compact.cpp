#include "triattention-compact.h"

#include "llama-model.h"

#include <algorithm>

triattention_moves triattention_fill_holes(const std::vector<int32_t> & kept, int64_t n_rows, int32_t budget) {
    triattention_moves m;
    m.layout.assign(n_rows * budget, -1);
    std::vector<std::vector<int32_t>> from(n_rows), to(n_rows);
    for (int64_t r = 0; r < n_rows; ++r) {
        int32_t * cell = m.layout.data() + r * budget;
        for (int32_t j = 0; j < budget; ++j) {
            const int32_t i = kept[r * budget + j];
            if (i < budget) {
                cell[i] = i;
            } else {
                from[r].push_back(i);
            }
        }
        for (int32_t j = 0; j < budget; ++j) {
            if (cell[j] < 0) {
                to[r].push_back(j);
            }
        }
        GGML_ASSERT(from[r].size() == to[r].size());
        for (size_t k = 0; k < to[r].size(); ++k) {
            cell[to[r][k]] = from[r][k];
        }
        m.n = std::max(m.n, (int32_t) from[r].size());
    }
    m.src.resize(n_rows * m.n);
    m.dst.resize(n_rows * m.n);
    for (int64_t r = 0; r < n_rows; ++r) {
        const int32_t * cell = m.layout.data() + r * budget;
        int32_t stay = 0;
        while ((size_t) m.n > from[r].size() && cell[stay] != stay) {
            ++stay;  // exists: fewer than `budget` cells moved in
        }
        for (int32_t k = 0; k < m.n; ++k) {
            const bool moves = (size_t) k < from[r].size();
            m.src[r * m.n + k] = moves ? from[r][k] : stay;
            m.dst[r * m.n + k] = moves ? to[r][k] : stay;
        }
    }
    return m;
}

namespace {

// A tensor of another type over the same bytes as storage (for bit-exact row moves).
ggml_tensor * alias(ggml_context * g, ggml_tensor * storage, ggml_type type, int64_t ne0, int64_t ne1) {
    ggml_tensor * t = ggml_new_tensor_2d(g, type, ne0, ne1);
    GGML_ASSERT(ggml_nbytes(t) == ggml_nbytes(storage));
    ggml_backend_tensor_alloc(storage->buffer, t, storage->data);
    return t;
}

// 32-bit words read as pairs of f16 (a view, no conversion): set_rows copies f16 rows bit-exactly.
ggml_tensor * words_as_f16(ggml_context * g, ggml_tensor * words) {
    ggml_tensor * t = ggml_view_3d(g, words, words->ne[0], words->ne[1], words->ne[2], words->nb[1], words->nb[2], 0);
    t->type = GGML_TYPE_F16;
    t->ne[0] *= 2;
    t->nb[0] = sizeof(ggml_fp16_t);
    return t;
}

// One group's cell indices as graph inputs: per (KV head) row for K and V in rows, per (head,
// dimension) element for a transposed V.
struct group_indices {
    ggml_tensor * src = nullptr, * dst = nullptr, * src_el = nullptr, * dst_el = nullptr;
};

}  // namespace

// Rows are gathered as 32-bit words (any K/V type, quantized included, bit-exact) and scattered
// into the holes; a transposed V moves element by element in its own type.
bool triattention_compact(llama_context * ctx, llama_kv_cache * kv, const triattention_moves & m, int32_t n_groups) {
    if (m.n == 0) {
        return true;
    }
    const llama_hparams & hp = ctx->get_model().hparams;
    const std::vector<uint32_t> layers = kv->get_layer_ids();
    const int64_t n_head_kv = hp.n_head_kv(layers[0]);
    const int64_t kv_size = kv->get_size();
    const int64_t head_dim_v = hp.n_embd_head_v(layers[0]);
    const bool v_trans = kv->get_v_trans();

    ggml_context_ptr g = triattention_graph_context(TRIATTENTION_MAX_NODE);
    auto index = [&](int64_t ne1, int64_t ne2) {
        ggml_tensor * t = ggml_new_tensor_3d(g.get(), GGML_TYPE_I32, m.n, ne1, ne2);
        ggml_set_input(t);
        return t;
    };
    std::vector<group_indices> groups(n_groups);
    for (group_indices & gi : groups) {
        gi.src = index(n_head_kv, 1);
        gi.dst = index(n_head_kv, 1);
        if (v_trans) {
            gi.src_el = index(head_dim_v, n_head_kv);
            gi.dst_el = index(head_dim_v, n_head_kv);
        }
    }
    ggml_cgraph * gf = ggml_new_graph_custom(g.get(), TRIATTENTION_MAX_NODE, false);

    // `storage` laid out [row of one head][head][cell], viewed as [row][cell][head] in `type`
    auto rows_of = [&](ggml_tensor * storage, int64_t row_bytes, ggml_type type) {
        ggml_tensor * flat = alias(g.get(), storage, type, ggml_nbytes(storage) / ggml_type_size(type), 1);
        return ggml_permute(g.get(), ggml_view_3d(g.get(), flat, row_bytes / ggml_type_size(type), n_head_kv,
                                                   kv_size, row_bytes, storage->nb[1], 0), 0, 2, 1, 3);
    };
    auto move_rows = [&](ggml_tensor * storage, int64_t row_bytes, const group_indices & gi) {
        ggml_tensor * moved = ggml_get_rows(g.get(), rows_of(storage, row_bytes, GGML_TYPE_I32), gi.src);
        ggml_build_forward_expand(gf, ggml_set_rows(g.get(), rows_of(storage, row_bytes, GGML_TYPE_F16),
                                                    words_as_f16(g.get(), moved), gi.dst));
    };
    // a transposed V: [cell] runs per (head, dimension); one-element rows
    auto move_elements = [&](ggml_tensor * storage, const group_indices & gi) {
        const size_t es = ggml_type_size(storage->type);
        ggml_tensor * cells = ggml_view_4d(g.get(), storage, 1, kv_size, head_dim_v, n_head_kv, es, kv_size * es,
                                           head_dim_v * kv_size * es, 0);
        ggml_build_forward_expand(gf, ggml_set_rows(g.get(), cells, ggml_get_rows(g.get(), cells, gi.src_el), gi.dst_el));
    };

    for (size_t li = 0; li < layers.size(); ++li) {
        const int il = (int) layers[li];
        const group_indices & gi = groups[n_groups == 1 ? 0 : li];
        ggml_tensor * k = kv->get_k_storage(il);
        ggml_tensor * v = kv->get_v_storage(il);
        const int64_t k_row = ggml_row_size(k->type, hp.n_embd_head_k(il));
        const int64_t v_row = ggml_row_size(v->type, hp.n_embd_head_v(il));
        if (k_row % 4 != 0 || (!v_trans && v_row % 4 != 0)) {
            triattention_fail("a head's cached row is not a whole number of 32-bit words");
            return false;
        }
        if (hp.n_embd_head_v(il) != head_dim_v || hp.n_head_kv(il) != n_head_kv) {
            triattention_fail("layers differ in KV head count or V head size");
            return false;
        }
        move_rows(k, k_row, gi);
        if (v_trans) {
            move_elements(v, gi);
        } else {
            move_rows(v, v_row, gi);
        }
    }
    const bool ok = triattention_runner_of(ctx).run(gf, [&] {
        std::vector<int32_t> s, d;
        for (int32_t gr = 0; gr < n_groups; ++gr) {
            const int32_t * src = m.src.data() + (size_t) gr * n_head_kv * m.n;
            const int32_t * dst = m.dst.data() + (size_t) gr * n_head_kv * m.n;
            ggml_backend_tensor_set(groups[gr].src, src, 0, ggml_nbytes(groups[gr].src));
            ggml_backend_tensor_set(groups[gr].dst, dst, 0, ggml_nbytes(groups[gr].dst));
            if (v_trans) {
                s.resize(ggml_nelements(groups[gr].src_el));
                d.resize(s.size());
                for (int64_t hk = 0; hk < n_head_kv; ++hk) {
                    for (int64_t e = 0; e < head_dim_v; ++e) {
                        std::copy_n(src + hk * m.n, m.n, s.begin() + (hk * head_dim_v + e) * m.n);
                        std::copy_n(dst + hk * m.n, m.n, d.begin() + (hk * head_dim_v + e) * m.n);
                    }
                }
                ggml_backend_tensor_set(groups[gr].src_el, s.data(), 0, ggml_nbytes(groups[gr].src_el));
                ggml_backend_tensor_set(groups[gr].dst_el, d.data(), 0, ggml_nbytes(groups[gr].dst_el));
            }
        }
    });
    if (!ok) {
        triattention_fail("the compaction graph failed");
    }
    return ok;
}
