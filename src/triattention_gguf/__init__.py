"""TriAttention KV-cache compression for llama.cpp and GGUF models.

`Llama` is llama_cpp.Llama with kv_compress / kv_budget / kv_divide_length / kv_select.
The package installs a .pth hook that points llama-cpp-python at the patched libllama
built with it, so `llama_cpp` and this package can be imported in any order. Attributes
load lazily: the hook runs at every interpreter start and must stay cheap.
"""
__version__ = "0.1.0"
__all__ = ["Llama", "api_version", "__version__"]


def __getattr__(name: str):
    if name == "Llama":
        from triattention_gguf.llama import Llama

        return Llama
    if name == "api_version":
        from triattention_gguf._lib import api_version

        return api_version
    raise AttributeError(f"module 'triattention_gguf' has no attribute {name!r}")
