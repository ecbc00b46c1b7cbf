"""Turn on KV-cache compression for a llama_context* and read what it did (C API wrappers)."""
from __future__ import annotations

import ctypes

import numpy as np

from triattention_gguf._lib import lib, llama_cpp_bindings as ll
from triattention_gguf.methods import DEFAULT_SELECT, MAX_HORIZON, METHODS, MIN_CONCENTRATION, SELECT_MODES
from triattention_gguf.centers import Centers

_f32p, _i32p = ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_int32)


class CompressionError(ValueError):
    pass


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise CompressionError(f"{what}: {lib.triattention_last_error().decode()}")


def check_arguments(method: str, budget: int, divide_length: int, select: str, keep_recent: int = 0,
                    horizon: int = MAX_HORIZON, min_concentration: float = MIN_CONCENTRATION) -> None:
    """Refuse bad compression arguments with a message that says what to pass instead."""
    if method not in METHODS:
        raise CompressionError(f"unknown kv_compress {method!r}; choose one of {', '.join(METHODS)}")
    if select not in SELECT_MODES:
        raise CompressionError(f"unknown kv_select {select!r}; choose one of {', '.join(SELECT_MODES)}")
    if budget < 5 or divide_length < 1:
        raise CompressionError(f"kv_budget must be at least 5 and kv_divide_length at least 1 "
                               f"(got {budget} and {divide_length})")
    if not 0 <= keep_recent <= budget:
        raise CompressionError(f"kv_keep_recent must be between 0 and kv_budget {budget} (got {keep_recent})")
    if not 1 <= horizon <= MAX_HORIZON:
        raise CompressionError(f"kv_horizon must be between 1 and {MAX_HORIZON} tokens (got {horizon})")
    if horizon != MAX_HORIZON and method != "tri":
        raise CompressionError(f"kv_horizon is tri's; kv_compress {method!r} has no predicted queries")
    if not 0.0 <= min_concentration <= 1.0:  # NaN too
        raise CompressionError(f"kv_min_concentration must be between 0 and 1 (got {min_concentration}); "
                               f"0 scores every head by its centres")
    if min_concentration != MIN_CONCENTRATION and method != "tri":
        raise CompressionError(f"kv_min_concentration is tri's; kv_compress {method!r} has no calibrated centres")


CELL_PAGE = 256  # llama.cpp rounds a context's cells up to a multiple of this


def prompt_ubatch(budget: int, divide_length: int, largest: int = 512) -> int:
    """The largest ubatch (at most `largest`) for which a compressed cache of budget + divide_length
    + ubatch cells is a whole number of llama.cpp's pages, so that its rounding adds no unused cells."""
    return largest - (budget + divide_length + largest) % CELL_PAGE


def physical_cells(budget: int, divide_length: int, n_ubatch: int, n_swa: int = 0) -> int:
    """The cells a compressed context needs: budget + divide_length + one ubatch. llama.cpp sizes a
    sliding-window model's window cache from the same n_ctx, and that must hold the window and a ubatch."""
    return max(budget + divide_length + n_ubatch, n_swa + n_ubatch if n_swa else 0)


def _flat_f32(*arrays: np.ndarray) -> list[np.ndarray]:
    return [np.ascontiguousarray(a, dtype=np.float32).reshape(-1) for a in arrays]


def configure(ctx, method: str, budget: int = 2048, divide_length: int = 128, select: str = DEFAULT_SELECT,
              seed: int = 0, centers: Centers | None = None, keep_recent: int = 0, horizon: int = MAX_HORIZON,
              min_concentration: float = MIN_CONCENTRATION) -> None:
    """Compress ctx's cache with `method` to `budget` cells whenever budget + divide_length is reached,
    never evicting the newest keep_recent tokens; tri predicts the queries up to `horizon` tokens ahead,
    and scores the heads whose concentration is below min_concentration by recency and observed attention."""
    check_arguments(method, budget, divide_length, select, keep_recent, horizon, min_concentration)
    if centers is not None:
        set_centers(ctx, centers)
    params = lib.triattention_default_params()
    params.method, params.budget, params.divide_length = METHODS[method], budget, divide_length
    params.select, params.seed, params.keep_recent, params.horizon = SELECT_MODES[select], seed, keep_recent, horizon
    params.min_concentration = min_concentration
    _check(lib.triattention_set_params(ctx, params), "compression parameters")


def set_centers(ctx, centers: Centers) -> None:
    """Give ctx's compression the centres and query clusters tri scores with. Set after tri's
    parameters, they also choose its spread heads anew (its snapkv window of them starts again)."""
    arrays = _flat_f32(centers.q_mean.real, centers.q_mean.imag, centers.q_abs_mean)
    _check(lib.triattention_set_centers(ctx, *(a.ctypes.data_as(_f32p) for a in arrays), arrays[0].size), "centres")
    arrays = _flat_f32(centers.cluster_mean.real, centers.cluster_mean.imag, centers.cluster_abs_mean)
    _check(lib.triattention_set_clusters(ctx, *(a.ctypes.data_as(_f32p) for a in arrays), centers.n_clusters,
                                         arrays[0].size), "query clusters")


def keep_prefix(ctx, n: int) -> None:
    """Never evict positions [0, n) (0: none); they must fit in the budget beside the kept recent tokens."""
    _check(lib.triattention_set_keep_prefix(ctx, n), "kept prefix")


def keep_prompt(ctx, n: int, budget: int, keep_recent: int = 0) -> bool:
    """Never evict a prompt of n tokens when it fits (beside the keep_recent newest tokens, or
    at least the newest), else keep nothing; whether it fits."""
    fits = n + max(keep_recent, 1) <= budget
    keep_prefix(ctx, n if fits else 0)
    return fits


def compress(ctx) -> None:
    _check(lib.triattention_compress(ctx), "compression")


def stats(ctx) -> dict:
    s = lib.triattention_get_stats(ctx)
    return {"compressions": s.compressions, "cells_evicted": s.cells_evicted, "compress_seconds": s.seconds,
            "compressed_upto": s.compressed_upto}


def last_kept(ctx, n_head_kv: int, budget: int) -> np.ndarray:
    """[group, n_head_kv, budget] cell indices (before the last compression) that it kept: one
    group per compressed layer with per-layer-head selection, else one."""
    out = np.zeros(len(compressed_layers(ctx)) * n_head_kv * budget, dtype=np.int32)
    n = lib.triattention_last_kept(ctx, out.ctypes.data_as(_i32p), out.size)
    if n <= 0 or n % (n_head_kv * budget):
        raise CompressionError("no compression has happened with these dimensions")
    return out[:n].reshape(-1, n_head_kv, budget)


def head_positions(ctx) -> np.ndarray:
    """[group, n_head_kv, n_cells]: the position of the token that each cell written by the last
    compaction holds in each KV head (of each compressed layer with per-layer-head selection, else
    one group), -1 where none (no cells before the first compression)."""
    size = lib.triattention_records_size(ctx)
    buf = ctypes.create_string_buffer(size)
    lib.triattention_records_get(ctx, buf, size)
    rec = np.frombuffer(buf.raw, dtype=np.int32)
    n_groups, n_head_kv, n_cells = int(rec[0]), int(rec[1]), int(rec[2])
    return rec[4 + n_cells:].reshape(n_groups, n_head_kv, n_cells).copy()


def compressed_layers(ctx) -> list[int]:
    """The layers whose cache compression works on: every layer, or only the full-attention
    layers of a sliding-window model (llama.cpp keeps their window-sized cache apart)."""
    out = np.zeros(1024, dtype=np.int32)
    n = lib.triattention_cache_layers(ctx, out.ctypes.data_as(_i32p), out.size)
    return out[:n].tolist()


def cache_rows(ctx, il: int, k_width: int, v_width: int) -> tuple[np.ndarray, np.ndarray]:
    """Layer il's cached K and V (f32, [n_cells, n_head_kv * head_dim]) of sequence 0's stream."""
    n_max = ll.llama_n_ctx(ctx)
    k = np.zeros((n_max, k_width), dtype=np.float32)
    v = np.zeros((n_max, v_width), dtype=np.float32)
    n = lib.triattention_cache_rows(ctx, il, k.ctypes.data_as(_f32p), v.ctypes.data_as(_f32p), n_max)
    if n < 0:
        raise CompressionError(lib.triattention_last_error().decode())
    return k[:n], v[:n]
