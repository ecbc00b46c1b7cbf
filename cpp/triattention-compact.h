// Compaction: moving the kept K and V rows of every compressed layer into the front cells.
#pragma once

#include "triattention-impl.h"

#include <vector>

// Where each row's (group, KV head) kept cells go: those below `budget` stay where they are and
// those above it fill the evicted cells below it, so a compaction moves at most n_kv - budget
// cells per row.
struct triattention_moves {
    std::vector<int32_t> layout;  // [row][budget]: the candidate cell that cell j now holds
    std::vector<int32_t> src;     // [row][n]: the cells moved from
    std::vector<int32_t> dst;     // [row][n]: and to; a row with fewer than n moves copies one of
    int32_t n = 0;                // its staying cells onto itself
};

// kept: [row][budget] candidate cells, rows = groups x KV heads.
triattention_moves triattention_fill_holes(const std::vector<int32_t> & kept, int64_t n_rows, int32_t budget);

// Carries out the moves in every compressed layer of kv with graph ops on its backends; with
// n_groups > 1 layer li moves the rows of group li. Returns false (with triattention_fail) on failure.
bool triattention_compact(llama_context * ctx, llama_kv_cache * kv, const triattention_moves & m, int32_t n_groups);
