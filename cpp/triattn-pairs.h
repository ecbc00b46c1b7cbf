// Where the two dims of rotary pair f of a head are, for host and device code.
#pragma once

#ifdef __CUDACC__
#define TRIATTN_HOST_DEVICE __host__ __device__
#else
#define TRIATTN_HOST_DEVICE
#endif

// NORM rotates adjacent dims (2f, 2f+1); NEOX pairs f with f + n_rot/2. The dims after
// n_rot (a partial RoPE) are not rotated and are paired adjacently after the rotated ones.
static inline TRIATTN_HOST_DEVICE void triattn_pair_dims(int f, bool neox, int n_rot, int * re, int * im) {
    const int half_rot = n_rot / 2;
    if (f < half_rot) {
        *re = neox ? f : 2 * f;
        *im = neox ? f + half_rot : 2 * f + 1;
    } else {
        *re = n_rot + 2 * (f - half_rot);
        *im = *re + 1;
    }
}
