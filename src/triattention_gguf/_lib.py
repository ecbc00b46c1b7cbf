"""Load our patched libllama into llama-cpp-python and bind our C API.

llama-cpp-python 0.3.36 is installed without its own native build; its ctypes
loader reads LLAMA_CPP_LIB_PATH for the folder holding libllama. The package's
.pth hook (_libpath) makes it load our library in any import order; here we
install that hook too (for an interpreter started before the package was
installed) and check that what got loaded exports our symbols.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

from triattention_gguf import _libpath


def lib_dir() -> Path:
    """The folder with our libllama: $TRIATTENTION_LIB_PATH, else lib/ inside the package."""
    found = _libpath.lib_dir()
    if found is None:
        raise ImportError(
            f"triattention_gguf's native libraries were not found in {[str(d) for d in _libpath.lib_dirs()]}; "
            "build them with `make setup` (or the pip command in the README), or set "
            f"{_libpath.LIB_ENV} to the folder holding {_libpath.LIB_NAME}")
    return found


def _load_llama_cpp():
    lib_dir()
    _libpath.install()
    import llama_cpp.llama_cpp as bindings

    if not hasattr(bindings._lib, "triattention_api_version"):
        chosen = os.environ.get("LLAMA_CPP_LIB_PATH")
        raise ImportError(
            f"llama_cpp loaded a libllama without TriAttention from {bindings._base_path}: " +
            (f"LLAMA_CPP_LIB_PATH is set ({chosen}); unset it to use the library built with triattention_gguf"
             if chosen else "llama_cpp was imported before triattention_gguf was installed; start a new interpreter"))
    return bindings


llama_cpp_bindings = _load_llama_cpp()
lib: ctypes.CDLL = llama_cpp_bindings._lib


def _bind(name: str, restype, *argtypes) -> None:
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)


_f32p = ctypes.POINTER(ctypes.c_float)
_vp = ctypes.c_void_p
_bind("triattention_api_version", ctypes.c_int32)
_bind("triattention_model_head_dim", ctypes.c_int32, _vp)
_bind("triattention_model_n_rot", ctypes.c_int32, _vp)
_bind("triattention_rope_omega", ctypes.c_int32, _vp, ctypes.c_int32, _f32p)
_bind("triattention_calib_init", _vp, _vp, ctypes.c_bool)
_bind("triattention_calib_free", None, _vp)
_bind("triattention_calib_callback", _vp)
_bind("triattention_calib_n_tokens", ctypes.c_int64, _vp)
_bind("triattention_calib_error", ctypes.c_char_p, _vp)
_bind("triattention_calib_get", None, _vp, _f32p, _f32p, _f32p)
_i32p = ctypes.POINTER(ctypes.c_int32)
_bind("triattention_score_layer", ctypes.c_int32, _vp, ctypes.c_int32, _f32p, _f32p, _f32p, _f32p, _i32p, ctypes.c_int32)
_bind("triattention_cache_k_rotated", ctypes.c_bool, _vp)
_bind("triattention_cache_rows", ctypes.c_int32, _vp, ctypes.c_int32, _f32p, _f32p, ctypes.c_int32)


class Params(ctypes.Structure):
    _fields_ = [("method", ctypes.c_int32), ("budget", ctypes.c_int32), ("divide_length", ctypes.c_int32),
                ("select", ctypes.c_int32), ("seed", ctypes.c_uint32), ("keep_recent", ctypes.c_int32),
                ("horizon", ctypes.c_int32), ("min_concentration", ctypes.c_float)]


class Stats(ctypes.Structure):
    _fields_ = [("compressions", ctypes.c_int64), ("cells_evicted", ctypes.c_int64), ("seconds", ctypes.c_double),
                ("compressed_upto", ctypes.c_int32)]


class CacheInfo(ctypes.Structure):
    _fields_ = [("cells_used", ctypes.c_int32), ("cells_span", ctypes.c_int32), ("cells_capacity", ctypes.c_int32),
                ("bytes", ctypes.c_int64),
                ("swa_cells_capacity", ctypes.c_int32), ("swa_bytes", ctypes.c_int64)]


_bind("triattention_default_params", Params)
_bind("triattention_set_params", ctypes.c_int32, _vp, Params)
_bind("triattention_set_centers", ctypes.c_int32, _vp, _f32p, _f32p, _f32p, ctypes.c_int64)
_bind("triattention_set_clusters", ctypes.c_int32, _vp, _f32p, _f32p, _f32p, ctypes.c_int32, ctypes.c_int64)
_bind("triattention_compress", ctypes.c_int32, _vp)
_bind("triattention_get_cache_info", CacheInfo, _vp)
_bind("triattention_cache_layers", ctypes.c_int32, _vp, _i32p, ctypes.c_int32)
_bind("triattention_cells_before", ctypes.c_int32, _vp, ctypes.c_int32)
_bind("triattention_records_size", ctypes.c_size_t, _vp)
_bind("triattention_records_get", ctypes.c_size_t, _vp, ctypes.c_char_p, ctypes.c_size_t)
_bind("triattention_records_set", ctypes.c_int32, _vp, ctypes.c_char_p, ctypes.c_size_t)
_bind("triattention_get_stats", Stats, _vp)
_bind("triattention_last_kept", ctypes.c_int32, _vp, _i32p, ctypes.c_int32)
_bind("triattention_set_keep_prefix", ctypes.c_int32, _vp, ctypes.c_int32)
_bind("triattention_last_error", ctypes.c_char_p)
_bind("triattention_calib_last", ctypes.c_int32, _vp, ctypes.c_int32, ctypes.c_bool, _f32p, ctypes.c_int64)


def api_version() -> int:
    return lib.triattention_api_version()
