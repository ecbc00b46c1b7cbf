"""TriAttention's key scores (algorithm.md §4) computed from Python: the reference and
diagnostic path beside the engine, which builds the same virtual queries in C++
(cpp/triattention-scorer-tri.cpp) at every compression.

The trigonometric term needs no inverse RoPE: for a cached (rotated) key k'
at position p, S_trig = Re sum_f conj(k'_f) V_f with
V_f = qbar_f e^{i w_f t} mean_{delta in D} e^{i w_f delta}, one "virtual query"
per (layer, query head) at the compression point t. The norm term weights
each band's key magnitude by a_f - |qbar_f|.
"""
from __future__ import annotations

import ctypes

import numpy as np

from triattention_gguf._lib import lib, llama_cpp_bindings as ll
from triattention_gguf.centers import Centers
from triattention_gguf.methods import MAX_HORIZON


def future_offsets(horizon: int) -> np.ndarray:
    """The geometric offsets 1, 2, 4, ... <= horizon of the future query positions."""
    return 2.0 ** np.arange(horizon.bit_length())


OFFSETS = future_offsets(MAX_HORIZON)  # the reference's 17


def pairs_to_real(z: np.ndarray, rope_type: str, n_rot: int) -> np.ndarray:
    """[..., head_dim/2] complex -> [..., head_dim] real in the model's rotary pair layout:
    NORM pairs (2f, 2f+1), NEOX pairs (f, f + n_rot/2); unrotated tail pairs are adjacent."""
    half_rot = n_rot // 2
    x = np.empty(z.shape[:-1] + (2 * z.shape[-1],), dtype=np.float64)
    if rope_type == "neox":
        x[..., :half_rot] = z[..., :half_rot].real
        x[..., half_rot:n_rot] = z[..., :half_rot].imag
    else:
        x[..., 0:n_rot:2] = z[..., :half_rot].real
        x[..., 1:n_rot:2] = z[..., :half_rot].imag
    x[..., n_rot::2] = z[..., half_rot:].real
    x[..., n_rot + 1::2] = z[..., half_rot:].imag
    return x


def real_to_pairs(x: np.ndarray, rope_type: str, n_rot: int) -> np.ndarray:
    """The inverse of pairs_to_real: [..., head_dim] real -> [..., head_dim/2] complex."""
    half_rot = n_rot // 2
    if rope_type == "neox":
        rotated = x[..., :half_rot] + 1j * x[..., half_rot:n_rot]
    else:
        rotated = x[..., 0:n_rot:2] + 1j * x[..., 1:n_rot:2]
    return np.concatenate([rotated, x[..., n_rot::2] + 1j * x[..., n_rot + 1::2]], axis=-1)


def virtual_queries(centers: Centers, omega: np.ndarray, t: int,
                    offsets: np.ndarray = OFFSETS) -> tuple[np.ndarray, np.ndarray]:
    """(q [n_layer, n_head * n_clusters, head_dim], w [n_layer, n_head * n_clusters, head_dim/2])
    float32 for position t, one row per (query head, cluster), a head's clusters adjacent.
    omega: [n_layer, head_dim/2] angular frequencies (0 for unrotated pairs)."""
    omega = omega.astype(np.float64)
    phase = np.exp(1j * omega * t) * np.exp(1j * omega[..., None] * offsets).mean(axis=-1)
    mean = centers.cluster_mean.reshape(centers.n_layer, -1, centers.head_dim // 2).astype(np.complex128)
    magnitude = centers.cluster_abs_mean.reshape(mean.shape).astype(np.float64)
    q = pairs_to_real(mean * phase[:, None, :], centers.rope_type, centers.n_rot).astype(np.float32)
    w = (magnitude - np.abs(mean)).astype(np.float32)
    return q, w


def score_cache_layer(ctx, il: int, q: np.ndarray, w: np.ndarray, n_head_kv: int,
                      n_max: int = 1 << 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run the scoring op on layer il of a live context's cache (sequence 0).
    Returns scores [n_head, n_cells], the keys as stored in f32 [n_cells, n_head_kv, head_dim]
    and the cells' positions [n_cells] (-1 where empty)."""
    n_head, head_dim = q.shape
    n_max = min(n_max, ll.llama_n_ctx(ctx))
    q = np.ascontiguousarray(q, dtype=np.float32)
    w = np.ascontiguousarray(w, dtype=np.float32)
    scores = np.zeros((n_head, n_max), dtype=np.float32)
    keys = np.zeros((n_max, n_head_kv, head_dim), dtype=np.float32)
    pos = np.zeros(n_max, dtype=np.int32)
    f32p, i32p = ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_int32)
    n = lib.triattention_score_layer(ctx, il, q.ctypes.data_as(f32p), w.ctypes.data_as(f32p),
                                     scores.ctypes.data_as(f32p), keys.ctypes.data_as(f32p),
                                     pos.ctypes.data_as(i32p), n_max)
    if n < 0:
        raise RuntimeError(f"triattention_score_layer: {lib.triattention_last_error().decode()}")
    # the op wrote [n_head][n] contiguously
    return scores.reshape(-1)[: n_head * n].reshape(n_head, n), keys[:n], pos[:n]
