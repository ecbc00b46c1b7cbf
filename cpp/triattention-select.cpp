#include "triattention-select.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace {

constexpr float KEEP    = 1e30f;   // score bonus of a token that must stay
constexpr float EVICTED = -1e30f;  // score of an empty cell

// The scores per row [group][head][cell] that the select mode compares.
std::vector<float> aggregate(int32_t select, const triattention_scores & s, const triattention_candidates & c) {
    const size_t per_set = (size_t) c.n_head_kv * c.n_kv;
    if (select == TRIATTENTION_SELECT_PER_LAYER_HEAD) {
        GGML_ASSERT((size_t) s.n_sets * per_set == c.pos.size());
        return s.v;
    }
    std::vector<float> mean(per_set, 0.0f);
    for (int32_t k = 0; k < s.n_sets; ++k) {
        for (size_t i = 0; i < per_set; ++i) {
            mean[i] += s.v[k * per_set + i] / (float) s.n_sets;
        }
    }
    if (select == TRIATTENTION_SELECT_SHARED) {
        for (int32_t i = 0; i < c.n_kv; ++i) {
            float sum = 0.0f;
            for (int32_t hk = 0; hk < c.n_head_kv; ++hk) {
                sum += mean[hk * c.n_kv + i];
            }
            for (int32_t hk = 0; hk < c.n_head_kv; ++hk) {
                mean[hk * c.n_kv + i] = sum / (float) c.n_head_kv;
            }
        }
    }
    return mean;
}

// A non-finite score (infinite weight scales, a RoPE base of 0, absurd centres) would leave the
// sort's order undefined and could evict the newest token: finite scores are clamped under the
// bonus, and a non-finite one becomes its cell's bonus (kept, evicted, or below every finite score).
float with_bonus(float s, float bonus) {
    constexpr float LIMIT = 1e28f;
    return std::isfinite(s) ? std::clamp(s, -LIMIT, LIMIT) + bonus : bonus != 0.0f ? bonus : -10.0f * LIMIT;
}

}  // namespace

std::vector<int32_t> triattention_select(int32_t select, const triattention_scores & s, const triattention_candidates & c,
                                         const triattention_keep & keep, int32_t budget) {
    std::vector<float> scores = aggregate(select, s, c);
    const int64_t n_rows = (int64_t) c.n_groups * c.n_head_kv;
    std::vector<int32_t> kept(n_rows * budget);
    std::vector<int32_t> order(c.n_kv);
    for (int64_t r = 0; r < n_rows; ++r) {
        float * sr = scores.data() + r * c.n_kv;
        const llama_pos * pos = c.row(r);
        for (int32_t i = 0; i < c.n_kv; ++i) {
            const llama_pos p = pos[i];
            const bool stays = p == c.newest || (p >= 0 && p < keep.prefix) || (keep.from >= 0 && p >= keep.from);
            sr[i] = with_bonus(sr[i], p < 0 ? EVICTED : stays ? KEEP : 0.0f);
        }
        std::iota(order.begin(), order.end(), 0);
        // the kept set, in no particular order (compaction does not need one): linear per row
        std::nth_element(order.begin(), order.begin() + (budget - 1), order.end(), [&](int32_t a, int32_t b) {
            return sr[a] != sr[b] ? sr[a] > sr[b] : pos[a] > pos[b];
        });
        std::copy(order.begin(), order.begin() + budget, kept.begin() + r * budget);
    }
    return kept;
}
