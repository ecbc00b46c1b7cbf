// The Hadamard rotation llama.cpp may apply to cached keys (llama_kv_cache attn_rot_k).
#pragma once

#include <cmath>

// In-place orthonormal Walsh-Hadamard transform (Sylvester order, like llama.cpp's
// rotation matrix, which is symmetric: applying it again undoes the rotation).
inline void triattn_fwht(float * x, int n) {
    for (int len = 1; len < n; len <<= 1) {
        for (int i = 0; i < n; i += len << 1) {
            for (int j = i; j < i + len; ++j) {
                const float a = x[j];
                const float b = x[j + len];
                x[j]       = a + b;
                x[j + len] = a - b;
            }
        }
    }
    const float scale = 1.0f / std::sqrt((float) n);
    for (int i = 0; i < n; ++i) {
        x[i] *= scale;
    }
}
