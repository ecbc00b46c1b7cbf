"""TriAttention KV-cache compression for llama.cpp and GGUF models.

Importing this package loads the patched libllama built with it into
llama-cpp-python, so import it before `llama_cpp`. `Llama` is llama_cpp.Llama
with kv_compress / kv_budget / kv_divide_length / kv_select.
"""
from triattention_gguf._lib import api_version
from triattention_gguf.llama import Llama

__version__ = "0.1.0"
__all__ = ["Llama", "api_version", "__version__"]
