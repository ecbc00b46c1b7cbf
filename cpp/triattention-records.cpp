#include "triattention-records.h"

#include <algorithm>

triattention_records::truncation triattention_records::truncation_at(const llama_kv_cells & cells,
                                                                     llama_pos next) const {
    // the cell of the newest compacted token keeps it unless the cut came before it
    const llama_pos last = cells.seq_pos_max(0);
    if (compressed_upto < 0 || last >= compressed_upto) {
        return truncation::none;
    }
    return last < 0 && next <= 0 ? truncation::cleared : truncation::cut;
}

std::vector<int32_t> triattention_records::serialize() const {
    std::vector<int32_t> out = { n_groups, n_head_kv, n_cells(), compressed_upto };
    out.insert(out.end(), cell_pos.begin(), cell_pos.end());
    out.insert(out.end(), head_pos.begin(), head_pos.end());
    return out;
}

bool triattention_records::deserialize(const std::vector<int32_t> & rec, int32_t n_head_kv_model, int32_t n_layer) {
    if (rec.size() < 4) {
        return false;
    }
    const int64_t groups = rec[0], heads = rec[1], cells = rec[2];
    if (groups < 0 || heads < 0 || cells < 0 || (int64_t) rec.size() != 4 + cells * (1 + groups * heads)) {
        return false;
    }
    if (cells > 0 && (heads != n_head_kv_model || (groups != 1 && groups != n_layer))) {
        return false;
    }
    n_groups        = (int32_t) groups;
    n_head_kv       = (int32_t) heads;
    compressed_upto = rec[3];
    cell_pos.assign(rec.begin() + 4, rec.begin() + 4 + cells);
    head_pos.assign(rec.begin() + 4 + cells, rec.end());
    return true;
}

triattention_candidates triattention_gather(const triattention_records & rec, const llama_kv_cells & cells,
                                            int32_t n_head_kv, int32_t n_groups, llama_pos before) {
    triattention_candidates c;
    c.n_kv      = (int32_t) std::max<uint32_t>(cells.used_max_p1(), before >= 0 ? rec.n_cells() : 0);
    c.n_groups  = n_groups;
    c.n_head_kv = n_head_kv;
    c.pos.assign((size_t) n_groups * n_head_kv * c.n_kv, -1);
    c.valid.assign(c.n_kv, 0.0f);
    const int32_t recorded_rows = rec.n_groups * rec.n_head_kv;  // one group's records serve every group
    for (int32_t i = 0; i < c.n_kv; ++i) {
        const bool used = !cells.is_empty(i);
        const bool in_records = i < rec.n_cells() && rec.cell_pos[i] >= 0;
        const bool compacted = in_records && (used ? cells.pos_get(i) == rec.cell_pos[i] : before >= 0);
        if (!used && !compacted) {
            continue;
        }
        bool any = false;
        for (int32_t r = 0; r < n_groups * n_head_kv; ++r) {
            llama_pos q = compacted ? rec.head_pos[(size_t) (r % recorded_rows) * rec.n_cells() + i] : cells.pos_get(i);
            if (before >= 0 && q >= before) {
                q = -1;  // past the cut
            }
            c.pos[(size_t) r * c.n_kv + i] = q;
            c.newest = std::max(c.newest, q);
            any = any || q >= 0;
        }
        if (any) {
            c.valid[i] = 1.0f;
        }
    }
    return c;
}

int32_t triattention_candidates::min_row_tokens() const {
    int32_t fewest = n_kv;
    for (int64_t r = 0; r < (int64_t) n_groups * n_head_kv; ++r) {
        fewest = std::min(fewest, (int32_t) std::count_if(row(r), row(r) + n_kv, [](llama_pos p) { return p >= 0; }));
    }
    return fewest;
}
