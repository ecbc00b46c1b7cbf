// Select modes: from a scorer's scores to the cells each (group, KV head) keeps.
#pragma once

#include "triattention-records.h"
#include "triattention-scorer.h"

#include <vector>

// What is kept whatever the scores say.
struct triattention_keep {
    llama_pos prefix = 0;      // positions below: a prompt kept whole
    llama_pos from   = -1;     // positions from here on (snapkv's window), -1 for none
};

// The candidate cells each row keeps, [group][KV head][budget] with c.n_groups groups: PER_HEAD
// averages the scores over the layers, SHARED over the layers and KV heads (one set for every
// head), PER_LAYER_HEAD takes each layer's own (c.n_groups is then the number of layers). The
// newest token, `keep` and the highest scores are kept; an empty cell never; ties go to the newer
// token.
std::vector<int32_t> triattention_select(int32_t select, const triattention_scores & s, const triattention_candidates & c,
                                         const triattention_keep & keep, int32_t budget);
