// What compaction recorded about the cells, and the candidate cells a compression chooses from.
#pragma once

#include "llama-kv-cells.h"

#include <vector>

// After a compaction, cell c holds a different token in each KV head, and with per-layer-head
// selection in each compressed layer too: their true positions, head_pos [group][head][cell],
// with one group (every layer alike) or one per compressed layer. cell_pos is the position the
// compaction gave each cell (the newest of its tokens), to notice when llama.cpp reused the cell.
struct triattention_records {
    std::vector<llama_pos> head_pos;  // [group][head][cell]
    std::vector<llama_pos> cell_pos;  // [cell]
    int32_t   n_groups  = 0;
    int32_t   n_head_kv = 0;
    llama_pos compressed_upto = -1;   // newest position at the last compression, -1 when none

    int32_t n_cells() const { return (int32_t) cell_pos.size(); }

    // What llama.cpp did to the compacted history since the last compression, as the sequence
    // continues at `next`: nothing; cleared the cache (next is 0: the records are void); or cut the
    // sequence inside it: seq_rm freed every cell whose newest token lies past the cut, though most
    // of the tokens in them, each head's and layer's, precede it (with 90 rows per cell, often every
    // cell). Their rows stay in place until the next decode writes there.
    enum class truncation { none, cleared, cut };
    truncation truncation_at(const llama_kv_cells & cells, llama_pos next) const;

    // int32 n_groups, n_head_kv, n_cells, compressed_upto; cell_pos[n_cells]; head_pos[n_groups][n_head_kv][n_cells]
    std::vector<int32_t> serialize() const;
    // false when rec is malformed or its heads are not n_head_kv, or its groups neither 1 nor n_layer
    bool deserialize(const std::vector<int32_t> & rec, int32_t n_head_kv, int32_t n_layer);
};

// The cells [0, n_kv) of sequence 0 as each (group, KV head) sees them. A group is one compressed
// layer under per-layer-head selection, else every layer.
struct triattention_candidates {
    int32_t n_kv      = 0;
    int32_t n_groups  = 1;
    int32_t n_head_kv = 0;
    std::vector<llama_pos> pos;    // [group][head][cell]: the token's position, -1 for an empty cell
    std::vector<float>     valid;  // [cell]: 1 for a used cell
    llama_pos newest  = -1;

    const llama_pos * row(int64_t r) const { return pos.data() + r * n_kv; }  // r = group * n_head_kv + head
    const llama_pos * row(int32_t group, int64_t head) const { return row(group * (int64_t) n_head_kv + head); }

    // The fewest tokens any row holds.
    int32_t min_row_tokens() const;
};

// Candidates in n_groups groups (1, or the compressed layers when rec has one group per layer).
// before < 0: the used cells. Else after a cut inside the compacted history (truncation_at): the cells
// the cut freed count too, with the rows recorded in them, and only tokens before `before`.
triattention_candidates triattention_gather(const triattention_records & rec, const llama_kv_cells & cells,
                                            int32_t n_head_kv, int32_t n_groups, llama_pos before);
